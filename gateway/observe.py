"""What an operator sees of each finished call: the labelled call metrics (/metrics) and the access log line.

`CallObserver` is called once per call, from the proxy's `finally:`, with the finished `CallRecord` (the same
record that became the span). It runs on the event loop for every call, so it does the least it can: a dict
lookup for the call's series, a bisect per histogram and, when the access log is on, one line formatted and
queued. Lines are written to their stream (stderr under `tagway serve`) together, at most `ACCESS_FLUSH_SECONDS`
later (or once `ACCESS_FLUSH_LINES` wait), and at shutdown: one write per batch instead of one system call per call,
as nginx's `access_log ... buffer= flush=` does. Not through `logging`: a LogRecord costs ~8 us, more than the rest
of the observation together (bench/observe_bench.py). The Prometheus families are built only at scrape time
(`collect()`, through prometheus_client's registry in gateway/metrics.py).

Labels are bounded on purpose: `model` is the public model name when it is configured (anything else a client
typed is `unknown`), `provider` and `operation` come from the config and the route, `status_class` is `2xx`,
`4xx`, `5xx` or `none` (no response was sent: the client hung up first). The `customer` label is off by default
(`metrics.customer_label`), and capped: customers after the first `metrics.customer_label_limit` share `other`.

The access log never carries content, keys or error messages (which can quote upstream bodies): only ids, tags
the gateway itself resolved, numbers and the error type.

Beside it on stderr runs the operational log (`install_log`): tagway's own `logging` lines, uvicorn's and any
library's, each with its UTC time, level and logger, in the access log's format (`text` or `json`). A JSON
operational line has `level` and `logger`, which no access line has: that is how a reader tells the two apart.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from bisect import bisect_left
from typing import Any, Iterator, TextIO

import orjson
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from .config import GatewayConfig
from .telemetry import CallRecord

__all__ = ["CallObserver", "LogFormatter", "install_access_log", "install_log", "LATENCY_BUCKETS", "TTFB_BUCKETS",
           "status_class"]

# Seconds. A call is an LLM generation: from a few ms (cached, embeddings, errors) to minutes (long streams).
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                                      60.0, 120.0, 300.0)
# Seconds to the first streamed token.
TTFB_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
UNKNOWN_MODEL = "unknown"
OTHER_CUSTOMER = "other"

_BASE = ("operation", "model", "provider")
_BARE = re.compile(r"[A-Za-z0-9_.:/@+\-]+")  # logfmt values that need no quotes
_access_stream: TextIO | None = None  # where access lines go in this process (None: nowhere)
ACCESS_FLUSH_SECONDS = 0.1  # the longest a line waits before it is written
ACCESS_FLUSH_LINES = 256  # ... or this many lines


def status_class(http_status: int) -> str:
    return f"{http_status // 100}xx" if http_status else "none"


def install_access_log(config: GatewayConfig, stream: TextIO | None = None) -> TextIO | None:
    """Write the access log of the gateways this process starts to stderr (or `stream`), as `tagway serve`
    does; with `access_log.enabled: false` (or never called: tests, `--in-process` replays) there is none."""
    global _access_stream
    _access_stream = (stream if stream is not None else sys.stderr) if config.access_log.enabled else None
    return _access_stream


class LogFormatter(logging.Formatter):
    """`2026-12-07T19:01:20.123Z WARNING tagway.limits: message` (a traceback follows on its own lines), or with
    `json` one object a line: time, level, logger, message and, for an exception, its traceback as one string
    (`exception`)."""

    def __init__(self, *, json: bool = False) -> None:
        super().__init__()
        self.json = json

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exc = self.formatException(record.exc_info) if record.exc_info else ""
        if record.stack_info:
            exc = f"{exc}\n{self.formatStack(record.stack_info)}" if exc else self.formatStack(record.stack_info)
        if self.json:
            obj = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                   "message": message}
            if exc:
                obj["exception"] = exc
            return orjson.dumps(obj).decode()
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        return f"{line}\n{exc}" if exc else line


# the loggers --log-level sets; any other library's lines are shown from WARNING up, as before
_OWN_LOGGERS = ("tagway", "exporters")
# litellm writes its loggers' lines with a handler of its own (which redacts secrets): not a second time through ours
_OWN_HANDLER_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def install_log(config: GatewayConfig, level: int, stream: TextIO | None = None) -> logging.Handler:
    """The operational log of `tagway serve` and of each of its workers: one handler on the root logger, writing
    to stderr (or `stream`) in the access log's format; tagway's loggers at `level` (--log-level). uvicorn runs
    with `log_config=None`, so its own lines (`uvicorn.error`) come through here too."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogFormatter(json=config.access_log.format == "json"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in _OWN_HANDLER_LOGGERS:
        logging.getLogger(name).propagate = False
    return handler


