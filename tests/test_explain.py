"""potion explain: the numbers are the model's own, every renderer reads the same data, bad input -> clear error."""

import importlib
import json
import math
import subprocess
import sys

import pytest
import torch

import potion
from potion.config import ModelConfig, RunConfig
from potion.data.tokenizer import CharTokenizer, save_tokenizer
from potion.errors import PotionError
from potion.explain import (
    Explanation,
    check_probe,
    explain,
    load_json,
    load_probes,
    render_html,
    render_text,
    save_probe,
    visible,
)
from potion.formats.run import write_config
from potion.model import GPT
from potion.model.record import recording
from potion.train.checkpoint import model_state, save_tensors

CHARS = "abcdefghijklmnopqrstuvwxyz ROMEO:<>/\n"
VARIANTS = {
    "gpt2": {},
    "modern": {
        "positions": "rope",
        "norm": "rmsnorm",
        "qk_norm": True,
        "bias": False,
        "logit_softcap": 15.0,
        "value_embeddings": True,
        "tie_embeddings": False,
        "mlp_activation": "relu2",
    },
    "llama": {
        "positions": "rope",
        "norm": "rmsnorm",
        "bias": False,
        "n_head": 4,
        "n_kv_head": 2,
        "mlp_activation": "swiglu",
    },
}


def tiny(variant="gpt2", context_length=32, seed=0):
    torch.manual_seed(seed)
    tok = CharTokenizer(CHARS)
    model = GPT(
        ModelConfig(
            vocab_size=tok.vocab_size,
            context_length=context_length,
            **{"n_layer": 2, "n_head": 2, "n_embd": 32, **VARIANTS[variant]},
        )
    )
    with torch.no_grad():  # untrained weights attend almost uniformly; spread them so the tests can fail
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval(), tok


@pytest.fixture(params=list(VARIANTS))
def model_tok(request):
    return tiny(request.param)


def test_rows_sum_to_one_and_values_reproduce_attention_output(model_tok):
    model, tok = model_tok
    e = explain(model, "ROMEO: hello", tok)
    for h in e.heads:
        assert math.isclose(sum(h.weights), 1.0, abs_tol=1e-4) and math.isclose(h.row_sum, 1.0, abs_tol=1e-5)
        assert len(h.weights) == e.focus + 1
    assert e.checks.row_sum < 1e-5
    assert e.checks.heads_to_attention_output < 1e-5  # weights @ values, through proj == the block's attn_out
    # and independently here: the weighted sum of the values is the context, which proj turns into attn_out
    idx = torch.tensor([tok.encode("ROMEO: hello")])
    with torch.no_grad(), recording(model) as trace:
        model(idx)
        for block, r in zip(model.blocks, trace):
            context = r["weights"] @ r["value"]
            B, H, T, D = context.shape
            out = block.attn.proj(context.transpose(1, 2).reshape(B, T, H * D))
            assert torch.allclose(out, r["attn_out"], atol=1e-5)


def test_logits_equal_generation(model_tok):
    model, tok = model_tok
    prompt = "ROMEO: hi"
    e = explain(model, prompt, tok, top_k=3)
    assert e.checks.logits_vs_generate < 1e-4
    from potion.infer.generate import prefill

    with torch.no_grad():
        logits = prefill(model, torch.tensor([tok.encode(prompt)]), model.new_cache(1))[0]
    probs = logits.softmax(-1)
    top = probs.topk(3)
    assert [c.id for c in e.prediction] == top.indices.tolist()
    assert all(math.isclose(c.probability, p, rel_tol=1e-4) for c, p in zip(e.prediction, top.values.tolist()))


def test_attribution_sums_to_logit_and_lens_ends_at_logits(model_tok):
    model, tok = model_tok
    e = explain(model, "ROMEO: a", tok, expect="b")
    a = e.attribution
    assert abs(a.logit - a.parts_sum) < 1e-4 and e.checks.parts_to_residual < 1e-4
    assert e.checks.lens_last_vs_logits < 1e-4
    assert [c.id for c in e.lens[-1].top] == [c.id for c in e.prediction]
    assert e.expected.candidate.id == tok.encode("b")[0] and e.target == e.expected.candidate
    assert len(e.lens) == model.config.n_layer + 1


