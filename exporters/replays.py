"""Replay runs and results for reading (the dashboard's Replays, run and case pages, their API and
`tagway show --cases`), over the tables of migration 3 (`replay_runs`, `replay_results`, `replay_datasets`).

The replay package writes these tables; the gateway must never import replay, so the reading the gateway needs
lives here (imports go replay -> exporters <- gateway). Runs are append-only versions (the newest `version` wins);
results may be written again for one (run, candidate, case) by a resume, and the newest row wins.

A run's per-segment table comes from its gate report (`report_json`, what `tagway replay report` prints) when the
reader may see the whole run; a tenant (`customer=`) gets the same table computed from its own customer's results
only, without the gate's marks (they were decided over every customer's cases). Flipped cases (baseline passed and
the candidate failed, or the other way round) always come from the results.
"""
from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Iterable

import orjson

from .calls import table_name
from .queries import wilson_interval
from .vocabulary import QueryInputError, show

__all__ = ["RUN_ID_RE", "parse_run_id", "list_runs", "get_run", "segment_table", "flipped_cases", "run_detail",
           "trend", "results_for_case", "datasets_for_trace", "BASELINE", "STALE_RUN_SECONDS", "LAST_WRITE",
           "settle_running"]

BASELINE = "baseline"
_TREND_BY = ("customer", "intent", "prompt_version", "model")  # replay_results columns a trend may segment by
_TREND_FIELDS = ("case_id", "candidate", "segment", "status", "customer", "intent", "prompt_version", "model", "tags")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_RUN_COLS = ("status", "spec_json", "dataset_id", "judge_version", "candidates", "segment_by", "n_cases", "verdict",
             "report_json", "cost_usd")
# A report row's verdict (regression | inconclusive | ok); reports written before the paired gate had
# `failing`/`below`/`low_confidence` flags instead, still read for runs stored then.
_MARK_KEYS = ("verdict",)


def parse_run_id(run_id: str) -> str:
    rid = (run_id or "").strip()
    if not RUN_ID_RE.match(rid):
        raise QueryInputError(f"invalid run id {show(rid)}", param="run_id")
    return rid


def _loads(text: str | None) -> Any:
    if not text:
        return {}
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}


def _run_select(database: str, where: str) -> str:
    latest = ", ".join(f"argMax({c}, version) AS {c}" for c in _RUN_COLS)
    return (f"SELECT run_id, {latest}, toFloat64(min(created_at)) AS created_at, "
            f"toFloat64(argMax(finished_at, version)) AS finished_at, {LAST_WRITE}\n"
            f"FROM {table_name('replay_runs', database)} {where}\nGROUP BY run_id")


# A run's process writes the run's row when it starts and when it ends, and its results as cases finish. One that
# was killed in between (SIGKILL, its machine, the store it wrote to gone) leaves the row 'running' for good: a
# 'running' run with neither a row nor a result written for STALE_RUN_SECONDS is shown as what it is, incomplete
# (`tagway replay resume` finishes it). A live run writes a result at least once a case's timeout and retries.
STALE_RUN_SECONDS = 900
LAST_WRITE = "max(version) / 1e9 AS last_write"  # `version` is the time.time_ns() of each write of the row


def settle_running(store: Any, rows: list[dict], database: str = "", now: float | None = None) -> None:
    """In place: the stale 'running' rows of `rows` (run_id, status, last_write) become 'incomplete'; every row
    loses its `last_write`."""
    now = time.time() if now is None else now
    suspects = [r for r in rows if r.get("status") == "running" and now - r["last_write"] > STALE_RUN_SECONDS]
    if suspects:
        last = {x["run_id"]: x["t"] for x in store.query(
            f"SELECT run_id, toFloat64(max(Timestamp)) AS t FROM {table_name('replay_results', database)} "
            "WHERE run_id IN {ids:Array(String)} GROUP BY run_id", parameters={"ids": [r["run_id"] for r in suspects]})}
        for r in suspects:
            if now - max(r["last_write"], last.get(r["run_id"], 0.0)) > STALE_RUN_SECONDS:
                r["status"] = "incomplete"
    for r in rows:
        r.pop("last_write", None)


