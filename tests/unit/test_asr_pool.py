"""The ASR pool through real Redis: PoolTranscriber (gateway side) and AsrWorker (worker side)
with the real tiny.en engine, in this process. tests/e2e/test_pool.py runs the same pool as
`earshot run --asr pool` and `earshot worker` processes with SIP calls and kill -9."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import wave
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis

os.environ["HF_HUB_OFFLINE"] = "1"

from gateway.asr.interface import AsrTimeout, SourceAudio, Superseded, TranscriptionError, TranscriptionRequest
from gateway.asr.remote.pool import PoolTranscriber
from gateway.asr.remote.wire import PoolNames, Reply, decode_job, encode_job, encode_reply
from gateway.asr.remote import worker as worker_module
from gateway.asr.remote.worker import AsrWorker, WorkerConfig
from gateway.asr.scheduler import SchedulerLimits
from gateway.asr.wer import word_error_rate
from gateway.asr.whisper.engine import WhisperEngine
from gateway.media.resample import upsample_8k_to_16k
from tests.conftest import REDIS_URL
from tests.redis_server import RedisServer
from tests.unit.test_asr_whisper import PROMPTS, SOUNDS

pytestmark = pytest.mark.skipif(not SOUNDS.is_dir(), reason="asterisk-core-sounds-en not installed")


def prompt(name: str) -> np.ndarray:
    with wave.open(str(SOUNDS / f"{name}.wav")) as w:
        return upsample_8k_to_16k(np.frombuffer(w.readframes(w.getnframes()), np.int16))


def final(name: str, session: str, timeout: float = 30.0, **kw: object) -> TranscriptionRequest:
    return TranscriptionRequest(prompt(name), "final", key=f"{session}/caller", session=session,
                                deadline=time.time() + timeout, **kw)  # type: ignore[arg-type]


def partial(name: str, session: str, timeout: float = 30.0) -> TranscriptionRequest:
    return TranscriptionRequest(prompt(name), "partial", key=f"{session}/caller", session=session,
                                deadline=time.time() + timeout)


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    return WhisperEngine("tiny.en", compute_type="int8", cpu_threads=2, local_files_only=True)


@pytest.fixture
def names(prefix: str) -> PoolNames:
    return PoolNames(prefix)


def worker_config(names: PoolNames, url: str = REDIS_URL, **kw: object) -> WorkerConfig:
    options: dict[str, object] = {"claim_idle_s": 1.0, "limits": SchedulerLimits(max_batch=4, batch_wait_s=0.02),
                                  "block_ms": 100}
    options.update(kw)
    return WorkerConfig(redis_url=url, names=names, worker_id=f"w-{uuid.uuid4().hex[:6]}", **options)  # type: ignore[arg-type]


async def started_worker(engine: WhisperEngine, names: PoolNames, **kw: object) -> AsrWorker:
    worker = AsrWorker(worker_config(names, **kw), engine)
    await worker.start()
    return worker


async def started_pool(names: PoolNames, url: str = REDIS_URL, **kw: object) -> PoolTranscriber:
    pool = PoolTranscriber(url, names=names, instance=f"gw-{uuid.uuid4().hex[:6]}", **kw)  # type: ignore[arg-type]
    await pool.start()
    return pool


@pytest.fixture
async def pool(names: PoolNames) -> AsyncIterator[PoolTranscriber]:
    transcriber = await started_pool(names)
    yield transcriber
    await transcriber.close()


async def test_finals_of_several_calls_come_back_batched_and_right(engine: WhisperEngine, names: PoolNames,
                                                                  pool: PoolTranscriber) -> None:
    worker = await started_worker(engine, names)
    try:
        chosen = ["agent-pass", "pbx-invalid", "privacy-unident", "conf-muted"]
        results = await asyncio.gather(*(pool.transcribe(final(n, f"call-{i}")) for i, n in enumerate(chosen)))
        for name, result in zip(chosen, results):
            assert word_error_rate(PROMPTS[name], result.text) <= 0.25, (name, result.text)
            assert result.model == "tiny.en" and not result.silence
        assert worker.jobs[("final", "done")] == 4 and pool.stats.results == 4
        assert sum(n * size for size, n in worker.batch_sizes.items()) == 4
        assert max(worker.batch_sizes) > 1  # four calls' finals shared model calls
        # the same text as the embedded path gives on the same audio (int16 on the wire)
        alone = engine.transcribe(final("agent-pass", "x"))
        assert results[0].text == alone.text
        client = redis.Redis.from_url(REDIS_URL)
        try:
            assert client.xlen(names.jobs("final")) == 0  # acknowledged and deleted
            assert client.xpending(names.jobs("final"), names.group)["pending"] == 0
        finally:
            client.close()
    finally:
        await worker.close()


async def test_no_worker_gives_asr_timeout_by_the_deadline(engine: WhisperEngine, names: PoolNames,
                                                          pool: PoolTranscriber) -> None:
    started = time.monotonic()
    with pytest.raises(AsrTimeout) as caught:
        await pool.transcribe(final("vm-goodbye", "call-1", timeout=1.5))
    elapsed = time.monotonic() - started
    assert caught.value.code == "asr-timeout"
    assert 1.3 <= elapsed <= 3.0, elapsed
    assert pool.stats.timeouts["final"] == 1
    # A worker that comes up later drops the expired job instead of decoding it.
    worker = await started_worker(engine, names)
    try:
        for _ in range(100):
            if worker.jobs[("final", "cancelled")] + worker.jobs[("final", "deadline")]:
                break
            await asyncio.sleep(0.05)
        assert worker.jobs[("final", "cancelled")] + worker.jobs[("final", "deadline")] == 1
        assert worker.jobs[("final", "done")] == 0
    finally:
        await worker.close()


async def test_a_superseded_partial_is_never_decoded(engine: WhisperEngine, names: PoolNames,
                                                     pool: PoolTranscriber) -> None:
    old = asyncio.ensure_future(pool.transcribe(partial("agent-pass", "call-1")))
    await asyncio.sleep(0.2)  # sent: no worker yet
    newer = asyncio.ensure_future(pool.transcribe(partial("pbx-invalid", "call-1")))
    with pytest.raises(Superseded):
        await old
    the_final = asyncio.ensure_future(pool.transcribe(final("privacy-unident", "call-1")))
    with pytest.raises(Superseded):
        await newer
    await asyncio.sleep(0.2)  # the cancel keys are written
    worker = await started_worker(engine, names)
    try:
        result = await the_final
        assert word_error_rate(PROMPTS["privacy-unident"], result.text) <= 0.25
        for _ in range(50):
            if worker.jobs[("partial", "cancelled")] == 2:
                break
            await asyncio.sleep(0.05)
        assert worker.jobs[("partial", "cancelled")] == 2 and worker.jobs[("partial", "done")] == 0
        assert pool.stats.superseded == 2
    finally:
        await worker.close()


async def test_a_dead_workers_job_is_reclaimed_and_answered_once(engine: WhisperEngine, names: PoolNames,
                                                               pool: PoolTranscriber) -> None:
    """A consumer that read the job and died (it is in the group's pending list, never
    answered) loses it to a live worker after claim_idle_s; when the dead one's answer
    turns up anyway, the gateway ignores and counts it."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        for stream in names.job_streams:
            await client.xgroup_create(stream, names.group, id="0", mkstream=True)
        request = final("agent-pass", "call-1")
        waiter = asyncio.ensure_future(pool.transcribe(request))
        entries: list = []
        for _ in range(50):  # the "dead worker" takes the job
            entries = await client.xreadgroup(names.group, "dead-worker", {names.jobs("final"): ">"}, count=1)
            if entries:
                break
            await asyncio.sleep(0.05)
        (_stream, [(entry_id, fields)]), = entries
        worker = await started_worker(engine, names, claim_idle_s=0.5)
        try:
            result = await asyncio.wait_for(waiter, 20)
            assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25
            assert worker.reclaimed == 1
            pending = await client.xpending(names.jobs("final"), names.group)
            assert pending["pending"] == 0
            # the dead worker's own (late, different) answer arrives after all
            job = decode_job(fields)
            late = Reply(job.request.request_id, result.__class__(**{**result.__dict__, "text": "something else"}),
                         worker="dead-worker")
            await client.xadd(job.reply_to, encode_reply(late))
            for _ in range(50):
                if pool.stats.duplicates:
                    break
                await asyncio.sleep(0.05)
            assert pool.stats.duplicates == 1 and pool.stats.results == 1
        finally:
            await worker.close()
    finally:
        await client.aclose()


