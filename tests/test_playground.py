"""The web playground, end to end in headless Chromium: type a prompt, press Generate,
watch the text stream in, read tokens/s."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from moorelm.inference.engine import Engine
from moorelm.serve import BackgroundServer
from moorelm.serve.api import create_app
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT
from tests.test_inference_engine import scripted_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("Chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def looping():
    """A scripted model that writes 'ab' over and over: a long, known stream."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    return scripted_model(tok, [a, b, a], seq_len=512), tok


def wait_for(cond, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def set_value(driver, element_id: str, value: str) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, value)


# records, at every change of the output, how long the text was and what the status said
WATCH = """
window.seen = [];
new MutationObserver(() => window.seen.push([
  document.getElementById('output').textContent.length,
  document.getElementById('status').textContent,
])).observe(document.getElementById('output'), {childList: true, subtree: true,
                                                 characterData: true});
"""


def test_playground_streams_tokens(browser, looping):
    """Generate shows the completion growing while the request is still running, ends with
    the same text the API returns for the same settings, and shows tokens/s."""
    model, tok = looping
    engine = Engine(model, tok, max_batch=4)
    with BackgroundServer(create_app(engine, "looping")) as server:
        browser.get(server.url + "/")
        wait_for(lambda: "looping" in browser.find_element("id", "model").text)
        set_value(browser, "prompt", "a")
        set_value(browser, "temperature", "0")
        set_value(browser, "max-tokens", "400")
        browser.execute_script(WATCH)
        browser.find_element("id", "generate").click()
        wait_for(lambda: browser.find_element("id", "status").text == "done")
        text = browser.find_element("id", "output").text
        expected = httpx.post(server.url + "/v1/completions", json={
            "model": "looping", "prompt": "a", "max_tokens": 400, "temperature": 0,
        }).json()["choices"][0]["text"]
        assert text == expected == "ba" * 200
        seen = browser.execute_script("return window.seen;")
        partial = {n for n, status in seen if status.startswith("generating") and 0 < n < 400}
        assert len(partial) > 1  # shown piece by piece while the request was still running
        assert int(browser.find_element("id", "output").get_attribute("data-chunks")) > 1
        rate = browser.find_element("id", "rate").text
        assert re.search(r"400 tokens · [\d.]+ tokens/s", rate), rate
    engine.stop()


def test_playground_reports_errors(browser, looping):
    """A request the server refuses (here: no API key) shows the server's message instead
    of output; with the key typed in, generation works."""
    model, tok = looping
    engine = Engine(model, tok, max_batch=2)
    with BackgroundServer(create_app(engine, "looping", api_key="sesame")) as server:
        browser.get(server.url + "/")
        wait_for(lambda: "looping" in browser.find_element("id", "model").text)
        set_value(browser, "prompt", "a")
        set_value(browser, "max-tokens", "10")
        browser.find_element("id", "generate").click()
        status = wait_for(lambda: browser.find_element("id", "status").text.startswith("error")
                          and browser.find_element("id", "status").text)
        assert "API key" in status
        set_value(browser, "api-key", "sesame")
        browser.find_element("id", "generate").click()
        wait_for(lambda: browser.find_element("id", "status").text == "done")
        assert browser.find_element("id", "output").text == "ba" * 5
    engine.stop()


