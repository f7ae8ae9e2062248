"""The explain page in a real headless browser: it loads offline, without errors, and responds to clicks."""

import pytest
from headless import chromium  # skips this module where playwright or Chromium is missing
from test_explain import tiny  # noqa: E402

from potion.explain import explain, save_html  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def open_page(browser, path):
    page = browser.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    url = path.as_uri()
    page.goto(url)
    page.wait_for_load_state("load")
    return page, url, errors, requests


def test_page_loads_offline_and_click_changes_attention(browser, tmp_path):
    model, tok = tiny()
    probes = [explain(model, "ROMEO:", tok, step=s) for s in (0, 50)]
    path = tmp_path / "page.html"
    save_html(explain(model, "ROMEO: abc", tok, expect="d"), path, probes)
    page, url, errors, requests = open_page(browser, path)

    assert page.locator("#tokens .tok").count() == 10
    assert page.locator("#grid .cell").count() == 2 * 3  # 2 layers x (2 heads + the average)
    before = page.inner_text("#detail")
    assert "row sum" in before and "masked" not in before  # the last token: nothing after it to mask
    page.click("#tokens .tok[data-i='2']")
    page.mouse.move(0, 0)  # leave the token: the click, not the hover, must hold the choice
    after = page.inner_text("#detail")
    assert after != before and "tokens 3..9: masked" in after
    assert "Attention of token 2" in page.inner_text("#detail-title")

    page.click("#grid .cell[data-layer='0'][data-head='1']")
    assert "layer 0, head 1" in page.inner_text("#detail-title")
    page.click("#grid .cell[data-layer='0'][data-head='-1']")
    assert "average" in page.inner_text("#detail-title")

    assert page.is_visible("#training-section")
    page.locator("#slider").fill("0")
    assert page.inner_text("#step-label").startswith("step 0")

    assert errors == []
    assert requests == [url]  # nothing from the network, not even a font or an icon
    page.close()


def test_long_prompt_page_shows_the_focus_only(browser, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("potion.explain.attention"), "MATRIX_BUDGET", 50)
    model, tok = tiny()
    path = tmp_path / "long.html"
    save_html(explain(model, "ROMEO: abcdefghijklm", tok), path)
    page, url, errors, requests = open_page(browser, path)
    page.click("#tokens .tok[data-i='1']")
    assert "only token" in page.inner_text("#tokens-note")
    assert "Attention of token 19" in page.inner_text("#detail-title")
    assert errors == [] and requests == [url]
    page.close()
