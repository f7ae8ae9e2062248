"""The live page of potion serve in a real headless browser: typing redraws the attention grid and the
probabilities with the numbers the JSON endpoint gives, a click focuses a token or picks a head, Generate streams
text in, a run's loss curve follows its log, and no request leaves this machine."""

from __future__ import annotations

import json
import os
import socket

import pytest
from headless import chromium  # skips this module where playwright or Chromium is missing
from serving import Server, make_run  # noqa: E402
from test_explain import tiny  # noqa: E402

from potion.explain import explain, save_probe  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("live") / "run")
    model, tok = tiny()
    for step in (0, 10):
        save_probe(model, tok, "ROMEO:", run, step)
    write_log(run, range(0, 20, 5), [0, 10])
    return run


def write_log(run, train_steps, eval_steps) -> None:
    with open(run / "log.jsonl", "a", encoding="utf-8") as f:
        for s in train_steps:
            f.write(json.dumps({"kind": "train", "step": s, "loss": 3.5 - s / 100}) + "\n")
        for s in eval_steps:
            f.write(
                json.dumps({"kind": "eval", "step": s, "train_loss": 3.4 - s / 90, "val_loss": 3.5 - s / 90}) + "\n"
            )


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir)
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.stderr)  # every bad request was answered, none crashed a handler


COUNT_MUTATIONS = """() => {
    window.mutations = 0;
    const options = { childList: true, subtree: true, characterData: true };
    const observer = new MutationObserver((m) => { window.mutations += m.length; });
    observer.observe(document.getElementById('generated'), options);
}"""
GENERATED = ["stopped at max tokens", "the model ended its text"]  # the status once a generation has finished


def alphas(page, layer: int, head: int) -> list[float]:
    """The weights one grid cell draws: the opacity of each of its token stripes (later tokens: masked, none)."""
    backgrounds = page.eval_on_selector_all(
        f"#grid .cell[data-layer='{layer}'][data-head='{head}'] span", "spans => spans.map(s => s.style.background)"
    )
    return [float(b.rsplit(",", 1)[1].rstrip(")")) if b else 0.0 for b in backgrounds]


def assert_page_shows(page, e: dict) -> None:
    n_head = e["model"]["n_head"]
    for layer in range(e["model"]["n_layer"]):
        for head in range(n_head):
            weights = e["heads"][layer * n_head + head]["weights"]
            assert alphas(page, layer, head)[: len(weights)] == pytest.approx(
                weights, abs=6e-3
            )  # colours keep 2 decimals
    prediction = page.inner_text("#prediction")
    for c in e["prediction"]:
        assert f"'{c['label']}' {c['probability']:.3f}" in prediction


