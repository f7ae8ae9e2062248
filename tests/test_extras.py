"""Core potion works without its optional extras, and a command that needs a missing one names it in one line."""

import subprocess
import sys

from tiny_settings import TINY

# Runs potion's command line with some modules made unimportable, as on a machine where they were never installed
WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # `import name` now raises ImportError
from potion.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def potion_without(modules: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT, modules, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_serve_without_its_extra_names_the_install_in_one_line(tmp_path):
    done = potion_without("uvicorn", "serve", "--model", str(tmp_path / "no-such-run"))
    assert done.returncode == 2
    expected = 'potion serve needs uvicorn, which is not installed: pip install "potion[serve]"'
    assert done.stderr.strip() == f"potion: error: {expected}"


def test_a_hub_name_without_huggingface_hub_names_the_install(tmp_path):
    done = potion_without("huggingface_hub", "generate", "--model", "someone/some-model", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert 'pip install "potion[hf]"' in done.stderr


def test_training_without_matplotlib_trains_and_says_once_that_loss_png_is_not_drawn(tmp_path, shakespeare):
    settings = [f"--set={s}" for s in TINY + ["max_steps=4", "eval_every=2"]]
    run = tmp_path / "run"
    done = potion_without("matplotlib", "train", "--data", str(shakespeare), "--out", str(run), *settings)
    assert done.returncode == 0, done.stderr
    assert (run / "model.safetensors").exists() and not (run / "loss.png").exists()
    assert done.stderr.count('matplotlib is not installed (pip install "potion[plot]")') == 1
