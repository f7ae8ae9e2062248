"""potion: train a small GPT on your own text, sample from it, and look inside."""

from .config import DataConfig, ModelConfig, RunConfig, SamplingConfig, TrainConfig
from .errors import PotionError
from .explain import Explanation, explain
from .generate import generate_text
from .model import GPT
from .run import LoadedRun, load

__all__ = [
    "GPT",
    "DataConfig",
    "Explanation",
    "LoadedRun",
    "ModelConfig",
    "PotionError",
    "RunConfig",
    "SamplingConfig",
    "TrainConfig",
    "explain",
    "generate_text",
    "load",
]
__version__ = "0.1.0"
