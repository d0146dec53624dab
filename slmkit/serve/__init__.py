"""`slm serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

>>> from slmkit.serve import serve
>>> serve("runs/smollm2", port=8000, weights="int8", max_batch=8)  # doctest: +SKIP

Or in-process, e.g. to mount it in another ASGI app:
>>> from slmkit import LLM
>>> from slmkit.serve import Engine, create_app
>>> app = create_app(Engine(LLM.load("runs/smollm2"), max_batch=8), model_name="smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.serve.app import PLAIN_TEMPLATE, create_app
from slmkit.serve.engine import Engine, QueueFull, Request

__all__ = ["PLAIN_TEMPLATE", "Engine", "QueueFull", "Request", "create_app", "serve"]


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, weights: str = "fp32",
          kv_cache: str = "fp32", api_key: str | None = None, max_batch: int = 8, ctx: int | None = None,
          threads: int | None = None, max_queue: int = 64, max_tokens: int = 4096, timeout: float = 600.0,
          max_body: int = 1 << 20, model_name: str | None = None, log_level: str = "info") -> None:
    """Load `run` and serve it until interrupted. `api_key` defaults to the SLM_API_KEY environment variable.

    `threads` (the decode step's) defaults to one less than the cores: the HTTP event loop needs a core of its own,
    and a decode step whose threads share cores with it stalls at every barrier (docs/benchmarks.md)."""
    import uvicorn

    from slmkit.api import LLM
    from slmkit.runtime import available_cores

    for name, value in (("port", port), ("max_tokens", max_tokens), ("max_body", max_body)):
        if value < 1 or (name == "port" and value > 65535):
            raise SlmError(f"{name}={value} is out of range")
    if timeout <= 0:
        raise SlmError(f"timeout={timeout} must be > 0 seconds")
    api_key = api_key if api_key is not None else os.environ.get("SLM_API_KEY") or None
    llm = LLM.load(run, threads=threads or max(1, available_cores() - 1), weights=weights)  # type: ignore[arg-type]
    engine = Engine(llm, max_batch=max_batch, max_len=ctx, max_queue=max_queue, kv=kv_cache)
    name = model_name or Path(run).resolve().name
    app = create_app(engine, model_name=name, api_key=api_key, max_body=max_body, max_tokens=max_tokens,
                     timeout=timeout)
    log = logging.getLogger("slmkit.serve")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    fused = "fused C batch step" if engine.batch is not None else "PyTorch, one sequence at a time"
    log.info("serving %s as %r: %d slots of %s tokens (KV cache %.0f MB, %s), decode via %s; chat page at "
             "http://%s:%d/%s", run, name, max_batch, engine.max_len or "any", engine.kv_bytes / 1e6, kv_cache,
             fused, host, port, " (API key required on /v1)" if api_key else "")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