async def test_a_flooding_call_does_not_delay_another_calls_final(engine: WhisperEngine, names: PoolNames) -> None:
    """One call floods 24 finals and 24 partials; a quiet call's final, sent after the flood,
    comes back long before the flood is through (its deadline is 6 s; the flood alone takes
    far longer on this CPU)."""
    pool = await started_pool(names, session_limit=2)
    worker = await started_worker(engine, names, limits=SchedulerLimits(max_batch=2))
    try:
        flood = [asyncio.ensure_future(pool.transcribe(
            TranscriptionRequest(prompt("privacy-unident"), "final", session="flood", key=f"flood/{i}",
                                 deadline=time.time() + 120))) for i in range(24)]
        partials = [asyncio.ensure_future(pool.transcribe(partial("pbx-invalid", f"flood-{i}"))) for i in range(24)]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        quiet = await pool.transcribe(final("agent-pass", "quiet", timeout=6.0))
        waited = time.monotonic() - started
        assert word_error_rate(PROMPTS["agent-pass"], quiet.text) <= 0.25
        flood_done = sum(f.done() for f in flood)
        assert flood_done < 20, "the flood finished first: the test proves nothing on this machine"
        assert waited < 6.0
    finally:
        for future in flood + partials:
            future.cancel()
        await asyncio.gather(*flood, *partials, return_exceptions=True)
        await worker.close()
        await pool.close()


