"""The web chat page (slmkit/serve/static) driven in headless Chromium through Playwright.

The tests talk to the page like a user (type, Enter, Stop, New chat) and read only what any server with the API
would produce: the model name from /v1/models, some streamed text, the server's own error messages. They never
depend on the generated words, so they hold for a random model. Playwright's own browser download is not used:
Debian's chromium is (`apt-get install chromium`; scripts/setup.sh test installs it when it can).

SLMKIT_SCREENSHOT=docs/chat.png saves a screenshot of a conversation (left unset in CI: tests do not write into
the repository).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"the web chat tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the web chat tests need playwright: pip install 'slmkit[dev]'")
pytest.importorskip("fastapi", reason="the web chat tests need the serve dependencies (fastapi, uvicorn)")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: real runs, servers or a browser (the quick lane skips them)

STATIC = Path(__file__).resolve().parents[2] / "slmkit" / "serve" / "static"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ASSISTANT_TEXT = "#messages .msg.assistant .text"
STREAM_TIMEOUT = 60_000  # ms: a whole reply on a loaded 2-core machine


# ---- a stand-in server that writes each event in parts (test_events_split_across_reads) ---------------------------

FAKE_MODEL = "fake-model"
FAKE_KEY = "sk-test-123"
# curly apostrophes and dashes are several bytes in UTF-8: splitting an event inside one tests the page's decoding
FAKE_WORDS = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
              "that lour’d upon our house — in the deep bosom of the ocean buried.").split()
FAKE_DELAY = 0.03  # s between pieces: slow enough to see text grow and to press Stop


def _fake_reply(n: int) -> list[str]:
    """The pieces the stand-in streams for max_tokens=n: the sonnet's words, cycled."""
    return [("" if i == 0 else " ") + FAKE_WORDS[i % len(FAKE_WORDS)] for i in range(n)]


