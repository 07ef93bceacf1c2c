"""The chat page at `/`, driven end to end in headless Chromium: a real uvicorn server in a thread serving a
tiny random model, playwright typing a message and clicking Send, the streamed reply growing on screen
and ending as the server's own non-streaming greedy reply. Skipped without playwright or /usr/bin/chromium
(Debian's chromium; playwright's own browser download is not needed)."""

from pathlib import Path

import httpx
import pytest
import torch

from conftest import LiveServer
from slmforge.config import preset
from slmforge.model import LlamaModel
from slmforge.modeldir import save_model_dir
from slmforge.serve.app import ServerConfig, create_app

CHROMIUM = Path("/usr/bin/chromium")
KEY = "sk-webui"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)  # a larger init than training's: far-from-uniform logits, no greedy near-ties
    m = LlamaModel(preset("200k", vocab_size=tiny_tokenizer.vocab_size, initializer_range=0.1))
    path = save_model_dir(tmp_path_factory.mktemp("webui") / "tiny", m, tiny_tokenizer)
    s = LiveServer(create_app([f"tiny={path}"], ServerConfig(max_batch=2, api_keys=[KEY])))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_page_is_self_contained(server):
    r = httpx.get(server.base + "/", timeout=60)  # generous: the test machine may be shared
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, nothing fetched from elsewhere


def test_chat_streams_greedy_reply(server, browser):
    message, max_tokens = "Tom saw the cat.", 40
    expected = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "tiny", "messages": [{"role": "user", "content": message}], "temperature": 0,
        "max_tokens": max_tokens}, timeout=60).json()["choices"][0]["message"]["content"]
    assert expected

    page = browser.new_page()
    page.goto(server.base + "/")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")  # stores the key and reloads the model list with it
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")
    assert page.evaluate("localStorage.getItem('slmforge.apiKey')") == KEY
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    # Record every length the reply takes on screen, to see it arrive in pieces rather than at once.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const m = document.querySelector('.msg.assistant');
            if (m) window.lengths.push(m.textContent.length);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", message)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    assert page.text_content(".msg.user") == message
    assert page.text_content(".msg.assistant") == expected
    lengths = [n for n in page.evaluate("window.lengths") if n]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew chunk by chunk
    assert "finish: length" in page.text_content(".stats") or "finish: stop" in page.text_content(".stats")
    page.close()
