"""potion: train a small GPT on your own text, sample from it, and look inside."""

from potion.config import DataConfig, ModelConfig, RunConfig, SamplingConfig, TrainConfig
from potion.errors import PotionError
from potion.explain import Explanation, explain
from potion.formats.run import LoadedRun, load
from potion.infer.chat import Chat
from potion.infer.generate import generate_text
from potion.model import GPT

__all__ = [
    "GPT",
    "Chat",
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
