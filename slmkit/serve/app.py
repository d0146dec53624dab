"""The HTTP server: OpenAI's API over the continuous-batching engine, and the web chat page.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both streaming as server-sent events
or not), `GET /health`, and the chat page at `/` (slmkit/serve/static, shipped in the package: no CDN).

Limits: a body over `max_body` bytes is a 413; `max_tokens` over the cap or a prompt that fills the context is a 400
(nothing is truncated silently); a full waiting queue is a 429; a request still running at `timeout` seconds ends
with finish_reason "length", one still waiting for a slot then gets a 503. A client that disconnects (or stops
reading a stream) frees its slot at the next decode step. With `api_key` set, every /v1 route wants
`Authorization: Bearer <key>` (401 otherwise); the page and /health do not.

Chat: the model's own chat template (imported chat models carry one), else `PLAIN_TEMPLATE` — "User: …" /
"Assistant: …" lines, with "\\nUser:" as an extra stop string so a base model's reply ends where it would start the
user's next line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmkit.errors import SlmError
from slmkit.sampling import SamplingParams
from slmkit.serve.engine import Done, Engine, Event, QueueFull, Token
from slmkit.serve.engine import Request as GenRequest
from slmkit.serve.protocol import ApiError, ChatRequest, CompletionRequest, error_param
from slmkit.tokenizer.tokenizer import PLAIN_TEMPLATE

STATIC = Path(__file__).parent / "static"
PLAIN_STOP = "\nUser:"
# The page loads only its own files and talks only to this server: injected markup could not fetch or run anything.
PAGE_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_body: int = 1 << 20,
               max_tokens: int = 4096, timeout: float = 600.0) -> FastAPI:
    """The FastAPI app around a (not yet started) engine; the app's lifespan starts and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="slmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    tok = engine.tokenizer

    # --- errors: always OpenAI's shape -----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = "no such route: see GET /v1/models" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
                e = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    # --- routes -------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {model_name!r}", "model",
                           "model_not_found")
        return _model_card(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = _validate(ChatRequest, await _read_json(request, max_body))
        _check_model(body.model, model_name)
        if body.logprobs is False and body.top_logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        stop = list(body.stop or ())  # the validator made a given stop a list
        try:
            if tok.chat_template:
                ids = tok.encode(tok.apply_chat_template(messages), bos=tok.add_bos, specials=True)
            else:  # user text stays text: "<|eos|>" typed in a message is not the control token
                ids = tok.encode(tok.apply_chat_template(messages, template=PLAIN_TEMPLATE), bos=tok.add_bos)
                stop.append(PLAIN_STOP)
        except SlmError as e:
            raise ApiError(400, str(e), "messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _run(request, "chat", body, ids, stop, limit, param, top)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _validate(CompletionRequest, await _read_json(request, max_body))
        _check_model(body.model, model_name)
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            ids = list(prompt)  # type: ignore[arg-type]
        else:
            text = prompt if isinstance(prompt, str) else prompt[0]
            try:
                ids = tok.encode(text, bos=tok.add_bos) or [tok.bos_id]  # at least one token to condition on
            except SlmError as e:
                raise ApiError(400, str(e), "prompt") from None
        return await _run(request, "text", body, ids, list(body.stop or ()), body.max_tokens, "max_tokens",
                          body.logprobs)

    # --- one generation -----------------------------------------------------------------------------------------

    async def _run(request: Request, kind: str, body: Any, ids: list[int], stop: list[str], limit: int | None,
                   param: str, top: int | None) -> Response:
        room = engine.max_len - len(ids) if engine.max_len is not None else max_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context holds {engine.max_len} "
                           "(prompt and completion together): shorten it", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")
        if limit is not None and limit > max_tokens:
            raise ApiError(400, f"{param}={limit} is over this server's cap of {max_tokens}", param)
        n = min(limit or max_tokens, room, max_tokens)
        try:
            params = SamplingParams(n, 1.0 if body.temperature is None else float(body.temperature), body.top_k,
                                    None if body.top_p is None else float(body.top_p),
                                    1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
                                    body.seed)
        except SlmError as e:
            raise ApiError(400, str(e)) from None
        inbox = Inbox(asyncio.get_running_loop())
        bias = {int(k): float(v) for k, v in body.logit_bias.items()} if body.logit_bias else None
        req = GenRequest(ids, params, inbox.put, tuple(stop), top, time.monotonic() + timeout, bias)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except SlmError as e:
            raise ApiError(400, str(e)) from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        shape = _Shape(kind, rid, int(time.time()), model_name, tok)
        try:
            first = await _next_events(request, inbox, engine, req)
        except BaseException:
            engine.cancel(req)
            raise
        if isinstance(first[0], Done) and first[0].error:
            status = 503 if "timed out" in first[0].error else 500
            raise ApiError(status, first[0].error, code="timeout" if status == 503 else None)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(inbox, engine, req, first, shape, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text: list[str] = []
        logprobs: list[Token] = []
        evs = first
        while True:
            for ev in evs:
                text.append(ev.text)
                if isinstance(ev, Token):
                    if top is not None and ev.logprob is not None:
                        logprobs.append(ev)
                    continue
                if ev.error:
                    raise ApiError(500, ev.error)
                return JSONResponse(shape.whole("".join(text), logprobs if top is not None else None, ev))
            try:
                evs = await _next_events(request, inbox, engine, req)
            except BaseException:
                engine.cancel(req)
                raise

    async def _stream(inbox: Inbox, engine: Engine, req: GenRequest, first: list[Event], shape: _Shape,
                      usage: bool) -> AsyncIterator[bytes]:
        """The SSE body: one event per token, as OpenAI sends them; the events that arrived together (the engine ran
        ahead of this stream) go out in one write."""
        done = False
        try:
            out = bytearray()
            if shape.kind == "chat":  # OpenAI's first chat chunk names the role
                out += _sse(shape.chunk(role=True, usage=usage))
            evs = first
            while True:
                for ev in evs:
                    if isinstance(ev, Token):
                        if ev.text or ev.logprob is not None:
                            out += _sse(shape.chunk(ev.text, [ev] if ev.logprob is not None else None, usage=usage))
                        continue
                    done = True
                    if ev.error:
                        out += _sse(ApiError(500, ev.error).body())
                    else:
                        if ev.text:
                            out += _sse(shape.chunk(ev.text, usage=usage))
                        out += _sse(shape.chunk(finish=ev.finish_reason, usage=usage))
                        if usage:
                            out += _sse(shape.usage_chunk(ev))
                    yield bytes(out + b"data: [DONE]\n\n")
                    return
                if out:
                    yield bytes(out)
                    out.clear()
                evs = await inbox.get()
        finally:
            if not done:  # the client went away (or the server is stopping): free the slot now
                engine.cancel(req)

    # --- the page -----------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.exists():
            raise ApiError(404, "the chat page is not installed")
        return FileResponse(index, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Inbox:
    """One request's events, from the engine thread to the event loop. The loop is woken once for whatever has
    arrived since it last looked, not once per token: each wake-up costs a write to the loop's self-pipe and a turn
    of the loop, which with many streams decoding at once would cost more than the tokens themselves."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: list[Event] = []
        self._lock = threading.Lock()
        self._wake_pending = False
        self._ready = asyncio.Event()

    def put(self, ev: Event) -> None:
        """Called from the engine thread."""
        with self._lock:
            self._items.append(ev)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def get(self) -> list[Event]:
        """Every event that has arrived, oldest first (at least one: waits for it)."""
        while True:
            with self._lock:
                if self._items:
                    items, self._items = self._items, []
                    return items
                self._ready.clear()
            await self._ready.wait()


async def _next_events(request: Request, inbox: Inbox, engine: Engine, req: GenRequest) -> list[Event]:
    """The request's next events; a client that disconnected meanwhile cancels it (its slot is freed)."""
    while True:
        try:
            return await asyncio.wait_for(inbox.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                engine.cancel(req)
                raise ApiError(499, "the client closed the connection") from None


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "slmkit"}


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(404, f"the model {name!r} does not exist; this server has {served!r}", "model",
                       "model_not_found")


async def _read_json(request: Request, cap: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `cap` bytes (read no further), 400 for empty, non-UTF-8 or invalid JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {cap}")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > cap:
            raise ApiError(413, f"the request body is over the limit of {cap} bytes")
    if not raw:
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 (byte {e.start})") from None

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(obj).__name__}")
    return obj


def _validate(schema: type, obj: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = error_param(err["loc"])
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "a required field is missing"
        elif param in ("n", "frequency_penalty", "presence_penalty", "echo", "suffix"):
            msg = f"this server supports only the default for {param} ({msg})"
        raise ApiError(400, f"{param}: {msg}" if param else msg, param or None) from None


class _Shape:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, kind: str, rid: str, created: int, model: str, tok: Any):
        self.kind, self.id, self.created, self.model, self.tok = kind, rid, created, model, tok

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: list[Token]) -> dict[str, Any]:
        tb = self.tok.token_bytes
        if self.kind == "chat":
            def entry(i: int, lp: float) -> dict[str, Any]:
                b = tb(i)
                return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

            return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or ()]}
                                for t in tokens]}
        return {"tokens": [tb(t.id).decode("utf-8", "replace") for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{tb(i).decode("utf-8", "replace"): lp for i, lp in t.top or ()} for t in tokens]}

    def _usage(self, done: Done) -> dict[str, int]:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def whole(self, text: str, logprobs: list[Token] | None, done: Done) -> dict[str, Any]:
        lp = None if logprobs is None else self._logprobs(logprobs)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": done.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self._usage(done)}
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": done.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self._usage(done)}

    def chunk(self, text: str = "", logprobs: list[Token] | None = None, *, role: bool = False,
              finish: str | None = None, usage: bool = False) -> dict[str, Any]:
        lp = None if logprobs is None else self._logprobs(logprobs)
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            out = {**self._head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if usage:
            out["usage"] = None
        return out

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self._usage(done)}
