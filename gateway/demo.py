"""`tagway demo`: the gateway on the embedded store with mock models and three tenants, a realistic mix of tagged
traffic through the real openai client, then a per-tenant / per-intent summary read back from ClickHouse."""
from __future__ import annotations

import datetime as dt
import os
import random
import signal
import socket
import sys
import threading
import time
from typing import Callable

from .auth import hash_key, new_key
from .config import GatewayConfig

TENANTS = ("acme", "globex", "initech")
INTENTS = ("refund", "billing", "support", "onboarding")


def demo_config(data_dir: str, keys: dict[str, str], admin_key: str) -> GatewayConfig:
    price = {"input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}
    return GatewayConfig(
        storage={"data_dir": os.path.abspath(data_dir)},
        admin_key_hash=hash_key(admin_key),
        models=[
            {"name": "gpt-4o-mini", "provider": "mock", "mock": {"latency_ms": 15, "jitter_ms": 20, "seed": 1,
                                                                 "error_rate": 0.02}, **price},
            {"name": "gpt-4o", "provider": "mock", "mock": {"latency_ms": 40, "jitter_ms": 40, "seed": 2},
             "input_cost_per_token": 2.5e-6, "output_cost_per_token": 1e-5},
            # an unreliable primary that falls back to gpt-4o-mini on its 503s
            {"name": "claude-3-5-haiku", "provider": "mock", "fallbacks": ["gpt-4o-mini"],
             "mock": {"latency_ms": 25, "seed": 3, "error_rate": 0.25, "error_status": 503},
             "input_cost_per_token": 8e-7, "output_cost_per_token": 4e-6},
            # a model that fails a lot and has no fallback: its failures land on whoever uses it
            {"name": "legacy-refunds", "provider": "mock", "mock": {"latency_ms": 30, "seed": 4, "error_rate": 0.35,
                                                                    "error_status": 500}, **price},
        ],
        tenants=[{"customer": t, "keys": [{"id": f"{t}-demo", "hash": hash_key(keys[t])}]} for t in TENANTS],
        taxonomy={"keys": {"region": {"values": ["eu", "us"]}, "tier": {}}, "unknown": "keep"},
        recording={"source": "demo", "batch_max_seconds": 0.5},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traffic(base_url: str, keys: dict[str, str], calls: int) -> dict[str, int]:
    import openai  # noqa: PLC0415

    rng = random.Random(7)
    clients = {t: openai.OpenAI(base_url=base_url, api_key=k, max_retries=0) for t, k in keys.items()}
    outcome = {"ok": 0, "error": 0}
    for i in range(calls):
        tenant = rng.choices(TENANTS, weights=(5, 3, 2))[0]
        intent = rng.choices(INTENTS, weights=(2, 3, 4, 1))[0]
        # initech's refund flow runs on the flaky legacy model: the failing segment the averages hide
        model = "legacy-refunds" if (tenant == "initech" and intent == "refund") else \
            rng.choice(("gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "claude-3-5-haiku"))
        headers = {"x-tagway-intent": intent, "x-tagway-prompt-version": f"{intent}-v{rng.choice((3, 4))}",
                   "x-tagway-tags": f"region={rng.choice(('eu', 'us'))},tier={rng.choice(('free', 'pro'))}"}
        messages = [{"role": "system", "content": f"You handle {intent} requests."},
                    {"role": "user", "content": f"Customer question #{i} about {intent}"}]
        try:
            if i % 5 == 0:
                stream = clients[tenant].chat.completions.create(
                    model=model, messages=messages, stream=True, extra_headers=headers)
                for _ in stream:
                    pass
            else:
                clients[tenant].chat.completions.create(model=model, messages=messages, extra_headers=headers)
            outcome["ok"] += 1
        except openai.APIError:
            outcome["error"] += 1
    # a few rejected calls: they are recorded too
    for bad in ("no-such-model",):
        try:
            clients["globex"].chat.completions.create(model=bad, messages=[{"role": "user", "content": "x"}])
        except openai.APIError:
            outcome["error"] += 1
    try:
        openai.OpenAI(base_url=base_url, api_key="tw-wrong", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    except openai.APIError:
        outcome["error"] += 1
    return outcome


def keep_up(keep_running: bool | None) -> tuple[bool, str]:
    """Whether the demo keeps serving after its traffic, and why: `--keep-running` / `--exit` decide; without
    either, it stays up in an interactive terminal (someone is there to look and to press Ctrl-C) and exits when
    piped or in CI."""
    if keep_running is not None:
        return keep_running, "--keep-running was given" if keep_running else "--exit was given"
    if sys.stdin.isatty() and sys.stdout.isatty():
        return True, "this is a terminal; `tagway demo --exit` ends right after the traffic"
    return False, "not a terminal"


class _Interrupt:
    """SIGTERM and SIGINT end the demo as Ctrl-C does: a KeyboardInterrupt in the main thread, whose `finally` stops
    the gateway (its lifespan removes the discovery file) and shuts the recorder down (its last batch is stored).
    uvicorn installs no handler of its own in a thread, so without this SIGTERM killed the process outright. Once
    the demo is stopping, further signals are ignored: raising again would cut that cleanup short."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stopping = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_demo(*, data_dir: str, port: int, calls: int, keep_running: bool | None,
             explain: Callable[[GatewayConfig, Exception], str] | None = None) -> int:
    """`explain(cfg, error)`: the line for a store that cannot be opened (the CLI's, which names the gateway that
    serves the data directory rather than the spool lock it hit first)."""
    import uvicorn  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415
    from rich.markup import escape  # noqa: PLC0415

    from exporters.store import StoreError  # noqa: PLC0415

    from .app import TagwayApp, default_recorder  # noqa: PLC0415

    console = Console()
    if not console.is_terminal:  # piped or in CI: rich would squeeze the table into 80 columns
        console = Console(width=160)
    keys = {t: new_key() for t in TENANTS}
    admin_key = new_key()
    cfg = demo_config(data_dir, keys, admin_key)
    try:
        recorder = default_recorder(cfg)
    except StoreError as e:
        console.print(f"[red]error:[/] {escape(explain(cfg, e) if explain else str(e))}", highlight=False,
                      soft_wrap=True)
        return 2
    port = port or _free_port()
    app = TagwayApp(cfg, recorder=recorder)
    # a bounded graceful stop, so the lifespan shutdown (which removes the discovery file) runs within the join below
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    with _Interrupt() as interrupt:
        try:
            thread.start()
            while not server.started:
                if not thread.is_alive():
                    console.print("[red]error:[/] the demo gateway did not start")
                    return 1
                time.sleep(0.02)
            return _serve(console, cfg, app, recorder, thread, keys, admin_key, port, calls, keep_running)
        except KeyboardInterrupt:  # Ctrl-C, SIGINT or SIGTERM: a graceful stop, as `tagway serve` makes
            return 0
        finally:
            interrupt.stopping = True  # a second signal must not cut the cleanup short
            server.should_exit = True
            if thread.is_alive():
                thread.join(30)
            app.local.close()  # idempotent: the lifespan has removed the discovery file unless the join timed out
            recorder.shutdown()  # the calls still queued are stored


def _serve(console, cfg: GatewayConfig, app, recorder, thread: threading.Thread, keys: dict[str, str],
           admin_key: str, port: int, calls: int, keep_running: bool | None) -> int:
    """The demo's traffic and summary, then, when it keeps running, serving until a signal (KeyboardInterrupt)."""
    from exporters import queries as q  # noqa: PLC0415

    from .stats_cli import print_stats  # noqa: PLC0415

    base_url = f"http://127.0.0.1:{port}/v1"
    console.print(f"tagway demo gateway on [bold]{base_url}[/] (embedded store {cfg.storage.resolved_dsn()})")
    started_ns = time.time_ns()
    with console.status(f"driving {calls} tagged calls through the openai client..."):
        outcome = _traffic(base_url, keys, calls)
    recorder.force_flush()
    # the same query layer and table as `tagway stats`
    started = dt.datetime.fromtimestamp(started_ns / 1e9, dt.timezone.utc).isoformat()
    report = q.segment_stats(recorder.store, q.make_selection(where=["source=demo"], from_=started),
                             by=["customer", "intent"], min_calls=10)
    console.print()
    print_stats(report, console, "this demo run")
    total = sum(s.calls for s in report.segments)
    errors = sum(s.errors for s in report.segments)
    console.print(f"client saw {outcome['ok']} ok / {outcome['error']} errors; recorded {total} calls,"
                  f" {errors} errors ({errors / max(total, 1):.1%} overall: the mean hides the worst rows).")
    root = base_url[:-3]
    keep, why = keep_up(keep_running)
    if keep:
        app.announce(root)  # `tagway stats` and friends work through this gateway while it holds the store
        # the key goes in the fragment: browsers never send it, and the page moves it to the tab's storage
        console.print(f"dashboard: {root}/ui#key={admin_key}   (calls: {root}/ui/calls, replays: {root}/ui/replays)")
        console.print("keys (shown once): " + ", ".join(f"{t}={k}" for t, k in keys.items())
                      + f", admin={admin_key}")
        console.print(f"metrics: {root}/metrics   the CLI works meanwhile: tagway stats --dsn "
                      f"{cfg.storage.resolved_dsn()} --by customer --by intent")
        console.print(f"serving the gateway and its dashboard until Ctrl-C ({why})")
        while thread.is_alive():
            time.sleep(0.5)
    else:
        console.print(f"the demo gateway stops now ({why}), and its dashboard with it: run `tagway demo "
                      "--keep-running` to keep both up until Ctrl-C. The calls stay in the store: tagway stats "
                      f"--dsn {cfg.storage.resolved_dsn()} --by customer --by intent")
    return 0 if total >= calls else 1
