"""The chat page in real headless Chromium: send, watch drafted tokens stream in, press stop."""

import json
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
                None)
# Without the background-networking flags Chromium hangs on a closed network.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
Q = "Ava has 3 apples. Then Ava buys 2 more apples. How many apples does Ava have now?"


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        yield browser
        browser.close()


def test_chat_page_streams_marks_drafts_and_stops(browser, serve_app, slow_engine, tmp_path):
    slow = slow_engine(delay=0.08)  # ignores end-of-text: the answer lasts until we press stop
    server = serve_app(engine_fn=slow)
    page = browser.new_page()
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny:')")

    page.fill("#prompt", Q)
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .tok.draft", timeout=20_000)  # an accepted draft, marked
    page.wait_for_function("document.querySelectorAll('.msg.assistant .block').length >= 3")
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    tau = float(page.text_content("#tau"))
    assert 1.0 < tau <= 2.0  # two heads: at most two tokens per forward
    assert float(page.text_content("#tps")) > 0
    computed = page.locator(".msg.assistant .tok:not(.draft)").count()
    assert computed >= 1  # and the computed tokens look different: no draft class

    page.click("#stop")
    page.wait_for_selector(".msg.assistant .note:text('[stopped]')")
    health = server.wait_idle(timeout=10)  # the server stopped decoding, it did not finish the answer
    assert health["cancelled"] == 1 and health["finished"] == 0
    assert slow.runs[0].closed and slow.runs[0].events < slow.runs[0].max
    assert not slow.engine.rows  # the stopped answer's row is free
    shown = page.text_content(".msg.assistant")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 1000
    if os.environ.get("MTPLAB_SCREENSHOT"):  # to look at it: MTPLAB_SCREENSHOT=chat.png pytest ...
        shutil.copy(tmp_path / "chat.png", os.environ["MTPLAB_SCREENSHOT"])

    # a second turn carries the first one, stopped answer included, in the chat template's roles
    page.click("#settings summary")
    page.fill("#max_tokens", "3")
    page.fill("#prompt", "And then?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                           "document.querySelectorAll('.msg.assistant')[1].dataset.state == 'done'")
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[-1]["messages"][1]["content"] == shown.replace("[stopped]", "")
    assert bodies[-1]["stream"] is True and bodies[-1]["max_tokens"] == 3
    assert page.locator(".msg.assistant").nth(1).locator(".note").text_content() == "[token limit]"


def test_chat_page_with_an_api_key(browser, serve_app):
    """The page loads without the key, asks for it, says so when it is wrong, and chats with the
    right one (sent on every API call; every /v1 route still needs it)."""
    server = serve_app(api_key="sekret")
    page = browser.new_page()
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization")))
            if "/v1/" in r.url else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#keyform:not([hidden])")
    assert page.text_content("#key_message") == "This server needs an API key."

    page.fill("#api_key", "wrong")
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('key_message').textContent.startsWith('Wrong API key')")
    assert page.is_visible("#keyform")

    page.fill("#api_key", "sekret")
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny:')")
    assert page.is_hidden("#keyform")
    page.click("#settings summary")
    page.fill("#max_tokens", "4")
    page.fill("#prompt", Q)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.msg.assistant') && "
                           "document.querySelector('.msg.assistant').dataset.state == 'done'", timeout=20_000)
    assert not page.locator(".msg.assistant.error").count()
    assert page.text_content(".msg.assistant").strip()
    assert sent[-1][0].endswith("/v1/chat/completions") and sent[-1][1] == "Bearer sekret"
    assert page.evaluate("sessionStorage.getItem('mtplab_api_key')") == "sekret"