class _Hist:
    __slots__ = ("counts", "total")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # first bucket whose upper bound (le) is >= value
        self.total += value

    def buckets(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*map(str, bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


class _Usage:
    __slots__ = ("calls", "input_tokens", "output_tokens", "cost")

    def __init__(self) -> None:
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0


class CallObserver:
    """Per-call metrics and the access log. Updated on the event loop thread only (plain ints, no locks); a
    scrape reads them on the same loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self._models = frozenset(m.name for m in config.models)
        self._customer_label = config.metrics.customer_label
        self._customer_limit = config.metrics.customer_label_limit
        self._customers: set[str] = set()
        self._access = _access_stream if config.access_log.enabled else None
        self._json = config.access_log.format == "json"
        self._second = -1  # the access log's time stamp, formatted once per second
        self._stamp = ""
        self._quoted: dict[str, str] = {}  # access-log values as logfmt writes them
        self._usage: dict[tuple[str, ...], _Usage] = {}  # (operation, model, provider, status_class[, customer])
        self._errors: dict[tuple[str, ...], int] = {}  # (operation, model, provider, error_type[, customer])
        self._latency: dict[tuple[str, ...], _Hist] = {}  # (operation, model, provider, status_class)
        self._upstream: dict[tuple[str, ...], _Hist] = {}  # (operation, model, provider)
        self._ttfb: dict[tuple[str, ...], _Hist] = {}  # (operation, model, provider): streams only
        self.failures = 0  # observations that raised (a bug): never the call's problem
        self._lines: list[str] = []  # access lines waiting to be written
        self._flush_at: asyncio.TimerHandle | None = None

    def __call__(self, rec: CallRecord, trace_id: int, latency_s: float, *, count: bool = True) -> None:
        """Count the call in the metrics (`count`: a shadow call, which answers no client, has its own counter and
        only an access line) and queue its access line."""
        try:
            if count:
                self._count(rec, latency_s)
            if self._access is not None:
                self._lines.append(self.access_line(rec, trace_id, latency_s))
                if len(self._lines) >= ACCESS_FLUSH_LINES:
                    self.flush()
                elif self._flush_at is None:
                    self._schedule_flush()
        except Exception:  # observing never fails a call
            self.failures += 1
            logging.getLogger("tagway").exception("could not observe a call")

    def flush(self) -> None:
        """Write the queued access lines now (also at shutdown)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if not self._lines or self._access is None:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self._access.write(text)
            self._access.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail calls; the lines are lost
            self.failures += 1

    def _schedule_flush(self) -> None:
        try:
            self._flush_at = asyncio.get_running_loop().call_later(ACCESS_FLUSH_SECONDS, self.flush)
        except RuntimeError:  # called off an event loop: write now
            self.flush()

    # -- metrics ------------------------------------------------------------------------------------------------
    def _count(self, rec: CallRecord, latency_s: float) -> None:
        model = rec.requested_model if rec.requested_model in self._models else UNKNOWN_MODEL
        base = (rec.operation, model, rec.provider or "none")
        status = status_class(rec.http_status)
        cust: tuple[str, ...] = (self._customer(rec.customer),) if self._customer_label else ()
        key = (*base, status, *cust)
        usage = self._usage.get(key)
        if usage is None:
            usage = self._usage[key] = _Usage()
        usage.calls += 1
        if rec.input_tokens:
            usage.input_tokens += rec.input_tokens
        if rec.output_tokens:
            usage.output_tokens += rec.output_tokens
        if rec.cost_usd:
            usage.cost += rec.cost_usd
        if rec.error_type:
            ekey = (*base, rec.error_type, *cust)
            self._errors[ekey] = self._errors.get(ekey, 0) + 1
        _observe(self._latency, (*base, status), LATENCY_BUCKETS, latency_s)
        if rec.attempts:
            # time spent waiting on providers (to the response, or to the first event of a stream), all attempts
            waited = sum((a.end_ns - a.start_ns) for a in rec.attempts if a.end_ns) / 1e9
            _observe(self._upstream, base, LATENCY_BUCKETS, waited)
        if rec.ttft_s is not None:
            _observe(self._ttfb, base, TTFB_BUCKETS, rec.ttft_s)

    def _customer(self, customer: str) -> str:
        if not customer:
            return "none"
        if customer in self._customers:
            return customer
        if len(self._customers) >= self._customer_limit:
            return OTHER_CUSTOMER
        self._customers.add(customer)
        return customer

    def collect(self, prefix: str = "tagway_") -> Iterator[Any]:
        labels = [*_BASE, "status_class"] + (["customer"] if self._customer_label else [])
        calls = CounterMetricFamily(f"{prefix}calls", "LLM calls on /v1/*, by how they ended.", labels=labels)
        tin = CounterMetricFamily(f"{prefix}input_tokens", "Input (prompt) tokens the providers reported.",
                                  labels=labels)
        tout = CounterMetricFamily(f"{prefix}output_tokens", "Output (completion) tokens the providers reported.",
                                   labels=labels)
        cost = CounterMetricFamily(f"{prefix}cost_usd", "Cost of the calls in US dollars, from the price map.",
                                   labels=labels)
        for key, u in list(self._usage.items()):
            values = list(key)
            calls.add_metric(values, u.calls)
            tin.add_metric(values, u.input_tokens)
            tout.add_metric(values, u.output_tokens)
            cost.add_metric(values, u.cost)
        errors = CounterMetricFamily(
            f"{prefix}call_errors", "LLM calls that ended in an error, by error type (as recorded in error.type).",
            labels=[*_BASE, "error_type"] + (["customer"] if self._customer_label else []))
        for key, n in list(self._errors.items()):
            errors.add_metric(list(key), n)
        yield from (calls, errors, tin, tout, cost)
        yield _histogram(f"{prefix}call_duration_seconds", "Whole call, from the request to its span's end (after "
                         "the last byte sent).",
                         [*_BASE, "status_class"], self._latency, LATENCY_BUCKETS)
        yield _histogram(f"{prefix}upstream_duration_seconds", "Time spent waiting on providers: to the response, "
                         "or to a stream's first event; all attempts of a call, fallbacks included.",
                         list(_BASE), self._upstream, LATENCY_BUCKETS)
        yield _histogram(f"{prefix}time_to_first_token_seconds", "Streamed calls: time to the first content event "
                         "sent to the client.", list(_BASE), self._ttfb, TTFB_BUCKETS)

    # -- access log ---------------------------------------------------------------------------------------------
    def access_line(self, rec: CallRecord, trace_id: int, latency_s: float) -> str:
        """time, trace id, key id, customer, intent, prompt version, operation, model, deployment, provider, status,
        error type, latency, ttft, tokens, cost, stream, attempts, source: ids, numbers and names the gateway
        resolved (tags are normalised); never content or keys."""
        second, ms = divmod(rec.start_ns // 1_000_000, 1000)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        when = f"{self._stamp}.{ms:03d}Z"
        model = rec.requested_model[:128]  # what the client typed: bounded, and quoted below
        if self._json:
            return orjson.dumps({
                "time": when, "trace_id": f"{trace_id:032x}", "key_id": rec.key_id or None,
                "customer": rec.customer or None, "intent": rec.intent or None,
                "prompt_version": rec.prompt_version or None, "operation": rec.operation, "model": model or None,
                "deployment": rec.deployment or None, "provider": rec.provider or None,
                "status": rec.http_status or None,
                "error_type": rec.error_type or None, "latency_ms": round(latency_s * 1000, 1),
                "ttft_ms": round(rec.ttft_s * 1000, 1) if rec.ttft_s is not None else None,
                "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
                "cost_usd": round(rec.cost_usd, 8) if rec.cost_usd is not None else None, "stream": rec.stream,
                "attempts": len(rec.attempts), "source": rec.source}).decode()
        q = self._logfmt
        line = (f"time={when} trace_id={trace_id:032x} key_id={q(rec.key_id)} customer={q(rec.customer)} "
                f"intent={q(rec.intent)} prompt_version={q(rec.prompt_version)} operation={q(rec.operation)} "
                f"model={q(model)} deployment={q(rec.deployment)} provider={q(rec.provider)} "
                f"status={rec.http_status or '-'} error_type={q(rec.error_type)} latency_ms={latency_s * 1000:.1f}")
        # every line has every field (`-` when the call has none), so a line's fields never shift for a parser
        ttft = f"{rec.ttft_s * 1000:.1f}" if rec.ttft_s is not None else "-"
        tin = rec.input_tokens if rec.input_tokens is not None else "-"
        tout = rec.output_tokens if rec.output_tokens is not None else "-"
        cost = f"{rec.cost_usd:.8f}" if rec.cost_usd is not None else "-"
        line += f" ttft_ms={ttft} input_tokens={tin} output_tokens={tout} cost_usd={cost}"
        return f"{line} stream={'true' if rec.stream else 'false'} attempts={len(rec.attempts)} source={q(rec.source)}"

    def _logfmt(self, value: str) -> str:
        """A logfmt value: `-` when empty, bare when it is a plain word, else a JSON string (quotes, spaces and
        control characters escaped), so a model name a client typed cannot forge a second line or field. Values
        repeat (keys, customers, models), so their quoted form is remembered (a bounded number of them)."""
        if not value:
            return "-"
        quoted = self._quoted.get(value)
        if quoted is None:
            quoted = value if _BARE.fullmatch(value) else orjson.dumps(value).decode()
            if len(self._quoted) < 4096:
                self._quoted[value] = quoted
        return quoted


def _observe(series: dict[tuple[str, ...], _Hist], key: tuple[str, ...], bounds: tuple[float, ...],
             value: float) -> None:
    h = series.get(key)
    if h is None:
        h = series[key] = _Hist(len(bounds))
    h.observe(bounds, value)


def _histogram(name: str, doc: str, labels: list[str], series: dict[tuple[str, ...], _Hist],
               bounds: tuple[float, ...]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, h in list(series.items()):
        fam.add_metric(list(key), h.buckets(bounds), h.total)
    return fam
