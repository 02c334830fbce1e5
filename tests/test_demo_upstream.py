from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from aiohttp import web

from atp_extproc.demo_upstream import UpstreamConfig, make_app, parse_args
from atp_extproc.llm_api import SseStream, Usage


@dataclass
class Upstream:
    base_url: str
    port: int
    session: aiohttp.ClientSession

    def openai_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", **kwargs
        )

    async def debug_requests(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.base_url}/debug/requests") as resp:
            assert resp.status == 200
            return (await resp.json())["requests"]


StartUpstream = Callable[..., Awaitable[Upstream]]


@pytest_asyncio.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    runners: list[web.AppRunner] = []
    session = aiohttp.ClientSession()

    async def start(**config: Any) -> Upstream:
        runner = web.AppRunner(make_app(UpstreamConfig(**config)))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return Upstream(f"http://127.0.0.1:{port}", port, session)

    yield start
    await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture
async def upstream(start_upstream: StartUpstream) -> Upstream:
    return await start_upstream()


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """Return the data payloads, asserting one SSE event per HTTP chunk."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    payloads: list[str] = []
    buffer = b""
    async for data, end_of_chunk in resp.content.iter_chunks():
        buffer += data
        if end_of_chunk or not data:
            if not buffer:
                continue
            text = buffer.decode("utf-8")
            assert text.startswith("data: ") and text.endswith("\n\n"), text
            assert text.count("\n\n") == 1, f"more than one event in a chunk: {text!r}"
            payloads.append(text[len("data: ") : -2])
            buffer = b""
    assert buffer == b""
    return payloads


CHAT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "héllo wörld"},
]
# system: ceil(14/4)+3 = 7, user: ceil(13/4)+3 = 7; reply is 30 bytes -> 8.
CHAT_REPLY = "[demo] you said: héllo wörld"
CHAT_USAGE = {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22}


@pytest.mark.asyncio
async def test_chat_completion_raw(upstream: Upstream) -> None:
    body = {"model": "gpt-test", "messages": CHAT_MESSAGES}
    async with upstream.session.post(f"{upstream.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["x-upstream-name"] == "demo"
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-test"
    assert data["id"] == "chatcmpl-demo-000001"
    assert data["choices"][0]["message"] == {
        "role": "assistant",
        "content": CHAT_REPLY,
        "refusal": None,
    }
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == CHAT_USAGE


@pytest.mark.asyncio
async def test_chat_text_parts_and_last_user_message(start_upstream: StartUpstream) -> None:
    up = await start_upstream(name="alpha")
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "ignored earlier turn"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "part one"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    {"type": "text", "text": "part two"},
                ],
            },
            {"role": "assistant", "content": None},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    async with up.session.post(f"{up.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["x-upstream-name"] == "alpha"
        data = await resp.json()
    reply = "[alpha] you said: part one\npart two"
    assert data["choices"][0]["message"]["content"] == reply
    # ceil(20/4)+3 + ceil(17/4)+3 + 0+3 = 8 + 8 + 3
    assert data["usage"] == {"prompt_tokens": 19, "completion_tokens": 9, "total_tokens": 28}


@pytest.mark.asyncio
async def test_chat_stream_raw_with_and_without_usage(upstream: Upstream) -> None:
    url = f"{upstream.base_url}/v1/chat/completions"
    for with_usage in (False, True):
        body: dict[str, Any] = {"model": "gpt-test", "messages": CHAT_MESSAGES, "stream": True}
        if with_usage:
            body["stream_options"] = {"include_usage": True}
        async with upstream.session.post(url, json=body) as resp:
            assert resp.status == 200
            assert resp.headers["x-upstream-name"] == "demo"
            payloads = await read_sse(resp)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert all(c["model"] == "gpt-test" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        if with_usage:
            usage_chunk = chunks.pop()
            assert usage_chunk["choices"] == []
            assert usage_chunk["usage"] == CHAT_USAGE
            assert all("usage" in c and c["usage"] is None for c in chunks)
        else:
            assert all("usage" not in c for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        content_chunks = chunks[1:-1]
        assert len(content_chunks) > 1
        assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks)
        assert "".join(c["choices"][0]["delta"]["content"] for c in content_chunks) == CHAT_REPLY


@pytest.mark.asyncio
async def test_openai_client_chat(upstream: Upstream) -> None:
    client = upstream.openai_client()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=CHAT_MESSAGES,  # type: ignore[arg-type]
        )
        assert raw.headers["x-upstream-name"] == "demo"
        completion = raw.parse()
        assert completion.choices[0].message.content == CHAT_REPLY
        assert completion.model == "gpt-test"
        assert completion.usage is not None
        assert completion.usage.model_dump(exclude_none=True) == CHAT_USAGE

        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=CHAT_MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == CHAT_REPLY
        assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.model_dump(exclude_none=True) == CHAT_USAGE

        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=CHAT_MESSAGES,
            stream=True,  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
        assert all(c.usage is None and c.choices for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == CHAT_REPLY
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_openai_client_completions(upstream: Upstream) -> None:
    client = upstream.openai_client()
    try:
        completion = await client.completions.create(model="davinci-x", prompt="hello world")
        assert completion.object == "text_completion"
        assert completion.choices[0].text == "[demo] you said: hello world"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.model_dump(exclude_none=True) == {
            "prompt_tokens": 3,
            "completion_tokens": 7,
            "total_tokens": 10,
        }

        completion = await client.completions.create(
            model="davinci-x", prompt=["first", "second prompt"]
        )
        # One choice per prompt, as OpenAI answers (it answered the last prompt alone).
        assert [c.text for c in completion.choices] == [
            "[demo] you said: first", "[demo] you said: second prompt"]
        assert [c.index for c in completion.choices] == [0, 1]
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 2 + 4
        assert completion.usage.completion_tokens == 6 + 8

        # Token ids, as OpenAI takes them: one prompt, or several (refused before).
        completion = await client.completions.create(model="davinci-x",
                                                     prompt=[[1, 2, 3], [4, 5]])
        assert [c.text for c in completion.choices] == [
            "[demo] you said: <3 tokens>", "[demo] you said: <2 tokens>"]
        assert completion.usage is not None and completion.usage.prompt_tokens == 5

        stream = await client.completions.create(
            model="davinci-x",
            prompt="hello world",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == (
            "[demo] you said: hello world"
        )
        assert len([c for c in chunks if c.choices]) > 2
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == 10
        assert all(c.usage is None for c in chunks[:-1])

        stream = await client.completions.create(
            model="davinci-x", prompt="hello world", stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert all(c.usage is None and c.choices for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_completions_stream_raw_has_no_usage_key(upstream: Upstream) -> None:
    body = {"model": "m", "prompt": "hello world", "stream": True}
    async with upstream.session.post(f"{upstream.base_url}/v1/completions", json=body) as resp:
        payloads = await read_sse(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "[demo] you said: hello world"


@pytest.mark.asyncio
async def test_openai_client_embeddings(upstream: Upstream) -> None:
    client = upstream.openai_client()
    try:
        # The client requests base64 by default and decodes it to floats.
        result = await client.embeddings.create(model="emb", input=["alpha", "beta"])
        assert result.model == "emb"
        assert [e.index for e in result.data] == [0, 1]
        vectors = [e.embedding for e in result.data]
        assert all(len(v) == 8 for v in vectors)
        assert vectors[0] != vectors[1]
        assert result.usage.model_dump() == {"prompt_tokens": 2 + 1, "total_tokens": 3}

        as_floats = await client.embeddings.create(
            model="emb", input="alpha", encoding_format="float"
        )
        assert as_floats.data[0].embedding == vectors[0]

        tokens = await client.embeddings.create(model="emb", input=[[1, 2, 3], [4, 5]])
        assert tokens.usage.prompt_tokens == 5
        assert len(tokens.data) == 2

        single_tokens = await client.embeddings.create(model="emb", input=[1, 2, 3])
        assert single_tokens.usage.prompt_tokens == 3
        assert single_tokens.data[0].embedding == tokens.data[0].embedding
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_responses_models_and_health(upstream: Upstream) -> None:
    body = {
        "model": "resp-model",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello world"}]}],
    }
    async with upstream.session.post(f"{upstream.base_url}/v1/responses", json=body) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "response"
    assert data["model"] == "resp-model"
    assert data["output"][0]["type"] == "message"
    assert data["output"][0]["role"] == "assistant"
    assert data["output"][0]["content"][0]["type"] == "output_text"
    assert data["output"][0]["content"][0]["text"] == "[demo] you said: hello world"
    assert data["usage"] == {"input_tokens": 6, "output_tokens": 7, "total_tokens": 13}

    client = upstream.openai_client()
    try:
        response = await client.responses.create(model="resp-model", input="hello world")
        assert response.output_text == "[demo] you said: hello world"
        stream = await client.responses.create(model="resp-model", input="hello world", stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == "[demo] you said: hello world"
        assert events[-1].response.usage is not None
        assert events[-1].response.usage.output_tokens == 7
        async with client.responses.stream(model="resp-model", input="hello world") as helper:
            final = await helper.get_final_response()
        assert final.output_text == "[demo] you said: hello world"
    finally:
        await client.close()

    async with upstream.session.get(f"{upstream.base_url}/v1/models") as resp:
        assert await resp.json() == {"object": "list", "data": []}
    async with upstream.session.get(f"{upstream.base_url}/healthz") as resp:
        assert resp.status == 200
        assert resp.headers["x-upstream-name"] == "demo"
        assert await resp.json() == {"ok": True}


async def read_typed_sse(resp: aiohttp.ClientResponse) -> tuple[bytes, list[dict[str, Any]]]:
    """The raw stream and its events, asserting `event:` names each one by its `type`."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await resp.read()
    events: list[dict[str, Any]] = []
    for block in raw.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    assert raw.endswith(b"\n\n")
    return raw, events


