"""Run in a process of its own (chDB: one data directory per process) by tests/test_rollups_backfill.py:

    python -m tests.rollup_backfill_script DIR seed       # an existing store (migrations 1-8, 3 days of calls), then 9
    python -m tests.rollup_backfill_script DIR live       # calls after live_from, and late calls from before it
    python -m tests.rollup_backfill_script DIR interrupt  # a backfill stopped after its second step
    python -m tests.rollup_backfill_script DIR interrupt_first  # stopped inside live_from's own day (hourly steps)
    python -m tests.rollup_backfill_script DIR check      # rollup vs raw answers, the coverage, as JSON
    python -m tests.rollup_backfill_script DIR seed10     # a store with rollups (10) and calls, then 11
    python -m tests.rollup_backfill_script DIR after10    # calls after the per-customer family's start, late ones
"""
from __future__ import annotations

import datetime as dt
import json
import sys

from exporters import queries as q
from exporters import rollups
from exporters.rollups import ROLLUPS_MIGRATION
from exporters.schema import SchemaSettings, migrate
from exporters.store import connect
from tests.rollup_seed import insert_spans, seed_spans

UTC = dt.timezone.utc
CUSTOMERS = ["bf-a", "bf-b", "bf-c"]


def answers(store, now: dt.datetime) -> dict:
    out = {}
    for name, by, where, since in (("tenants", ["customer"], [], "3d"), ("intents", ["customer", "intent"], [], "2d"),
                                   ("zone", ["tag.zone"], [], "3d"), ("pro", ["customer"], ["tag.zone=eu"], "30h")):
        sel = q.make_selection(where=where, since=since)
        fast, raw = q.segment_stats(store, sel, by), q.segment_stats(store, sel, by, rollups=False)
        key = lambda r: [(s.key, s.calls, s.errors, s.cancelled, s.input_tokens, s.output_tokens, s.cost_usd)  # noqa
                         for s in r.segments] + [r.total.calls]
        out[name] = {"equal": key(fast) == key(raw), "calls": raw.total.calls, "read": fast.read}
    last = q.make_selection(from_=(now - dt.timedelta(hours=50)).isoformat(),
                            to=(now + dt.timedelta(hours=3)).isoformat())  # reaches hours past the family's start
    fast, raw = q.segment_stats(store, last, ["customer"]), q.segment_stats(store, last, ["customer"], rollups=False)
    out["tenants_ahead"] = {"equal": [(s.key, s.calls, s.errors) for s in fast.segments] ==
                            [(s.key, s.calls, s.errors) for s in raw.segments], "calls": raw.total.calls,
                            "read": fast.read}
    ts = q.make_selection(since="2d")
    out["series_equal"] = (q.error_timeseries(store, ts, step=3600).to_dict()["series"] ==
                           q.error_timeseries(store, ts, step=3600, rollups=False).to_dict()["series"])
    return out


def main(path: str, phase: str) -> None:
    store = connect(f"chdb://{path}")
    now = dt.datetime.now(UTC)
    try:
        if phase == "seed":
            migrate(store, SchemaSettings(), upto=ROLLUPS_MIGRATION - 1)
            spans = seed_spans(CUSTOMERS, now - dt.timedelta(hours=60), now - dt.timedelta(seconds=2), 3000)
            insert_spans(store, spans)
            # the last second before the upgrade: in the minute/hour/day buckets that straddle live_from
            insert_spans(store, seed_spans(CUSTOMERS, now - dt.timedelta(seconds=1), now, 30, seed=12))
            migrate(store, SchemaSettings(rollup_tag_keys=("zone",)))
        elif phase == "live":
            st = rollups.read_state(store)
            assert now > st.live_from, (now, st.live_from)
            insert_spans(store, seed_spans(CUSTOMERS, st.live_from, now, 300, seed=5))
            insert_spans(store, seed_spans(CUSTOMERS, now - dt.timedelta(hours=30), now - dt.timedelta(hours=29),
                                           100, seed=6))  # late: from before live_from, before the backfill
        elif phase == "seed10":  # the rollups existed (and rolled these calls up) before the per-customer family
            migrate(store, SchemaSettings(), upto=ROLLUPS_MIGRATION)
            insert_spans(store, seed_spans(CUSTOMERS, now - dt.timedelta(hours=60), now - dt.timedelta(seconds=2),
                                           3000))
            migrate(store, SchemaSettings())
        elif phase == "after10":  # past the family's start: through its view; late calls from before it too
            st = rollups.read_state(store)
            assert now > st.customer_from, (now, st.customer_from)
            insert_spans(store, seed_spans(CUSTOMERS, st.customer_from, now, 200, seed=8))
            insert_spans(store, seed_spans(CUSTOMERS, now - dt.timedelta(hours=20), now - dt.timedelta(hours=19),
                                           100, seed=9))
            rollups.backfill(store, SchemaSettings(), settle_seconds=0)  # nothing to backfill: changes nothing
        elif phase in ("interrupt", "interrupt_first"):
            seen = []

            # interrupt_first stops after its first step: live_from's day may hold only one (live_from in the
            # day's first hour), and stopping after two would then cut short the day before instead.
            last = 1 if phase == "interrupt_first" else 2

            def stop(step: rollups.BackfillStep) -> None:
                seen.append(step)
                if len(seen) == last:
                    raise KeyboardInterrupt

            try:
                rollups.backfill(store, SchemaSettings(), settle_seconds=0, progress=stop,
                                 rows_per_step=50 if phase == "interrupt_first" else 2_000_000)
            except KeyboardInterrupt:
                pass
        st = rollups.read_state(store)
        cust = st.customer_from.isoformat() if st.customer_from else None
        print(json.dumps({"answers": answers(store, now), "live_from": st.live_from.isoformat(), "customer_from": cust,
                          "covered_from": st.covered_from.isoformat(), "pending_from": st.pending_from.isoformat(),
                          "split": st.split_at_live_from,
                          "tag_keys": {k: v.isoformat() for k, v in st.tag_keys.items()}}))
    finally:
        store.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
