"""The server through the official `openai` client and plain HTTP: what it answers equals what the library
generates, whatever the batching; limits, errors and auth answer as OpenAI's API does."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx2 as httpx
import openai
import pytest

from slmkit.serve.app import PLAIN_STOP
from tests.serve.conftest import MODEL, running, tiny_llm, wait_idle

PROMPTS = ["the king is", "o romeo wherefore", "my lord what say you", "a summers day", "long live", "fair maid o"]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(chat=True)


@pytest.fixture(scope="module")
def url(llm):
    with running(llm, max_batch=4) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4


def test_greedy_chat_and_completion_equal_the_library(client, llm):
    for prompt in PROMPTS[:3]:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=12, temperature=0)
        want = llm.generate(prompt, chat=True, temperature=0, max_new_tokens=12)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
        c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert c.choices[0].text == llm.generate(prompt, temperature=0, max_new_tokens=12)
        assert c.object == "text_completion"


def test_usage_and_finish_reason(client, llm):
    tok = llm.tokenizer
    r = client.completions.create(model=MODEL, prompt="the king is", max_tokens=7, temperature=0)
    assert r.usage.prompt_tokens == len(tok.encode("the king is", bos=tok.add_bos))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length"


def test_streaming_equals_the_whole_response(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "the king is"}], max_tokens=15, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    pieces = list(client.completions.create(model=MODEL, prompt="the king is", max_tokens=15, temperature=0,
                                            stream=True))
    assert len(pieces) > 3  # token by token, not one lump
    assert "".join(p.choices[0].text for p in pieces) == client.completions.create(
        model=MODEL, prompt="the king is", max_tokens=15, temperature=0).choices[0].text


def test_stop_strings_cut_before_the_stop(client):
    full = client.completions.create(model=MODEL, prompt="my lord", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="my lord", max_tokens=30, temperature=0, stop=[stop, "zzzz"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


def test_seeded_sampling_repeats_and_differs_across_seeds(client):
    kw = dict(model=MODEL, prompt="the king", max_tokens=20, temperature=1.0)
    a, b, c = (client.completions.create(**kw, seed=s).choices[0].text for s in (1, 1, 2))
    assert a == b and a != c


def test_concurrent_requests_over_the_slots_each_get_their_own_answer(url, llm):
    """More requests than slots, at once, some streaming: each equals the library's greedy answer."""
    want = {p: llm.generate(p, temperature=0, max_new_tokens=10 + i) for i, p in enumerate(PROMPTS)}

    async def main() -> dict[str, str]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(i: int, p: str) -> tuple[str, str]:
            kw = dict(model=MODEL, prompt=p, max_tokens=10 + i, temperature=0)
            if i % 2:
                return p, "".join([c.choices[0].text async for c in await ac.completions.create(**kw, stream=True)])
            return p, (await ac.completions.create(**kw)).choices[0].text

        return dict(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))

    assert asyncio.run(main()) == want
    assert wait_idle(url)["running"] == 0


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the king"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert e.logprob == pytest.approx(tops[0])  # greedy takes the most likely token
        assert e.token == e.top_logprobs[0].token
    c = client.completions.create(model=MODEL, prompt="the king", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 4 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


def test_plain_template_for_a_model_without_one():
    llm = tiny_llm(chat=False)
    with running(llm, max_batch=2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                           messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "the king is"}])
        whole = llm.generate("System: be brief\nUser: the king is\nAssistant:", temperature=0, max_new_tokens=12,
                             stop=[PLAIN_STOP])
        assert r.choices[0].message.content == whole


def test_errors_through_the_client(client, url):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    for bad in (dict(max_tokens=-1), dict(max_tokens=10**9), dict(temperature=3.0), dict(top_p=0), dict(n=2)):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=msgs, **bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # longer than the context (96 tokens here)
        client.completions.create(model=MODEL, prompt="the king " * 200)
    assert e.value.body["code"] == "context_length_exceeded"


def test_api_key():
    llm = tiny_llm()
    never_stop = {str(i): -100 for i in {*llm.tokenizer.stop_ids, llm.tokenizer.pad_id}}  # a random model may end
    with running(llm, max_batch=1, api_key="sekret") as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        answer = good.completions.create(model=MODEL, prompt="the", max_tokens=2, logit_bias=never_stop)
        assert answer.usage.completion_tokens == 2
        assert httpx.get(url + "/health").status_code == 200  # the page and health need no key


def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_is_a_429_and_the_deadline_ends_a_request():
    llm = tiny_llm(block_size=4096)
    never_stop = {str(i): -100 for i in {*llm.tokenizer.stop_ids, llm.tokenizer.pad_id}}  # a random model may end
    with running(llm, max_batch=1, max_queue=1, timeout=1.0) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        health = lambda: httpx.get(url + "/health").json()  # noqa: E731
        results: list = []

        def long_one() -> None:
            try:
                results.append(client.completions.create(model=MODEL, prompt="the", max_tokens=4000,
                                                         logit_bias=never_stop))
            except openai.APIStatusError as e:
                results.append(e)

        first, second = threading.Thread(target=long_one), threading.Thread(target=long_one)
        first.start()
        _until(lambda: health()["running"] == 1)
        second.start()
        _until(lambda: health()["waiting"] == 1)
        with pytest.raises(openai.RateLimitError):  # one running, one waiting: the queue is full
            client.completions.create(model=MODEL, prompt="the", max_tokens=5)
        first.join()
        second.join()
        r = results[0]
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens < 4000  # cut at its deadline
        # the second waited for the slot past its own deadline (503), or got it just before and was cut too
        assert getattr(results[1], "status_code", 200) in (200, 503)