async def test_a_restarted_redis_loses_nothing(engine: WhisperEngine, names: PoolNames) -> None:
    """Redis restarted without persistence while a final waits: the gateway sends it again to
    the new server, the worker re-creates its group, and the final comes back."""
    server = RedisServer().start()
    try:
        pool = await started_pool(names, url=server.url)
        worker = await started_worker(engine, names, url=server.url)
        try:
            warm = await pool.transcribe(final("vm-goodbye", "call-0"))
            assert word_error_rate(PROMPTS["vm-goodbye"], warm.text) == 0.0
            with worker.scheduler.paused():  # the worker takes the job, then Redis goes away
                waiter = asyncio.ensure_future(pool.transcribe(final("agent-pass", "call-1")))
                for _ in range(100):
                    if worker.scheduler.queued:
                        break
                    await asyncio.sleep(0.02)
                assert worker.scheduler.queued == 1
                port = server.port
                server.stop()
                await asyncio.sleep(0.5)
                server = RedisServer(port).start()
            result = await asyncio.wait_for(waiter, 25)
            assert word_error_rate(PROMPTS["agent-pass"], result.text) <= 0.25
            assert pool.stats.resent >= 1
            assert pool.stats.results == 2  # a second answer (old copy and resent copy) counts as a duplicate
        finally:
            await worker.close()
            await pool.close()
    finally:
        server.stop()


async def test_drain_answers_held_jobs_and_takes_no_new_ones(engine: WhisperEngine, names: PoolNames,
                                                             pool: PoolTranscriber) -> None:
    worker = await started_worker(engine, names)
    try:
        with worker.scheduler.paused():
            held = [asyncio.ensure_future(pool.transcribe(final(n, f"c{i}")))
                    for i, n in enumerate(["agent-pass", "conf-muted"])]
            for _ in range(100):
                if worker.scheduler.queued == 2:
                    break
                await asyncio.sleep(0.02)
            assert worker.scheduler.queued == 2
            draining = asyncio.ensure_future(worker.drain(30))
            await asyncio.sleep(0.3)
            later = asyncio.ensure_future(pool.transcribe(final("vm-goodbye", "c9", timeout=3.0)))
        assert await draining
        results = await asyncio.gather(*held)
        assert [word_error_rate(PROMPTS[n], r.text) <= 0.25 for n, r in zip(["agent-pass", "conf-muted"], results)] \
            == [True, True]
        with pytest.raises(AsrTimeout):
            await later  # read by nobody: the draining worker took no new job
    finally:
        await worker.close()


async def test_unreadable_and_undeliverable_jobs_are_answered_with_errors(engine: WhisperEngine, names: PoolNames,
                                                                         pool: PoolTranscriber) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    worker = await started_worker(engine, names, claim_idle_s=0.5, max_deliveries=2)
    try:
        # 1. garbage on the stream: acknowledged, counted, the worker lives on
        await client.xadd(names.jobs("final"), {"meta": b"{broken", "audio": b"\x00"})
        # 2. a valid job whose meta names a reply stream but whose audio is bad: that stream hears why
        request = final("vm-goodbye", "c1")
        fields = encode_job(request, pool.reply_stream, time.time())
        fields["audio"] = b"\x00\x00\x00"
        await client.xadd(names.jobs("final"), fields)  # type: ignore[arg-type]
        for _ in range(100):
            if worker.poison >= 2:
                break
            await asyncio.sleep(0.05)
        assert worker.poison == 2 and worker.jobs[("unknown", "bad-request")] == 2
        # 3. a job delivered too often (two consumers read it and died) gets an error, not a third try
        await worker.close()
        waiter = asyncio.ensure_future(pool.transcribe(final("agent-pass", "c2")))
        await asyncio.sleep(0.3)
        for consumer in ("dead-1", "dead-2"):
            if consumer == "dead-1":
                await client.xreadgroup(names.group, consumer, {names.jobs("final"): ">"}, count=1)
            else:
                await asyncio.sleep(0.6)
                await client.xautoclaim(names.jobs("final"), names.group, consumer, 500, "0-0", count=10)
            await asyncio.sleep(0.6)
        worker = await started_worker(engine, names, claim_idle_s=0.5, max_deliveries=2)
        with pytest.raises(TranscriptionError) as caught:
            await asyncio.wait_for(waiter, 10)
        assert caught.value.code == "asr-failed" and "delivered 3 times" in str(caught.value)
        assert worker.jobs[("final", "poison")] == 1
        # the worker still serves good jobs
        ok = await pool.transcribe(final("conf-muted", "c3"))
        assert word_error_rate(PROMPTS["conf-muted"], ok.text) <= 0.25
    finally:
        await worker.close()
        await client.aclose()


