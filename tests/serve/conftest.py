"""A real uvicorn server on a free loopback port, in-process, around a tiny model — what the tests talk to with the
official `openai` client, plain HTTP, and headless Chromium."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2 as httpx
import pytest
import torch
import uvicorn

from slmkit import LLM
from slmkit.config import ModelConfig
from slmkit.model import GPT
from slmkit.serve import Engine, create_app
from slmkit.tokenizer import Tokenizer
from tests.conftest import WORDS, noisy_weights

CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")
MODEL = "tiny"


def tiny_llm(chat: bool = False, block_size: int = 96, seed: int = 0, **fields: Any) -> LLM:
    """A random 2-layer Llama-style model over a small BPE vocabulary, weights large enough that greedy decoding
    does not repeat one token; with `chat`, its tokenizer carries a chat template (as imported chat models do)."""
    tok = Tokenizer.train("bpe:300", [" ".join(WORDS)] * 20)
    if chat:
        tok = Tokenizer.from_str(tok.to_str(), {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True,
                                                "chat_template": CHAT_TEMPLATE})
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": block_size, "n_layer": 2, "n_head": 4,
                         "n_kv_head": 2, "n_embd": 64, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", **fields})
    model = noisy_weights(GPT(cfg), seed=seed).eval()
    return LLM(model, tok)


@contextlib.contextmanager
def running(llm: LLM, **kw: Any) -> Iterator[str]:
    """Serve `llm` (create_app keywords, plus Engine's max_batch/max_len/max_queue/prefill_chunk/kv) on a free
    loopback port in a thread; yields the base URL; stops the server and its engine after."""
    engine_kw = {k: kw.pop(k) for k in ("max_batch", "max_len", "max_queue", "prefill_chunk", "kv") if k in kw}
    app = create_app(Engine(llm, **engine_kw), model_name=kw.pop("model_name", MODEL), **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def serve_llm() -> Callable[..., Any]:
    """`with serve_llm(llm, **kw) as url:` — see `running`."""
    return running


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A chat-template model served with 4 slots, shared by a module's tests."""
    with running(tiny_llm(chat=True), max_batch=4) as url:
        yield url


def wait_idle(url: str, timeout: float = 10) -> dict[str, Any]:
    """/health once no request is running or waiting (slots are freed a step after a client leaves)."""
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(url + "/health").json()
        if (h["running"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)
