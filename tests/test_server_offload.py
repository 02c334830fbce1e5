"""The server's worker thread: a big request body is inspected off the event loop, and so
is the restore of a big answer (placeholders put back into megabytes of JSON), so the
loop keeps serving every other exchange meanwhile."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from atp_extproc import config as config_mod
from atp_extproc import server
from atp_extproc.exchange import Exchange
from atp_extproc.server import OFFLOAD_BODY_BYTES, ConfigHolder, ExternalProcessor
from tests.test_exchange import EXAMPLE, req_body, req_headers, resp_body, resp_headers


class _Context:
    def invocation_metadata(self):
        return ()

    async def abort(self, code, details):  # pragma: no cover - never draining here
        raise AssertionError(details)


async def _messages(messages):
    for message in messages:
        yield message


def _restoring_holder(tmp_path: Path) -> ConfigHolder:
    snapshot = config_mod.load(EXAMPLE)
    routes = tuple(r.model_copy(update={"restore": True}) for r in snapshot.routes)
    holder = ConfigHolder(tmp_path / "atp.yaml", dataclasses.replace(snapshot, routes=routes))
    return holder


@pytest.mark.asyncio
async def test_a_big_answer_is_restored_off_the_event_loop(tmp_path, monkeypatch) -> None:
    threads: dict[str, str] = {}
    chunk = Exchange._on_json_chunk

    def recording(self, *args):
        threads["restore"] = threading.current_thread().name
        return chunk(self, *args)

    monkeypatch.setattr(Exchange, "_on_json_chunk", recording)
    addresses = [f"user{i:05d}@example.com" for i in range(50)]
    request = {"model": "gpt-4o-mini",
               "messages": [{"role": "user", "content": " ".join(addresses[:50])}]}
    answer = json.dumps({"choices": [{"message": {"content": " ".join(
        f"[EMAIL_{i % 50 + 1}]" for i in range(OFFLOAD_BODY_BYTES // 8))}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    assert len(answer) > OFFLOAD_BODY_BYTES
    processor = ExternalProcessor(_restoring_holder(tmp_path))
    # Big request bodies hold the inspecting thread: the answer is not queued behind
    # them (a small request's answer waited there past message_timeout, a 504).
    inspecting = threading.Event()
    processor._pool.submit(inspecting.wait, 30)
    try:
        replies = [r async for r in processor.Process(_messages([
            req_headers("POST", "/v1/chat/completions"), req_body(request),
            resp_headers(200, "application/json",
                         extra={"content-length": str(len(answer))}),
            resp_body(answer)]), _Context())]
    finally:
        inspecting.set()
    restored = replies[-1].response_body.response.body_mutation.body
    assert b"user00000@example.com" in restored and b"[EMAIL_" not in restored
    assert threads["restore"].startswith("atp-restore")


@pytest.mark.asyncio
@pytest.mark.parametrize("grace_over", [False, True])
async def test_an_answer_envoy_stopped_waiting_for_is_recorded_and_logged(
        tmp_path, monkeypatch, caplog, grace_over: bool) -> None:
    # Envoy's message_timeout passed while a big body was inspected: the client got a
    # 504, and ATP's record said status 0 with no error, like a client that left early.
    # Cut by ATP's own drain, the log blamed Envoy's timeout or the client.
    import asyncio

    started, release = threading.Event(), threading.Event()
    inspect = Exchange.inspect_body

    def slow(self, message):
        started.set()
        release.wait(10)
        return inspect(self, message)

    records = []
    finish = Exchange.finish
    monkeypatch.setattr(Exchange, "inspect_body", slow)
    monkeypatch.setattr(Exchange, "finish", lambda self: records.append(finish(self)))
    big = {"model": "gpt-4o-mini",
           "messages": [{"role": "user", "content": "x" * (2 * OFFLOAD_BODY_BYTES)}]}
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))

    async def consume():
        return [r async for r in processor.Process(_messages([
            req_headers("POST", "/v1/chat/completions"), req_body(big)]), _Context())]

    with caplog.at_level("WARNING", logger="atp.server"):
        task = asyncio.create_task(consume())
        while not started.is_set():
            await asyncio.sleep(0.01)
        processor.grace_over = grace_over
        task.cancel()  # as grpc.aio does when Envoy closes the stream, or the drain
        with pytest.raises(asyncio.CancelledError):
            await task
    release.set()
    (record,) = records
    assert record.error_code == "atp_answer_abandoned"
    said = [r.getMessage() for r in caplog.records]
    envoy = "Envoy stopped waiting for ATP's answer to request_body"
    drain = "ATP stopped working on request_body"
    assert [any(envoy in m for m in said), any(drain in m for m in said)] == (
        [False, True] if grace_over else [True, False])


def _recording_finish(monkeypatch) -> list:
    records: list = []
    finish = Exchange.finish
    monkeypatch.setattr(Exchange, "finish", lambda self: records.append(finish(self)))
    return records


@pytest.mark.asyncio
@pytest.mark.parametrize("answered, error_code", [
    # The body's answer, after Envoy had stopped waiting: nothing reached a model, and
    # the record used to bill the request as forwarded.
    (2, "atp_answer_abandoned"),
    # The answer's, after the client left: the model had the request, the ledger counts
    # it failed (it used to count a success).
    (3, "response_incomplete"),
])
async def test_an_answer_that_went_nowhere_is_recorded_so(
        tmp_path, monkeypatch, caplog, answered: int, error_code: str) -> None:
    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    replies = processor.Process(_messages([
        req_headers("POST", "/v1/chat/completions"),
        req_body({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        resp_headers(200, "application/json")]), _Context())
    with caplog.at_level("WARNING", logger="atp.server"):
        for _ in range(answered):
            await replies.__anext__()
        await replies.aclose()  # as grpc.aio does with an RPC Envoy has closed
    (record,) = records
    assert record.error_code == error_code
    # Answered at once: the client left (or Envoy refused ATP's headers, a 431), which
    # is no slowness of ATP's to warn of.
    assert not [r for r in caplog.records if r.name == "atp.server"]
    assert (record.cost_usd is None) == (answered == 2)  # billed only once forwarded


@pytest.mark.asyncio
async def test_envoys_own_answer_closed_on_is_request_incomplete(tmp_path, monkeypatch) -> None:
    # Envoy's 408 to a stalled body, then its reset once it has ATP's answer: with no
    # time to first byte, the answer read as never come, and the record said a model had
    # the request (response_incomplete).
    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    replies = processor.Process(_messages([
        req_headers("POST", "/v1/chat/completions"), resp_headers(408, "text/plain")]),
        _Context())
    for _ in range(2):
        await replies.__anext__()
    await replies.aclose()
    (record,) = records
    assert (record.status, record.error_code) == (408, "request_incomplete")


@pytest.mark.asyncio
async def test_an_exchange_is_idle_only_once_its_record_is_written(tmp_path, monkeypatch) -> None:
    # Idle came first: at the grace period's end the ledger closed while cancelled
    # exchanges were still finishing ("ledger is closed"; record and row lost).
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    idle_at_finish: list[bool] = []
    finish = Exchange.finish

    def noting(self):
        idle_at_finish.append(processor._idle.is_set())
        return finish(self)

    monkeypatch.setattr(Exchange, "finish", noting)
    replies = processor.Process(_messages([req_headers("POST", "/v1/chat/completions")]),
                                _Context())
    await replies.__anext__()
    await replies.aclose()
    assert idle_at_finish == [False] and processor._idle.is_set()


_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
_ANSWER = {"choices": [{"message": {"content": "hello"}}],
           "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


@pytest.mark.asyncio
@pytest.mark.parametrize("slow, error_code", [
    # Envoy resets the stream once it has the last answer, and that can cancel gRPC's
    # write of it after it went out: a few % of complete answers were recorded failed.
    (False, ""),
    # A last answer that held the loop past Envoy's default message_timeout may have
    # come too late.
    (True, "response_incomplete"),
])
async def test_a_last_answer_closed_on_is_recorded_complete_unless_slow(
        tmp_path, monkeypatch, slow: bool, error_code: str) -> None:
    records = _recording_finish(monkeypatch)
    if slow:
        monkeypatch.setattr(server, "_SLOW_ANSWER_S", 0.0)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    replies = processor.Process(_messages([
        req_headers("POST", "/v1/chat/completions"), req_body(_CHAT),
        resp_headers(200, "application/json"),
        resp_body(json.dumps(_ANSWER).encode())]), _Context())
    for _ in range(4):
        await replies.__anext__()
    await replies.aclose()
    (record,) = records
    assert record.error_code == error_code
    assert record.output_tokens == 2


@pytest.mark.asyncio
async def test_a_stream_closed_on_after_its_last_event_is_whole(tmp_path, monkeypatch) -> None:
    # The openai SDK closes at [DONE]: Envoy resets the stream as ATP answers that chunk,
    # before the body's end, and the stream was recorded response_incomplete.
    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    events = (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
              b"data: [DONE]\n\n")
    replies = processor.Process(_messages([
        req_headers("POST", "/v1/chat/completions"), req_body({**_CHAT, "stream": True}),
        resp_headers(200, "text/event-stream"), resp_body(events, end=False)]), _Context())
    for _ in range(4):
        await replies.__anext__()
    await replies.aclose()
    (record,) = records
    assert (record.error_code, record.output_tokens) == ("", 1)


@pytest.mark.asyncio
async def test_a_refusal_closed_on_is_no_abandoned_answer(tmp_path, monkeypatch,
                                                        caplog) -> None:
    # Envoy ends the stream with the immediate response: ATP warned that Envoy had
    # stopped waiting for it.
    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    replies = processor.Process(_messages([
        req_headers("POST", "/v1/chat/completions", key="sk-wrong")]), _Context())
    with caplog.at_level("WARNING", logger="atp.server"):
        assert (await replies.__anext__()).HasField("immediate_response")
        await replies.aclose()
    (record,) = records
    assert (record.status, record.error_code) == (401, "invalid_api_key")
    assert not [r for r in caplog.records if r.name == "atp.server"]


@pytest.mark.asyncio
async def test_a_stream_without_a_message_leaves_no_record(tmp_path, monkeypatch) -> None:
    # Envoy dropping a connection ends streams that never carried a message: each was
    # logged as a blank exchange (status 0, no error).
    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    assert [r async for r in processor.Process(_messages([]), _Context())] == []
    assert records == []


@pytest.mark.asyncio
async def test_a_held_event_loop_is_warned_of(caplog) -> None:
    # Paused past message_timeout (SIGSTOP, a machine out of CPU), ATP never read the
    # exchanges Envoy gave up on meanwhile: no record, and no warning said so.
    import asyncio
    import time

    watch = asyncio.create_task(server.watch_loop(interval_s=0.01, stall_s=0.2))
    with caplog.at_level("WARNING", logger="atp.server"):
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # the loop held, as a blocking call holds it
        await asyncio.sleep(0.05)
        watch.cancel()
    (warning,) = [r for r in caplog.records if "event loop was held" in r.getMessage()]
    assert 0.2 <= float(warning.getMessage().split("held for ")[1].split(" s")[0]) < 5


@pytest.mark.asyncio
async def test_a_request_is_decided_under_the_config_in_force_when_its_body_comes(
        tmp_path) -> None:
    # Its headers read before a reload revoked the key, a request whose body came later
    # (a byte every few minutes, as long as the client liked) was served with it.
    snapshot = config_mod.load(EXAMPLE)
    holder = ConfigHolder(tmp_path / "atp.yaml", snapshot)
    processor = ExternalProcessor(holder)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    revoked = dataclasses.replace(snapshot, api_keys={
        digest: key for digest, key in snapshot.api_keys.items() if key.tenant != "alice"})

    async def send(swap: bool) -> list:
        holder.current = snapshot
        replies = []

        async def messages():
            yield req_headers("POST", "/v1/chat/completions")
            if swap:
                holder.current = revoked  # the reload, between headers and body
            yield req_body(body)

        async for reply in processor.Process(messages(), _Context()):
            replies.append(reply)
        return replies

    kept = await send(swap=False)
    assert kept[-1].WhichOneof("response") == "request_body"
    refused = await send(swap=True)
    assert refused[-1].immediate_response.status.code == 401


@pytest.mark.asyncio
async def test_a_request_decided_at_its_body_is_stripped_and_timed_as_the_new_config_says(
        tmp_path, monkeypatch) -> None:
    # The exchange rebuilt at the body under a reload that trusts a tenant header lost
    # that header's removal (it reached the provider), and its record's duration left out
    # the time the body took to come.
    import asyncio

    snapshot = config_mod.load(EXAMPLE)
    trusting = dataclasses.replace(snapshot, version="trusting", auth=snapshot.auth.model_copy(
        update={"trusted_tenant_header": "x-tenant"}))
    holder = ConfigHolder(tmp_path / "atp.yaml", snapshot)
    records = _recording_finish(monkeypatch)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def messages():
        yield req_headers("POST", "/v1/chat/completions", extra={"x-tenant": "alice"})
        await asyncio.sleep(0.05)  # the body's upload
        holder.current = trusting
        yield req_body(body)

    replies = [r async for r in ExternalProcessor(holder).Process(messages(), _Context())]
    assert "x-tenant" not in replies[0].request_headers.response.header_mutation.remove_headers
    removed = replies[1].request_body.response.header_mutation.remove_headers
    assert "x-tenant" in removed
    (record,) = records
    assert record.config_version == trusting.version and record.duration_ms >= 50


@pytest.mark.asyncio
@pytest.mark.parametrize(("grace_over", "unread", "error_code"), [
    # A compressed answer (whose body ATP does not read) still coming when the drain's
    # grace period ended: the client got part of it, the record said a whole 200.
    (True, True, "response_incomplete"),
    # Envoy resets the stream of a whole answer too: only ATP's own cut says it was not.
    (False, True, ""),
    # An answer ATP read to its end is whole, though the drain cuts its stream.
    (True, False, ""),
])
async def test_an_unread_answer_cut_by_the_drain_is_incomplete(
        tmp_path, monkeypatch, grace_over: bool, unread: bool, error_code: str) -> None:
    import asyncio

    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    answered = asyncio.Event()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    answer = json.dumps(_ANSWER).encode()

    async def messages():
        yield req_headers("POST", "/v1/chat/completions")
        yield req_body(body)
        if unread:
            yield resp_headers(200, "application/json", extra={"content-encoding": "gzip"})
        else:
            yield resp_headers(200, "application/json",
                               extra={"content-length": str(len(answer))})
            yield resp_body(answer)
        answered.set()
        await asyncio.Event().wait()  # Envoy keeps the stream open while the body goes

    async def consume():
        return [r async for r in processor.Process(messages(), _Context())]

    task = asyncio.create_task(consume())
    await asyncio.wait_for(answered.wait(), 5)
    await asyncio.sleep(0)
    processor.grace_over = grace_over
    task.cancel()  # as grpc.aio does when the drain stops the server, or Envoy resets
    with pytest.raises(asyncio.CancelledError):
        await task
    (record,) = records
    assert (record.status, record.error_code) == (200, error_code)


@pytest.mark.asyncio
@pytest.mark.parametrize(("grace_over", "error_code"), [
    # The drain's grace period ended while the body was still coming: ATP cut it, not
    # the client, and nothing reached a model.
    (True, "atp_answer_abandoned"),
    # Envoy resets the stream when the client leaves mid-body: the client's.
    (False, "request_incomplete"),
])
async def test_a_body_cut_by_the_drain_is_atps_abandoned_request(
        tmp_path, monkeypatch, caplog, grace_over: bool, error_code: str) -> None:
    import asyncio

    records = _recording_finish(monkeypatch)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    waiting = asyncio.Event()

    async def messages():
        yield req_headers("POST", "/v1/chat/completions")
        waiting.set()
        await asyncio.Event().wait()  # the body's upload never ends

    async def consume():
        return [r async for r in processor.Process(messages(), _Context())]

    task = asyncio.create_task(consume())
    await asyncio.wait_for(waiting.wait(), 5)
    await asyncio.sleep(0)
    processor.grace_over = grace_over
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (record,) = records
    assert record.error_code == error_code
    assert ("server.grace_period_s was over" in caplog.text) == grace_over


@pytest.mark.asyncio
async def test_an_answer_atp_failed_on_is_recorded_incomplete(tmp_path, monkeypatch) -> None:
    # Restore raised on the answer's only chunk: Envoy reset the stream and the client got
    # nothing, yet the record (and ledger) counted a whole 200.
    records = _recording_finish(monkeypatch)

    def failing(self, *args):
        raise KeyError("restore")

    monkeypatch.setattr(Exchange, "_on_json_chunk", failing)
    processor = ExternalProcessor(ConfigHolder(tmp_path / "atp.yaml",
                                               config_mod.load(EXAMPLE)))
    answer = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
    with pytest.raises(KeyError):
        [r async for r in processor.Process(_messages([
            req_headers("POST", "/v1/chat/completions"),
            req_body({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
            resp_headers(200, "application/json"), resp_body(answer)]), _Context())]
    (record,) = records
    assert (record.status, record.error_code) == (200, "response_incomplete")