def test_client_disconnect_frees_the_slot():
    """A streaming client that goes away mid-answer frees its slot at once, not after max_tokens more tokens."""
    llm = tiny_llm(block_size=4096)
    never_stop = {str(i): -100 for i in {*llm.tokenizer.stop_ids, llm.tokenizer.pad_id}}
    body = {"model": MODEL, "prompt": "the king", "max_tokens": 4000, "stream": True, "logit_bias": never_stop}
    with running(llm, max_batch=2) as url:
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 400, "stream": False})
        per_token = (time.monotonic() - t0) / r.json()["usage"]["completion_tokens"]
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert httpx.get(url + "/health").json()["running"] == 1
        left = time.monotonic()
        assert wait_idle(url)["running"] == 0
        assert time.monotonic() - left < 0.25 * 4000 * per_token  # long before the answer would have ended


BAD = [
    (b"", 400), (b"{", 400), (b"[]", 400), (b'"text"', 400), (b"null", 400), (b"\xff\xfe{}", 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": NaN}', 400),
    (b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', 400),
    (b'{"prompt": "x"}', 400), (b'{"model": 5, "prompt": "x"}', 400), (b'{"model": "tiny"}', 400),
    (b'{"model": "tiny", "prompt": 5}', 400), (b'{"model": "tiny", "prompt": []}', 400),
    (b'{"model": "tiny", "prompt": [1.5]}', 400), (b'{"model": "tiny", "prompt": [999999]}', 400),
    (b'{"model": "tiny", "prompt": [-1]}', 400), (b'{"model": "tiny", "prompt": ["a", "b"]}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 2.5}', 400),
    (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400),
    (b'{"model": "tiny", "prompt": "x", "temperature": -0.1}', 400),
    (b'{"model": "tiny", "prompt": "x", "top_p": 1.5}', 400),
    (b'{"model": "tiny", "prompt": "x", "stop": 7}', 400), (b'{"model": "tiny", "prompt": "x", "stop": [""]}', 400),
    (b'{"model": "tiny", "prompt": "x", "stop": ["a","b","c","d","e"]}', 400),
    (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400),
    (b'{"model": "tiny", "prompt": "x", "seed": "1"}', 400), (b'{"model": "tiny", "prompt": "x", "n": 3}', 400),
    (b'{"model": "tiny", "prompt": "x", "echo": true}', 400),
    (b'{"model": "tiny", "prompt": "x", "logprobs": 50}', 400),
    (b'{"model": "tiny", "prompt": "x", "frequency_penalty": 1}', 400),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"a": 1}}', 400),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"1": 500}}', 400),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}}', 400),
    (b'{"model": "nope", "prompt": "x"}', 404),
]
BAD_CHAT = [
    b'{"model": "tiny", "messages": []}', b'{"model": "tiny", "messages": "hi"}',
    b'{"model": "tiny", "messages": [{}]}',
    b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -4}',
]


def test_malformed_requests_get_openai_shaped_4xx_and_the_server_keeps_answering(url):
    cases = [("/v1/completions", b, s) for b, s in BAD] + [("/v1/chat/completions", b, 400) for b in BAD_CHAT]
    cases += [("/v1/completions", b"x" * (2 << 20), 413), ("/v1/nothing", b"{}", 404)]
    assert len(cases) >= 30
    with httpx.Client() as client:  # one connection for all: a new one per request was most of this test's time
        for path, body, status in cases:
            r = client.post(url + path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body[:80], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], body[:80]
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    # greedy: a sampled end-of-text token can end the answer before its 3 tokens
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "the king", "max_tokens": 3,
                                                   "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_sse_wire_format(url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_an_ngram_model_is_served_too():
    """No KV cache to share: each request advances through the model's own generate, one token per step."""
    import numpy as np

    from slmkit import LLM
    from slmkit.model.ngram import NgramLM

    tok = tiny_llm().tokenizer
    text = " ".join(["the king is dead long live the king"] * 50)
    ids = np.array([tok.bos_id, *tok.encode(text)], dtype=np.int64)
    llm = LLM(NgramLM.fit(ids, vocab_size=tok.vocab_size, bos_id=tok.bos_id, order=3), tok)
    with running(llm, max_batch=2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model=MODEL, prompt="the king", max_tokens=8, temperature=0)
        assert r.choices[0].text == llm.generate("the king", temperature=0, max_new_tokens=8)
        with pytest.raises(openai.BadRequestError):  # no logits to report
            client.completions.create(model=MODEL, prompt="the king", max_tokens=2, logprobs=1)
