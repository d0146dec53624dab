"""Continuous batching: many requests decoded together, joining and leaving the batch between decode steps.

One scheduler thread owns the model. Each transformer request gets a *slot*: one sequence of a batch KV cache
(`KVCache.slot`). A step of the loop
1. admits waiting requests into free slots (a bounded queue in front: `submit` raises `QueueFull` past it);
2. takes at most `prefill_chunk` prompt tokens, across the requests still prefilling — a long prompt is split
   over several steps, so the streams already running wait for one chunk at a time, not for the whole prompt;
3. runs those prompt tokens and the next token of every decoding request in one call of the fused C step
   (slmkit.infer.fused.BatchDecoder), which reads each weight once for all of them — decoding a small model is
   bound by the bytes of weights read per step, so a batch of n rows costs little more than one. Models the C
   step does not cover prefill and decode slot by slot through the PyTorch forward.
A request leaves its slot the moment it finishes: a stop token, a stop string, `max_tokens`, a full context, its
deadline, or `cancel` (a client that went away); the next waiting request takes the slot in the same step.

Models other than transformers (the n-gram baseline) have no KV cache to share: their requests advance one token per
step each through their own `generate` iterator — the same scheduling, without the shared weight reads.

Events reach the request's `sink` from the scheduler thread, in order: `Token` per generated token (its text piece
may be "" while held back), then one `Done`. The HTTP layer (slmkit.serve.app) turns them into responses.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from slmkit.api import LLM
from slmkit.errors import SlmError
from slmkit.infer.fused import BatchDecoder
from slmkit.model.gpt import GPT, KVCache
from slmkit.runtime import release_freed_memory
from slmkit.sampling import SamplingParams, sample_rows
from slmkit.tokenizer.stream import TextStream

log = logging.getLogger("slmkit.serve")
# tokens per slot unless asked: every slot's cache is allocated up front, and an 8k-context model's full one per slot
# would cost more memory than the model's weights
DEFAULT_MAX_LEN = 2048
TRIM_EVERY_S = 10.0  # how often a busy engine returns freed heap memory to the OS (Engine._trim)


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound: the client should retry later (HTTP 429)."""


@dataclass
class Token:
    id: int
    text: str  # the text this token made final: "" while a character or a possible stop string is incomplete
    logprob: float | None = None  # log-probability of the token under the model (temperature 1), if asked
    top: list[tuple[int, float]] | None = None  # the most likely tokens at this step and their log-probabilities


@dataclass
class Done:
    finish_reason: str  # "stop" (stop token or string), "length" (max_tokens, context full, deadline) or "error"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # the last text, held back until the end (a possible stop string's start, a partial character)
    error: str | None = None  # with finish_reason "error": what went wrong (e.g. the deadline passed in the queue)


