"""The playground's chat mode, in headless Chromium: turns as role bubbles, replies streamed
from /v1/chat/completions with the whole conversation sent each time, reset; and the served
model's name in /v1/models."""

from __future__ import annotations

import httpx
import pytest

from moorelm.inference.engine import Engine
from moorelm.serve import BackgroundServer
from moorelm.serve.api import create_app
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT
from tests.test_inference_engine import scripted_model
from tests.test_playground import browser, set_value, wait_for  # noqa: F401 (a fixture)

# records the JSON body of every request the page sends
RECORD = """
window.sent = [];
const plain = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body) window.sent.push([url, JSON.parse(opts.body)]);
  return plain(url, opts);
};
"""


@pytest.fixture(scope="module")
def replying():
    """A scripted model that answers 'Ok!' after the default template's 'ASSISTANT:\\n'."""
    tok = Tokenizer.train([SMALL_TEXT], "char")
    return scripted_model(tok, [tok.encode(c)[0] for c in "\nOk!"], seq_len=256), tok


def bubbles(driver) -> list[tuple[str, str]]:
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#messages .bubble')].map("
        "(b) => [b.dataset.role, b.querySelector('.content').textContent]);")
    return [tuple(r) for r in rows]


def test_chat_mode_turns_stream_and_reset(browser, replying):  # noqa: F811
    """Chat mode shows each turn as a bubble of its role; the reply equals what the API answers
    for the same conversation; the second message is sent with the first turn and its reply;
    a refused request takes its turn back; Reset empties the conversation; completion mode's prompt and output are hidden meanwhile."""
    model, tok = replying
    engine = Engine(model, tok, max_batch=2)
    with BackgroundServer(create_app(engine, "replying")) as server:
        listed = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["replying"]
        browser.get(server.url + "/")
        wait_for(lambda: "replying" in browser.find_element("id", "model").text)
        browser.find_element("id", "mode-chat").click()
        assert browser.find_element("id", "chat-panel").is_displayed()
        assert not browser.find_element("id", "output").is_displayed()
        assert not browser.find_element("id", "generate").is_displayed()
        browser.execute_script(RECORD)
        set_value(browser, "temperature", "0")
        set_value(browser, "max-tokens", "20")
        set_value(browser, "chat-input", "hello")
        browser.find_element("id", "send").click()
        wait_for(lambda: browser.find_element("id", "messages").get_attribute("data-turns") == "2")
        expected = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "replying", "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "hello"}]}).json()
        reply = expected["choices"][0]["message"]["content"]
        assert reply == "Ok!" and bubbles(browser) == [("user", "hello"), ("assistant", reply)]
        assert browser.find_element("id", "status").text == "done"
        assert browser.find_element("id", "chat-input").get_attribute("value") == ""

        set_value(browser, "system", "Be brief.")
        set_value(browser, "chat-input", "again")
        browser.find_element("id", "send").click()
        wait_for(lambda: browser.find_element("id", "messages").get_attribute("data-turns") == "4")
        assert [role for role, _ in bubbles(browser)] == ["user", "assistant"] * 2
        url, body = browser.execute_script("return window.sent;")[-1]
        assert url == "/v1/chat/completions" and body["stream"] is True
        assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "Ok!"},
                                    {"role": "user", "content": "again"}]

        # a refused request (too long for the context) takes its turn back, text kept to edit
        set_value(browser, "max-tokens", "250")
        set_value(browser, "chat-input", "once more")
        browser.find_element("id", "send").click()
        wait_for(lambda: browser.find_element("id", "status").text.startswith("error"))
        assert "context window" in browser.find_element("id", "status").text
        assert len(bubbles(browser)) == 4
        assert browser.find_element("id", "chat-input").get_attribute("value") == "once more"

        browser.find_element("id", "reset").click()
        assert bubbles(browser) == []
        assert browser.find_element("id", "messages").get_attribute("data-turns") == "0"
        browser.find_element("id", "mode-completion").click()
        assert browser.find_element("id", "prompt").is_displayed()
        assert not browser.find_element("id", "chat-panel").is_displayed()
    engine.stop()


def test_models_route_names_an_imported_model(tmp_path):
    """A served import lists the name the import kept (config.json's ``name``) in /v1/models
    and /health, not the run folder's."""
    pytest.importorskip("transformers")
    from fastapi.testclient import TestClient

    from moorelm.interop.hf import import_hf
    from moorelm.serve import build_app
    from tests.test_hf_families import hf_folder

    hf_folder(tmp_path / "tiny-qwen3", "qwen3")
    run = import_hf(tmp_path / "tiny-qwen3", tmp_path / "run")
    with TestClient(build_app(run, device="cpu", max_batch=1)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-qwen3"]
        assert client.get("/health").json()["model"] == "tiny-qwen3"