def test_playground_colours_tokens_and_shows_attention(browser, looping, tmp_path):
    """Each generated piece is coloured by its probability (from the API's logprobs);
    hovering one shows its alternatives; clicking one asks POST /v1/inspect and shows what
    that token attended to (weights over the earlier tokens, summing to 1), per layer and
    head; a screenshot of the page is saved."""
    from selenium.webdriver.common.action_chains import ActionChains

    model, tok = looping
    engine = Engine(model, tok, max_batch=2)
    with BackgroundServer(create_app(engine, "looping")) as server:
        browser.get(server.url + "/")
        wait_for(lambda: "looping" in browser.find_element("id", "model").text)
        set_value(browser, "prompt", "a")
        set_value(browser, "temperature", "0")
        set_value(browser, "max-tokens", "8")
        browser.find_element("id", "generate").click()
        wait_for(lambda: browser.find_element("id", "status").text == "done")
        spans = browser.find_elements("css selector", "#output .tok")
        texts, probs, colours = browser.execute_script(
            "const c = [...document.querySelectorAll('#output .tok')];"
            "return [c.map((x) => x.textContent), c.map((x) => parseFloat(x.dataset.prob)),"
            "        c.map((x) => getComputedStyle(x).backgroundColor)];")
        assert "".join(texts) == "ba" * 4 and len(spans) == len(texts)
        assert all(0 < p <= 1 for p in probs)
        assert all(c.startswith("rgb") and c != "rgba(0, 0, 0, 0)" for c in colours)
        ActionChains(browser).move_to_element(spans[2]).perform()
        tip = wait_for(lambda: browser.find_element("id", "tip").is_displayed()
                       and browser.find_element("id", "tip").text)
        assert "alternatives" in tip and "p = " in tip
        spans[3].click()
        wait_for(lambda: browser.find_elements("css selector", "#attention .tok"))
        status = wait_for(lambda: "attended" in browser.find_element("id", "attention-status").text
                          and browser.find_element("id", "attention-status").text)
        assert "layer 0" in status and "mean of heads" in status
        texts, weights = browser.execute_script(
            "const c = [...document.querySelectorAll('#attention .tok')];"
            "return [c.map((x) => x.textContent), c.map((x) => parseFloat(x.dataset.weight))];")
        pos = int(browser.find_element("id", "attention").get_attribute("data-position"))
        assert "".join(texts) == "a" + "ba" * 4 and pos == 4
        assert abs(sum(weights[: pos + 1]) - 1) < 1e-2 and sum(weights[pos + 1:]) == 0
        expected = httpx.post(server.url + "/v1/inspect", json={
            "model": "looping", "prompt": "a" + "ba" * 4, "position": pos}).json()
        assert weights[: pos + 1] == pytest.approx(expected["attention"]["weights"][: pos + 1],
                                                   abs=1e-3)
        browser.set_window_size(1200, 900)
        shot = tmp_path / "playground.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    engine.stop()


def test_inspect_html_page_hover_and_attention(browser, tmp_path):
    """moorelm inspect's HTML page, opened from disk: hovering a token shows its probability
    and alternatives; clicking one shades the text by that token's attention (weights over
    the tokens up to it, which sum to 1) for the chosen layer and head."""
    import torch
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    from moorelm.config import ModelConfig
    from moorelm.inspect import inspect, save_html
    from moorelm.model import GPT

    tok = Tokenizer.train([SMALL_TEXT], "char")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=32, n_layer=2, n_head=4,
                            n_kv_head=2, n_embd=32, pos="rope", norm="rmsnorm")).eval()
    result = inspect(model, tok, "ROMEO: soft", max_new_tokens=3)
    page = save_html(result, tmp_path / "inspect.html")
    browser.get(page.as_uri())
    spans = wait_for(lambda: browser.find_elements("css selector", "#text .tok"))
    assert len(spans) == len(result.tokens)
    assert float(spans[3].get_attribute("data-prob")) == pytest.approx(result.tokens[3].prob, abs=1e-4)
    ActionChains(browser).move_to_element(spans[3]).perform()
    tip = wait_for(lambda: browser.find_element("id", "tip").text)
    assert "alternatives" in tip and "rank" in tip
    Select(browser.find_element("id", "layer")).select_by_value("1")
    Select(browser.find_element("id", "head")).select_by_value("3")
    spans[6].click()
    weights = browser.execute_script(
        "return [...document.querySelectorAll('#text .tok')]"
        ".map((x) => parseFloat(x.dataset.attention));")
    expected = result.attention_map(1, 3)[6]
    assert weights[:7] == pytest.approx(expected[:7].tolist(), abs=1e-3)
    assert sum(weights[:7]) == pytest.approx(1, abs=1e-2) and sum(weights[7:]) == 0
    assert "layer 1" in browser.find_element("id", "mode").text
