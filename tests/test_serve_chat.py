"""potion serve's chat completions through the official openai client, against a real server in a subprocess: a
reply is potion's own completion of the conversation its chat template renders; logprobs are the model's; a
conversation that does not fit is refused; the tokenizer routes; a client that leaves stops its reply. The real
SmolLM2's chat is in test_lm_eval.py, which serves it once for the openai client and for lm-eval."""

from __future__ import annotations

import time

import pytest
import torch
from serving import Server, make_run, open_events, seconds_until_idle_of

import potion
from potion.config import SamplingConfig
from potion.data.chat import template_for, turn_ends
from potion.infer.generate import continue_prompt

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")

MODEL = "chat"
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("chat") / MODEL, chat=True)


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.stderr)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(run_dir):
    return potion.load(run_dir)


def rendered_ids(local, messages) -> list[int]:
    text = template_for(local.tokenizer).render(messages, add_generation_prompt=True)
    return local.tokenizer.encode(text)


def own_replies(local, messages, n: int = 1, stop: tuple[str, ...] = (), **sampling) -> list[str]:
    """potion's own continuations of the rendered conversation, stopped where a reply ends."""
    stops = (*stop, *turn_ends(template_for(local.tokenizer)))
    config = SamplingConfig(stop=stops, num_samples=n, **sampling)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    idx = torch.tensor([rendered_ids(local, messages)])
    return [continue_prompt(local.model, local.tokenizer, idx, config, generator).text for _ in range(n)]


def test_a_reply_is_potions_completion_of_the_rendered_conversation(client, local):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, seed=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (c,) = r.choices
    assert c.message.role == "assistant" and c.logprobs is None
    assert [c.message.content] == own_replies(local, HELLO, max_new_tokens=30, temperature=1.0, seed=3)
    tokens = len(local.tokenizer.encode(c.message.content))
    assert r.usage.prompt_tokens == len(rendered_ids(local, HELLO)) and r.usage.completion_tokens == tokens
    assert c.finish_reason == ("length" if tokens == 30 else "stop")


def test_stream_gives_the_same_reply_in_openai_chunks(client):
    asked = {"model": MODEL, "messages": HELLO, "max_completion_tokens": 25, "seed": 9, "n": 2}
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    texts, roles, finish = {0: "", 1: ""}, {}, {}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id and chunk.usage is None
        (c,) = chunk.choices
        assert finish.get(c.index) is None  # nothing after a choice's finish_reason
        if c.index not in roles:
            roles[c.index] = c.delta.role  # the first chunk of each choice says who speaks
        texts[c.index] += c.delta.content or ""
        finish[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"} and len(chunks) > 20
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_logprobs_are_the_models_log_softmax_of_each_token(client, local):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    ids = rendered_ids(local, HELLO)
    reply = local.tokenizer.encode(r.choices[0].message.content)
    assert [e.token for e in content] == [local.tokenizer.token_text(t) for t in reply] and len(reply) == 12
    with torch.no_grad():
        expected = local.model(torch.tensor([ids + reply]))[0].float().log_softmax(-1)[len(ids) - 1 :]
    for i, entry in enumerate(content):
        assert abs(entry.logprob - float(expected[i, reply[i]])) < 1e-4
        assert bytes(entry.bytes) == entry.token.encode()
        values, top = expected[i].topk(3)
        assert [t.token for t in entry.top_logprobs] == [local.tokenizer.token_text(int(t)) for t in top]
        assert all(abs(t.logprob - float(v)) < 1e-4 for t, v in zip(entry.top_logprobs, values))
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely token was taken
    streamed = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    in_chunks = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.model_dump() for e in in_chunks] == [e.model_dump() for e in content]
    alone = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, logprobs=True)
    assert [e.logprob for e in alone.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in alone.choices[0].logprobs.content)


def test_n_choices_and_seed_are_potions_own(client, local):
    def replies(seed: int) -> list[str]:
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=15, n=3, seed=seed, top_p=0.9)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices]

    first = replies(7)
    assert first == replies(7) != replies(8)
    assert first == own_replies(local, HELLO, n=3, max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)


