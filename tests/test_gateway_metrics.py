"""/metrics and the access log of a real gateway: names, labels, histogram buckets, the customer-label cap, and one
access line per call with no secret or content in it. Traffic goes through the real `openai` SDK to the test
upstream; the scrape is parsed with prometheus_client's own parser (what Prometheus reads)."""
from __future__ import annotations

import io
import os
import time

import httpx
import openai
import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from exporters import semconv as sc
from exporters.recording import disabled_recorder
from gateway.app import TagwayApp
from gateway.config import GatewayConfig
from gateway.observe import LATENCY_BUCKETS, TTFB_BUCKETS, install_access_log
from tests.gateway_fixture import ADMIN_KEY, KEYS, UPSTREAM_KEY, GatewayServer, gateway_config
from tests.upstream import Upstream

SECRET_PROMPT = "my card is 4111 1111 1111 1111 and the word is PLUMTREE-CONTENT-MARKER"
CUSTOMER_LIMIT = 3


@pytest.fixture(scope="module")
def observed(upstream: Upstream):
    """A gateway with the customer label on (capped at 3), a JSON access log captured in memory, and the
    "recording off" recorder (real export counters, nothing written)."""
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    cfg = GatewayConfig(**gateway_config(upstream.base_url, metrics={"customer_label": True,
                                                                     "customer_label_limit": CUSTOMER_LIMIT},
                                         access_log={"format": "json"}))
    log = io.StringIO()
    handler = install_access_log(cfg, stream=log)
    recorder = disabled_recorder()
    spans = InMemorySpanExporter()  # beside the discarding processor: what the spans of a non-recording gateway hold
    recorder.tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    server.log = log
    server.spans = spans
    server.calls = drive(server.url)
    yield server
    server.stop()
    install_access_log(GatewayConfig(access_log={"enabled": False}))
    assert handler is not None


def client(url: str, who: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[who], max_retries=0)


def drive(url: str) -> dict:
    """A known mix of calls; returns what the test expects to see counted."""
    acme = client(url)
    usage = {"input": 0, "output": 0}
    for _ in range(3):
        r = acme.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": SECRET_PROMPT}])
        usage["input"] += r.usage.prompt_tokens
        usage["output"] += r.usage.completion_tokens
    streamed = acme.chat.completions.create(model="gpt-test", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "stream please"}])
    for chunk in streamed:
        if chunk.usage:
            usage["input"] += chunk.usage.prompt_tokens
            usage["output"] += chunk.usage.completion_tokens
    with pytest.raises(openai.InternalServerError):
        acme.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.create(model="no such model\nforged=line", messages=[{"role": "user", "content": "x"}])
    acme.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}])  # 503, then fallback
    platform = client(url, "platform")
    for customer in ("c1", "c2", "c3", "c4"):  # acme + c1 + c2 fill the cap of 3; c3, c4 become "other"
        platform.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                         extra_headers={"x-tagway-customer": customer})
    acme.moderations.create(model="gpt-test", input="x")  # a passed-through route (gateway/passthrough.py)
    return {"usage": usage, "total": 3 + 1 + 1 + 1 + 1 + 4 + 1}


def scrape(url: str, accept: str | None = None) -> httpx.Response:
    return httpx.get(url + "/metrics", headers={"accept": accept} if accept else {})


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "", **labels: str) -> list:
    return [s for s in family.samples if s.name == family.name + suffix
            and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, suffix: str = "", **labels: str) -> float:
    found = samples(family, suffix, **labels)
    assert found, f"no {family.name}{suffix} sample with {labels}"
    return sum(s.value for s in found)


def test_call_counters_are_labelled_by_operation_model_provider_status(observed):
    f = families(scrape(observed.url).text)
    calls = f["tagway_calls"]
    assert calls.type == "counter"
    assert {tuple(sorted(s.labels)) for s in calls.samples} == {
        ("customer", "model", "operation", "provider", "status_class")}
    ok = dict(operation="chat", model="gpt-test", provider="openai", status_class="2xx")
    assert value(calls, "_total", **ok, customer="acme") == 4
    assert value(calls, "_total", model="broken", status_class="5xx") == 1
    # a model the client made up is not a label value of its own (unbounded cardinality)
    assert value(calls, "_total", model="unknown", provider="none", status_class="4xx") == 1
    assert not [s for s in calls.samples if "forged" in str(s.labels)]
    assert value(calls, "_total", model="flaky", status_class="2xx") == 1
    assert value(calls, "_total") == observed.calls["total"]

    errors = f["tagway_call_errors"]
    assert value(errors, "_total", model="broken", provider="openai", error_type="http_500") == 1
    assert value(errors, "_total", model="unknown", error_type="model_not_found") == 1
    assert value(errors, "_total") == 2  # the fallback that succeeded is not an error

    u = observed.calls["usage"]
    assert value(f["tagway_input_tokens"], "_total", model="gpt-test", customer="acme") == u["input"]
    assert value(f["tagway_output_tokens"], "_total", model="gpt-test", customer="acme") == u["output"]
    # gpt-test costs 1e-6 per input token and 2e-6 per output token
    assert value(f["tagway_cost_usd"], "_total", model="gpt-test", customer="acme") == pytest.approx(
        u["input"] * 1e-6 + u["output"] * 2e-6)


