"""Stopping a training from outside without losing it: the first Ctrl-C lets the loop finish its step, evaluate,
save and stop; a second one aborts at once."""

from __future__ import annotations

import signal
import sys
import threading

from tqdm import tqdm


class StopRequest(threading.Event):
    """Set by the first Ctrl-C: the loop finishes its step, evaluates, saves and stops. A second Ctrl-C aborts."""

    previous = None

    @classmethod
    def install(cls) -> StopRequest:
        request = cls()
        if threading.current_thread() is threading.main_thread():
            request.previous = signal.signal(signal.SIGINT, request.on_signal)
        return request

    def on_signal(self, signum, frame) -> None:
        if self.is_set():
            raise KeyboardInterrupt
        self.set()
        tqdm.write(
            "\npotion: Ctrl-C: finishing this step, then saving (press Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
