"""What the progress bar and the logs say of a run's speed: the time left to its end, and MFU against the best
matmul peak, with the size that reached it."""

import json

import pytest
import torch
from tiny_settings import TINY

from potion import hardware
from potion.config import resolve
from potion.formats.run import load
from potion.train.loop import train
from potion.train.report import smoothed, time_left


def test_time_left_is_the_steps_left_at_the_recent_rate():
    assert time_left(step=60, max_steps=100, seconds_per_step=0.5, elapsed=30, max_time=0) == 20
    assert time_left(step=90, max_steps=100, seconds_per_step=0.5, elapsed=10, max_time=600) == 5


def test_time_left_is_what_max_time_leaves_when_that_ends_first():
    assert time_left(step=10, max_steps=100, seconds_per_step=1.0, elapsed=50, max_time=60) == 10
    assert time_left(step=10, max_steps=100, seconds_per_step=1.0, elapsed=70, max_time=60) == 0


def test_time_left_is_nothing_once_the_last_step_is_done_whatever_max_time_leaves():
    assert time_left(step=100, max_steps=100, seconds_per_step=0.5, elapsed=3, max_time=124) == 0


def test_the_rate_is_smoothed_over_recent_windows():
    assert smoothed(None, 2.0) == 2.0  # the first window is all there is
    assert smoothed(1.0, 2.0, weight=0.3) == pytest.approx(1.3)  # one slow window (an evaluation) moves it a little


def fake_matmuls(monkeypatch, tflops_at: dict[int, float]) -> list[int]:
    """hardware.fastest_matmul answering as a device that reaches tflops_at[size]; returns the sizes it was asked."""
    asked = []

    def fastest(a, b, warmup=0, repeats=10):
        n = a.shape[0]
        asked.append(n)
        return 2 * n**3 / (tflops_at[n] * 1e12)

    monkeypatch.setattr(hardware, "fastest_matmul", fastest)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    return asked


def test_the_matmul_peak_is_the_best_over_sizes_with_the_size_that_reached_it(monkeypatch):
    asked = fake_matmuls(monkeypatch, {1024: 1.57, 2048: 2.81, 4096: 2.7})  # an AMX CPU's bf16
    peak = hardware.matmul_peak.__wrapped__(torch.device("cpu"), torch.bfloat16)  # not the cached, measured one
    assert asked == [1024, 2048, 4096]
    assert (peak.tflops, peak.size, peak.dtype) == (2.81, 2048, "bf16")
    assert str(peak) == "2.81 TFLOP/s, bf16 matmul at 2048"


def test_a_size_whose_one_call_would_take_too_long_is_not_measured(monkeypatch):
    asked = fake_matmuls(monkeypatch, {1024: 0.05, 2048: 0.05})  # 43 ms at 1024: 2048 would take a third of a second
    peak = hardware.matmul_peak.__wrapped__(torch.device("cpu"), torch.float32)
    assert asked == [1024] and peak.size == 1024


def test_a_run_says_which_peak_its_mfu_is_of_and_ends_with_nothing_left(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    config = resolve("tiny", None, [*TINY, f"data={corpus}", "max_steps=20", "eval_every=20", "max_time=600"])
    summary = train(config, tmp_path / "run", quiet=False)
    peak = summary["matmul_peak"]
    assert peak["tflops"] > 0 and peak["size"] in (256, 1024, 2048, 4096) and peak["devices"] == 1
    flops_per_token = load(tmp_path / "run").model.training_flops_per_token()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in windows] == [10, 20]
    for r in windows:  # each row says what its MFU is of
        assert (r["peak_tflops"], r["peak_matmul_size"]) == (peak["tflops"], peak["size"])
        mfu = r["tokens_per_second"] * flops_per_token / 1e12 / r["peak_tflops"]
        assert r["mfu"] == pytest.approx(mfu, rel=1e-2, abs=1e-4)
    err = capsys.readouterr().err
    assert f"MFU of {peak['tflops']:.2f} TFLOP/s, {peak['dtype']} matmul at {peak['size']}" in err
    bar = err.replace("\r", "\n").strip().splitlines()[-1]  # the bar as it closed, at the last step
    assert "20/20" in bar and "left=00:00" in bar, bar  # not the ten minutes that max_time still allowed
