"""Shadow traffic: a sample of live calls mirrored to a candidate model, off the request path.

The proxy offers every finished call (`offer`, after its response went out and its span was handed off); a call
that matches a rule's `where`, belongs to a tenant that has not opted out, and wins the rule's `sample` draw is put
on the rule's bounded queue. A full queue drops the call (counted in /metrics), it never grows. One worker per rule
takes calls off the queue at most `max_rps` a second and sends each through `send` (the proxy's own routing,
provider and recording machinery: `Proxy.shadow_call`), with at most `max_in_flight` waiting on the candidate, so
a hanging candidate fills the queue and then drops, and costs production nothing but the offer.

Mirror and record only: the gateway never scores a shadow call; `tagway replay report --shadow` pairs the recorded
calls with the live ones and gates them.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporters.vocabulary import NON_PRODUCTION_SOURCES

from .config import ShadowConfig, TenantConfig
from .telemetry import CallRecord

__all__ = ["ShadowDispatcher", "ShadowJob", "matches", "SHADOW_OPERATIONS"]

log = logging.getLogger("tagway.shadow")

# calls whose answer can be compared as text (an embedding has nothing for an evaluator to read)
SHADOW_OPERATIONS = frozenset({"chat", "text_completion", "responses", "messages"})


class ShadowJob:
    """What a shadow call needs of the live one: its parsed request, who sent it and how it was recorded."""

    __slots__ = ("model", "route", "payload", "rec", "trace_id", "principal", "tenant", "capture", "forward_headers")

    def __init__(self, model: str, call: Any) -> None:
        self.model = model
        self.route = (call.operation, call.upstream_path)
        self.payload, self.rec, self.trace_id = call.payload, call.rec, call.trace_id.decode()
        self.principal, self.tenant, self.capture = call.principal, call.tenant, call.capture
        self.forward_headers = call.forward_headers


def matches(rule: ShadowConfig, rec: CallRecord) -> bool:
    """The call carries every `where` value of the rule (model: the name the client asked for)."""
    for key, want in rule.where.items():
        if key.startswith("tag."):
            have = rec.tags.get(key[4:], "")
        else:
            have = rec.requested_model if key == "model" else getattr(rec, key)
        if have != want:
            return False
    return True


class _Lane:
    """One rule's queue, rate and in-flight bound, and its counters."""

    def __init__(self, rule: ShadowConfig) -> None:
        self.rule = rule
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=rule.queue)
        self.slots = asyncio.Semaphore(rule.max_in_flight)
        self.counts: Counter[str] = Counter()  # sampled, dropped, sent, failed
        self.in_flight = 0
        self.worker: asyncio.Task | None = None


class ShadowDispatcher:
    def __init__(self, rules: list[ShadowConfig], send: Callable[[ShadowJob], Awaitable[bool]], *,
                 seed: int | None = None) -> None:
        self._lanes = [_Lane(r) for r in rules]
        self._send = send  # True when the candidate answered
        self._random = random.Random(seed)
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # -- the request path's side: O(rules), never waits ---------------------------------------------------------
    def offer(self, call: Any) -> None:
        rec, tenant = call.rec, call.tenant
        if self._closed or call.operation not in SHADOW_OPERATIONS or rec.error_type or not call.payload \
                or rec.source in NON_PRODUCTION_SOURCES:
            return
        if isinstance(tenant, TenantConfig) and not tenant.shadow:
            return
        for lane in self._lanes:
            rule = lane.rule
            if rule.model == rec.requested_model or not matches(rule, rec):
                continue
            if self._random.random() >= rule.sample:
                continue
            lane.counts["sampled"] += 1
            try:
                lane.queue.put_nowait(ShadowJob(rule.model, call))
            except asyncio.QueueFull:
                lane.counts["dropped"] += 1
                continue
            if lane.worker is None:
                lane.worker = asyncio.get_running_loop().create_task(self._work(lane))

    # -- the worker: at most max_rps starts a second, at most max_in_flight waiting -------------------------------
    async def _work(self, lane: _Lane) -> None:
        interval = 1.0 / lane.rule.max_rps
        next_start = time.monotonic()
        while True:
            job = await lane.queue.get()
            delay = next_start - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_start = max(next_start, time.monotonic() - interval) + interval  # no burst after an idle spell
            await lane.slots.acquire()
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._one(lane, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, lane: _Lane, job: ShadowJob) -> None:
        try:
            ok = await self._send(job)
            lane.counts["sent" if ok else "failed"] += 1
        except asyncio.CancelledError:
            lane.counts["failed"] += 1
            raise
        except Exception:  # the send records its own failures; this is a bug of ours, counted and logged
            lane.counts["failed"] += 1
            log.exception("shadow call to %s failed", job.model)
        finally:
            lane.in_flight -= 1
            lane.slots.release()

    async def aclose(self) -> None:
        """Stop taking calls; cancel the workers and the calls in flight (each records itself as cancelled)."""
        self._closed = True
        tasks = [*self._tasks, *(lane.worker for lane in self._lanes if lane.worker is not None)]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes:
            lane.counts["dropped"] += lane.queue.qsize()  # sampled but never sent: counted, not lost silently

    # -- /metrics -------------------------------------------------------------------------------------------------
    def collect(self, prefix: str) -> Iterator[Metric]:
        calls = CounterMetricFamily(prefix + "shadow_calls", "Live calls mirrored to a shadow candidate, by outcome: "
                                    "sampled, dropped (queue full), sent (answered), failed.",
                                    labels=["model", "outcome"])
        queued = GaugeMetricFamily(prefix + "shadow_queued", "Sampled calls waiting to be sent.", labels=["model"])
        flying = GaugeMetricFamily(prefix + "shadow_in_flight", "Shadow calls waiting on the candidate.",
                                   labels=["model"])
        for lane in self._lanes:
            m = lane.rule.model
            for outcome in ("sampled", "dropped", "sent", "failed"):
                calls.add_metric([m, outcome], lane.counts[outcome])
            queued.add_metric([m], lane.queue.qsize())
            flying.add_metric([m], lane.in_flight)
        yield from (calls, queued, flying)
