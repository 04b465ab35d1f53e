"""Deployments that keep failing are passed over for a while when a fallback can serve instead (a circuit breaker,
as LiteLLM's router cools a deployment down after `allowed_fails`).

Without it, every call of an outage first waits on the broken deployment (up to its `timeout`, 60 s by default, for
one that hangs) before its fallback answers. After `after_failures` failures in a row that would have sent a call on
to a fallback (429, 5xx, 401/403 of the gateway's own key, timeouts, connection errors), the deployment cools for
`seconds`: calls go straight to the next deployment of their chain that is not cooling. When the period ends one
call tries it again (half-open) while the others still pass it over, until that try ends: a failure cools it again,
an answer clears it, a try that ends with neither (the client left, a 400) lets the next call try. Otherwise every
call after the period would wait out a hanging deployment's timeout until the first of them failed. A deployment
with no other to go to is always tried: a chance of an answer beats a certain error.

State lives in the process (each worker of `--workers N` learns by itself) and is touched on the event loop only.
The hot path pays one dict lookup per call while nothing fails.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["Cooldowns"]

log = logging.getLogger("tagway.cooldowns")


class Cooldowns:
    def __init__(self, after_failures: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after_failures  # 0: never cool a deployment down
        self.seconds = seconds
        self.clock = clock
        # failures in a row, by deployment name (absent: the last try answered). Empty (no deployment failing or
        # cooling) almost always: the hot path tests it before asking about each deployment
        self.failing: dict[str, int] = {}
        self._until: dict[str, float] = {}  # deployments cooling, until this clock time
        self._probing: set[str] = set()  # cooled deployments whose period is over and that one call is trying
        self.started: dict[str, int] = {}  # times each deployment began cooling (a metric)
        self.passed_over: dict[str, int] = {}  # calls sent past each deployment while it cooled (a metric)

    def cooling(self, name: str) -> bool:
        """Whether calls that can go elsewhere should pass the deployment over now."""
        until = self._until.get(name) if self._until else None
        return until is not None and (self.clock() < until or name in self._probing)

    def pass_over(self, name: str) -> None:
        """A call goes past the cooling deployment to a fallback."""
        self.passed_over[name] = self.passed_over.get(name, 0) + 1

    def trying(self, name: str) -> bool:
        """A call is about to try the deployment: once its period is over, that call is the one probe (True); only
        it may hand the try on (`ended`)."""
        if self._until and name in self._until and name not in self._probing and self.clock() >= self._until[name]:
            self._probing.add(name)
            return True
        return False

    def failed(self, name: str, why: str = "") -> None:
        """A try that failed in a way a fallback would take over (UpstreamFailure.retryable); `why` its error type."""
        self._probing.discard(name)
        if not self.after:
            return
        n = self.failing[name] = self.failing.get(name, 0) + 1
        if n >= self.after:
            new = name not in self._until
            self._until[name] = self.clock() + self.seconds  # a failed probe cools it again
            if new:
                self.started[name] = self.started.get(name, 0) + 1
                log.warning("deployment %r failed %d times in a row (last: %s): calls that can go to a fallback "
                            "pass it over for %gs at a time until it answers again", name, n, why or "error",
                            self.seconds)

    def answered(self, name: str) -> None:
        if self.failing:
            self._probing.discard(name)
            if self.failing.pop(name, 0) >= self.after > 0:
                log.info("deployment %r answers again: calls go to it first again", name)
            self._until.pop(name, None)

    def ended(self, name: str) -> None:
        """The probe's try ended with no word on the deployment's health (cancelled, the client's own error): the
        next call may try. Only the call `trying` chose calls this."""
        self._probing.discard(name)

    def collect(self, prefix: str) -> Iterator[Metric]:
        now = self.clock()
        gauge = GaugeMetricFamily(prefix + "deployment_cooling", "1 while a deployment that kept failing is passed "
                                  "over for its fallbacks (cooldown.seconds).", labels=["model"])
        for name in sorted(self.started):  # every deployment that ever cooled: 0 once it answers again
            until = self._until.get(name)
            gauge.add_metric([name], 1.0 if until is not None and (now < until or name in self._probing) else 0.0)
        yield gauge
        started = CounterMetricFamily(prefix + "deployment_cooldowns", "Times a deployment began cooling down after "
                                      "cooldown.after_failures failures in a row.", labels=["model"])
        for name, n in sorted(self.started.items()):
            started.add_metric([name], n)
        yield started
        passed = CounterMetricFamily(prefix + "deployment_passed_over", "Calls sent straight to a fallback because "
                                     "this deployment was cooling down.", labels=["model"])
        for name, n in sorted(self.passed_over.items()):
            passed.add_metric([name], n)
        yield passed
