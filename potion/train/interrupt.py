"""Stopping a training from outside without losing it.

The first Ctrl-C (SIGINT), SIGTERM or SIGUSR1 lets the loop finish its step, evaluate, save and stop; a second one
aborts at once. SIGTERM is what cluster schedulers (Slurm, Kubernetes, spot instances) send before they kill a
job, and Slurm sends SIGUSR1 ahead of the time limit when asked to (`#SBATCH --signal=USR1@90`).

A training stopped by a scheduler's signal exits with 128 + the signal's number (143 for SIGTERM, 138 for
SIGUSR1), the code a shell gives a process ended by that signal: the job did not finish, and a Kubernetes Job or
a retry loop must not take it for done; the checkpoint is on disk all the same. A Ctrl-C is a person's own
choice to stop, and exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from tqdm import tqdm

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Aborted(KeyboardInterrupt):
    """A second stop signal: the training ends at once, without saving; the exit code is 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest(threading.Event):
    """Set by the first stop signal: the loop finishes its step, evaluates, saves and stops. A second one aborts."""

    def __init__(self):
        super().__init__()
        self.previous: dict[int, object] = {}
        self.signum: int | None = None  # the signal that asked for the stop
        self.first_signal_at = 0.0  # time.monotonic() of that signal
        self.announce = True  # say on the terminal that the training is stopping

    @classmethod
    def install(cls) -> StopRequest:
        request = cls()
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                request.previous[signum] = signal.signal(signum, request.on_signal)
        return request

    def on_signal(self, signum, frame) -> None:
        if self.is_set():
            raise Aborted(signum)
        self.signum, self.first_signal_at = signum, time.monotonic()
        self.set()
        if not self.announce:
            return
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
        tqdm.write(
            f"\npotion: {name}: finishing this step, then saving ({again} to abort without saving)", file=sys.stderr
        )

    @property
    def signal_name(self) -> str | None:
        """SIGINT, SIGTERM or SIGUSR1: what asked for the stop (None: nothing did)."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self.previous = {}


def exit_code(signal_name: str | None) -> int:
    """A stopped training's exit code: 0 when nothing or a Ctrl-C stopped it; 128 + the signal's number when a
    scheduler's signal did."""
    if signal_name is None or signal_name == "SIGINT":
        return 0
    return 128 + signal.Signals[signal_name].value
