"""`/metrics`: one prometheus_client registry over counters that live where they are counted: the proxy's own
(`ProxyStats`), the per-call labelled metrics (`gateway.observe.CallObserver`), refused credentials (`KeyRing`),
calls refused by rate limits and budgets (`CallLimits`), shadow traffic (`gateway.shadow.ShadowDispatcher`) and the
export pipeline's (`exporters.metrics.ExportMetrics`). Nothing is copied: each scrape reads them through one custom
collector.

prometheus_client does the exposition (text 0.0.4, or OpenMetrics when the scraper asks for it), so label values
that come from traffic (model names, customers, error types) are escaped by the library, not by hand.
"""
from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

__all__ = ["GatewayCollector", "MetricsEndpoint"]

PREFIX = "tagway_"


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("tagway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # run from a checkout without `pip install`

# ProxyStats attribute -> (metric name, kind, HELP)
_PROXY: tuple[tuple[str, str, str, str], ...] = (
    ("fallbacks", "fallbacks", "counter", "Times a call moved on to a fallback deployment after one failed (calls "
     "sent past a cooling deployment: deployment_passed_over)."),
    ("record_failures", "record_failures", "counter", "Calls whose span could not be built (should stay 0)."),
    ("capture_failures", "capture_failures", "counter",
     "Calls whose input content could not be captured (the call itself was recorded)."),
    ("in_flight", "calls_in_flight", "gauge", "Calls being served now."),
)


class GatewayCollector:
    """Reads the app's parts at scrape time: the proxy (once started) and the recorder (whichever it is)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily(PREFIX + "build", "The tagway release serving (a dashboard joins on it to tell "
                               "versions apart across a rollout).", value={"version": _version()})
        proxy = self.app.proxy
        if proxy is not None:
            for attr, name, kind, doc in _PROXY:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(PREFIX + name, doc, value=getattr(proxy.stats, attr))
            observer = getattr(proxy, "observe", None)
            if observer is not None:
                yield from observer.collect(PREFIX)
            if proxy.shadow is not None:
                yield from proxy.shadow.collect(PREFIX)
            yield from proxy.cooldowns.collect(PREFIX)
        refused = CounterMetricFamily(PREFIX + "auth_failures", "Requests refused before a tenant was known, by "
                                      "reason.", labels=["reason"])
        for reason, n in sorted(dict(self.app.keyring.failures).items()):
            refused.add_metric([reason], n)
        yield refused
        limits = getattr(self.app, "limits", None)
        if limits is not None:
            limited = CounterMetricFamily(PREFIX + "limited", "Calls refused by a rate limit or a budget (429), by "
                                          "reason.", labels=["reason"])
            for reason, n in sorted(dict(limits.refused).items()):
                limited.add_metric([reason], n)
            yield limited
        export = getattr(self.app.recorder, "metrics", None)
        if export is not None and hasattr(export, "collect"):
            yield from export.collect(PREFIX)


class MetricsEndpoint:
    """The registry of one app and its exposition, negotiated on the scraper's Accept header."""

    def __init__(self, app: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(app))
        # the process's own CPU, memory, open files and start time (process_*), and the Python it runs (python_info):
        # what an SRE's standard dashboards and alerts read, from /proc, at scrape time only
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
