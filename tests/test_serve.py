"""potion serve: the official openai client against a real server in a subprocess, and every bad request -> its
4xx JSON error (never a 500). The texts are compared with potion's own generate_text on the same weights."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import IDLE, Server, make_run, open_events, seconds_until_idle_of

import potion
from potion.cli import main
from potion.config import SamplingConfig
from potion.infer.generate import generate_text
from potion.serve.server import reach_warning

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")

KEY = "test-key-7"
MODEL = "run"  # the run directory's name is the model's id


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, "--api-key", KEY)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.stderr)  # every bad request was answered, none crashed a handler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(run_dir):
    """The same weights in this process, for potion's own generate_text."""
    return potion.load(run_dir)


def reference(local, prompt: str, **sampling) -> list[str]:
    samples, _ = generate_text(local.model, local.tokenizer, prompt, SamplingConfig(**sampling))
    return [s.text for s in samples]


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def test_models_lists_the_run(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "potion"


def test_completion_with_seed_is_potion_generate_with_seed(client, local):
    r = client.completions.create(model=MODEL, prompt="ROMEO: ", max_tokens=24, temperature=1.0, seed=5)
    again = client.completions.create(model=MODEL, prompt="ROMEO: ", max_tokens=24, temperature=1.0, seed=5)
    other = client.completions.create(model=MODEL, prompt="ROMEO: ", max_tokens=24, temperature=1.0, seed=6)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == again.choices[0].text != other.choices[0].text
    assert [r.choices[0].text] == reference(local, "ROMEO: ", max_new_tokens=24, temperature=1.0, seed=5)
    tokens = len(local.tokenizer.encode(r.choices[0].text))
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == tokens
    assert r.usage.total_tokens == 7 + tokens
    assert r.choices[0].finish_reason == ("length" if tokens == 24 else "stop")


def test_n_choices_are_potion_generate_num_samples(client, local):
    r = client.completions.create(model=MODEL, prompt="ab", max_tokens=12, n=3, seed=11, top_p=0.9)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == reference(
        local, "ab", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11, num_samples=3
    )
    assert r.usage.completion_tokens == sum(len(local.tokenizer.encode(c.text)) for c in r.choices)


def test_stream_gives_the_same_text_in_openai_chunks(client):
    whole = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, seed=3, n=2)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="ROMEO:",
            max_tokens=30,
            seed=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts, finish = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.id == chunks[0].id and chunk.usage is None
        for c in chunk.choices:
            assert finish.get(c.index) is None  # nothing after a choice's finish_reason
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason
    assert len(chunks) > 10  # token by token, not one block
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_string_cuts_the_text_before_it(client):
    free = client.completions.create(model=MODEL, prompt="ab", max_tokens=40, seed=2).choices[0].text
    stop = free[6:8]
    cut = client.completions.create(model=MODEL, prompt="ab", max_tokens=40, seed=2, stop=[stop, "never here"])
    assert cut.choices[0].text == free[: free.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="ab", max_tokens=40, seed=2, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_echo_greedy_and_token_prompts(client, local):
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0, echo=True)
    ids = local.tokenizer.encode("ROMEO:")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == "ROMEO:" + by_ids.choices[0].text
    assert [by_ids.choices[0].text] == reference(local, "ROMEO:", max_new_tokens=5, temperature=0)
    two = client.completions.create(model=MODEL, prompt=["ab", "ROMEO:"], max_tokens=5, temperature=0)
    assert two.choices[1].text == by_ids.choices[0].text and two.usage.prompt_tokens == 2 + 6


