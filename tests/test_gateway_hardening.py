"""No tenant can stall, flood or blind the gateway (issue 19), against the real `tagway serve` (subprocess, embedded
store, real HTTP upstream, the openai SDK as client). Each test names the finding it covers."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess, metric
from tests.upstream import Upstream

ADMIN = "tw-hard-admin-0123456789abcdefghijklmnopq"
KEYS = {c: f"tw-hard-{c}-0123456789abcdefghijklmnopqrs" for c in ("acme", "private", "platform", "globex")}
UPSTREAM_KEY = "sk-upstream-hardening-0123456789"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    with Upstream() as up:
        base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "HARD_UPSTREAM_KEY"}
        config = {
            "admin_key_hash": hash_key(ADMIN),
            "models": [{"name": "gpt-test", "model": "ok-model", **base},
                       {"name": "echokey", "model": "echokey-model", **base},
                       {"name": "flaky", "model": "fail503-a", **base, "fallbacks": ["premium", "gpt-test"]},
                       {"name": "premium", "model": "ok-premium", **base}],
            "tenants": [{"customer": "acme", "allowed_models": ["gpt-test", "echokey", "flaky"],
                         "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])}]},
                        {"customer": "private", "capture_content": False,
                         "keys": [{"id": "private-k", "hash": hash_key(KEYS["private"])}]},
                        {"customer": "platform", "may_set_customer": True,
                         "keys": [{"id": "platform-k", "hash": hash_key(KEYS["platform"])}]},
                        {"customer": "globex", "keys": [{"id": "globex-k", "hash": hash_key(KEYS["globex"])}]}],
            "metrics": {"auth": True},
        }
        with GatewayProcess(tmp, config, env={"HARD_UPSTREAM_KEY": UPSTREAM_KEY}) as g:
            g.upstream = up
            yield g


def client(gw, customer: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS[customer], max_retries=0)


def chat(gw, customer: str, text: str = "hi", **kw):
    return client(gw, customer).chat.completions.with_raw_response.create(
        model=kw.pop("model", "gpt-test"), messages=[{"role": "user", "content": text}], **kw)


def attrs(gw, trace_id: str) -> dict:
    gw.call_row(trace_id, ADMIN)  # written
    rows = gw.query("SELECT SpanAttributes AS a FROM otel_traces WHERE TraceId = {t:String} "
                    "AND SpanAttributes['tagway.kind'] = 'call'", ADMIN, t=trace_id)
    assert len(rows) == 1
    return rows[0]["a"]


def test_finding1_a_huge_adversarial_prompt_does_not_stall_anyone(gw):
    """98 KB shaped to make a backtracking e-mail pattern quadratic (it held the event loop 8-27 s)."""
    evil = "a" * 49_000 + "@" + "a" * 49_000
    raw = chat(gw, "acme", evil)
    lat = []
    for _ in range(10):  # another tenant, right after: before the fix each waited for the redaction
        t0 = time.perf_counter()
        chat(gw, "globex", "where is my refund?")
        lat.append(time.perf_counter() - t0)
    assert max(lat) < 2.0, lat
    row = gw.call_row(raw.headers["x-tagway-trace-id"], ADMIN)
    assert "truncated by tagway" in row["request_json"] and len(row["request_json"]) < 60_000


def test_finding3_client_strings_are_bounded_and_redacted(gw):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw, "acme").chat.completions.create(model="m" * 300, messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_too_long"
    user = "contact bob@example.com " + "u" * 300_000  # the fixture upstream takes bodies up to 1 MiB
    raw = chat(gw, "acme", user=user, metadata={"note": "mail carol@example.com"})
    trace = raw.headers["x-tagway-trace-id"]
    row = gw.call_row(trace, ADMIN)
    assert len(row["end_user"]) <= 256 and "bob@example.com" not in row["end_user"]
    assert "[REDACTED:email]" in row["end_user"]
    assert "carol" not in row["tags"].get("note", "") and "redacted" in row["tags"]["note"]
    a = attrs(gw, trace)
    assert a.get("tagway.truncated") == "{\"user\":%d}" % len(user), sorted(a)


def test_finding7_capture_follows_the_recorded_tenant(gw):
    """A platform key (may set its customer) recording a call as `private`, whose tenant turned capture off."""
    raw = client(gw, "platform").chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "my secret diagnosis"}],
        extra_headers={"x-tagway-customer": "private"})
    row = gw.call_row(raw.headers["x-tagway-trace-id"], ADMIN)
    assert row["customer"] == "private"
    assert row["request_json"] == "" and row["response_json"] == ""
    # and the admin key likewise
    raw = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}",
                                                               "x-tagway-customer": "private"},
                     json={"model": "gpt-test", "messages": [{"role": "user", "content": "another secret"}]})
    row = gw.call_row(raw.headers["x-tagway-trace-id"], ADMIN)
    assert row["request_json"] == "" and row["response_json"] == ""


def test_finding7_fallbacks_the_tenant_may_not_use_are_skipped_and_recorded(gw):
    raw = chat(gw, "acme", model="flaky")  # flaky (503) -> premium (not allowed for acme) -> gpt-test
    trace = raw.headers["x-tagway-trace-id"]
    row = gw.call_row(trace, ADMIN)
    assert row["deployment"] == "gpt-test" and row["attempts"] == 2
    assert attrs(gw, trace)["tagway.fallbacks_skipped"] == '["premium"]'
    assert not [r for r in gw.upstream.requests if r["body"].get("model") == "ok-premium"]


def test_finding7_a_repeated_credential_header_is_refused_on_every_route(gw):
    two = [("Authorization", f"Bearer {KEYS['acme']}"), ("Authorization", f"Bearer {KEYS['globex']}")]
    r = httpx.post(gw.url + "/v1/chat/completions", headers=two,
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_header"
    r = httpx.get(gw.url + "/v1/tagway/stats", headers=two)
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_header"
    r = httpx.post(gw.url + "/v1/chat/completions",
                   headers=[("Authorization", f"Bearer {KEYS['platform']}"), ("x-tagway-customer", "acme"),
                            ("x-tagway-customer", "globex")],
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-tagway-customer"


def test_two_different_keys_in_two_credential_headers_are_refused_on_every_route(gw):
    """Authorization for one tenant and api-key (or x-api-key) for another: whose call it is would be a guess (it
    was Authorization's, silently). The same key in both is one credential and passes."""
    chat_body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}
    for other in ("api-key", "x-api-key"):
        mixed = {"Authorization": f"Bearer {KEYS['acme']}", other: KEYS["globex"]}
        r = httpx.post(gw.url + "/v1/chat/completions", headers=mixed, json=chat_body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "conflicting_api_keys", r.text
        r = httpx.get(gw.url + "/v1/tagway/stats", headers=mixed)
        assert r.status_code == 400 and r.json()["error"]["code"] == "conflicting_api_keys", r.text
    both = {"api-key": KEYS["acme"], "x-api-key": KEYS["globex"]}
    for route in (("POST", "/v1/chat/completions"), ("GET", "/v1/tagway/stats"), ("GET", "/v1/models")):
        r = httpx.request(*route[:1], gw.url + route[1], headers=both, json=chat_body if route[0] == "POST" else None)
        assert r.status_code == 400 and r.json()["error"]["code"] == "conflicting_api_keys", (route, r.text)
    for same in ({"Authorization": f"Bearer {KEYS['acme']}", "api-key": KEYS["acme"]},
                 {"api-key": KEYS["acme"], "x-api-key": KEYS["acme"]}):
        r = httpx.post(gw.url + "/v1/chat/completions", headers=same, json=chat_body)
        assert r.status_code == 200, r.text
        assert gw.call_row(r.headers["x-tagway-trace-id"], ADMIN)["customer"] == "acme"


def test_finding8_a_provider_echoing_its_key_leaks_it_nowhere(gw):
    raw = chat(gw, "acme", model="echokey")
    text = raw.parse().choices[0].message.content
    assert UPSTREAM_KEY not in text and "***" in text
    row = gw.call_row(raw.headers["x-tagway-trace-id"], ADMIN)
    assert UPSTREAM_KEY not in row["response_json"] and "***" in row["response_json"]
    stream = client(gw, "acme").chat.completions.create(model="echokey", stream=True,
                                                        messages=[{"role": "user", "content": "x"}])
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert UPSTREAM_KEY not in streamed and "***" in streamed


def test_finding8_refused_credentials_are_counted_by_reason_and_metrics_need_the_admin_key(gw):
    assert httpx.get(gw.url + "/metrics").status_code == 401
    assert gw.get("/metrics", KEYS["acme"]).status_code == 403
    before = gw.get("/metrics", ADMIN).text
    for key in (None, "tw-nobody-0123456789abcdefghij"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(gw.url + "/v1/chat/completions", headers=headers,
                       json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401
    after = gw.get("/metrics", ADMIN).text
    for reason in ("missing_api_key", "invalid_api_key"):
        assert metric(after, "tagway_auth_failures_total", reason=reason) >= \
            metric(before, "tagway_auth_failures_total", reason=reason) + 1


def test_finding8_concurrent_tenants_keep_their_own_records(gw):
    """Isolation under concurrency: each tenant's calls are recorded as that tenant, with its own settings."""
    out: dict[str, list[str]] = {"acme": [], "private": []}

    def run(customer: str) -> None:
        for i in range(5):
            out[customer].append(chat(gw, customer, f"{customer} {i}").headers["x-tagway-trace-id"])

    threads = [threading.Thread(target=run, args=(c,)) for c in out]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for customer, traces in out.items():
        for t in traces:
            row = gw.call_row(t, ADMIN)
            assert row["customer"] == customer
            assert (row["request_json"] == "") == (customer == "private")


def test_finding8_a_hanging_clickhouse_does_not_hold_start_up(tmp_path):
    """A ClickHouse server that accepts connections and never answers: the gateway serves at once, /readyz says
    why recording is degraded, calls are answered; when the server goes away the spans are spooled."""
    import socket  # noqa: PLC0415

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # and say nothing
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    with Upstream() as up:
        config = {"admin_key_hash": hash_key(ADMIN),
                  "storage": {"dsn": f"http://default:pw@127.0.0.1:{port}/default"},
                  "models": [{"name": "gpt-test", "model": "ok-model", "provider": "openai", "base_url": up.base_url}],
                  "tenants": [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])}]}]}
        g = GatewayProcess(tmp_path, config)
        t0 = time.monotonic()
        g.start(timeout=20)
        assert time.monotonic() - t0 < 15  # it used to wait 30 s for the first answer
        ready = httpx.get(g.url + "/readyz").json()
        assert ready["recording"] == "degraded" and ready["reason"]
        assert chat(g, "acme").parse().choices[0].message.content.startswith("Echo")
        stop.set()
        for s in held:
            s.close()
        listener.close()
        err = g.stop()
    assert "Traceback" not in err
    spooled = list((tmp_path / "data" / "spool").rglob("*.spool"))
    assert spooled, "the call's span must be kept in the spool"


