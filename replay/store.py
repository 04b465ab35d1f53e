"""Replay runs and results in ClickHouse (tables `replay_runs`, `replay_results` of migration 3).

A result row carries the keys that line it up with production in one join:
`replay_results.case_id = llm_calls.trace_id` (the original call), plus customer, intent, prompt_version, model,
dataset_id, judge_version and run_id; `replay_trace_id` is the replayed call's own trace id, which appears in
`llm_calls` with `replay_run_id` / `replay_case_id` set by the gateway.

Runs are append-only versions (newest `version` wins at read time); results may be written again for the same
(run, candidate, case) when a resume retries an errored one, and the newest row wins.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Sequence

import orjson

from exporters.genai_messages import from_semconv_input, loads_or_empty
from exporters.replays import LAST_WRITE, settle_running
from exporters.vocabulary import COLUMNS, JUDGE_SOURCE, REPLAY_SOURCE

ADMIN_KEY_ID = "admin"  # gateway.auth.ADMIN_KEY_ID: what the admin key's calls are recorded under (llm_calls.key_id)

__all__ = ["ResultRow", "RunRow", "write_results", "read_results", "done_keys", "write_run", "get_run", "list_runs",
           "case_inputs", "call_attributes", "recorded_calls", "recorded_cost", "RESULT_COLUMNS", "JOIN_SQL"]


@dataclasses.dataclass
class ResultRow:
    run_id: str
    case_id: str  # the original call's trace id
    candidate: str  # a candidate name, or "baseline"
    segment: str
    status: str  # passed | failed | errored
    replay_trace_id: str = ""
    customer: str = ""
    intent: str = ""
    prompt_version: str = ""
    model: str = ""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    dataset_id: str = ""
    judge_version: str = ""
    passed: bool | None = None
    score: float | None = None
    error: str = ""
    evaluations: list[dict] = dataclasses.field(default_factory=list)
    output: str = ""
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    http_status: int = 0
    attempts: int = 0
    timestamp: float = dataclasses.field(default_factory=time.time)

    def to_json_row(self) -> dict:
        d = dataclasses.asdict(self)
        d["Timestamp"] = d.pop("timestamp")
        d["evaluations"] = orjson.dumps(self.evaluations).decode()
        d["attempts"] = min(int(self.attempts), 255)
        return d


RESULT_COLUMNS = [f.name for f in dataclasses.fields(ResultRow) if f.name != "timestamp"]


@dataclasses.dataclass
class RunRow:
    run_id: str
    status: str  # running | complete | incomplete
    spec_json: str = ""
    dataset_id: str = ""
    judge_version: str = ""
    candidates: list[str] = dataclasses.field(default_factory=list)
    segment_by: list[str] = dataclasses.field(default_factory=list)
    n_cases: int = 0
    verdict: str = ""  # passed | failed | "" while running
    report_json: str = ""
    cost_usd: float = 0.0
    created_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None
    key_id: str = ""  # the key that started it, as the gateway named it ("" when it did not say: in-process, older)

    @property
    def spec(self) -> dict:
        return orjson.loads(self.spec_json) if self.spec_json else {}


def write_results(store: Any, rows: Iterable[ResultRow]) -> int:
    lines = [orjson.dumps(r.to_json_row()) for r in rows]
    if lines:
        store.insert_json_rows("replay_results", b"\n".join(lines))
    return len(lines)


def read_results(store: Any, run_id: str) -> list[ResultRow]:
    """The newest result per (candidate, case) of a run."""
    cols = ", ".join(RESULT_COLUMNS)
    rows = store.query(
        f"SELECT {cols}, toFloat64(Timestamp) AS timestamp FROM replay_results WHERE run_id = {{run_id:String}} "
        "ORDER BY Timestamp DESC LIMIT 1 BY candidate, case_id", {"run_id": run_id})
    out = []
    for r in rows:
        r["evaluations"] = orjson.loads(r["evaluations"]) if r["evaluations"] else []
        r["tags"] = dict(r["tags"] or {})
        out.append(ResultRow(**r))
    out.sort(key=lambda r: (r.candidate, r.segment, r.case_id))
    return out


def done_keys(store: Any, run_id: str, *, include_errored: bool = True) -> set[tuple[str, str]]:
    """(candidate, case_id) pairs that already have a result (optionally not counting errored ones)."""
    rows = store.query(
        "SELECT candidate, case_id, argMax(status, Timestamp) AS st FROM replay_results "
        "WHERE run_id = {run_id:String} GROUP BY candidate, case_id", {"run_id": run_id})
    return {(r["candidate"], r["case_id"]) for r in rows if include_errored or r["st"] != "errored"}


def recorded_calls(store: Any, run_id: str, key_id: str = "") -> list[dict]:
    """The newest answered (status ok) call per (candidate, case) that the gateway recorded for a run's replay:
    among them the calls a stopped run paid for and never stored the result of (a CLI killed before its results
    were written), which a resume can score without calling again. `key_id`: only the calls made with the run's
    key (any key that may mark replay calls can mark them with any run's id), or the admin key's (ADMIN_KEY_ID): an
    admin resume of a tenant's run pays with the admin key, and a later resume with the run's key must not pay again."""
    return store.query(
        "SELECT trace_id, replay_candidate AS candidate, replay_case_id AS case_id, model_requested, prompt_version, "
        "latency_ms, cost_usd, input_tokens, output_tokens, http_status, attempts, system_instructions, response_json "
        "FROM llm_calls WHERE replay_run_id = {run_id:String} AND source = {src:String} AND status = 'ok' "
        "AND replay_case_id != '' AND ({key:String} = '' OR key_id IN ({key:String}, {admin:String})) "
        "AND (replay_candidate, replay_case_id) NOT IN ("  # not the pairs scored already
        "SELECT candidate, case_id FROM replay_results WHERE run_id = {run_id:String} GROUP BY candidate, case_id "
        "HAVING argMax(status, Timestamp) != 'errored') "
        "ORDER BY Timestamp DESC LIMIT 1 BY replay_candidate, replay_case_id",
        {"run_id": run_id, "src": REPLAY_SOURCE, "key": key_id, "admin": ADMIN_KEY_ID})


def recorded_cost(store: Any, run_id: str, sources: Sequence[str] = (REPLAY_SOURCE, JUDGE_SOURCE)) -> float:
    """What the gateway recorded a run's calls (replayed and judge, or `sources`) as costing: a run whose CLI was
    killed never wrote its spend, so a resume's budget starts from this when it is more; the judge's calls alone
    are what the report shows apart (they have no result row of their own)."""
    rows = store.query("SELECT sum(cost_usd) AS spent FROM llm_calls WHERE replay_run_id = {run_id:String} "
                       "AND source IN {srcs:Array(String)}", {"run_id": run_id, "srcs": list(sources)})
    return float(rows[0]["spent"] or 0.0) if rows else 0.0


def write_run(store: Any, run: RunRow) -> None:
    row = {
        "run_id": run.run_id, "created_at": run.created_at, "finished_at": run.finished_at, "status": run.status,
        "spec_json": run.spec_json, "dataset_id": run.dataset_id, "judge_version": run.judge_version,
        "candidates": run.candidates, "segment_by": run.segment_by, "n_cases": run.n_cases, "verdict": run.verdict,
        "report_json": run.report_json, "cost_usd": run.cost_usd, "key_id": run.key_id, "version": time.time_ns(),
    }
    store.insert_json_rows("replay_runs", orjson.dumps(row))


_RUN_COLS = ("run_id", "status", "spec_json", "dataset_id", "judge_version", "candidates", "segment_by", "n_cases",
             "verdict", "report_json", "cost_usd", "key_id")


def _run_select(where: str) -> str:
    latest = ", ".join(f"argMax({c}, version) AS {c}" for c in _RUN_COLS[1:])
    return (f"SELECT run_id, {latest}, toFloat64(min(created_at)) AS created_at, "
            f"toFloat64(argMax(finished_at, version)) AS finished_at, {LAST_WRITE} FROM replay_runs {where} "
            "GROUP BY run_id")


def get_run(store: Any, run_id: str) -> RunRow | None:
    rows = store.query(_run_select("WHERE run_id = {run_id:String}"), {"run_id": run_id})
    if not rows:
        return None
    settle_running(store, rows)  # a run whose process is gone reads as incomplete
    r = rows[0]
    r["candidates"], r["segment_by"] = list(r["candidates"]), list(r["segment_by"])
    return RunRow(**r)


def list_runs(store: Any, limit: int = 20) -> list[RunRow]:
    rows = store.query(_run_select("") + " ORDER BY created_at DESC LIMIT {limit:UInt32}", {"limit": limit})
    settle_running(store, rows)
    return [RunRow(**{**r, "candidates": list(r["candidates"]), "segment_by": list(r["segment_by"])}) for r in rows]


def _last_user_text(request_json: str) -> str:
    msgs = from_semconv_input(None, loads_or_empty(request_json) or [])
    for m in reversed(msgs):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
    return ""


def case_inputs(store: Any, case_ids: Iterable[str], *, run_id: str = "", chunk: int = 2000) -> dict[str, str]:
    """The last user message of each original call (for the flipped cases of a report); for a case whose original
    call is not in the store (past its TTL, or a JSONL dataset's case from elsewhere), that of this run's (`run_id`)
    replayed call of it, which sent the same user turns: never another run's (a dataset's own case ids repeat
    across runs and tenants) nor its judge's calls (their prompt holds the rubric and answers)."""
    ids = sorted(set(case_ids))
    out: dict[str, str] = {}
    queries: list[tuple[str, dict]] = [("SELECT trace_id AS id, any(request_json) AS rj FROM llm_calls WHERE trace_id "
                                        "IN {ids:Array(String)} AND replay_run_id = '' GROUP BY trace_id", {})]
    if run_id:
        queries.append(("SELECT replay_case_id AS id, any(request_json) AS rj FROM llm_calls WHERE replay_run_id = "
                        "{run:String} AND source = {src:String} AND replay_case_id IN {ids:Array(String)} AND "
                        "request_json != '' GROUP BY replay_case_id", {"run": run_id, "src": REPLAY_SOURCE}))
    for sql, params in queries:
        for i in range(0, len(ids), chunk):
            for r in store.query(sql, {"ids": ids[i:i + chunk], **params}):
                if r["id"] in out:
                    continue
                try:
                    out[r["id"]] = _last_user_text(r["rj"])
                except (TypeError, ValueError, AttributeError):
                    out[r["id"]] = ""
        ids = [x for x in ids if x not in out]
        if not ids:
            break
    return out


def call_attributes(store: Any, case_ids: Iterable[str], *, chunk: int = 2000) -> list[dict]:
    """What `replay discover` slices by, for each original call: every vocabulary column (by its vocabulary name),
    tags, token counts, latency, and the number of user turns (None when content was not captured)."""
    cols = ", ".join(f"toString(any({col})) AS {name}" for name, col in COLUMNS.items())
    turns = ("any(if(request_json = '', NULL, arrayCount(x -> JSONExtractString(x, 'role') = 'user', "
             "JSONExtractArrayRaw(request_json)))) AS turns")
    ids = sorted(set(case_ids))
    out: list[dict] = []
    for i in range(0, len(ids), chunk):
        out += store.query(f"SELECT trace_id, {cols}, any(tags) AS tags, any(input_tokens) AS input_tokens, "
                           f"any(output_tokens) AS output_tokens, any(latency_ms) AS latency_ms, {turns} "
                           "FROM llm_calls WHERE trace_id IN {ids:Array(String)} AND replay_run_id = '' "
                           "GROUP BY trace_id", {"ids": ids[i:i + chunk]})
    for r in out:
        r["tags"] = dict(r["tags"] or {})
    return out


# The join the keys exist for: each replayed case beside the production call it came from (and the replayed call).
JOIN_SQL = """SELECT r.run_id AS run_id, r.candidate AS candidate, r.case_id AS case_id, r.segment AS segment,
       r.status AS status, r.model AS candidate_model, p.model_requested AS production_model,
       p.customer AS customer, p.intent AS intent, p.latency_ms AS production_latency_ms,
       r.latency_ms AS replay_latency_ms, r.replay_trace_id AS replay_trace_id
FROM replay_results AS r
INNER JOIN llm_calls AS p ON p.trace_id = r.case_id
WHERE r.run_id = {run_id:String} AND p.replay_run_id = ''"""
