"""The continuous-batching engine without HTTP: requests that join a running batch, leave it early, prefill in
chunks or wait for a slot each get exactly what they would alone."""

from __future__ import annotations

import threading

import pytest

from slmkit.errors import SlmError
from slmkit.finetune.lora import add_lora
from slmkit.sampling import SamplingParams
from slmkit.serve.engine import Done, Engine, QueueFull, Request, Token
from tests.serve.conftest import tiny_llm


class Collect:
    def __init__(self) -> None:
        self.events: list[Token | Done] = []
        self.done = threading.Event()

    def __call__(self, ev: Token | Done) -> None:
        self.events.append(ev)
        if isinstance(ev, Done):
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.events if isinstance(e, Token)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(block_size=128)


def _alone(llm, ids: list[int], n: int) -> list[int]:
    """Greedy ids from the model's own generate, up to and including a stop token (pad too, as LLM.stream)."""
    tok, out = llm.tokenizer, []
    for i in llm.lm.generate(ids, SamplingParams(n, temperature=0), stop_ids=(*tok.stop_ids, tok.pad_id)):
        out.append(i)
    return out


@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_requests_joining_and_leaving_get_what_they_would_alone(llm, kv):
    tok = llm.tokenizer
    prompts = [tok.encode(t, bos=True) for t in ("the king is dead", "o romeo", "my lord what say you to this fair",
                                                 "long", "a summers day and shall i compare")]
    lengths = [30, 5, 17, 40, 9]  # different lengths: requests leave while others run and newcomers take their slot
    engine = Engine(llm, max_batch=2, prefill_chunk=4, kv=kv)  # 2 slots for 5 requests; prompts span chunks
    assert engine.batch is not None  # the fused C step runs the batch
    sinks = [Collect() for _ in prompts]
    engine.start()
    try:
        for ids, n, sink in zip(prompts, lengths, sinks, strict=True):
            engine.submit(Request(ids, SamplingParams(n, temperature=0), sink))
        assert all(s.done.wait(30) for s in sinks)
    finally:
        engine.stop()
    ref = Engine(llm, max_batch=1, kv=kv)  # the same cache storage, one request at a time
    for ids, n, sink in zip(prompts, lengths, sinks, strict=True):
        alone = Collect()
        ref.start().submit(Request(ids, SamplingParams(n, temperature=0), alone))
        assert alone.done.wait(30)
        assert sink.ids == alone.ids
        if kv == "fp32":
            assert sink.ids == _alone(llm, ids, n)  # and what LLM.generate's engine gives
    ref.stop()
    assert engine.steps > 0 and engine.load()["running"] == 0


def test_the_pytorch_path_for_what_the_c_step_does_not_cover():
    llm = tiny_llm(block_size=64)
    add_lora(llm.model, rank=4)  # an unmerged adapter: LoRALinear is no layer the C step reads
    _check_each_gets_what_it_would_alone(llm, fused=False)


def test_linear_attention_keeps_its_state_per_slot_in_the_c_step():
    """Linear attention's recurrent state lives in the batch cache, a row per slot, updated by the C step."""
    _check_each_gets_what_it_would_alone(tiny_llm(block_size=64, attention="linear"), fused=True)


def _check_each_gets_what_it_would_alone(llm, fused: bool) -> None:
    engine = Engine(llm, max_batch=3)
    assert (engine.batch is not None) == fused
    tok = llm.tokenizer
    prompts = [tok.encode(t, bos=True) for t in ("the king", "o romeo wherefore art", "fair")]
    sinks = [Collect() for _ in prompts]
    engine.start()
    try:
        for ids, sink in zip(prompts, sinks, strict=True):
            engine.submit(Request(ids, SamplingParams(12, temperature=0), sink))
        assert all(s.done.wait(30) for s in sinks)
    finally:
        engine.stop()
    for ids, sink in zip(prompts, sinks, strict=True):
        assert sink.ids == _alone(llm, ids, 12)


