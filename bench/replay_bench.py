"""Replay throughput (cases/s) at concurrency 32 against an instant local upstream.

    python bench/replay_bench.py [--cases 2000] [--concurrency 32] [--direct-only]

Two set-ups, both with results written to an embedded chDB store as in a real run (batched JSONEachRow):
  direct   the runner talks to the fixture server playing the gateway (aiohttp; answers instantly)
  gateway  the runner talks to the real tagway gateway (uvicorn, in a thread of this process, recording its
           spans to the same chDB store), which forwards to the same instant server as its upstream
Everything shares this one process (and core): the figures are a floor for a gateway on its own machine.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exporters.schema import migrate  # noqa: E402
from exporters.store import connect  # noqa: E402
from replay.runner import Runner, gateway_client, targets_for  # noqa: E402
from replay.slice import Case  # noqa: E402
from replay.spec import parse_spec  # noqa: E402
from replay.store import write_results  # noqa: E402
from tests.replay_support import API_KEY, FakeLLM  # noqa: E402

KEY = "tw-bench-platform-0123456789abcdefghij"


def make_cases(n: int) -> list[Case]:
    return [Case(case_id=f"{i:032x}", segment=f"cust-{i % 8}", customer=f"cust-{i % 8}", intent="refund",
                 prompt_version="p1", model="prod-model", tags={"region": "eu"},
                 messages=[{"role": "system", "content": "Decide."}, {"role": "user", "content": f"refund #{i}"}],
                 params={"temperature": 0.2}, baseline_output=[{"role": "assistant", "parts": [
                     {"type": "text", "content": "approved"}], "finish_reason": "stop"}]) for i in range(n)]


def spec(concurrency: int):
    return parse_spec({"dataset": "bench.jsonl", "candidates": [{"name": "cand", "model": "cand-model"}],
                       "evaluators": [{"type": "icontains", "value": "approved"}], "concurrency": concurrency})


async def run_once(url: str, key: str, cases: list[Case], concurrency: int, store, run_id: str) -> float:
    s = spec(concurrency)
    async with gateway_client(base_url=url, concurrency=concurrency) as client:
        runner = Runner(client, s, run_id=run_id, api_key=key, progress=False,
                        sink=lambda rows: write_results(store, rows), batch_size=256)
        t0 = time.perf_counter()
        out = await runner.run(cases, targets_for(s)[1:])
        dt = time.perf_counter() - t0
    bad = [r for r in out.results if r.status != "passed"]
    assert not bad, f"{len(bad)} cases did not pass: {bad[0].error or bad[0].evaluations}"
    return len(cases) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--direct-only", action="store_true")
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="replay-bench-")
    dsn = f"chdb://{data}/clickhouse"
    store = connect(dsn)
    migrate(store)
    cases = make_cases(args.cases)
    answer = {"cand-model": lambda user, headers: "approved", "cand-up": lambda user, headers: "approved"}

    with FakeLLM(answer, require_key=None) as fake:
        asyncio.run(run_once(fake.url, API_KEY, cases[:100], args.concurrency, store, "warmup-direct"))
        direct = asyncio.run(run_once(fake.url, API_KEY, cases, args.concurrency, store, "bench-direct"))
        print(f"direct  (fixture server as gateway): {direct:8.0f} cases/s  ({args.cases} cases, "
              f"concurrency {args.concurrency})")
        if args.direct_only:
            return
        from gateway.app import TagwayApp
        from gateway.auth import hash_key
        from gateway.config import GatewayConfig
        from tests.gateway_fixture import GatewayServer

        os.environ["REPLAY_BENCH_UPSTREAM_KEY"] = "sk-bench"
        cfg = GatewayConfig(
            models=[{"name": "cand-model", "model": "cand-up", "provider": "openai", "base_url": fake.url + "/v1",
                     "api_key_env": "REPLAY_BENCH_UPSTREAM_KEY", "input_cost_per_token": 1e-6,
                     "output_cost_per_token": 2e-6}],
            tenants=[{"customer": "platform", "may_set_customer": True,
                      "keys": [{"id": "p", "hash": hash_key(KEY)}]}],
            storage={"dsn": dsn, "spool_dir": f"{data}/spool"}, taxonomy={"unknown": "keep"})
        server = GatewayServer(TagwayApp(cfg)).start()
        try:
            asyncio.run(run_once(server.url, KEY, cases[:100], args.concurrency, store, "warmup-gateway"))
            through = asyncio.run(run_once(server.url, KEY, cases, args.concurrency, store, "bench-gateway"))
        finally:
            server.stop()
        print(f"gateway (real tagway, recording):   {through:8.0f} cases/s  ({args.cases} cases, "
              f"concurrency {args.concurrency}, one process)")


if __name__ == "__main__":
    main()
