"""What observing one call costs on the event loop: the labelled metrics alone, plus the access log (text or
JSON) written to a file, and a /metrics scrape of the resulting series. In-process, single thread.

    python bench/observe_bench.py [--calls 200000]

gateway_bench.py measures the same thing end to end (req/s and CPU per request with and without this code);
this one isolates the per-call figure in microseconds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from gateway.config import GatewayConfig  # noqa: E402
from gateway.observe import CallObserver, install_access_log  # noqa: E402
from gateway.telemetry import Attempt, CallRecord  # noqa: E402


def record(i: int) -> CallRecord:
    now = time.time_ns()
    return CallRecord(operation="chat", start_ns=now, requested_model=f"model-{i % 4}", key_id="acme-1",
                      customer=f"c{i % 20}", provider="openai", http_status=200 if i % 50 else 503,
                      error_type="" if i % 50 else "http_503", input_tokens=120, output_tokens=40, cost_usd=4e-5,
                      ttft_s=0.2 if i % 3 == 0 else None, stream=i % 3 == 0,
                      attempts=[Attempt("d", "openai", "m", now, now + 150_000_000)])


def run(label: str, config: dict, calls: int, log_path: str | None = None) -> float:
    cfg = GatewayConfig(models=[{"name": f"model-{i}", "provider": "mock"} for i in range(4)], **config)
    fh = open(log_path, "w") if log_path else None
    install_access_log(cfg, stream=fh)
    obs = CallObserver(cfg)
    recs = [record(i) for i in range(1000)]

    async def drive() -> float:  # on an event loop, as in the gateway (queued lines are flushed by a timer)
        t0 = time.perf_counter()
        for i in range(calls):
            obs(recs[i % 1000], 0x1234567890ABCDEF1234567890ABCDEF, 0.25)
            if i % 64 == 63:
                await asyncio.sleep(0)
        obs.flush()
        return time.perf_counter() - t0

    per_call = asyncio.run(drive()) / calls * 1e6
    t1 = time.perf_counter()
    n = sum(1 for _ in obs.collect())
    scrape_ms = (time.perf_counter() - t1) * 1e3
    if fh:
        fh.close()
    print(f"{label:<44} {per_call:6.2f} us/call   collect {n} families in {scrape_ms:.2f} ms")
    return per_call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "access.log")
        off = {"access_log": {"enabled": False}}
        run("metrics only", off, args.calls)
        run("metrics + customer label (20 customers)", {**off, "metrics": {"customer_label": True}}, args.calls)
        run("metrics + access log (text, to a file)", {}, args.calls, log)
        run("metrics + access log (json, to a file)", {"access_log": {"format": "json"}}, args.calls, log)
    install_access_log(GatewayConfig(access_log={"enabled": False}))


if __name__ == "__main__":
    main()