def test_stop_cuts_the_reply_before_it(client, local):
    free = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, seed=2)
    text = free.choices[0].message.content
    stop = text[8:10]
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, seed=2, stop=[stop, "QQQ"])
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert [text[: text.find(stop)]] == own_replies(
        local, HELLO, stop=(stop,), max_new_tokens=40, temperature=1.0, seed=2
    )


def test_a_conversation_longer_than_the_context_is_refused(client, local):
    long = [{"role": "user", "content": "tell me more " * 20}]  # 260 characters: past the context of 256
    size = len(rendered_ids(local, long))
    with pytest.raises(openai.BadRequestError, match=f"the conversation takes {size} tokens, with no room") as refused:
        client.chat.completions.create(model=MODEL, messages=long)
    assert refused.value.code == "context_length_exceeded"
    fits = len(rendered_ids(local, HELLO))
    with pytest.raises(openai.BadRequestError, match=f"takes {fits} tokens and {257 - fits} more") as refused:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=257 - fits)
    assert refused.value.code == "context_length_exceeded"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0)  # no limit: what the context has
    assert r.usage.total_tokens <= 256


BAD_CHATS = [
    ({"messages": []}, "messages has no messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0 has role 'robot'; the roles are system, user"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "has content of type ['image_url']; potion reads text only",
    ),
    ({"messages": [{"role": "user"}]}, "message 0 has no text content"),
    ({"messages": "hello"}, "messages: input should be a valid array"),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs: input should be less than or equal"),
    ({"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens and max_completion_tokens differ"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools is not supported by potion serve"),
    ({"messages": [{"role": "user", "content": "€"}]}, "character '€' (U+20AC) in the conversation"),
    ({"messages": HELLO, "beam_width": 2}, "unknown field 'beam_width'"),
]


@pytest.mark.parametrize("body, message", BAD_CHATS)
def test_a_bad_chat_request_is_a_400_with_one_message(server, body, message):
    status, answer = server.request("POST", "/v1/chat/completions", {"model": MODEL, **body})
    assert status == 400 and message in answer["error"]["message"], answer
    assert "\n" not in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_tokenizer_routes_are_vllms(server, local):
    status, body = server.request("POST", "/tokenize", {"prompt": "ROMEO: hi", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == local.tokenizer.encode("ROMEO: hi") and body["count"] == 9
    assert body["max_model_len"] == 256
    status, body = server.request("POST", "/tokenize", {"messages": HELLO, "return_token_strs": True})
    assert body["tokens"] == rendered_ids(local, HELLO) and "".join(body["token_strs"]).startswith("<|im_start|>")
    assert server.request("POST", "/detokenize", {"tokens": body["tokens"]})[1] == {
        "prompt": template_for(local.tokenizer).render(HELLO, add_generation_prompt=True)
    }
    info = server.request("GET", "/tokenizer_info")[1]
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == template_for(local.tokenizer).source
    status, body = server.request("POST", "/detokenize", {"tokens": [9999]})
    assert status == 400 and "tokens has token id 9999" in body["error"]["message"]


def test_a_client_that_leaves_stops_its_reply(tmp_path):
    run = make_run(tmp_path / "flat", flat=True, chat=True, context_length=4400)  # a reply that never ends by itself
    server = Server(run)
    try:
        body = {"model": "flat", "messages": HELLO, "temperature": 0, "max_tokens": 400}
        started = time.monotonic()
        status, whole = server.request("POST", "/v1/chat/completions", body)
        per_token = (time.monotonic() - started) / 400
        assert status == 200 and whole["usage"]["completion_tokens"] == 400
        open_events(server.url, "/v1/chat/completions", {**body, "max_tokens": 4096, "stream": True})[0].close()
        assert seconds_until_idle_of(server, "flat") < 4096 * per_token / 4
    finally:
        server.stop()