def _fake_app(api_key: str | None = None):
    """A minimal FastAPI app with the served page and the two /v1 routes the page uses, streaming slowly. Each event
    is written in three parts (one split inside a multi-byte character when the piece has one, one between the two
    newlines that end it), so the page must reassemble lines across reads."""
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def error(status: int, message: str, code: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": code}}, status_code=status)

    def unauthorized(request: Request) -> JSONResponse | None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "Incorrect API key provided: pass it as Authorization: Bearer KEY", "invalid_api_key")
        return None

    @app.get("/")
    def index():
        # the real server's policy: a page that needed inline script or style would break here too
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'")})

    @app.get("/v1/models")
    def models(request: Request):
        return unauthorized(request) or {"object": "list",
                                         "data": [{"id": FAKE_MODEL, "object": "model", "owned_by": "slmkit"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        if not body.get("messages"):
            return error(400, "messages must be a non-empty list", "invalid_value")
        n = int(body.get("max_tokens") or 16)

        def event(delta: dict, finish: str | None = None) -> bytes:
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": FAKE_MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()

        async def stream():
            yield event({"role": "assistant"})
            for piece in _fake_reply(n):
                await asyncio.sleep(FAKE_DELAY)
                data = event({"content": piece})
                cut = next((i + 1 for i, b in enumerate(data) if b >= 0xC0), len(data) // 2)
                for part in (data[:cut], data[cut:-1], data[-1:]):
                    yield part
                    await asyncio.sleep(0.002)
            yield event({}, "length")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@contextmanager
def _serve(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """The real server (slm serve's app and engine) around a tiny random chat model."""
    from tests.serve.conftest import running, tiny_llm

    with running(tiny_llm(chat=True, block_size=512), max_batch=4) as url:
        yield url


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    with _serve(_fake_app()) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[tuple[str, str]]:
    """(base URL, API key) of a real server that requires the key on /v1."""
    from tests.serve.conftest import running, tiny_llm

    with running(tiny_llm(chat=True, block_size=512), max_batch=2, api_key=FAKE_KEY) as url:
        yield url, FAKE_KEY


# ---- browser ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """open_page(url, width=900, height=700) → a page in a fresh context (own localStorage) with the chat loaded.
    Uncaught script errors on any page fail the test."""
    contexts, errors = [], []

    def open_(url: str, width: int = 900, height: int = 700) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def get_json(url: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def model_id(base: str, key: str | None = None) -> str:
    status, body = get_json(base + "/v1/models", key)
    assert status == 200, body
    return body["data"][0]["id"]


def send(page: Page, text: str, max_tokens: int | None = None) -> None:
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def stop_at_first_text(page: Page) -> None:
    """Arm the page to press Stop the moment the next reply shows its first text, from inside the page (a mutation
    observer): even a tiny model that finishes in milliseconds is then stopped mid-stream."""
    page.evaluate("""() => {
        const messages = document.getElementById('messages');
        window.__stopPressed = false;
        const observer = new MutationObserver(() => {
            const texts = messages.querySelectorAll('.msg.assistant .text');
            const n = texts.length ? texts[texts.length - 1].textContent.length : 0;
            if (messages.getAttribute('aria-busy') === 'true' && n > 0) {
                observer.disconnect();
                document.getElementById('stop').click();
                window.__stopPressed = true;
            }
        });
        observer.observe(messages, {subtree: true, childList: true, characterData: true});
    }""")


def wait_idle(page: Page) -> None:
    expect(page.locator("#messages")).to_have_attribute("aria-busy", "false", timeout=STREAM_TIMEOUT)
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def watch_reply(page: Page) -> None:
    """Record, at every change of the chat, the newest reply's length and whether the stream was still open: a
    record taken by the page itself, so a fast server cannot slip text past a polling test."""
    page.evaluate("""() => {
        const messages = document.getElementById('messages');
        window.__replyLog = [];
        new MutationObserver(() => {
            const texts = messages.querySelectorAll('.msg.assistant .text');
            window.__replyLog.push({busy: messages.getAttribute('aria-busy') === 'true',
                                    n: texts.length ? texts[texts.length - 1].textContent.length : 0});
        }).observe(messages, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")


def lengths_while_streaming(page: Page) -> list[int]:
    return [e["n"] for e in page.evaluate("window.__replyLog") if e["busy"] and e["n"] > 0]


# ---- tests -----------------------------------------------------------------------------------------------------

def test_model_name_shown(open_page, server_url):
    page = open_page(server_url)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#messages .msg")).to_have_count(0)


def test_reply_streams_in_and_history_is_sent(open_page, server_url):
    page = open_page(server_url)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    page.fill("#temperature", "0.5")
    page.fill("#max-tokens", "12")  # small: the whole conversation must fit a tiny test model's context
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    page.locator("#prompt").press_sequentially("there")
    expect(page.locator("#prompt")).to_have_value("Hello\nthere")
    expect(page.locator("#messages .msg")).to_have_count(0)

    watch_reply(page)
    with page.expect_request("**/v1/chat/completions") as first:
        page.press("#prompt", "Enter")
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#messages .msg.user .text")).to_have_text("Hello\nthere")
    wait_idle(page)
    reply = page.locator(ASSISTANT_TEXT).text_content()
    # text was on screen while the stream was open, and more came after it
    assert any(0 < n < len(reply) for n in lengths_while_streaming(page)), "the reply did not stream in"
    body = first.value.post_data_json
    assert body["stream"] is True and body["max_tokens"] == 12 and body["temperature"] == 0.5
    assert body["messages"] == [{"role": "user", "content": "Hello\nthere"}]

    # the second request carries the whole conversation, the reply exactly as it was shown
    with page.expect_request("**/v1/chat/completions") as second:
        send(page, "And then?", max_tokens=6)
    wait_idle(page)
    assert second.value.post_data_json["messages"] == [
        {"role": "user", "content": "Hello\nthere"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And then?"},
    ]
    expect(page.locator(ASSISTANT_TEXT)).to_have_count(2)
    expect(page.locator("#messages .msg.error")).to_have_count(0)
    # the second turn completed: text, or (a random model may end its turn at once) the page's own "empty reply"
    second = page.locator("#messages .msg.assistant").nth(1)
    assert second.locator(".text").text_content() or second.locator(".note").text_content() == "empty reply"

    if shot := os.environ.get("SLMKIT_SCREENSHOT"):
        page.set_viewport_size({"width": 820, "height": 640})
        page.eval_on_selector("#messages", "m => { m.scrollTop = m.scrollHeight; }")
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shot)

    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)
    with page.expect_request("**/v1/chat/completions") as third:
        send(page, "Fresh start", max_tokens=4)
    wait_idle(page)
    assert third.value.post_data_json["messages"] == [{"role": "user", "content": "Fresh start"}]


def test_stop_keeps_partial_reply(open_page, server_url):
    page = open_page(server_url)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    stop_at_first_text(page)
    send(page, "Tell me a long story", max_tokens=2000)
    wait_idle(page)
    assert page.evaluate("window.__stopPressed"), "the reply ended without text, or Stop was never pressed"
    partial = page.locator(ASSISTANT_TEXT).text_content()
    assert partial
    time.sleep(0.3)  # nothing more arrives after Stop
    assert page.locator(ASSISTANT_TEXT).text_content() == partial
    expect(page.locator("#messages .msg.assistant .note")).to_have_text("stopped")

    # the page is usable again, and the stopped reply is part of the conversation
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Shorter, please", max_tokens=8)
    wait_idle(page)
    assert request.value.post_data_json["messages"][1] == {"role": "assistant", "content": partial}
    expect(page.locator(ASSISTANT_TEXT)).to_have_count(2)
    expect(page.locator("#messages .msg.error")).to_have_count(0)
    # the second turn completed: text, or (a random model may end its turn at once) the page's own "empty reply"
    second = page.locator("#messages .msg.assistant").nth(1)
    assert second.locator(".text").text_content() or second.locator(".note").text_content() == "empty reply"


def test_stop_before_any_text_takes_the_turn_back(open_page, server_url):
    page = open_page(server_url)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    page.route("**/v1/chat/completions", lambda route: None)  # the request hangs: no reply ever starts
    send(page, "Are you there?")
    expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    wait_idle(page)
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("Are you there?")


def test_errors_are_shown_inline(open_page, server_url):
    """Errors that only a broken server or proxy produces, played by the browser itself."""
    page = open_page(server_url)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    errors = page.locator("#messages .msg.error .text")

    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=502, body="<html>Bad Gateway</html>"))
    send(page, "one")
    expect(errors).to_have_count(1)
    expect(errors.first).to_contain_text("HTTP 502")
    page.unroute("**/v1/chat/completions")

    # an error event after some text: the partial reply stays, the error is said under it
    sse = ('data: {"choices":[{"index":0,"delta":{"content":"half a rep"},"finish_reason":null}]}\n\n'
           'data: {"error":{"message":"generation failed: out of memory","type":"server_error"}}\n\n')
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    send(page, "two")
    wait_idle(page)
    expect(errors).to_have_count(2)
    expect(errors.nth(1)).to_have_text("generation failed: out of memory")
    expect(page.locator(ASSISTANT_TEXT)).to_have_text("half a rep")
    expect(page.locator("#messages .msg.assistant .note")).to_have_text("interrupted")


INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b> & &amp;'


def test_user_and_model_text_is_not_html(open_page, server_url):
    page = open_page(server_url)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    # the reply is markup too, served by the browser itself: any model, any context length
    pieces = ['<img src=x onerror="window.__pwned=3">', "<scr", "ipt>window.__pwned=4</script>", "<i>it</i>"]
    events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    send(page, INJECTION, max_tokens=4)
    wait_idle(page)
    expect(page.locator("#messages .msg.user .text")).to_have_text(INJECTION)
    expect(page.locator(ASSISTANT_TEXT)).to_have_text("".join(pieces))
    assert page.locator("#messages img, #messages script, #messages b, #messages i").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_api_key(open_page, keyed_server):
    url, key = keyed_server
    status, denied = get_json(url + "/v1/models")
    assert status == 401
    message = denied["error"]["message"]

    page = open_page(url)
    errors = page.locator("#messages .msg.error .text")
    expect(errors).to_have_count(1)  # the model list was refused: said at once, in the server's words
    expect(errors.first).to_contain_text(message)

    send(page, "Hello?", max_tokens=8)
    expect(errors).to_have_count(2)
    expect(errors.nth(1)).to_have_text(message)
    # the refused turn is taken back and its text returned for a retry
    expect(page.locator("#messages .msg.user, #messages .msg.assistant")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("Hello?")
    wait_idle(page)

    page.fill("#api-key", key)
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    assert request.value.headers["authorization"] == f"Bearer {key}"
    wait_idle(page)
    assert page.locator(ASSISTANT_TEXT).text_content()
    expect(page.locator("#messages .msg.user .text")).to_have_text("Hello?")
    expect(page.locator("#model")).to_have_text(model_id(url, key))
    expect(errors).to_have_count(2)

    page.reload()  # the key is remembered (localStorage), so a reload just works
    expect(page.locator("#api-key")).to_have_value(key)
    expect(page.locator("#model")).to_have_text(model_id(url, key))
    expect(page.locator("#messages .msg.error")).to_have_count(0)


def test_narrow_screen(open_page, server_url):
    page = open_page(server_url, width=360, height=640)
    expect(page.locator("#model")).to_have_text(model_id(server_url))
    send(page, "A long line without spaces: " + "x" * 200, max_tokens=30)
    wait_idle(page)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    for sel in ("#prompt", "#send", "#stop", "#temperature", "#max-tokens", "#api-key", "#new-chat"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, f"{sel} is off screen: {box}"


def test_events_split_across_reads(open_page, fake_url):
    """On the stand-in server: it writes every event in parts, one cut inside a multi-byte character."""
    page = open_page(fake_url)
    expect(page.locator("#model")).to_have_text(FAKE_MODEL)
    send(page, "Go", max_tokens=len(FAKE_WORDS) + 3)
    wait_idle(page)
    expect(page.locator(ASSISTANT_TEXT)).to_have_text("".join(_fake_reply(len(FAKE_WORDS) + 3)))
    expect(page.locator("#messages .msg.assistant .note")).to_have_text("reached max tokens")
