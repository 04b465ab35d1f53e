"""Benchmark of the span export pipeline (exporters/) into embedded chDB.

    python bench/export_bench.py                      # 50k call spans per phase, fresh temp data + spool dirs
    python bench/export_bench.py --spans 100000 --rate 4000 --queue-max 10000 --dir /tmp/tw-export-bench --keep

Measures, for spans shaped like the gateway's call span (~25 attributes, captured messages included):
  1. row build cost: ReadableSpan -> JSONEachRow bytes (+ sha256), µs per row, on the export thread;
  2. `on_end` cost per span, µs: what the event-loop thread pays to hand a span to the processor;
  3. span create+end cost with recording on and with recording off (discarding processor);
  4. capacity: rows/s the single export thread drains into chDB (a burst handed over at once, nothing spilled);
  5. paced load (--rate spans/s for 10 s) and overload (as fast as one event loop can end spans): rows/s stored
     end to end, how much went through the spool, and how late a 1 ms asyncio sleep wakes up while the export
     thread builds and inserts batches (with the longest gen2 GC pause, which grows with the queued spans).
Run it as its own process: chDB allows one data directory per process.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from exporters import semconv as sc  # noqa: E402
from exporters.recording import disabled_recorder, start_recording  # noqa: E402
from exporters.rows import encode_spans  # noqa: E402

MESSAGES = orjson.dumps([{"role": "user", "parts": [{"type": "text", "content": "Summarise this ticket: " + "x" * 600}]}]).decode()
OUTPUT = orjson.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "y" * 300}],
                        "finish_reason": "stop"}]).decode()


def call_attributes(i: int) -> dict:
    """The attributes gateway/telemetry.py stamps on one call span (25 of them)."""
    return {
        sc.OPERATION: "chat", sc.PROVIDER: "openai", sc.REQUEST_MODEL: "gpt-4o-mini",
        sc.RESPONSE_MODEL: "gpt-4o-mini-2024-07-18", sc.RESPONSE_ID: f"chatcmpl-{i}",
        sc.INPUT_TOKENS: 250 + i % 100, sc.OUTPUT_TOKENS: 80 + i % 50, sc.FINISH_REASONS: '["stop"]',
        sc.REQUEST_STREAM: i % 2 == 0, sc.TIME_TO_FIRST_CHUNK: 0.123, sc.SERVER_ADDRESS: "api.openai.com",
        sc.HTTP_STATUS: 200, sc.KIND: "call", sc.CUSTOMER: f"cust-{i % 50:02d}", sc.INTENT: "summarize",
        sc.PROMPT_VERSION: "v3", sc.TAG_PREFIX + "team": "search", sc.COST_USD: 0.000123, sc.SOURCE: "bench",
        sc.KEY_ID: "key-1", sc.REQUESTED_MODEL: "gpt-4o-mini", sc.DEPLOYMENT: "openai-main", sc.ATTEMPTS: 1,
        sc.INPUT_MESSAGES: MESSAGES, sc.OUTPUT_MESSAGES: OUTPUT,
    }


def make_span(tracer, i: int) -> None:
    span = tracer.start_span("chat gpt-4o-mini", kind=SpanKind.CLIENT)
    span.set_attributes(call_attributes(i))
    if i % 20 == 0:
        span.set_status(Status(StatusCode.ERROR, "upstream 503"))
    span.end()


def ended_spans(n: int) -> list:
    """`n` finished call spans, held by nothing else (a provider left registered with atexit would keep them all
    alive, and every gen2 GC pause would then pay for them)."""
    mem = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer(sc.SCOPE_NAME)
    for i in range(n):
        make_span(tracer, i)
    spans = list(mem.get_finished_spans())
    mem.clear()
    provider.shutdown()
    return spans


def bench_build(n: int, chunk: int = 250) -> float:
    """Encoding cost per row, in chunks of `chunk` spans as the encoder thread does it (a single 5000-row build
    costs ~30% more per row: fresh memory for 13 MB of row bytes)."""
    spans = ended_spans(n)
    parts = [spans[i:i + chunk] for i in range(0, n, chunk)]
    best = min(_timed(lambda: [encode_spans(p) for p in parts]) for _ in range(5))
    size = len(encode_spans(spans).body) / len(spans)
    print(f"row build      {best / len(spans) * 1e6:8.2f} µs/row   ({size:.0f} bytes/row, chunks of {chunk}, "
          f"sha256 included)")
    return best / len(spans) * 1e6


def bench_on_end(rec, n: int) -> float:
    spans = ended_spans(n)
    on_end = rec.processor.on_end
    t0 = time.perf_counter()
    for s in spans:
        on_end(s)
    per = (time.perf_counter() - t0) / n * 1e6
    rec.force_flush(120_000)
    print(f"on_end         {per:8.3f} µs/span  ({n} spans, writer thread running)")
    return per


def bench_create(tracer, n: int, label: str) -> float:
    t = _timed(lambda: [make_span(tracer, i) for i in range(n)])
    print(f"span create+end, recording {label:3s} {t / n * 1e6:8.2f} µs/span")
    return t / n * 1e6


class GcPauses:
    """Longest garbage-collector pause per generation while active (gc.callbacks)."""

    def __init__(self) -> None:
        self.max_ms = [0.0, 0.0, 0.0]
        self._t = 0.0

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            g = info["generation"]
            self.max_ms[g] = max(self.max_ms[g], (time.perf_counter() - self._t) * 1000)


async def _load(tracer, n: int, rate: float, chunk: int = 20) -> tuple[float, list[float]]:
    """End `n` spans on the event loop, `chunk` at a time, paced to `rate` spans/s (0 = as fast as possible),
    while a ticker measures how late a 1 ms sleep wakes up."""
    lateness: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(time.perf_counter() - t - 0.001)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        for i in range(start, min(n, start + chunk)):
            make_span(tracer, i)
        if rate:
            await asyncio.sleep(max(0.0, t0 + (start + chunk) / rate - time.perf_counter()))
        else:
            await asyncio.sleep(0)  # a gateway ends spans between requests, not in one long burst
    elapsed = time.perf_counter() - t0
    done = True
    await tick
    return elapsed, lateness


def bench_capacity(rec, n: int) -> float:
    """How fast the single export thread drains: `n` ended spans handed over at once, time until all inserted."""
    spans = ended_spans(n)
    before = rec.metrics.snapshot()
    t0 = time.perf_counter()
    for s in spans:
        rec.processor.on_end(s)
    del spans, s
    assert rec.force_flush(600_000), "force_flush timed out"
    elapsed = time.perf_counter() - t0
    m = rec.metrics.snapshot()
    batches = m["batches_exported"] - before["batches_exported"]
    ins = m["export_seconds_sum"] - before["export_seconds_sum"]
    print(f"capacity       {n / elapsed:8.0f} rows/s drained by the export thread ({n} queued spans in {elapsed:.2f}s; "
          f"{batches:.0f} inserts, mean {ins / max(batches, 1) * 1000:.0f} ms = {ins / n * 1e6:.0f} µs/row in chDB; "
          f"spooled {m['spans_spooled'] - before['spans_spooled']:.0f})")
    return n / elapsed


def bench_load(rec, n: int, rate: float, label: str) -> None:
    """Spans ended on an asyncio loop while the pipeline exports them: loop stalls, spooling, rows/s."""
    before = rec.metrics.snapshot()
    with GcPauses() as gcp:
        t0 = time.perf_counter()
        produce_s, lateness = asyncio.run(_load(rec.tracer, n, rate))
        assert rec.force_flush(600_000), "force_flush timed out"
        while rec.spool.pending_files:
            time.sleep(0.05)
        total = time.perf_counter() - t0
    m = rec.metrics.snapshot()
    lateness.sort()
    p99 = lateness[int(len(lateness) * 0.99)] if lateness else 0.0
    print(f"{label:14s} {n / produce_s:8.0f} spans/s offered, {n / total:6.0f} rows/s stored end to end "
          f"({n} spans in {total:.2f}s); exported {m['spans_exported'] - before['spans_exported']:.0f}, "
          f"spooled {m['spans_spooled'] - before['spans_spooled']:.0f}, dropped {m['spans_dropped']:.0f}")
    print(f"{'':14s} event loop: 1 ms sleep late by median {statistics.median(lateness) * 1000:.2f} ms, "
          f"p99 {p99 * 1000:.2f} ms, max {max(lateness) * 1000:.2f} ms; longest gen2 GC pause {gcp.max_ms[2]:.0f} ms")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=50_000, help="spans for the capacity and overload phases")
    ap.add_argument("--rate", type=float, default=2000, help="paced load, spans/s (for 10 s)")
    ap.add_argument("--batch-max-rows", type=int, default=2000)
    ap.add_argument("--batch-max-seconds", type=float, default=1.0)
    ap.add_argument("--queue-max", type=int, default=None, help="default: the processor's")
    ap.add_argument("--dir", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="tw-export-bench-")
    os.makedirs(root, exist_ok=True)

    def recorder(**over):
        opts = {"queue_max": args.queue_max} if args.queue_max else {}
        opts.update(over)
        return start_recording(dsn=f"chdb://{root}/data", spool_dir=f"{root}/spool",
                               batch_max_rows=args.batch_max_rows, batch_max_seconds=args.batch_max_seconds, **opts)

    try:
        print(f"spans shaped like a gateway call span: {len(call_attributes(0))} attributes; data in {root}")
        bench_build(5000)
        off = disabled_recorder()
        bench_create(off.tracer, 20_000, "off")
        off.shutdown()
        rec = recorder()
        bench_create(rec.tracer, 20_000, "on")
        rec.force_flush(120_000)
        bench_on_end(rec, 20_000)
        rec.shutdown()
        rec = recorder(queue_max=args.spans + 1)  # room for the whole burst: measures the drain, not the spill
        bench_capacity(rec, args.spans)
        rec.shutdown()
        rec = recorder()
        bench_load(rec, int(args.rate * 10), args.rate, "paced load")
        bench_load(rec, args.spans, 0, "overload")
        rec.shutdown()
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
