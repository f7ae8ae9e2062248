"""The checks that have a GPU variant: run on CUDA by scripts/gpu-check, skipped where there is no GPU.

POTION_TEST_DEVICE=cpu runs the same checks on the CPU, so that they are known to work before a GPU is at hand.
What a GPU changes: bf16 autocast and flash attention (SDPA), fused AdamW, torch.compile by default, pinned
host-to-device copies, and queued work that a read of a tensor's value waits for.
"""

import importlib
import json
import os
import subprocess
import traceback
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_robust import nan_loss_at, tiny_config, tiny_training_argv
from torch.nn.attention import SDPBackend, sdpa_kernel

import potion.train.checkpoint as ckpt
from potion import GPT, ModelConfig
from potion.model.record import recording
from potion.train.loop import train
from potion.train.optim import has_fused_adamw

training_loop = importlib.import_module("potion.train.loop")
DEVICE = torch.device(os.environ.get("POTION_TEST_DEVICE", "cuda"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here (scripts/gpu-check runs these on one)", allow_module_level=True)
ON_DEVICE = [f"device={DEVICE.type}", "compile=off"]  # compiling is checked once, on its own
BF16 = DEVICE.type == "cuda" and torch.cuda.is_bf16_supported()


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, context_length=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0, **kw)
    return GPT(config).to(DEVICE).eval()


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_decoding_equals_recomputation(dtype, positions):
    model = small_model(positions=positions).to(dtype)
    idx = torch.randint(0, 50, (2, 40), device=DEVICE)
    with torch.no_grad():
        full = model(idx).float()
        cache = model.new_cache(2)
        steps = [model(idx[:, :24], cache=cache)[:, -1]]
        steps += [model(idx[:, t : t + 1], cache=cache)[:, -1] for t in range(24, 40)]
    torch.testing.assert_close(torch.stack(steps, 1).float(), full[:, 23:], **tolerance(dtype))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_equals_explicit_attention_under_autocast(qk_norm):
    model = small_model(positions="rope", qk_norm=qk_norm)
    idx = torch.randint(0, 50, (2, 64), device=DEVICE)
    dtype = torch.bfloat16 if BF16 or DEVICE.type == "cpu" else torch.float32
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        with recording(model):
            explicit = model(idx).float()
        fast = model(idx).float()
        if BF16:  # the kernel training uses on a GPU: it must run here, not silently fall back
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                flash = model(idx).float()
            torch.testing.assert_close(flash, explicit, **tolerance(dtype))
    torch.testing.assert_close(fast, explicit, **tolerance(dtype))


def test_resume_continues_the_run_within_bf16_tolerance(corpus, tmp_path, monkeypatch):
    settings = [*ON_DEVICE, "max_steps=40", "eval_every=10", "dropout=0.1"]
    whole = train(tiny_config(corpus, *settings), tmp_path / "whole", quiet=True)
    real_stop = training_loop.stop_requested
    monkeypatch.setattr(
        training_loop, "stop_requested", lambda t, out_of_time=False: t.state.step >= 20 or real_stop(t, out_of_time)
    )
    train(tiny_config(corpus, *settings), tmp_path / "resumed", quiet=True)
    monkeypatch.undo()
    resumed = train(tiny_config(corpus, *settings), tmp_path / "resumed", resume=True, quiet=True)
    assert whole["steps"] == resumed["steps"] == 40
    final = [
        load_file(str(ckpt.complete_checkpoints(tmp_path / run)[-1] / "model.safetensors"))
        for run in ("whole", "resumed")
    ]
    for name, weight in final[0].items():
        torch.testing.assert_close(final[1][name], weight, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nan_steps_are_dropped_on_the_device(corpus, tmp_path, monkeypatch, optimizer):
    assert has_fused_adamw(DEVICE.type), "the fused AdamW kernel, which can drop a step without a host sync"
    nan_loss_at(monkeypatch, {7, 8})
    config = tiny_config(corpus, *ON_DEVICE, f"optimizer={optimizer}", "max_steps=20", "eval_every=10")
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["steps"] == 20 and summary["nonfinite_steps"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "run" / "model.safetensors")).values())


def test_training_steps_do_not_wait_for_the_device(corpus, tmp_path):
    """60 steps read the loss back every 10 steps, never once per step."""
    config = tiny_config(corpus, *ON_DEVICE, "max_steps=60", "eval_every=1000")
    if DEVICE.type != "cuda":
        pytest.skip("a CPU reads the counts back at every step, where a read costs nothing (host_read_interval)")
    # torch's own report of every host sync, .tolist() included. Only the steps count: saving weights at an
    # evaluation or checkpoint copies each tensor to the host (and waits for it), as it must.
    step_phases = {"train_one_step", "log_progress"}
    syncs_in_steps = []

    def note(message, *args, **kwargs):
        if "synchroniz" in str(message):
            frames = traceback.extract_stack()
            if step_phases & {f.name for f in frames}:
                syncs_in_steps.append(" <- ".join(f"{f.name}:{f.lineno}" for f in frames[::-1][1:5]))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            train(config, tmp_path / "run", quiet=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(syncs_in_steps) < 30, syncs_in_steps[:5]


def test_compiled_training_learns_and_matches_eager(corpus, tmp_path):
    def val_losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in rows if r["kind"] == "eval"]

    settings = ["max_steps=30", "eval_every=15"]
    train(tiny_config(corpus, f"device={DEVICE.type}", "compile=on", *settings), tmp_path / "compiled", quiet=True)
    train(tiny_config(corpus, *ON_DEVICE, *settings), tmp_path / "eager", quiet=True)
    compiled, eager = val_losses(tmp_path / "compiled"), val_losses(tmp_path / "eager")
    assert compiled[-1] < compiled[0] - 0.5  # it learns
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0.02)  # the same function, the same steps


def test_an_eager_run_never_imports_the_compilers_cuda_graphs(corpus, tmp_path):
    """With compile=off nothing calls into torch's CUDA-graph machinery, whose import costs about a second of the
    run's start (measured on a CPU: 0.84 s)."""
    argv = tiny_training_argv(corpus, "--out", tmp_path / "run", "--set", "max_steps=3", "--set", "eval_every=1000")
    argv[1:1] = ["-X", "importtime"]  # every module the run imports, on stderr
    argv += [a for setting in ON_DEVICE for a in ("--set", setting)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch._inductor.cudagraph_trees" not in done.stderr
