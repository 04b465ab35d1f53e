"""Which traces to add to a dataset, chosen from production:

- a filtered slice (`--where` in the stats vocabulary, `--since`), all of it or a sample (`--sample N`), stratified
  by `--stratify` keys with a floor per segment (`--min-per-segment`), deterministic under `--seed` (the replay
  sampler, replay.slice.sample);
- the calls users rated (`--from-feedback complaints | negative | any`): complaint-linked calls first, then other
  negative ratings (thumbs down, score < 0.5), then the rest, each tier sampled in that order;
- a run's cases (`--from-run RUN_ID`), or only those the gate found (`--flipped`: pass -> fail against the
  baseline, for any candidate);
- named traces (`--trace ID ...`).
Traces already in the dataset are left out before sampling, so `--sample 50` brings 50 new ones.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from exporters.feedback import feedback_table, value_expr
from exporters.vocabulary import parse_duration

from ..report import BASELINE, pair_outcome
from ..slice import PoolRow, Sampled, SampleResult, build_pool_query, sample
from ..spec import SliceSpec, SpecError
from ..store import get_run, read_results

__all__ = ["FEEDBACK_KINDS", "Selection", "slice_spec", "from_where", "from_feedback", "from_run", "MAX_UNSAMPLED"]

FEEDBACK_KINDS = ("complaints", "negative", "any")
MAX_UNSAMPLED = 10_000  # without --sample, a selection larger than this is refused (say --sample N)


@dataclasses.dataclass
class Selection:
    picked: list[Sampled]  # trace id and segment, in order
    matched: int  # calls that matched the filters (before leaving out the dataset's own)
    already: int = 0  # matched calls already in the dataset
    notes: list[str] = dataclasses.field(default_factory=list)


def slice_spec(where: Sequence[str], since: str | None, *, sample_n: int | None, stratify: Sequence[str],
               min_per_segment: int, seed: int) -> SliceSpec:
    """The replay slice these flags describe (validated like a spec: one line on bad input). A `--where` on status
    takes the statuses it names; otherwise only successful calls (an errored call has no answer to keep)."""
    status = "any" if any(w.strip().startswith("status") for w in where) else "ok"
    data = {"where": list(where), "since": since or "30d", "limit": sample_n, "segment_by": list(stratify),
            "sampling": {"min_per_segment": min_per_segment if sample_n else 0, "seed": seed}, "status": status}
    try:
        return SliceSpec.model_validate(data)
    except Exception as e:  # pydantic's ValidationError: its first problem, one line
        errors = getattr(e, "errors", lambda: [])()
        msg = errors[0].get("msg", str(e)) if errors else str(e)
        raise SpecError(str(msg).removeprefix("Value error, ")) from None


def _pool(store: Any, s: SliceSpec, extra: str = "", params: dict | None = None) -> list[PoolRow]:
    sql, p = build_pool_query(s, extra_where=extra)
    p.update(params or {})
    extra_cols = [k for k in s.segment_by if not k.startswith("tag.") and
                  k not in ("customer", "intent", "prompt_version", "model")]
    return [PoolRow(r["trace_id"], r["customer"], r["intent"], r["prompt_version"], r["model"], dict(r["tags"] or {}),
                    bool(r["has_content"]), {k: str(r[f"seg_{k}"]) for k in extra_cols}) for r in store.query(sql, p)]


def _draw(rows: list[PoolRow], s: SliceSpec, exclude: set[str], limit: int | None) -> tuple[SampleResult, int]:
    fresh = [r for r in rows if r.trace_id not in exclude]
    if limit is None and len(fresh) > MAX_UNSAMPLED:
        raise SpecError(f"{len(fresh)} calls match: more than {MAX_UNSAMPLED} (say --sample N)")
    return sample(fresh, s.segment_by, limit, s.sampling), len(rows) - len(fresh)


def _notes(result: SampleResult) -> list[str]:
    notes = list(result.notes)
    notes += [f"skipped {n}: {why}" for why, n in result.skipped.items()]
    return notes


def from_where(store: Any, s: SliceSpec, exclude: set[str]) -> Selection:
    rows = _pool(store, s)
    result, already = _draw(rows, s, exclude, s.limit)
    return Selection(result.cases, len(rows), already, _notes(result))


def from_feedback(store: Any, s: SliceSpec, kind: str, exclude: set[str], *, database: str = "") -> Selection:
    """The rated calls of the slice, complaint-linked first: tiers complaints, then other negative ratings, then the
    rest (`kind` says how far down to go); `--sample` takes from the first tier first."""
    if kind not in FEEDBACK_KINDS:
        raise SpecError(f"--from-feedback {kind!r}: use one of {', '.join(FEEDBACK_KINDS)}")
    since_ms = int((time.time() - parse_duration(s.since or "30d").total_seconds()) * 1000)
    tiers = {"complaints": "complaint", "negative": f"(NOT complaint) AND ({value_expr}) < 0.5",
             "any": f"(NOT complaint) AND NOT coalesce(({value_expr}) < 0.5, false)"}
    order = list(FEEDBACK_KINDS[:FEEDBACK_KINDS.index(kind) + 1])
    picked: list[Sampled] = []
    matched = already = 0
    notes: list[str] = []
    taken = set(exclude)
    for tier in order:
        left = None if s.limit is None else s.limit - len(picked)
        if left is not None and left <= 0:
            break
        cond = (f"trace_id IN (SELECT trace_id FROM {feedback_table(database)} WHERE Timestamp >= "
                f"fromUnixTimestamp64Milli({{fb_since:Int64}}) AND {tiers[tier]})")
        had = picked_ids(picked)  # an earlier tier's pick is not counted again
        rows = [r for r in _pool(store, s, cond, {"fb_since": since_ms}) if r.trace_id not in had]
        result, dup = _draw(rows, s, taken, left)
        matched += len(rows)
        already += dup
        picked += result.cases
        taken |= {p.trace_id for p in result.cases}
        notes += [f"{tier}: {n}" for n in ([len(result.cases)] if result.cases else [])] + _notes(result)
    return Selection(picked, matched, already, notes)


def picked_ids(picked: Sequence[Sampled]) -> set[str]:
    return {p.trace_id for p in picked}


def from_run(store: Any, run_id: str, *, flipped: bool, exclude: set[str]) -> Selection:
    """A run's cases (each in its run segment), or with `flipped` those that went pass -> fail against the
    baseline for any candidate (errors count as the run's gate counted them)."""
    run = get_run(store, run_id)
    if run is None:
        raise SpecError(f"no replay run {run_id!r} (see `tagway replay report`)")
    errors = (run.spec.get("gating") or {}).get("errors", "fail")
    results = read_results(store, run_id)
    base = {r.case_id: r for r in results if r.candidate == BASELINE}
    segment = {r.case_id: r.segment for r in results}
    ids: list[str] = []
    for r in sorted(results, key=lambda r: (r.segment, r.case_id)):
        if r.candidate == BASELINE or r.case_id in ids:
            continue
        if flipped:
            o = pair_outcome(base.get(r.case_id), r, errors)
            if o is None or not (o[0] and not o[1]):
                continue
        ids.append(r.case_id)
    fresh = [t for t in ids if t not in exclude]
    notes = [] if ids else [f"run {run_id} has no {'flipped ' if flipped else ''}case"]
    return Selection([Sampled(t, segment[t]) for t in fresh], len(ids), len(ids) - len(fresh), notes)