Event = Token | Done


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, sampling, stop strings; events go to `sink` (called from the scheduler thread)."""

    ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the top k
    deadline: float | None = None  # time.monotonic() after which the request ends (finish_reason "length")
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling (OpenAI's logit_bias)
    cancelled: bool = False
    # scheduler state
    slot: int = -1
    cache: KVCache | None = None
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    text: TextStream | None = None
    gen: torch.Generator | None = None
    it: Iterator[int] | None = None  # models without a KV cache: their own generate iterator


class Engine:
    """The scheduler around one loaded model (`LLM`). `start()` runs it in a daemon thread; `submit(request)` queues a
    request (thread-safe); `cancel(request)` drops it at the next step; `stop()` ends the thread.

    max_batch: requests decoded together (slots of the KV cache). max_len: tokens per slot, prompt and output
    (default: the model's context, at most DEFAULT_MAX_LEN). max_queue: requests waiting for a slot before `submit`
    raises QueueFull.
    prefill_chunk: prompt tokens prefilled per step, the most a running stream waits for a newcomer per step.
    kv: the KV cache's storage, "fp32", "bf16" or "int8" (slmkit.model.gpt.KVCache).
    """

    def __init__(self, llm: LLM, *, max_batch: int = 8, max_len: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, kv: str = "fp32"):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise SlmError(f"{name}={value} must be >= 1")
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        model = llm.model
        self.model: GPT | None = model if isinstance(model, GPT) else None
        ctx = llm.lm.context_length
        if max_len is not None and max_len < 2:
            raise SlmError(f"max_len={max_len} must be >= 2 (a prompt token and one generated)")
        if max_len is not None and ctx is not None and max_len > ctx:
            raise SlmError(f"max_len={max_len} is longer than the model's context of {ctx} tokens")
        self.max_len: int | None = min(max_len or DEFAULT_MAX_LEN, ctx) if ctx is not None else max_len
        self.cache: KVCache | None = None
        self.batch: BatchDecoder | None = None
        if self.model is not None:
            assert self.max_len is not None  # a transformer has a context length
            self.model.eval()
            self.cache = self.model.new_cache(max_batch, self.max_len, kv=kv)
            self.batch = BatchDecoder.for_model(self.model, self.cache, rows=max_batch + prefill_chunk)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._free = list(range(max_batch))[::-1]
        # per slot, the ids whose keys/values its cache holds at positions 0.. (what its last request left there)
        self._kept: list[list[int]] = [[] for _ in range(max_batch)]
        self.reused = 0  # prompt tokens not prefilled again: found in a slot's cache (for /health and tests)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seed = torch.Generator().manual_seed(int(time.time_ns()) & 0x7FFFFFFF)
        self.steps = 0  # decode steps run (for /health and tests)
        self._last_trim, self._finished_since_trim = time.monotonic(), 0

    # --- the caller's side (any thread) ---------------------------------------------------------------------------

    @property
    def supports_logprobs(self) -> bool:
        return self.model is not None

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="slmkit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, req: Request) -> None:
        """Queue `req`. SlmError for a request that cannot run (empty prompt, a prompt that fills the context, ids
        outside the vocabulary); QueueFull when the queue is at its bound."""
        if not req.ids:
            raise SlmError("the prompt is empty")
        if max(req.ids) >= self.llm.lm.vocab_size or min(req.ids) < 0:
            raise SlmError(f"the prompt holds token ids outside the model's vocabulary of {self.llm.lm.vocab_size}")
        if self.max_len is not None and len(req.ids) >= self.max_len:
            raise SlmError(f"the prompt is {len(req.ids)} tokens; this server's context holds {self.max_len} "
                           "(prompt and completion together): shorten it")
        if req.logit_bias and (max(req.logit_bias) >= self.llm.lm.vocab_size or min(req.logit_bias) < 0):
            raise SlmError(f"logit_bias names token ids outside the model's vocabulary of {self.llm.lm.vocab_size}")
        if req.logit_bias and self.model is None:
            raise SlmError("logit_bias is not available for this model")
        if req.top_logprobs is not None and not self.supports_logprobs:
            raise SlmError("log-probabilities are not available for this model")
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for a slot: retry later")
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Drop `req` at the next step (its slot is freed then); no further events are sent."""
        req.cancelled = True
        with self._cv:
            if req in self._waiting:  # never admitted: leaves the queue now
                self._waiting.remove(req)
            self._cv.notify()

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.max_batch}

    # --- the scheduler thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._admit()
                try:
                    self._step()
                    self._trim()
                except Exception as e:  # a bug must not take the server down: fail the requests in flight, go on
                    log.exception("engine step failed")
                    for req in list(self._running):
                        self._finish(req, "error", error=f"internal error: {type(e).__name__}: {e}")

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and (self._free or self._waiting[0].cancelled):
            req = self._waiting.popleft()
            if req.cancelled:
                continue
            if req.deadline is not None and now > req.deadline:
                self._send(req, Done("error", len(req.ids), 0, error="timed out waiting for a free slot"))
                continue
            req.slot = self._pick_slot(req.ids)
            req.text = TextStream(self.tokenizer, req.stop)
            seed = req.params.seed
            req.gen = torch.Generator().manual_seed(
                seed if seed is not None else int(torch.randint(2**31, (1,), generator=self._seed)))
            if self.cache is not None:
                req.cache = self.cache.slot(req.slot)
                # the prompt's start that the slot's last request left in its cache (a chat's system prompt and
                # earlier turns) is not computed again; its last token always is: its logits give the first new token
                kept = self._kept[req.slot]
                reuse = min(_shared(kept, req.ids), len(req.ids) - 1)
                if reuse < len(kept) and not req.cache.rewindable:
                    reuse = 0  # a recurrent state (linear attention) sums every kept position: it cannot be cut back
                req.prefilled = req.cache.pos = reuse
                self.reused += req.prefilled
            else:
                req.it = self.llm.lm.generate(req.ids, req.params, stop_ids=tuple(self.tokenizer.stop_ids))
            self._running.append(req)

    def _trim(self) -> None:
        """Every TRIM_EVERY_S while requests come and go, hand the heap's freed pages back to the OS: each request's
        short-lived tensors and strings (its prompt, logits rows, events) leave freed holes in glibc's heap that it
        keeps, and a server's resident memory should be its model, its caches and its requests in flight."""
        now = time.monotonic()
        if self._finished_since_trim and now - self._last_trim >= TRIM_EVERY_S:
            release_freed_memory()
            self._last_trim, self._finished_since_trim = now, 0

    def _pick_slot(self, ids: list[int]) -> int:
        """The free slot that saves the most prefill now for the least cached text lost: what its cache holds of the
        start of `ids`, less what of it would be overwritten (the most recently freed among equals) — a
        conversation's next turn finds its slot, a prompt sharing only a first token leaves another's alone."""
        def gain(i: int) -> tuple[int, int]:
            kept = self._kept[self._free[i]]
            return 2 * _shared(kept, ids) - len(kept), i

        return self._free.pop(max(range(len(self._free)), key=gain))

    def _step(self) -> None:
        now = time.monotonic()
        for req in list(self._running):
            if req.cancelled:
                self._release(req)
            elif req.deadline is not None and now > req.deadline:
                self._finish(req, "length")
        if self.model is None:
            for req in list(self._running):
                assert req.it is not None
                nxt = next(req.it, None)
                if nxt is None:  # the model's own generate ended: max_new_tokens
                    self._finish(req, "length")
                else:
                    self._emit(req, nxt, None)
            return
        decoding = [r for r in self._running if r.prefilled == len(r.ids)]
        chunks = self._chunks()
        if self.batch is not None:
            self._fused_step(decoding, chunks)
            return
        for req, n in chunks:  # outside what the C step covers: PyTorch forwards, prompt chunks then one per sequence
            cache = req.cache
            assert cache is not None
            logits = self.model(torch.tensor([req.ids[req.prefilled : req.prefilled + n]]), cache=cache,
                                last_only=True)[0][0, -1]
            req.prefilled += n
            if req.prefilled == len(req.ids):
                self._sample([req], logits[None])
        if decoding:
            self.steps += 1
            self._sample(decoding, torch.stack([
                self.model(torch.tensor([[r.generated[-1]]]), cache=r.cache, last_only=True)[0][0, -1]
                for r in decoding]))

    def _chunks(self) -> list[tuple[Request, int]]:
        """The prompt tokens to prefill this step: up to prefill_chunk of them, oldest request first."""
        budget, chunks = self.prefill_chunk, []
        for req in self._running:
            if budget <= 0:
                break
            n = min(len(req.ids) - req.prefilled, budget)
            if n > 0:
                chunks.append((req, n))
                budget -= n
        return chunks

    def _fused_step(self, decoding: list[Request], chunks: list[tuple[Request, int]]) -> None:
        """One C call: the next token of every decoding request and the prompt chunks, in one pass over the
        weights (prefilling alongside decoding costs the running streams little: the weights are read once)."""
        assert self.batch is not None
        tokens, slots, positions = [], [], []
        for r in decoding:
            tokens.append(r.generated[-1])
            slots.append(r.slot)
            positions.append(r.cache.pos)  # type: ignore[union-attr]
        ready, rows = list(decoding), list(range(len(decoding)))
        for req, n in chunks:
            start = req.cache.pos  # type: ignore[union-attr]
            tokens += req.ids[req.prefilled : req.prefilled + n]
            slots += [req.slot] * n
            positions += range(start, start + n)
            req.prefilled += n
            if req.prefilled == len(req.ids):  # the prompt is complete: its last row's logits give the first token
                ready.append(req)
                rows.append(len(tokens) - 1)
        logits = self.batch(tokens, slots, positions, logits_rows=rows)  # (len(rows), V): mid-prompt rows need none
        for r in decoding:
            r.cache.pos += 1  # type: ignore[union-attr]
        for req, n in chunks:
            req.cache.pos += n  # type: ignore[union-attr]
        if decoding:
            self.steps += 1
        if ready:
            self._sample(ready, logits.clone())

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample the next token of each request from its row of (B, V) logits, all rows at once, and emit it —
        with the log-probabilities it was drawn from if the request asks for them (the model's distribution, before
        temperature and filters, as OpenAI reports them)."""
        logits = logits.float()  # the callers pass fresh tensors (indexed copies, stacks): changed in place below
        logp = [torch.log_softmax(row, -1) if r.top_logprobs is not None else None
                for r, row in zip(reqs, logits, strict=True)]
        for r, row in zip(reqs, logits, strict=True):
            if r.logit_bias:
                row[list(r.logit_bias)] += torch.tensor(list(r.logit_bias.values()))
        histories = None  # the context ids, only when some request's repetition penalty reads them
        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            histories = [torch.tensor(r.ids + r.generated) if r.params.repetition_penalty != 1.0 else torch.empty(0)
                         for r in reqs]
        picks = sample_rows(logits, [r.params for r in reqs], [r.gen for r in reqs], histories)
        for r, nxt, lp in zip(reqs, picks, logp, strict=True):
            self._emit(r, nxt, lp)

    def _emit(self, req: Request, nxt: int, logp: torch.Tensor | None = None) -> None:
        """Send token `nxt` of `req` and finish the request if it ends here."""
        req.generated.append(nxt)
        tok = self.tokenizer
        logprob = top = None
        if logp is not None:
            logprob = float(logp[nxt])
            if req.top_logprobs:
                v, i = logp.topk(req.top_logprobs)
                top = list(zip(i.tolist(), v.tolist(), strict=True))
        assert req.text is not None
        if nxt in tok.stop_ids or nxt == tok.pad_id:
            self._send(req, Token(nxt, "", logprob, top))
            self._finish(req, "stop")
            return
        self._send(req, Token(nxt, req.text.push(nxt), logprob, top))
        if req.text.stopped:
            self._finish(req, "stop")
        elif len(req.generated) >= req.params.max_new_tokens:
            self._finish(req, "length")
        elif self.max_len is not None and len(req.ids) + len(req.generated) >= self.max_len:
            self._finish(req, "length")  # prompt + completion fill the slot's context

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        rest = req.text.flush() if req.text is not None and reason != "error" else ""
        self._send(req, Done(reason, len(req.ids), len(req.generated), rest, error))
        if reason == "error":  # a step failed midway: trust nothing it may have left in the cache
            req.cache = None
        self._release(req)

    def _send(self, req: Request, event: Event) -> None:
        if req.cancelled:
            return
        try:
            req.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): nobody is waiting for this request
            log.exception("dropping a request whose receiver failed")
            req.cancelled = True

    def _release(self, req: Request) -> None:
        if req in self._running:
            self._running.remove(req)
            self._finished_since_trim += 1
            # keys/values stand at positions < cache.pos: the prompt, then every generated token but the last
            self._kept[req.slot] = (req.ids + req.generated)[: req.cache.pos] if req.cache is not None else []
            with self._cv:
                self._free.append(req.slot)
        req.cache = req.it = None


def _shared(a: list[int], b: list[int]) -> int:
    """The length of the common start of a and b."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