def forward_log_softmax(local, ids: list[int]):
    """The model's log-probabilities at every position of ids, from one plain forward pass: (T, V)."""
    with torch.no_grad():
        return local.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def test_logprobs_are_the_models_log_softmax_of_each_token(client, local):
    plain = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, seed=4)
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, seed=4, logprobs=3, echo=True)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text == "ROMEO:" + plain.choices[0].text  # asking for logprobs changes nothing that is drawn
    assert "".join(lp.tokens) == text and lp.text_offset == list(range(len(text)))  # one character per token
    ids = local.tokenizer.encode(text)
    expected = forward_log_softmax(local, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(expected[i - 1, ids[i]])) < 1e-4
        values, top = expected[i - 1].topk(3)
        want = {local.tokenizer.token_text(int(t)): float(v) for t, v in zip(top, values)}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(abs(lp.top_logprobs[i][k] - want[k]) < 1e-4 for k in want)
    scored = client.completions.create(model=MODEL, prompt=ids[:6], max_tokens=0, logprobs=3, echo=True)
    assert scored.choices[0].text == "ROMEO:" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:6]  # the prompt alone, from its ids
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="ROMEO:", max_tokens=12, seed=4, logprobs=3, echo=True, stream=True
        )
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs
    assert [v for p in parts for v in p.text_offset] == lp.text_offset
    without = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, seed=4, logprobs=0)
    assert without.choices[0].logprobs.token_logprobs == lp.token_logprobs[6:]
    assert without.choices[0].logprobs.top_logprobs == [{}] * 12 and without.choices[0].logprobs.text_offset[0] == 0


