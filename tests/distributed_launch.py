"""`potion` as the distributed tests start it (under torchrun, or as any launcher would), with two hooks a test
turns on by environment variables:

    POTION_TEST_AUDIT=DIR         each process records every path it opens for writing, renames, makes or removes
                                  (Python's audit events) in DIR/rank-R.txt when it exits
    POTION_TEST_FAIL_RANK=R       rank R raises a PotionError at training step POTION_TEST_FAIL_STEP (default 5)
"""

import atexit
import importlib
import os
import sys

from potion.cli import main
from potion.errors import PotionError

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITING_EVENTS = {"os.rename": 1, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0}  # path arg


def record_writes(folder: str) -> None:
    written: list[str] = []
    recording = [True]

    def hook(event, args):
        if not recording[0]:
            return
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
                written.append(path)
        elif event in WRITING_EVENTS:
            written.append(args[WRITING_EVENTS[event]])
            if event == "os.rename":
                written.append(args[0])

    def save():
        recording[0] = False
        paths = [os.path.abspath(os.fsdecode(p)) for p in written if isinstance(p, (str, bytes, os.PathLike))]
        with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write("\n".join(paths))

    atexit.register(save)
    sys.addaudithook(hook)


def fail_on_rank(rank: str, at_step: int) -> None:
    if os.environ.get("RANK") != rank:
        return
    train = importlib.import_module("potion.train.loop")
    one_step = train.train_one_step

    def failing_step(t):
        if t.state.step == at_step:
            raise PotionError(f"a fault planted by the test at step {at_step}")
        one_step(t)

    train.train_one_step = failing_step


if __name__ == "__main__":
    if os.environ.get("POTION_TEST_AUDIT"):
        record_writes(os.environ["POTION_TEST_AUDIT"])
    if os.environ.get("POTION_TEST_FAIL_RANK"):
        fail_on_rank(os.environ["POTION_TEST_FAIL_RANK"], int(os.environ.get("POTION_TEST_FAIL_STEP", "5")))
    sys.exit(main(sys.argv[1:]))