def test_live_page(browser, server, run_dir):
    page = browser.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-prompt='Once upon a time']")  # the first prompt this tokenizer reads
    starter = alphas(page, 1, 0)

    page.fill("#prompt", "")
    page.type("#prompt", "ROMEO: ab", delay=15)  # each key restarts the debounce: one request at the end
    page.wait_for_selector("body[data-prompt='ROMEO: ab']")
    status, e = server.request("POST", "/api/explain", {"prompt": "ROMEO: ab"})
    assert status == 200 and page.locator("#tokens .tok").count() == 9
    assert alphas(page, 1, 0) != starter
    assert_page_shows(page, e)
    chosen = e["heads"][e["layer"] * 2 + e["head"]]["keys"][0]
    assert f"{chosen['weight']:.4f}" in page.inner_text("#detail") and f"{chosen['score']:.3f}" in page.inner_text(
        "#detail"
    )

    page.click("#tokens .tok[data-i='3']")  # focus token 3: the server explains the prediction after it
    page.wait_for_function(
        "() => document.getElementById('detail-title').textContent.startsWith('Attention of token 3')"
    )
    page.wait_for_function("() => E.focus === 3")
    status, at3 = server.request("POST", "/api/explain", {"prompt": "ROMEO: ab", "token": 3})
    assert_page_shows(page, at3)
    page.click("#grid .cell[data-layer='0'][data-head='1']")
    assert "layer 0, head 1" in page.inner_text("#detail-title")

    page.evaluate(COUNT_MUTATIONS)
    page.fill("#max-tokens", "30")
    page.fill("#temperature", "0")  # greedy: the page must show what the API gives
    page.click("#generate")
    page.wait_for_function(f"() => {GENERATED!r}.includes(document.getElementById('live-status').textContent)")
    body = {"model": "run", "prompt": "ROMEO: ab", "max_tokens": 30, "temperature": 0}
    greedy = server.request("POST", "/v1/completions", body)[1]["choices"][0]["text"]
    assert len(greedy) == 30 and page.inner_text("#generated") == "ROMEO: ab" + greedy
    assert page.evaluate("window.mutations") > 30  # the text arrived token by token, as it was generated

    assert page.is_visible("#loss-curve svg polyline[data-series='val']") and page.is_visible("#slider")
    assert "not training now; step 10: validation loss" in page.inner_text("#loss-caption")
    # a training takes the run: the page follows its new evaluation and probe
    (run_dir / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    model, tok = tiny()
    save_probe(model, tok, "ROMEO:", run_dir, 20)
    write_log(run_dir, [20], [20])
    page.wait_for_function(
        "() => document.getElementById('loss-caption').textContent.includes('step 20')", timeout=25_000
    )
    assert f"training now (process {os.getpid()})" in page.inner_text("#loss-caption")
    page.wait_for_function("() => document.getElementById('step-label').textContent.startsWith('step 20 (3 of 3)')")
    (run_dir / "train.lock").unlink()

    assert errors == []
    assert requests and all(url.startswith(server.url + "/") for url in requests)  # nothing leaves this machine
    page.close()


def test_notebook_display_is_the_page_offline(browser):
    model, tok = tiny()
    e = explain(model, "ROMEO: ab", tok)
    page = browser.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("request", lambda r: requests.append(r.url))
    page.set_content(f"<div class='output'>{e._repr_html_()}</div>")  # what a notebook does with _repr_html_
    frame = page.frame_locator("iframe")
    assert frame.locator("#grid .cell").count() == 2 * 3
    assert frame.locator("#tokens .tok").count() == 9
    assert "ROMEO: ab" in frame.locator("#title").inner_text()
    assert errors == [] and [u for u in requests if not u.startswith(("about:", "data:"))] == []
    page.close()


def test_with_an_api_key_the_page_asks_for_it(browser, run_dir):
    server = Server(run_dir, "--api-key", "sesame")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("() => document.getElementById('live-status').textContent.includes('needs an API key')")
        assert page.is_visible("#api-key") and page.locator("#tokens .tok").count() == 0
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")  # a change event: the key is used from now on
        page.wait_for_selector("body[data-prompt='Once upon a time']")
        assert page.locator("#tokens .tok").count() == len("Once upon a time")
        page.close()
    finally:
        server.stop()


def test_chat_panel(browser, tmp_path):
    """A model with a chat template gets the chat panel: each message sends the whole conversation (the system
    message first), the reply streams in as the API gives it, and the conversation can be explained; a model that
    only continues text (the run above) has no panel."""
    chat_run = make_run(tmp_path / "chat", chat=True)
    server = Server(chat_run)
    try:
        page = browser.new_page()
        errors, sent = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else 0)
        page.goto(server.url + "/")
        assert page.is_visible("#chat-panel")
        page.fill("#max-tokens", "20")
        page.fill("#temperature", "0")
        page.fill("#chat-system", "Be brief.")
        conversation = [{"role": "system", "content": "Be brief."}]
        for message in ("Hello, who are you?", "And then?"):
            page.fill("#chat-input", message)
            page.press("#chat-input", "Enter")
            page.wait_for_function("() => document.getElementById('chat-send').textContent === 'Send'")
            conversation.append({"role": "user", "content": message})
            asked = {"model": "chat", "messages": conversation, "max_tokens": 20, "temperature": 0}
            assert sent[-1] == {**asked, "stream": True}
            reply = server.request("POST", "/v1/chat/completions", asked)[1]["choices"][0]["message"]["content"]
            assert page.locator(".turn.assistant .content").last.inner_text() == reply
            conversation.append({"role": "assistant", "content": reply})
        assert page.locator(".turn.user").count() == 2 and page.input_value("#chat-input") == ""

        page.click("#chat-explain")  # the conversation as the template renders it becomes the explained prompt
        tokens = server.request("POST", "/tokenize", {"messages": conversation, "add_generation_prompt": False})[1]
        rendered = server.request("POST", "/detokenize", {"tokens": tokens["tokens"]})[1]["prompt"]
        page.wait_for_function("(text) => document.body.dataset.prompt === text", arg=rendered)
        assert rendered.count("<|im_start|>") == 5

        page.click("#chat-reset")
        assert page.locator(".turn").count() == 0 and page.is_hidden("#chat-explain")
        assert errors == []
        page.close()
    finally:
        server.stop()
    assert "Traceback" not in "".join(server.stderr)


def test_a_text_model_has_no_chat_panel(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-prompt]")
    assert page.is_hidden("#chat-panel")
    page.close()