def _run_dict(r: dict, *, full: bool) -> dict[str, Any]:
    spec = _loads(r.pop("spec_json", ""))
    report = _loads(r.pop("report_json", ""))
    models = {c.get("name"): c.get("model", "") for c in spec.get("candidates") or [] if isinstance(c, dict)}
    out = {**r, "candidates": list(r.get("candidates") or []), "segment_by": list(r.get("segment_by") or []),
           "spec_name": spec.get("name") or "", "models": models,
           "baseline_mode": (spec.get("baseline") or {}).get("mode", ""),
           "gating": report.get("gating") or spec.get("gating") or {},
           # what scored the run: runs scored differently are not one series (replay/trend.py)
           "evaluators_key": hashlib.sha256(orjson.dumps(spec.get("evaluators") or [],
                                                         option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]}
    finished = out.get("finished_at")
    out["finished_at"] = None if finished is None or finished != finished else finished
    if full:
        out["reasons"] = list(report.get("reasons") or [])
        out["notes"] = list(report.get("notes") or [])
        out["report"] = report
    else:
        out.pop("cost_usd", None)  # the whole run's cost: not a tenant's to see
        out["verdict"] = ""
    return out


def list_runs(store: Any, *, spec: str | None = None, dataset: str | None = None, customer: str | None = None,
              limit: int = 50, database: str = "", versions: bool = False) -> list[dict[str, Any]]:
    """Newest first. `spec` (the spec's name) or `dataset` narrow to the runs of one trend; `customer` to the runs
    that replayed that customer's calls (and hides what was decided over other customers). With `versions`, a
    dataset name without a version ('refunds') takes the runs of every version of it ('refunds@1', 'refunds@3')."""
    if not 1 <= limit <= 1000:
        raise QueryInputError("limit must be between 1 and 1000", param="limit")
    params: dict[str, Any] = {"limit": limit}
    having = []
    if spec:
        having.append("JSONExtractString(spec_json, 'name') = {spec:String}")
        params["spec"] = spec
    if dataset:
        if versions and "@" not in dataset:
            having.append("(dataset_id = {dataset:String} OR startsWith(dataset_id, {dataset_at:String}))")
            params["dataset_at"] = dataset + "@"
        else:
            having.append("dataset_id = {dataset:String}")
        params["dataset"] = dataset
    where = ""
    if customer is not None:
        where = (f"WHERE run_id IN (SELECT DISTINCT run_id FROM {table_name('replay_results', database)} "
                 "WHERE customer = {customer:String})")
        params["customer"] = customer
    sql = _run_select(database, where)
    if having:
        sql += "\nHAVING " + " AND ".join(having)
    rows = store.query(sql + "\nORDER BY created_at DESC, run_id DESC LIMIT {limit:UInt32}", parameters=params)
    settle_running(store, rows, database)
    runs = [_run_dict(r, full=customer is None) for r in rows]
    for r in runs:
        r.pop("report", None)
    if customer is not None and runs:
        mine = _customer_share(store, [r["run_id"] for r in runs], customer, database)
        for r in runs:
            r["n_cases"], r["cost_usd"] = mine.get(r["run_id"], (0, 0.0))
    return runs


def _customer_share(store: Any, run_ids: list[str], customer: str, database: str) -> dict[str, tuple[int, float]]:
    """run id -> (the customer's cases, what the run's calls for them cost). The cost is the recorded calls the run
    made as this customer (candidates, a re-run baseline, judges): a result row of a logged baseline carries the
    production call's cost, which the run never paid, and a judge's calls have no result row."""
    cases = store.query(f"SELECT run_id, uniqExact(case_id) AS n FROM {table_name('replay_results', database)} "
                        "WHERE customer = {customer:String} AND run_id IN {ids:Array(String)} GROUP BY run_id",
                        parameters={"customer": customer, "ids": run_ids})
    costs = store.query(f"SELECT replay_run_id AS run_id, sum(cost_usd) AS cost FROM {table_name('llm_calls', database)} "
                        "WHERE customer = {customer:String} AND replay_run_id IN {ids:Array(String)} "
                        "GROUP BY replay_run_id", parameters={"customer": customer, "ids": run_ids})
    cost = {c["run_id"]: float(c["cost"] or 0.0) for c in costs}
    return {c["run_id"]: (int(c["n"]), cost.get(c["run_id"], 0.0)) for c in cases}


def get_run(store: Any, run_id: str, *, customer: str | None = None, database: str = "") -> dict[str, Any] | None:
    rid = parse_run_id(run_id)
    rows = store.query(_run_select(database, "WHERE run_id = {run_id:String}"), parameters={"run_id": rid})
    if not rows:
        return None
    settle_running(store, rows, database)
    run = _run_dict(rows[0], full=customer is None)
    if customer is not None:
        mine = _customer_share(store, [rid], customer, database).get(rid)
        if mine is None:
            return None  # a run that never touched this customer does not exist for its key
        run["n_cases"], run["cost_usd"] = mine
    return run


# -- results ---------------------------------------------------------------------------------------------------
_RESULT_FIELDS = ("case_id", "candidate", "segment", "status", "passed", "score", "error", "evaluations", "output",
                  "replay_trace_id", "customer", "intent", "prompt_version", "model", "dataset_id", "judge_version",
                  "latency_ms", "cost_usd", "http_status", "attempts")


def _results(store: Any, where: str, params: dict, database: str, fields: Iterable[str] = _RESULT_FIELDS) -> list[dict]:
    """The newest result per (run, candidate, case) matching `where`."""
    cols = ", ".join(f for f in fields if f not in ("case_id", "candidate"))
    sql = (f"SELECT run_id, case_id, candidate, {cols}, toFloat64(Timestamp) AS at\n"
           f"FROM {table_name('replay_results', database)}\nWHERE {where}\n"
           "ORDER BY Timestamp DESC LIMIT 1 BY run_id, candidate, case_id")
    rows = store.query(sql, parameters=params)
    for r in rows:
        if "evaluations" in r:
            ev = _loads(r["evaluations"])
            r["evaluations"] = ev if isinstance(ev, list) else []
    return rows


def _run_results(store: Any, run_id: str, customer: str | None, database: str,
                 fields: Iterable[str] = ("case_id", "candidate", "segment", "status", "customer")) -> list[dict]:
    where, params = "run_id = {run_id:String}", {"run_id": run_id}
    if customer is not None:
        where += " AND customer = {customer:String}"
        params["customer"] = customer
    return _results(store, where, params, database, fields)


def _outcome(status: str, errors: str) -> bool | None:
    """The gate's reading of a result (replay/report.py): errored is a failure, or left out with errors: exclude."""
    if status == "errored":
        return None if errors == "exclude" else False
    return status == "passed"


def _row(segment: str, cand: list[dict], base: dict[str, dict], errors: str) -> dict[str, Any]:
    """One segment as the paired gate counts it: the cases where both the baseline and the candidate have an
    outcome, each side's pass rate over those pairs, and the flips."""
    pairs, excluded = [], 0
    for r in cand:
        b = base.get(r["case_id"])
        ob = None if b is None else _outcome(b["status"], errors)
        oc = _outcome(r["status"], errors)
        if ob is None or oc is None:
            excluded += 1
        else:
            pairs.append((ob, oc))
    n, bk, k = len(pairs), sum(ob for ob, _ in pairs), sum(oc for _, oc in pairs)
    return {"segment": segment, "n": n, "before_pass": bk, "after_pass": k,
            "before": bk / n if n else None, "after": k / n if n else None,
            "before_ci": list(wilson_interval(bk, n)) if n else None,
            "after_ci": list(wilson_interval(k, n)) if n else None,
            "delta": (k - bk) / n if n else None, "delta_ci": None,
            "pass_fail": sum(1 for ob, oc in pairs if ob and not oc),
            "fail_pass": sum(1 for ob, oc in pairs if oc and not ob),
            "errored": sum(1 for r in cand if r["status"] == "errored"),
            "before_errored": sum(1 for r in cand if base.get(r["case_id"], {}).get("status") == "errored"),
            "excluded": excluded, "marks": [], "more_cases": None, "why": "", "too_few": False}


def _computed_table(results: list[dict], errors: str) -> dict[str, dict[str, Any]]:
    by_cand: dict[str, dict[str, dict]] = {}
    for r in results:
        by_cand.setdefault(r["candidate"], {})[r["case_id"]] = r
    base = by_cand.pop(BASELINE, {})
    out = {}
    for cand in sorted(by_cand):
        segs: dict[str, list[dict]] = {}
        for r in by_cand[cand].values():
            segs.setdefault(r["segment"], []).append(r)
        out[cand] = {"rows": [_row(s, segs[s], base, errors) for s in sorted(segs)],
                     "overall": _row("all segments (pooled)", list(by_cand[cand].values()), base, errors)}
    return out


def _marks(row: dict) -> list[str]:
    for k in _MARK_KEYS:
        v = row.get(k)
        if isinstance(v, str) and v:
            return [v]
    marks = []
    if row.get("failing"):
        marks.append("regression")
    elif row.get("below") and not row.get("low_confidence"):
        marks.append("below, not gated")
    if row.get("low_confidence"):
        marks.append("low n")
    return marks


def _report_row(row: dict) -> dict[str, Any]:
    keep = ("segment", "n", "before_pass", "after_pass", "before", "after", "before_ci", "after_ci", "delta",
            "delta_ci", "pass_fail", "fail_pass", "errored", "before_errored", "excluded", "more_cases", "why",
            "p_value", "p_adjusted", "family")
    out = {k: row.get(k) for k in keep}
    out["too_few"] = bool(row.get("too_few"))
    for k in ("before_ci", "after_ci", "delta_ci"):
        if out[k] is not None:
            out[k] = list(out[k])
    if not out["n"]:
        out["after"] = None
    out["marks"] = _marks(row)
    out["why"] = out["why"] or "; ".join(row.get("problems") or [])  # reports written before the paired gate
    return out


def _report_table(report: dict) -> dict[str, dict[str, Any]] | None:
    cands = report.get("candidates")
    if not isinstance(cands, list) or not cands:
        return None
    out = {}
    for c in cands:
        if not isinstance(c, dict) or not isinstance(c.get("rows"), list):
            return None
        out[str(c.get("candidate"))] = {"rows": [_report_row(r) for r in c["rows"]],
                                        "overall": _report_row(c.get("overall") or {}),
                                        "status": c.get("status") or ""}
    return out


def segment_table(store: Any, run: dict, *, customer: str | None = None, database: str = "",
                  results: list[dict] | None = None) -> dict[str, dict[str, Any]]:
    """candidate -> {rows: [per segment], overall}: the gate report's rows for an admin, computed from the
    customer's own results for a tenant (or when the run has no report yet)."""
    if customer is None:
        table = _report_table(run.get("report") or {})
        if table is not None:
            return table
    if results is None:
        results = _run_results(store, run["run_id"], customer, database)
    return _computed_table(results, (run.get("gating") or {}).get("errors") or "fail")


def flipped_cases(results: list[dict], errors: str = "fail") -> list[dict[str, Any]]:
    """Cases where the baseline and a candidate disagree, as the gate reads outcomes (an errored result fails
    unless errors: exclude): `regressed` (baseline passed, candidate did not) first, then `fixed`."""
    base = {r["case_id"]: r for r in results if r["candidate"] == BASELINE}
    out = []
    for r in results:
        b = base.get(r["case_id"])
        if r["candidate"] == BASELINE or b is None:
            continue
        ob, oc = _outcome(b["status"], errors), _outcome(r["status"], errors)
        if ob is None or oc is None or ob == oc:
            continue
        out.append({"case_id": r["case_id"], "candidate": r["candidate"], "segment": r["segment"],
                    "customer": r.get("customer", ""), "flip": "regressed" if ob else "fixed",
                    "baseline": b["status"], "result": r["status"]})
    out.sort(key=lambda f: (f["flip"] != "regressed", f["candidate"], f["segment"], f["case_id"]))
    return out


def run_detail(store: Any, run_id: str, *, customer: str | None = None,
               database: str = "") -> dict[str, Any] | None:
    run = get_run(store, run_id, customer=customer, database=database)
    if run is None:
        return None
    results = _run_results(store, run["run_id"], customer, database)
    run["table"] = segment_table(store, run, customer=customer, database=database, results=results)
    run["flipped"] = flipped_cases(results, (run.get("gating") or {}).get("errors") or "fail")
    run["errored_cases"] = sorted({r["case_id"] for r in results if r["status"] == "errored"})
    run.pop("report", None)
    return run


def _segment_value(r: dict, by: str) -> str:
    """A result's value for a trend's own segment key: customer, intent, prompt_version, model or tag.<key>."""
    v = (r.get("tags") or {}).get(by[4:], "") if by.startswith("tag.") else r.get(by, "")
    return str(v) if v else "(none)"


def trend(store: Any, *, spec: str | None = None, dataset: str | None = None, customer: str | None = None,
          limit: int = 30, database: str = "", versions: bool = False, by: str | None = None,
          outcomes: bool = False) -> dict[str, Any]:
    """Per segment, the candidate's pass rate in each run of one spec (by name) or dataset, oldest run first, with
    the baseline on the same cases, the delta and the run's marks (a regression is marked). `versions`: see
    list_runs. `by` (customer, intent, prompt_version, model or tag.<key>) segments every run that way (a run
    segmented otherwise is regrouped from its results, without the gate's marks, which were decided over other
    segments); `outcomes` adds each point's case outcomes ({case_id: passed, or None when left out}) for paired
    comparisons between runs."""
    if not spec and not dataset:
        raise QueryInputError("a trend needs spec=NAME or dataset=ID", param="spec")
    if by is not None and by not in _TREND_BY and not (by.startswith("tag.") and len(by) > 4):
        raise QueryInputError(f"a trend segments by one of {', '.join(_TREND_BY)} or tag.<key>, not {show(by)}",
                              param="by")
    runs = list(reversed(list_runs(store, spec=spec, dataset=dataset, customer=customer, limit=limit,
                                   database=database, versions=versions)))
    points: dict[str, list[dict[str, Any]]] = {}
    out_runs = []
    for i, run in enumerate(runs):
        full = get_run(store, run["run_id"], customer=customer, database=database) or run
        errors = (full.get("gating") or {}).get("errors") or "fail"
        results = None
        if outcomes or (by is not None and full.get("segment_by") != [by]):
            results = _run_results(store, run["run_id"], customer, database, _TREND_FIELDS)
            if by is not None and full.get("segment_by") != [by]:
                results = [{**r, "segment": _segment_value(r, by)} for r in results]
                table = _computed_table(results, errors)
            else:
                table = segment_table(store, full, customer=customer, database=database)
        else:
            table = segment_table(store, full, customer=customer, database=database)
        out_runs.append({k: full.get(k, run.get(k)) for k in ("run_id", "created_at", "status", "verdict",
                                                               "candidates", "dataset_id", "spec_name",
                                                               "judge_version", "segment_by", "evaluators_key")})
        for cand, t in table.items():
            for row in t["rows"]:
                point = {"run": i, "run_id": run["run_id"], "candidate": cand, "n": row["n"], "after": row["after"],
                         "before": row["before"], "delta": row["delta"], "marks": row["marks"],
                         "regression": "regression" in row["marks"]}
                if outcomes and results is not None:
                    point["outcomes"] = {r["case_id"]: _outcome(r["status"], errors) for r in results
                                         if r["candidate"] == cand and r["segment"] == row["segment"]}
                points.setdefault(row["segment"], []).append(point)
    segments = [{"segment": s, "points": pts} for s, pts in sorted(points.items())]
    return {"spec": spec, "dataset": dataset, "runs": out_runs, "segments": segments}


# -- one case across runs --------------------------------------------------------------------------------------
def results_for_case(store: Any, trace_id: str, *, customer: str | None = None,
                     database: str = "") -> list[dict[str, Any]]:
    """Every replay result whose case is this production trace (newest per run and candidate), oldest run first,
    each with its run's time, spec name and verdict."""
    where, params = "case_id = {case:String}", {"case": trace_id}
    if customer is not None:
        where += " AND customer = {customer:String}"
        params["customer"] = customer
    rows = _results(store, where, params, database)
    if not rows:
        return []
    runs = store.query(
        _run_select(database, "WHERE run_id IN {ids:Array(String)}"),
        parameters={"ids": sorted({r["run_id"] for r in rows})})
    settle_running(store, runs, database)
    info = {r["run_id"]: _run_dict(dict(r), full=customer is None) for r in runs}
    for r in rows:
        run = info.get(r["run_id"], {})
        r["run"] = {k: run.get(k) for k in ("created_at", "status", "verdict", "spec_name", "dataset_id",
                                             "judge_version")}
    rows.sort(key=lambda r: (r["run"].get("created_at") or 0, r["run_id"], r["candidate"] != BASELINE,
                             r["candidate"]))
    return rows


def datasets_for_trace(store: Any, trace_id: str, *, database: str = "") -> list[dict[str, Any]]:
    """The pinned datasets this trace is a case of."""
    return store.query(
        f"SELECT dataset_id, any(segment) AS segment, any(description) AS description, "
        f"toFloat64(min(added_at)) AS added_at FROM {table_name('replay_datasets', database)}\n"
        "WHERE trace_id = {trace:String} GROUP BY dataset_id ORDER BY added_at", parameters={"trace": trace_id})
