"""How generation picks tokens and when it stops (torch-free, as every config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from potion.config.checks import check_seed
from potion.errors import PotionError

MAX_DRAFT_TOKENS = 16  # one check's products stay a few rows, where packed weights keep their speed
DECODE_DTYPES = ("auto", "fp32", "bf16")  # auto, or a name in hardware.DTYPES (kept torch-free here)


@dataclass(frozen=True)
class SamplingConfig:
    """How generation picks tokens and when it stops."""

    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 = greedy: always the most likely token
    top_k: int | None = None  # None = off; else only the k most likely tokens can be drawn
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    num_samples: int = 1
    decode_dtype: str = "auto"  # precision of the weights in one-token decode steps: auto | fp32 | bf16
    # speculative decoding: tokens a 4-bit copy of the model drafts before each check; None = where it pays
    # (a CPU, one sequence, weights too big for the caches), 0 = off. The output is the same either way.
    draft_tokens: int | None = None

    def __post_init__(self):
        self.check_types()
        if self.max_new_tokens < 0:
            raise PotionError(
                f"max_new_tokens must not be negative, got {self.max_new_tokens}", setting="max_new_tokens"
            )
        if not self.temperature >= 0:  # also catches NaN
            raise PotionError(
                f"temperature must be 0 (greedy) or positive, got {self.temperature}", setting="temperature"
            )
        if self.top_k is not None and self.top_k < 1:
            raise PotionError(
                f"top_k must be at least 1 (leave it out for no limit), got {self.top_k}", setting="top_k"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise PotionError(f"top_p must be in (0, 1], got {self.top_p}", setting="top_p")
        if self.num_samples < 1:
            raise PotionError(f"num_samples must be at least 1, got {self.num_samples}", setting="num_samples")
        if self.seed is not None:
            check_seed(self.seed, "seed", setting="seed")
        if self.draft_tokens is not None and not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise PotionError(
                f"draft_tokens must be from 0 (off) to {MAX_DRAFT_TOKENS}, got {self.draft_tokens}",
                setting="draft_tokens",
            )
        if self.decode_dtype not in DECODE_DTYPES:
            raise PotionError(
                f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got {self.decode_dtype!r}",
                setting="decode_dtype",
            )

    def check_types(self) -> None:
        """Numbers of their type (an int is taken where a float is expected), floats finite, stop strings text."""
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, value := float(value))  # frozen: this is its construction
            if type(value) is not float or not math.isfinite(value):
                raise PotionError(f"{name} must be a finite number, got {value!r}", setting=name)
        for name in ("max_new_tokens", "top_k", "seed", "num_samples", "draft_tokens"):
            value = getattr(self, name)
            if type(value) is not int and not (value is None and name in ("top_k", "seed", "draft_tokens")):
                raise PotionError(f"{name} must be an integer, got {value!r}", setting=name)
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise PotionError(f"stop must be a list of strings, got {self.stop!r}", setting="stop")