RESPONSES_USAGE = {"input_tokens": 6, "output_tokens": 7, "total_tokens": 13}


@pytest.mark.asyncio
async def test_responses_stream_raw(upstream: Upstream) -> None:
    body = {"model": "resp-model", "input": "hello world", "stream": True}
    async with upstream.session.post(f"{upstream.base_url}/v1/responses", json=body) as resp:
        assert resp.status == 200
        raw, events = await read_typed_sse(resp)
    assert b"[DONE]" not in raw  # the Responses API ends with response.completed
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    reply = "[demo] you said: hello world"
    assert "".join(e["delta"] for e in deltas) == reply
    assert all(e["item_id"] == "msg-demo-000001" for e in deltas)
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["id"] == completed["id"] == "resp-demo-000002"
    assert (created["status"], created["usage"]) == ("in_progress", None)
    assert created["model"] == completed["model"] == "resp-model"
    assert completed["status"] == "completed"
    assert completed["usage"] == RESPONSES_USAGE
    assert completed["output"][0]["content"][0]["text"] == reply

    # Deterministic: the same request gets the same stream but for its ids.
    async with upstream.session.post(f"{upstream.base_url}/v1/responses", json=body) as resp:
        again, _ = await read_typed_sse(resp)
    assert again.replace(b"-000003", b"-000001").replace(b"-000004", b"-000002") == raw
    # What ATP reads back from it: the usage and the streamed text.
    sse = SseStream(drop_usage_chunk=False)
    assert sse.feed(raw, end=True) is None
    assert sse.usage == Usage(6, 7)
    assert sse.output_chars == len(reply)