def test_chat_with_a_model_that_has_no_chat_template_is_one_400(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    status, answer = server.request("POST", "/v1/chat/completions", body, AUTH)
    assert status == 400 and answer["error"]["message"].startswith("this model has no chat template")
    assert "\n" not in answer["error"]["message"]


def test_prompt_longer_than_the_context_keeps_its_last_tokens_and_says_so(client):
    long = "ab" * 25  # 50 tokens; the context is 32
    r = client.completions.create(model=MODEL, prompt=long, max_tokens=4, temperature=0)
    tail = client.completions.create(model=MODEL, prompt=long[-32:], max_tokens=4, temperature=0)
    assert r.choices[0].text == tail.choices[0].text and r.usage.prompt_tokens == 32
    assert r.model_extra["warnings"] == [
        "the prompt has 50 tokens; this model's context is 32, so only its last 32 are used"
    ]
    chunks = list(client.completions.create(model=MODEL, prompt=long, max_tokens=4, temperature=0, stream=True))
    assert "only its last 32" in chunks[0].model_extra["warnings"][0]


def test_api_key_is_required(server, client):
    with pytest.raises(openai.AuthenticationError, match="needs an API key"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.request("GET", "/v1/models")[0] == 401  # no Authorization header at all
    status, body = server.request("POST", "/api/explain", {"prompt": "ab"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/api/health", headers=AUTH) == (200, {"status": "ok", "model": MODEL, **IDLE})


def test_openai_client_raises_its_errors(client):
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here; this server serves 'run'"):
        client.completions.create(model="gpt-4", prompt="ab")
    with pytest.raises(openai.BadRequestError, match="max_tokens: input should be less than or equal to 4096"):
        client.completions.create(model=MODEL, prompt="ab", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="unknown field 'beam_width'"):
        client.completions.create(model=MODEL, prompt="ab", extra_body={"beam_width": 4})


BAD_REQUESTS = [
    (b"{", 400, "the request body is not valid JSON"),
    (b"[1, 2]", 400, "the request body must be a JSON object"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 100_000, 400, "not valid JSON"),
    ({"prompt": "ab"}, 400, "'model' is required"),
    ({"model": MODEL, "prompt": "ab", "temprature": 1}, 400, "unknown field 'temprature'"),
    ({"model": MODEL, "max_tokens": -1}, 400, "max_tokens: input should be greater than or equal to 0"),
    ({"model": MODEL, "max_tokens": 10**30}, 400, "max_tokens: input should be less than or equal to 4096"),
    ({"model": MODEL, "max_tokens": "5"}, 400, "max_tokens: input should be a valid integer"),
    ({"model": MODEL, "n": 17}, 400, "n: input should be less than or equal to 16"),
    (
        {"model": MODEL, "n": 9, "prompt": ["a", "b"]},
        400,
        "2 prompts x n=9 is 18 choices; potion serve makes at most 16",
    ),
    ({"model": MODEL, "temperature": 2.5}, 400, "temperature: input should be less than or equal to 2"),
    ({"model": MODEL, "top_p": 0}, 400, "top_p: input should be greater than 0"),
    ({"model": MODEL, "top_k": 0}, 400, "top_k: input should be greater than or equal to 1"),
    ({"model": MODEL, "seed": -3}, 400, "seed must be between 0 and 2**63 - 1, got -3"),
    ({"model": MODEL, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be a string or a list of at most 4"),
    ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt must be a string, a list of strings, a list of token ids"),
    ({"model": MODEL, "prompt": []}, 400, "prompt is an empty list"),
    ({"model": MODEL, "prompt": [37]}, 400, "the prompt has token id 37; this model's ids are 0 to 36"),
    ({"model": MODEL, "prompt": "ZEBRA"}, 400, "character 'Z' (U+005A) in the prompt at line 1, column 1 is not in"),
    ({"model": MODEL, "logprobs": 21}, 400, "logprobs: input should be less than or equal to 20"),
    ({"model": MODEL, "suffix": "x"}, 400, "suffix is not supported by potion serve"),
    ({"model": MODEL, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage: input should be"),
    ({"model": "other"}, 404, "model 'other' is not served here"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_bad_request_is_its_4xx_with_one_message(server, body, status, message):
    got, answer = server.request("POST", "/v1/completions", body, AUTH)
    assert got == status and message in answer["error"]["message"]
    assert "\n" not in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_only_json_requests_that_name_this_machine_are_answered(server):
    """What another site's page could make a browser send: a form or plain text (no JSON), or, after DNS
    rebinding, requests with that site's name in Host."""
    body = json.dumps({"model": MODEL, "prompt": "ab"}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, answer = server.request("POST", "/v1/completions", body, {**AUTH, "Content-Type": kind})
        assert (
            status == 415
            and "send the body as JSON with 'Content-Type: application/json'" in answer["error"]["message"]
        )
    status, answer = server.request("GET", "/", headers={"Host": "evil.example:8000"})
    assert status == 403 and "not 'evil.example:8000'" in answer["error"]["message"]
    assert server.request("GET", "/api/health", headers={**AUTH, "Host": "localhost"})[0] == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    sock = socket.create_connection((urlsplit(server.url).hostname, urlsplit(server.url).port))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\n\r\n"
    )
    sock.sendall(head.encode())  # and not the 2 MB it announces
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 413 and "larger than 1024 KiB" in json.loads(response.read())["error"]["message"]
    sock.close()


def test_wrong_path_method_and_explain_input_are_4xx(server):
    assert server.request("GET", "/v2/chat", headers=AUTH)[0] == 404
    status, body = server.request("GET", "/v1/completions", headers=AUTH)
    assert status == 405 and body["error"]["message"] == "/v1/completions does not take GET"
    status, body = server.request("POST", "/api/explain", {"prompt": "ab" * 20}, AUTH)
    assert status == 400 and "the prompt has 40 tokens; this model's context is 32" in body["error"]["message"]
    status, body = server.request("POST", "/api/explain", {"prompt": "ab", "layer": 9}, AUTH)
    assert status == 400 and body["error"]["param"] == "layer"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["prompt", "temperature", "top_p", "top_k", "stop", "seed", "echo", "stream", "logprobs", "suffix", "user"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4),
    max_tokens=st.integers(-2, 3) | JSON_VALUES,
    n=st.integers(-1, 2) | JSON_VALUES,
)
def test_any_json_body_is_answered_without_a_server_error(server, fields, max_tokens, n):
    """Whatever the fields hold, the answer is a completion or a 4xx with one message (the counts stay small so
    that a request that happens to be valid is quick)."""
    body = {"model": MODEL, **fields, "max_tokens": max_tokens, "n": n, "stream": False}
    status, answer = server.request("POST", "/v1/completions", body, AUTH)
    assert status == 200 or (400 <= status < 500 and answer["error"]["message"]), answer


def test_concurrent_requests_get_what_they_would_get_alone(client):
    def one(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=seed).choices[0].text

    alone = [one(seed) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone


def test_reach_warning_names_the_risk():
    assert reach_warning("127.0.0.1", None) is None and reach_warning("::1", None) is None
    assert "every network interface" in reach_warning("0.0.0.0", None) and "--api-key" in reach_warning("::", None)
    assert "192.168.1.5" in reach_warning("192.168.1.5", "k") and "--api-key" not in reach_warning("0.0.0.0", "k")


def test_command_line_errors_are_one_line(server, run_dir, capsys, quiet_machine):
    port = urlsplit(server.url).port
    assert main(["serve", "--model", str(run_dir), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"potion: error: cannot listen on 127.0.0.1 --port {port} (Address already in use); choose another port\n"
    )
    assert main(["serve", "--model", str(run_dir), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "potion: error: --port must be between 0 and 65535, got 70000\n"
    assert main(["serve", "--model", str(run_dir / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- a model that never ends its text


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "flat", flat=True)


def open_stream(url: str, max_tokens: int = 4096):
    body = {"model": "flat", "prompt": "ab", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return open_events(url, "/v1/completions", body)


def seconds_until_idle(server: Server, limit: float = 10) -> float:
    return seconds_until_idle_of(server, "flat", limit)


def test_a_client_that_leaves_stops_its_generation(flat_run):
    server = Server(flat_run)
    try:
        started = time.monotonic()
        status, whole = server.request(
            "POST", "/v1/completions", {"model": "flat", "max_tokens": 400, "temperature": 0}
        )
        per_token = (time.monotonic() - started) / 400
        assert status == 200 and whole["usage"]["completion_tokens"] == 400  # it never ends its text by itself
        open_stream(server.url)[0].close()
        assert seconds_until_idle(server) < 4096 * per_token / 4  # far sooner than the 4096 tokens would take
        sock = socket.create_connection(urlsplit(server.url)[1].split(":"))  # the same, waiting for one response
        body = json.dumps({"model": "flat", "max_tokens": 4096, "temperature": 0}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
        sock.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)
        sock.close()
        assert seconds_until_idle(server) < 4096 * per_token / 4
    finally:
        server.stop()


def test_weights_a_training_saves_are_served(tmp_path):
    run = make_run(tmp_path / "flat", flat=True)
    server = Server(run)
    try:
        body = {"model": "flat", "prompt": "ab", "max_tokens": 8, "temperature": 0}
        flat = reference(potion.load(run), "ab", max_new_tokens=8, temperature=0)
        assert server.request("POST", "/v1/completions", body)[1]["choices"][0]["text"] == flat[0] == "\n" * 8
        trained = make_run(tmp_path / "trained")
        (trained / "model.safetensors").replace(run / "model.safetensors")  # as training saves: by rename
        expected = reference(potion.load(run), "ab", max_new_tokens=8, temperature=0)
        deadline = time.monotonic() + 10
        while server.request("POST", "/v1/completions", body)[1]["choices"][0]["text"] != expected[0]:
            assert time.monotonic() < deadline, "the new weights were not loaded"
            time.sleep(0.2)
    finally:
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_mid_stream_shuts_down_cleanly(flat_run, signum):
    server = Server(flat_run)
    connection, response = open_stream(server.url)
    server.signal(signum)
    started = time.monotonic()
    assert server.process.wait(15) == 0 and time.monotonic() - started < 5
    try:
        rest = response.read()
    except http.client.IncompleteRead as e:  # the connection closed mid-chunk
        rest = e.partial
    connection.close()
    assert b"the server is shutting down" in rest or rest == b""
    name = signal.Signals(signum).name
    assert server.stderr[-1] == f"potion serve: stopped ({name})\n" and "Traceback" not in "".join(server.stderr)