def test_occlusion_matches_rerunning_without_the_token():
    model, tok = tiny()
    e = explain(model, "ROMEO: ab", tok, expect="c")
    ids = tok.encode("ROMEO: ab")
    assert [o.index for o in e.occlusion] == list(range(len(ids) - 1))
    with torch.no_grad():
        p = model(torch.tensor([ids[:2] + ids[3:]]))[0, -1].softmax(-1)[tok.encode("c")[0]]
    assert math.isclose(e.occlusion[2].probability_without, float(p), rel_tol=1e-4)


def test_worked_example_reproduces_the_weight():
    model, tok = tiny()
    e = explain(model, "ROMEO: abc", tok, layer=1, head=1)
    h = e.head_attention(1, 1)
    w = h.worked
    assert w.key_index == h.keys[0].index and math.isclose(w.weight, h.keys[0].weight, rel_tol=1e-4)
    assert math.isclose(w.dot_product, w.score, rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(sum(w.products) + w.rest_of_dot_product, w.dot_product, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(h.keys[0].weighted_value_norm, h.keys[0].weight * h.keys[0].value_norm, rel_tol=1e-9)


def test_focus_token_masks_the_future():
    model, tok = tiny()
    e = explain(model, "ROMEO: abc", tok, token=3)
    assert e.focus == 3 and e.masked == tuple(range(4, 10))
    assert all(len(h.weights) == 4 for h in e.heads)
    assert e.matrices is not None and len(e.matrices.weights[0][0][5]) == 6


def test_json_round_trip_and_api(tmp_path):
    model, tok = tiny()
    e = potion.explain((model, tok), "ROMEO:", top_k=4)
    again = Explanation.from_dict(json.loads(e.to_json()))
    assert again == e
    with pytest.raises(PotionError, match="tokenizer"):
        potion.explain(model, "ROMEO:")


def test_long_prompt_gets_a_focused_view(monkeypatch):
    data = importlib.import_module("potion.explain.attention")

    monkeypatch.setattr(data, "MATRIX_BUDGET", 100)
    model, tok = tiny()
    e = explain(model, "ROMEO: abcdefghij", tok)
    assert e.matrices is None and "only token" in e.matrices_note
    assert "only token" in render_html(e)


@pytest.mark.parametrize(
    "kwargs, message, setting",
    [
        ({"prompt": ""}, "is empty", None),
        ({"prompt": "x" * 40}, "this model's context is 32", None),
        ({"prompt": "ROMEO:", "token": 6}, "^token 6 is out of range", "token"),
        ({"prompt": "ROMEO:", "token": -7}, "^token -7 is out of range", "token"),
        ({"prompt": "ROMEO:", "layer": 2}, "^layer 2 is out of range", "layer"),
        ({"prompt": "ROMEO:", "head": -1}, "^head -1 is out of range", "head"),
        ({"prompt": "ROMEO:", "top_k": 0}, "^top_k must be at least 1", "top_k"),
        ({"prompt": "ROMEO:", "expect": ""}, "the expect text is empty", "expect"),
        ({"prompt": "ROMEO:", "expect": "7"}, "'7' .* in the expect text", "expect"),
        ({"prompt": "ROMEO: 7"}, "'7' .* is not in this model's character vocabulary", None),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message, setting):
    """Library errors name the setting (the command line puts its flag in its place)."""
    model, tok = tiny()
    with pytest.raises(PotionError, match=message) as raised:
        explain(model, tokenizer=tok, **kwargs)
    assert raised.value.setting == setting


def test_check_probe_names_the_probe_setting():
    model, tok = tiny()
    with pytest.raises(PotionError, match="the probe text has 40 tokens") as raised:
        check_probe(tok, "x" * 40, model.config.context_length)
    assert raised.value.setting == "probe"


def test_text_renderer_plain_and_colour():
    model, tok = tiny()
    e = explain(model, "ROMEO: a\nb", tok, token=7, expect="b")
    plain = render_text(e, width=60)
    assert "\x1b[" not in plain and "↵" in plain and "·" in plain and "×" in plain
    assert all(len(line) <= 60 for line in plain.splitlines())
    wide = render_text(e, width=200)
    assert "not by themselves" in wide and "row sum 1.0000" in wide
    assert "\x1b[48;5;" in render_text(e, width=60, color=True)


def test_html_is_self_contained():
    model, tok = tiny()
    html = render_html(explain(model, "ROMEO: </script><b>", tok), [])
    assert html.count("</script>") == 2  # the page's own two scripts; the prompt cannot close one
    for marker in ("http://", "https://", "src=", "@import", "url("):
        assert marker not in html
    assert "what the token looks for" in html and "what a token offers" in html and "what it passes on" in html


def test_visible_marks_token_boundaries():
    assert visible(" a\n\t") == "·a↵⇥"


def make_run(tmp_path):
    model, tok = tiny()
    run = tmp_path / "run"
    run.mkdir()
    base = RunConfig()
    write_config(run, RunConfig(model=model.config, data=base.data, train=base.train))
    save_tokenizer(tok, run / "tokenizer.json")
    save_tensors(run / "model.safetensors", model_state(model))
    for step in (0, 10):
        save_probe(model, tok, "ROMEO:", run, step)
    return run


def test_probes_saved_and_loaded(tmp_path):
    run = make_run(tmp_path)
    probes = load_probes(run)
    assert [p.step for p in probes] == [0, 10] and probes[0].prompt == "ROMEO:"
    assert (run / "probes" / "step-00000010.json").is_file()
    assert load_json(run / "probes" / "step-00000000.json") == probes[0]


def potion_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "potion", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def test_cli_writes_every_format(tmp_path):
    run = make_run(tmp_path)
    r = potion_cli(
        "explain",
        "ROMEO: ab",
        "--model",
        run,
        "--expect",
        "c",
        "--html",
        tmp_path / "o.html",
        "--png",
        tmp_path / "o.png",
        "--json-out",
        tmp_path / "o.json",
        "--layer",
        "1",
        "--head",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert "Next token" in r.stdout and "\x1b[" not in r.stdout  # not a tty: plain
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    e = load_json(tmp_path / "o.json")
    assert e.layer == 1 and e.head == 0 and e.expected is not None
    html = (tmp_path / "o.html").read_text(encoding="utf-8")
    assert '"probes": [{"step": 0' in html


def test_cli_json_prints_one_object(tmp_path):
    run = make_run(tmp_path)
    r = potion_cli("explain", "ROMEO: ab", "--model", run, "--json", "--json-out", tmp_path / "o.json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # no text view, no "wrote" lines: stdout is the object alone
    e = Explanation.from_dict(json.loads(r.stdout))
    assert e == load_json(tmp_path / "o.json") and e.prompt == "ROMEO: ab"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--token", "99"], "--token 99 is out of range"),
        (["--layer", "5"], "--layer 5 is out of range"),
        (["--head", "9"], "--head 9 is out of range"),
    ],
)
def test_cli_bad_index_one_line_exit_2(tmp_path, args, message):
    run = make_run(tmp_path)
    r = potion_cli("explain", "ROMEO:", "--model", run, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_empty_prompt(tmp_path):
    run = make_run(tmp_path)
    r = potion_cli("explain", "", "--model", run)
    assert r.returncode == 2 and "is empty" in r.stderr


def test_train_probe_saves_explain_data_at_each_evaluation(tmp_path, shakespeare):
    out = tmp_path / "run"
    small = [
        f"--set={k}"
        for k in (
            "n_layer=1",
            "n_head=2",
            "n_embd=16",
            "context_length=16",
            "batch_size=4",
            "eval_batches=1",
            "sample_tokens=0",
        )
    ]
    r = potion_cli(
        "train",
        "--data",
        shakespeare,
        *small,
        "--max-steps",
        4,
        "--eval-every",
        2,
        "--probe",
        "ROMEO:",
        "--out",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert [p.step for p in load_probes(out)] == [0, 2, 4]
    r = potion_cli("train", "--data", shakespeare, *small, "--probe", "x" * 20, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "--probe text has 20 tokens" in r.stderr and not (tmp_path / "o2").exists()


def test_grouped_query_heads_are_named_as_sharing_key_value_heads():
    model, tok = tiny("llama")
    e = explain(model, "ROMEO: hello", tok)
    assert e.model.n_kv_head == 2 and json.loads(e.to_json())["model"]["n_kv_head"] == 2
    assert "4 query heads sharing 2 key/value heads" in render_text(e, width=200)
    model, tok = tiny()
    assert "× 2 heads" in render_text(explain(model, "ROMEO: hello", tok), width=200)