def test_finding8_a_broken_keys_file_is_one_line_and_exit_2(tmp_path):
    keys = tmp_path / "tagway.keys.yaml"
    ok = "- id: ok\n  customer: acme\n  hash: sha256:" + "0" * 64 + "\n"
    keys.write_text(ok + "- id: bad\n  customer: acme\n  hash: [1\n")
    g = GatewayProcess(tmp_path, {"tenants": [{"customer": "acme"}]})
    r = g.cli("serve")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{keys}: invalid YAML at line 7, column 1" in r.stderr
    keys.write_text(ok + "- id: bad\n  customer: acme\n  colour: red\n")
    r = g.cli("serve")
    assert r.returncode == 2 and f"{keys}:4: key #2: " in r.stderr and "Traceback" not in r.stderr


def _poison_spool_file(spool_dir, service: str, good: int) -> None:
    """A spool file as a crashed gateway would leave it: `good` valid call spans and one row ClickHouse refuses."""
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: PLC0415

    from exporters.rows import EncodedBatch, encode_spans  # noqa: PLC0415
    from exporters.spool import Spool  # noqa: PLC0415

    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("t")
    for i in range(good + 1):
        tracer.start_span(f"chat m{i}", attributes={"tagway.kind": "call", "tagway.customer": "acme"}).end()
    lines = encode_spans(mem.get_finished_spans()).body.splitlines()
    lines[good // 2] = lines[good // 2].replace(b'"Duration":', b'"Duration":"not a number","X":', 1)
    body = b"\n".join(lines) + b"\n"
    spool = Spool(str(spool_dir))
    spool.write(EncodedBatch.of("otel_traces", body, len(lines)))
    spool.close()


def test_finding2_a_batch_clickhouse_refuses_is_set_aside_and_recording_goes_on(tmp_path):
    service = "poison-test"
    _poison_spool_file(tmp_path / "data" / "spool" / "worker-0", service, good=40)
    with Upstream() as up:
        config = {"admin_key_hash": hash_key(ADMIN),
                  "models": [{"name": "gpt-test", "model": "ok-model", "provider": "openai", "base_url": up.base_url}],
                  "tenants": [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])}]}]}
        with GatewayProcess(tmp_path, config) as g:
            traces = [chat(g, "acme").headers["x-tagway-trace-id"] for _ in range(5)]
            for t in traces:  # recording goes on: the new calls are stored, not stuck behind the refused batch
                g.call_row(t, ADMIN, timeout=120)
            m = g.get("/metrics", ADMIN).text
            assert metric(m, "tagway_spool_poison_files_total") == 1
            assert metric(m, "tagway_spans_quarantined_total") == 1
            kept = g.query("SELECT count() AS n FROM otel_traces WHERE ServiceName = {s:String}", ADMIN, s=service)
            assert kept[0]["n"] == 40  # the refused row's 40 neighbours got through
            listed = g.cli("db", "spool", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            import json  # noqa: PLC0415
            (q,) = json.loads(listed.stdout)
            assert q["kind"] == "poison" and q["rows"] == 1 and "Code: " in q["reason"]
            # re-queued, the gateway picks it up and (still refused) sets it aside again
            assert g.cli("db", "spool", "retry", "--all").returncode == 0
            assert json.loads(g.cli("db", "spool", "list", "--json").stdout) == []
            deadline = time.monotonic() + 120
            while metric(g.get("/metrics", ADMIN).text, "tagway_spool_poison_files_total") < 2:
                assert time.monotonic() < deadline, "the re-queued batch was not picked up"
                time.sleep(0.2)
            (again,) = json.loads(g.cli("db", "spool", "list", "--json").stdout)
            assert again["kind"] == "poison" and again["rows"] == 1
            purged = g.cli("db", "spool", "purge", "--all")
            assert purged.returncode == 0 and "1 rows deleted" in purged.stdout
            assert g.cli("db", "spool", "list").stdout.strip() == "no quarantined batches"
            bad = g.cli("db", "spool", "retry", "nope.poison")
            assert bad.returncode == 2 and "not a quarantined batch: nope.poison" in bad.stderr


def test_finding5_sigkill_loses_at_most_a_flush_interval(tmp_path):
    """Acknowledged calls against stored rows after a SIGKILL mid-load. Batches are formed every 10 s here, so
    without the write-ahead log everything since the last batch (all of it) would be lost."""
    import signal  # noqa: PLC0415

    config = {"admin_key_hash": hash_key(ADMIN), "recording": {"batch_max_seconds": 10, "flush_interval_ms": 100},
              "models": [{"name": "m", "provider": "mock"}],
              "tenants": [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])}]}]}
    g = GatewayProcess(tmp_path, config).start()
    acked: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                try:
                    r = c.post(g.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['acme']}"},
                               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                except httpx.HTTPError:
                    continue  # being killed under us
                if r.status_code == 200:
                    acked.append(r.headers["x-tagway-trace-id"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    t0 = time.monotonic()
    [t.start() for t in threads]
    time.sleep(4)
    g.proc.send_signal(signal.SIGKILL)
    g.proc.wait(10)
    seconds = time.monotonic() - t0
    stop.set()
    [t.join(10) for t in threads]
    assert len(acked) > 100
    g.start()  # same data directory: the log is recovered into the spool and re-sent
    try:
        # until every acknowledged call is stored, or the spool is empty: the log was recovered into it at start-up,
        # so once it holds nothing, the count read after that is all there will be (a few calls may be lost by
        # design: waiting for all of them took the whole deadline)
        deadline = time.monotonic() + 60
        while True:
            m = g.get("/metrics", ADMIN).text
            assert "tagway_spool_files_pending" in m
            sent = metric(m, "tagway_spool_files_pending") == 0
            rows = g.query("SELECT count() AS n FROM llm_calls WHERE trace_id IN {t:Array(String)}", ADMIN, t=acked)
            lost = len(acked) - rows[0]["n"]
            if lost <= 0 or sent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        g.stop()
    rate = len(acked) / seconds
    # at most the flush interval's worth (100 ms) plus scheduling slack on a loaded machine
    assert lost <= 0.3 * rate + 5, f"lost {lost} of {len(acked)} acknowledged calls ({rate:.0f}/s)"


def test_rate_limits_and_budgets_per_key_and_tenant(tmp_path):
    """429s with retry-after, recorded as such; a budget computed from recorded cost survives a restart."""
    keys = {"fast": "tw-hard-fast-0123456789abcdefghijklmnopq", "spender": "tw-hard-spend-0123456789abcdefghijklmnop"}
    with Upstream() as up:
        model = {"name": "gpt-test", "model": "ok-model", "provider": "openai", "base_url": up.base_url,
                 "input_cost_per_token": 1e-4, "output_cost_per_token": 1e-4}  # ~12-14 tokens: ~$0.0013 a call
        config = {"admin_key_hash": hash_key(ADMIN), "models": [model],
                  "tenants": [{"customer": "limited", "limits": {"rpm": 3},
                               "keys": [{"id": "fast-k", "hash": hash_key(keys["fast"])}]},
                              {"customer": "thrifty", "keys": [{"id": "spend-k", "hash": hash_key(keys["spender"]),
                                                                "limits": {"budget": {"usd": 0.003, "per": "month",
                                                                                      "soft": 0.3}}}]}]}
        g = GatewayProcess(tmp_path, config).start()
        try:
            fast = openai.OpenAI(base_url=g.url + "/v1", api_key=keys["fast"], max_retries=0)
            for _ in range(3):
                fast.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.RateLimitError) as e:
                fast.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            assert e.value.code == "rate_limited" and int(e.value.response.headers["retry-after"]) >= 1
            row = g.call_row(e.value.response.headers["x-tagway-trace-id"], ADMIN)
            assert (row["error_type"], row["http_status"], row["customer"]) == ("rate_limited", 429, "limited")

            # a source the tenant names itself is still its spend (only replay, judge and shadow calls are not)
            spender = openai.OpenAI(base_url=g.url + "/v1", api_key=keys["spender"], max_retries=0,
                                    default_headers={"x-tagway-source": "free-tier"})
            first = spender.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            assert "x-tagway-budget-warning" not in first.headers
            second = spender.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            assert "spend-k" in second.headers["x-tagway-budget-warning"]  # past 30% of $0.003
            refused = None
            for _ in range(5):
                try:
                    spender.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
                except openai.RateLimitError as err:
                    refused = err
                    break
            assert refused is not None and refused.code == "budget_exceeded"
            assert refused.response.headers["x-should-retry"] == "false"
            budgets = g.get("/admin/budgets", ADMIN).json()["data"]
            (b,) = [b for b in budgets if b["id"] == "spend-k"]
            assert b["spent_usd"] >= 0.003 and b["used"] >= 1
            m = g.get("/metrics", ADMIN).text
            assert metric(m, "tagway_limited_total", reason="rate_limited") == 1
            assert metric(m, "tagway_limited_total", reason="budget_exceeded") == 1
            for t in (first.headers["x-tagway-trace-id"], second.headers["x-tagway-trace-id"]):
                g.call_row(t, ADMIN)  # the spend is in the store
        finally:
            g.stop()
        g.start()  # a restart does not reset the spend: it is read back from the recorded calls
        try:
            with pytest.raises(openai.RateLimitError) as e:
                openai.OpenAI(base_url=g.url + "/v1", api_key=keys["spender"], max_retries=0).chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            assert e.value.code == "budget_exceeded"
        finally:
            g.stop()


def test_finding6_heavy_reads_run_apart_from_inserts_and_within_limits(tmp_path):
    """A read that would run for minutes is cut at storage.query_max_seconds with a clear error; while it runs,
    calls are answered and their spans are inserted (reads have clients of their own)."""
    with Upstream() as up:
        config = {"admin_key_hash": hash_key(ADMIN),
                  "storage": {"query_max_seconds": 4, "query_concurrency": 2},
                  "models": [{"name": "gpt-test", "model": "ok-model", "provider": "openai", "base_url": up.base_url}],
                  "tenants": [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])}]}]}
        with GatewayProcess(tmp_path, config) as g:
            heavy: dict = {}

            def run_heavy() -> None:
                t0 = time.monotonic()
                heavy["r"] = httpx.post(g.url + "/admin/store/query", headers={"Authorization": f"Bearer {ADMIN}"},
                                        json={"sql": "SELECT sum(cityHash64(number)) FROM numbers(100000000000)"},
                                        timeout=60)
                heavy["seconds"] = time.monotonic() - t0

            t = threading.Thread(target=run_heavy)
            t.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            trace = chat(g, "acme").headers["x-tagway-trace-id"]
            rows = []
            while not rows and time.monotonic() - t0 < 3:  # stored while the heavy read still runs
                rows = g.query("SELECT trace_id FROM llm_calls WHERE trace_id = {t:String}", ADMIN, t=trace)
                time.sleep(0.1)
            stored_after = time.monotonic() - t0
            t.join(60)
        assert rows, "the span was not inserted while a heavy read ran"
        assert stored_after < 3.0 and "r" in heavy and heavy["seconds"] > stored_after
        r = heavy["r"]
        assert r.status_code == 400 and "Timeout exceeded" in r.json()["error"]["message"]
        assert heavy["seconds"] < 15  # cut at its limit (4 s, plus start-up), not minutes