@pytest.mark.asyncio
async def test_debug_records_exact_body(upstream: Upstream) -> None:
    raw = '{ "model":"m",\n  "messages":[{"role":"user","content":"ünïcode  spaced"}] }'
    raw_bytes = raw.encode("utf-8")
    headers = {"Content-Type": "application/json", "X-Custom-Header": "Abc"}
    async with upstream.session.post(
        f"{upstream.base_url}/v1/chat/completions", data=raw_bytes, headers=headers
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == (
            "[demo] you said: ünïcode  spaced"
        )

    async def chunked_body() -> AsyncIterator[bytes]:
        yield b'{"model":"m",'
        yield b'"prompt":"chunked"}'

    async with upstream.session.post(
        f"{upstream.base_url}/v1/completions", data=chunked_body()
    ) as resp:
        assert resp.status == 200

    requests = await upstream.debug_requests()
    assert len(requests) == 2
    first, second = requests
    assert first["method"] == "POST"
    assert first["path"] == "/v1/chat/completions"
    assert first["body"] == raw
    assert first["body_bytes"] == len(raw_bytes)
    assert first["content_length_header"] == str(len(raw_bytes))
    assert first["headers"]["x-custom-header"] == "Abc"
    assert first["headers"]["content-length"] == str(len(raw_bytes))
    assert all(name == name.lower() for name in first["headers"])
    assert second["path"] == "/v1/completions"
    assert second["body"] == '{"model":"m","prompt":"chunked"}'
    assert second["content_length_header"] is None
    assert second["body_bytes"] == len(second["body"])

    async with upstream.session.delete(f"{upstream.base_url}/debug/requests") as resp:
        assert resp.status == 200
    assert await upstream.debug_requests() == []


@pytest.mark.asyncio
async def test_debug_keeps_last_100(upstream: Upstream) -> None:
    for i in range(105):
        async with upstream.session.post(
            f"{upstream.base_url}/v1/embeddings", json={"model": "e", "input": str(i)}
        ) as resp:
            assert resp.status == 200
    requests = await upstream.debug_requests()
    assert len(requests) == 100
    assert json.loads(requests[0]["body"])["input"] == "5"
    assert json.loads(requests[-1]["body"])["input"] == "104"


@pytest.mark.asyncio
async def test_bad_json_is_400_and_recorded(upstream: Upstream) -> None:
    raw = b'{"model": "m", "messages": ['
    async with upstream.session.post(
        f"{upstream.base_url}/v1/chat/completions",
        data=raw,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert resp.headers["x-upstream-name"] == "demo"
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    requests = await upstream.debug_requests()
    assert requests[-1]["body"] == raw.decode()
    assert requests[-1]["body_bytes"] == len(raw)


@pytest.mark.asyncio
async def test_unknown_v1_path_is_recorded(upstream: Upstream) -> None:
    async with upstream.session.post(f"{upstream.base_url}/v1/nope", data=b"x") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_url"
    assert (await upstream.debug_requests())[-1]["path"] == "/v1/nope"


INJECTED_ERROR = {
    "error": {
        "message": "injected failure",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
}


@pytest.mark.asyncio
async def test_error_injection(start_upstream: StartUpstream) -> None:
    up = await start_upstream(name="flaky", error_rate=1.0, error_status=429)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with up.session.post(f"{up.base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 429
        assert resp.headers["x-upstream-name"] == "flaky"
        assert await resp.json() == INJECTED_ERROR

    client = up.openai_client(max_retries=0)
    try:
        with pytest.raises(openai.RateLimitError) as excinfo:
            await client.embeddings.create(model="e", input="hi")
        assert excinfo.value.status_code == 429
        assert excinfo.value.body == INJECTED_ERROR["error"]
    finally:
        await client.close()

    requests = await up.debug_requests()
    assert [r["path"] for r in requests] == ["/v1/chat/completions", "/v1/embeddings"]
    assert requests[0]["body"] == json.dumps(body)


@pytest.mark.asyncio
async def test_error_injection_is_seeded(start_upstream: StartUpstream) -> None:
    async def failure_pattern(up: Upstream) -> list[int]:
        statuses = []
        for _ in range(20):
            async with up.session.get(f"{up.base_url}/v1/models") as resp:
                statuses.append(resp.status)
        return statuses

    first = await failure_pattern(await start_upstream(error_rate=0.5, seed=7))
    second = await failure_pattern(await start_upstream(error_rate=0.5, seed=7))
    assert first == second
    assert set(first) == {200, 503}


@pytest.mark.asyncio
async def test_latency(start_upstream: StartUpstream) -> None:
    up = await start_upstream(latency_ms=100)
    started = time.monotonic()
    async with up.session.get(f"{up.base_url}/v1/models") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.09


def test_parse_args_defaults_and_validation() -> None:
    args = parse_args([])
    assert (args.host, args.port, args.name) == ("127.0.0.1", 18001, "demo")
    assert (args.latency_ms, args.error_rate, args.error_status, args.seed) == (0.0, 0.0, 503, 0)
    for bad in (["--error-rate", "1.5"], ["--latency-ms", "-100"], ["--latency-ms", "nan"],
                ["--error-status", "200"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_an_address_it_cannot_listen_on_is_one_line() -> None:
    import socket
    import subprocess
    import sys

    # A 26-line traceback before.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "atp_extproc", "demo-upstream",
                               "--port", str(port)], capture_output=True, text=True,
                              timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"demo-upstream: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
