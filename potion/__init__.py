"""potion: train a small GPT on your own text, sample from it, and look inside."""

from .checkpoint import load
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import PotionError
from .explain import explain
from .explanation import Explanation
from .generate import SamplingConfig, generate_text
from .model import GPT

__all__ = ["GPT", "DataConfig", "Explanation", "ModelConfig", "PotionError", "RunConfig", "SamplingConfig", "TrainConfig",
           "explain", "generate_text", "load"]
__version__ = "0.1.0"