async def test_a_backlog_waiting_in_redis_switches_finals_to_the_short_window(engine: WhisperEngine,
                                                                             names: PoolNames,
                                                                             pool: PoolTranscriber) -> None:
    """A worker holds one job at a time here, so its own queue never shows the backlog; the
    finals waiting in Redis (the group's lag) make it decode the cheap way, as the embedded
    backend does with its own queue."""
    worker = await started_worker(engine, names, limits=SchedulerLimits(max_batch=1, overload_backlog=2), prefetch=1)
    try:
        chosen = ["agent-pass", "pbx-invalid", "privacy-unident", "conf-muted"] * 2
        results = await asyncio.gather(*(pool.transcribe(final(n, f"call-{i}")) for i, n in enumerate(chosen)))
        assert worker.scheduler.overloaded >= 1, "the Redis backlog never counted"
        assert worker.scheduler.overloaded < len(chosen)  # the last ones found no backlog
        for name, result in zip(chosen, results):
            assert word_error_rate(PROMPTS[name], result.text) <= 0.3, (name, result.text)
    finally:
        await worker.close()


async def test_gone_workers_consumers_are_removed_and_a_drained_worker_leaves(
        engine: WhisperEngine, names: PoolNames, monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        for stream in names.job_streams:  # a "ghost" consumer: it read one entry and answered it
            await client.xgroup_create(stream, names.group, id="0", mkstream=True)
            await client.xadd(stream, {"meta": b"{}"})
            ((_, [(entry_id, _)]),) = await client.xreadgroup(names.group, "ghost", {stream: ">"}, count=1)
            await client.xack(stream, names.group, entry_id)
            await client.xdel(stream, entry_id)
        assert {c["name"] for c in await client.xinfo_consumers(names.jobs("final"), names.group)} == {b"ghost"}
        monkeypatch.setattr(worker_module, "GONE_CONSUMER_IDLE_S", 0.2)  # the ghost has been silent long enough
        worker = await started_worker(engine, names, claim_idle_s=0.5)
        try:
            reply = f"{names.prefix}:test-replies"
            await client.xadd(names.jobs("final"), encode_job(final("vm-goodbye", "c1"), reply, time.time()))
            for _ in range(200):
                if await client.xlen(reply):
                    break
                await asyncio.sleep(0.05)
            consumers = set()
            for _ in range(100):
                consumers = {c["name"].decode() for c in await client.xinfo_consumers(names.jobs("final"), names.group)}
                if "ghost" not in consumers:
                    break
                await asyncio.sleep(0.05)
            assert consumers == {worker.id}
            assert await worker.drain(10)
            for stream in names.job_streams:
                assert await client.xinfo_consumers(stream, names.group) == []
        finally:
            await worker.close()
    finally:
        await client.aclose()


def pcm8k(name: str) -> np.ndarray:
    with wave.open(str(SOUNDS / f"{name}.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).copy()


async def test_a_telephone_final_decodes_on_a_worker_exactly_as_in_process(engine: WhisperEngine, names: PoolNames,
                                                                         pool: PoolTranscriber) -> None:
    """A final as the leg pipeline builds it (8 kHz source, previous turn as context) gives on
    a worker the very result the embedded engine gives: same text, same scores."""
    turn, before = pcm8k("privacy-unident"), pcm8k("conf-muted")
    gap = np.zeros(4800, np.float32)
    request = TranscriptionRequest(
        upsample_8k_to_16k(turn), "final", key="call-1/caller", session="call-1", deadline=time.time() + 30,
        prompt="Please enter your password.", context_audio=np.concatenate((upsample_8k_to_16k(before), gap)),
        context_text=PROMPTS["conf-muted"], source=SourceAudio(8000, "polyphase", turn, (before,), 4800))
    worker = await started_worker(engine, names)
    try:
        remote = await pool.transcribe(request)
    finally:
        await worker.close()
    local = engine.transcribe(request)
    assert word_error_rate(PROMPTS["privacy-unident"], remote.text) <= 0.25
    assert (remote.text, remote.avg_logprob, remote.no_speech_prob) == \
        (local.text, local.avg_logprob, local.no_speech_prob)