def test_customer_label_is_capped(observed):
    calls = families(scrape(observed.url).text)["tagway_calls"]
    customers = {s.labels["customer"] for s in calls.samples}
    assert customers == {"acme", "c1", "c2", "other"}
    assert value(calls, "_total", customer="other") == 2  # c3 and c4


def test_histograms_have_the_documented_buckets(observed):
    f = families(scrape(observed.url).text)
    expected = {**{"call_duration_seconds": LATENCY_BUCKETS, "upstream_duration_seconds": LATENCY_BUCKETS},
                "time_to_first_token_seconds": TTFB_BUCKETS}
    for name, bounds in expected.items():
        h = f[f"tagway_{name}"]
        assert h.type == "histogram"
        for series in {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in h.samples}:
            labels = dict(series)
            buckets = samples(h, "_bucket", **labels)
            assert [b.labels["le"] for b in buckets] == [*map(str, bounds), "+Inf"]
            counts = [b.value for b in buckets]
            assert counts == sorted(counts)  # cumulative
            assert counts[-1] == value(h, "_count", **labels) > 0
    latency = f["tagway_call_duration_seconds"]
    assert {s.labels.get("customer") for s in latency.samples} == {None}  # no customer on histograms
    assert value(latency, "_count", operation="chat", model="gpt-test", status_class="2xx") == 4 + 4
    assert value(f["tagway_time_to_first_token_seconds"], "_count", model="gpt-test") == 1  # the one stream
    # both attempts of the fallback call count as time spent on providers, in one observation
    assert value(f["tagway_upstream_duration_seconds"], "_count", model="flaky") == 1
    assert not samples(f["tagway_upstream_duration_seconds"], "_count", model="unknown")  # never reached one


def test_proxy_and_export_counters_are_served_beside_them(observed):
    text = scrape(observed.url).text
    f = families(text)
    assert value(f["tagway_fallbacks"], "_total") == 1
    assert value(f["tagway_calls_in_flight"]) == 0
    assert value(f["tagway_spans_discarded"], "_total") >= observed.calls["total"]  # recording off: counted
    for name in ("spans_dropped", "spans_quarantined", "spans_spooled", "spool_corrupt_files"):
        assert f[f"tagway_{name}"].type == "counter"
    for name in ("queue_depth", "spool_spans_pending", "spool_bytes_pending", "spool_files_pending"):
        assert f[f"tagway_{name}"].type == "gauge"
    assert scrape(observed.url).headers["content-type"].startswith("text/plain; version=0.0.4")


def test_recording_off_captures_no_content(observed):
    """Content is captured and redacted only to be recorded: with recording off the call spans still carry who and
    what (the metrics and the trace id need them), never the messages."""
    calls = [s for s in observed.spans.get_finished_spans() if s.attributes.get(sc.KIND) == "call"]
    assert len(calls) >= observed.calls["total"]
    assert {s.attributes.get(sc.CUSTOMER) for s in calls} >= {"acme"}
    content = (sc.INPUT_MESSAGES, sc.OUTPUT_MESSAGES, sc.SYSTEM_INSTRUCTIONS, sc.REQUEST_PARAMS)
    assert [s.name for s in calls if any(k in s.attributes for k in content)] == []


def test_openmetrics_when_the_scraper_asks(observed):
    r = scrape(observed.url, "application/openmetrics-text; version=1.0.0")
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    assert 'tagway_calls_total{' in r.text


def access_lines(observed, at_least: int) -> list[dict]:
    """The access log so far, once it has `at_least` lines: lines are written in batches, within 0.1 s."""
    deadline = time.monotonic() + 5
    while len(observed.log.getvalue().splitlines()) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return [orjson.loads(x) for x in observed.log.getvalue().splitlines()]


