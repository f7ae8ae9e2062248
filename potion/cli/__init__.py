"""The `potion` command. It parses arguments and calls the modules; a PotionError becomes one line on stderr
and exit code 2 (`--debug` shows the traceback).

Conventions shared by every command: `--model DIR` is a run directory (default: the latest under ./runs), `--json`
prints one JSON object on stdout and nothing else there, and files are written only where a flag names them.
arguments.py holds the parser, commands.py what each command does.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from potion.cli.arguments import build_parser
from potion.errors import PotionError


def with_flag(error: PotionError, args: argparse.Namespace) -> str:
    """The error's message, with the setting it names written as the flag the user typed (temperature ->
    --temperature) when this command has that flag."""
    message, setting = str(error), error.setting
    if setting is None or setting not in vars(args):
        return message
    return re.sub(rf"\b{re.escape(setting)}\b", "--" + setting.replace("_", "-"), message, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"potion: warning: {message}", file=sys.stderr)
    try:
        return args.func(args)
    except PotionError as e:
        if args.debug:
            raise
        message = " ".join(with_flag(e, args).splitlines())  # one line, whatever text from a file it quotes
        print(f"potion: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a second Ctrl-C (or SIGTERM) during training, or one outside it
        print("\npotion: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