@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_a_prompt_start_left_in_a_slot_is_not_prefilled_again(llm, kv):
    """A chat's next turn repeats the conversation so far: the slot holding it skips that start and the answer is
    what a fresh slot would give. A prompt that only shares a start still takes the slot that holds it."""
    tok = llm.tokenizer
    chat = tok.encode("my lord what say you to this fair", bos=True)
    other = tok.encode("o romeo", bos=True)
    engine = Engine(llm, max_batch=2, kv=kv).start()
    fresh = Engine(llm, max_batch=1, kv=kv).start()
    try:
        def run(e: Engine, ids: list[int], n: int = 8) -> list[int]:
            sink = Collect()
            e.submit(Request(ids, SamplingParams(n, temperature=0), sink))
            assert sink.done.wait(30)
            return sink.ids

        first = run(engine, chat)
        run(engine, other)  # the other slot now holds "o romeo": the next turn of the chat must find the first one
        assert engine.reused == 0
        turn = chat + first + tok.encode(" and then", bos=False)
        assert run(engine, turn) == run(fresh, turn)
        # the slot held the prompt and all but the last generated token (never fed back)
        assert engine.reused == len(chat) + len(first) - 1
        again = engine.reused
        assert run(engine, turn) == run(fresh, turn)  # the whole prompt again: all but its last token reused
        assert engine.reused - again == len(turn) - 1
    finally:
        engine.stop()
        fresh.stop()


def test_finish_reasons_and_the_context_limit(llm):
    tok = llm.tokenizer
    never = {i: -100.0 for i in {*tok.stop_ids, tok.pad_id}}
    engine = Engine(llm, max_batch=2, max_len=20).start()
    try:
        full = Collect()  # 5 prompt tokens + up to 15 generated fill the 20-token slot
        engine.submit(Request(tok.encode("the king", bos=True), SamplingParams(100), full, logit_bias=never))
        assert full.done.wait(30)
        done = full.events[-1]
        assert isinstance(done, Done) and done.finish_reason == "length"
        assert done.prompt_tokens + done.completion_tokens == 20
        with pytest.raises(SlmError, match="context"):
            engine.submit(Request(list(range(1, 21)), SamplingParams(5), Collect()))
        with pytest.raises(SlmError, match="vocabulary"):
            engine.submit(Request([10**6], SamplingParams(5), Collect()))
    finally:
        engine.stop()


def test_cancel_frees_the_slot_and_the_queue_is_bounded(llm):
    tok = llm.tokenizer
    never = {i: -100.0 for i in {*tok.stop_ids, tok.pad_id}}
    engine = Engine(llm, max_batch=1, max_queue=1)  # not started: requests stay queued
    first, second = Collect(), Collect()
    a = Request(tok.encode("the", bos=True), SamplingParams(100), first, logit_bias=never)
    engine.submit(a)
    with pytest.raises(QueueFull):
        engine.submit(Request(tok.encode("the", bos=True), SamplingParams(5), second))
    engine.cancel(a)  # cancelled while waiting: skipped, never runs
    engine.submit(Request(tok.encode("o", bos=True), SamplingParams(5, temperature=0), second))
    engine.start()
    try:
        assert second.done.wait(30) and first.events == []
    finally:
        engine.stop()


def test_bad_settings_are_user_errors(llm):
    for bad in (dict(max_batch=0), dict(max_queue=0), dict(prefill_chunk=0), dict(max_len=1), dict(max_len=10**6)):
        with pytest.raises(SlmError):
            Engine(llm, **bad)


def test_a_busy_engine_hands_freed_heap_back_between_requests_not_during_idle_or_every_step(llm, monkeypatch):
    import slmkit.serve.engine as engine_module

    trims = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(engine_module, "TRIM_EVERY_S", 0.0)
    tok = llm.tokenizer
    engine = Engine(llm, max_batch=2).start()
    try:
        for _ in range(3):
            got = Collect()
            engine.submit(Request(tok.encode("the", bos=True), SamplingParams(4, temperature=0), got))
            assert got.done.wait(30)
        # each finished request makes the next step trim once, however many steps ran
        assert 1 <= len(trims) <= 3 < engine.steps
    finally:
        engine.stop()