def test_one_access_line_per_call_without_secrets_or_content(observed):
    lines = access_lines(observed, observed.calls["total"])
    assert len(lines) == observed.calls["total"]
    first = lines[0]
    assert set(first) >= {"time", "trace_id", "key_id", "customer", "model", "status", "latency_ms", "input_tokens",
                          "output_tokens"}
    assert first["key_id"] == "acme-1" and first["customer"] == "acme" and first["status"] == 200
    assert len(first["trace_id"]) == 32 and first["input_tokens"] > 0
    assert [x["status"] for x in lines if x["model"] == "broken"] == [500]
    assert [x["error_type"] for x in lines if x["model"] == "broken"] == ["http_500"]
    text = observed.log.getvalue()
    for secret in (*KEYS.values(), ADMIN_KEY, UPSTREAM_KEY, "PLUMTREE", "4111 1111", "stream please", "Bearer"):
        assert secret not in text, f"{secret!r} leaked into the access log"


def test_access_lines_say_why_and_where_a_call_went(observed):
    """On-call reads the intent and prompt version a call was made for and the deployment that served it (a
    fallback's name when the first one failed) from the access line alone."""
    r = httpx.post(observed.url + "/v1/chat/completions", headers={
        "authorization": f"Bearer {KEYS['acme']}", "x-tagway-intent": "Refund", "x-tagway-prompt-version": "v7"},
        json={"model": "flaky", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    (line,) = [x for x in access_lines(observed, observed.calls["total"] + 1)
               if x["trace_id"] == r.headers["x-tagway-trace-id"]]
    observed.calls["total"] += 1  # the tests after this one count it
    assert (line["intent"], line["prompt_version"], line["model"], line["deployment"], line["attempts"]) == \
        ("refund", "v7", "flaky", "gpt-test", 2)
    plain = [x for x in access_lines(observed, observed.calls["total"]) if x["model"] == "gpt-test"][0]
    assert plain["intent"] is None and plain["deployment"] == "gpt-test"


def test_a_passed_through_call_is_counted_and_has_its_access_line(observed):
    """Moderations, images, files...: calls like the others for whoever watches the metrics and the log."""
    f = families(scrape(observed.url).text)
    assert value(f["tagway_calls"], "_total", operation="moderations", model="gpt-test", provider="openai",
                 status_class="2xx", customer="acme") == 1
    assert value(f["tagway_call_duration_seconds"], "_count", operation="moderations", model="gpt-test") == 1
    (line,) = [x for x in access_lines(observed, observed.calls["total"]) if x["operation"] == "moderations"]
    assert (line["customer"], line["model"], line["deployment"], line["status"]) == ("acme", "gpt-test", "gpt-test",
                                                                                    200)


def test_access_line_matches_the_response_trace_id(observed):
    r = httpx.post(observed.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['globex']}"},
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    last = access_lines(observed, observed.calls["total"] + 1)[-1]
    assert last["trace_id"] == r.headers["x-tagway-trace-id"] and last["customer"] == "globex"


def test_text_access_lines_have_the_same_fields_whatever_the_call():
    """logfmt lines keep one schema: a failed call's missing ttft, tokens and cost are `-`, as the README says,
    so its fields line up with a successful call's."""
    from gateway.observe import CallObserver  # noqa: PLC0415
    from gateway.telemetry import CallRecord  # noqa: PLC0415

    obs = CallObserver(GatewayConfig(access_log={"format": "text"}))
    ok = CallRecord(start_ns=time.time_ns(), requested_model="gpt-test", key_id="k1", customer="acme",
                    provider="openai", http_status=200, input_tokens=12, output_tokens=3, cost_usd=1e-5, ttft_s=0.02)
    failed = CallRecord(start_ns=time.time_ns(), requested_model="gpt-test", key_id="k1", customer="acme",
                        http_status=502, error_type="upstream_error")
    lines = [obs.access_line(r, 0xABC, 0.1) for r in (ok, failed)]
    keys = [[f.split("=", 1)[0] for f in line.split(" ")] for line in lines]
    assert keys[0] == keys[1], lines
    assert "ttft_ms=- input_tokens=- output_tokens=- cost_usd=-" in lines[1]
    assert "customer=acme intent=- prompt_version=- operation=" in lines[1] and " deployment=- " in lines[1]
    assert "ttft_ms=20.0 input_tokens=12 output_tokens=3 cost_usd=0.00001000" in lines[0]


def test_the_process_its_python_and_the_release_are_exposed(observed):
    """What an SRE's standard dashboards read: process_* (CPU, memory, file descriptors, start time), python_info,
    and the release serving (tagway_build_info)."""
    import importlib.metadata  # noqa: PLC0415

    f = families(scrape(observed.url).text)
    assert value(f["process_cpu_seconds"], "_total") > 0
    assert value(f["process_resident_memory_bytes"]) > 10 * 2 ** 20
    assert 0 < value(f["process_open_fds"]) < value(f["process_max_fds"])
    assert value(f["process_start_time_seconds"]) < time.time()
    assert samples(f["python_info"], implementation="CPython")
    assert value(f["tagway_build_info"], version=importlib.metadata.version("tagway")) == 1
