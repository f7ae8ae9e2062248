"""The one exception type for mistakes a user can fix (bad data, bad flags, a missing run, a missing extra)."""

from __future__ import annotations


class PotionError(Exception):
    """A problem with the user's input. The command line prints its message as one line and exits with code 2.

    `setting` names the option the message is about (e.g. "temperature") when there is one: library messages
    speak of settings, and the command line puts its flag (--temperature) in their place.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


def require(module: str, extra: str, needed_for: str):
    """Import an optional dependency, or say in one line which extra brings it: core potion trains and samples with
    torch, numpy, tokenizers, safetensors and tqdm alone."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PotionError(
            f'{needed_for} needs {module}, which is not installed: pip install "potion[{extra}]"'
        ) from None
