"""`tagway replay report --shadow`: the gate over shadow traffic. The gateway mirrored sampled live calls to
candidates and recorded each copy (source `shadow`, `replay_case_id` = the live call's trace id, the live call's
tags); here each recorded shadow answer is paired with the live answer it shadowed, both are scored with the spec's
evaluators (no call is made, except by an LLM judge), and the usual per-segment report and gate are built. The
results are stored as a replay run (`shadow-<time>-<hex>`), so `tagway replay report RUN_ID` and the dashboard's
run page show it again.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from exporters.genai_messages import loads_or_empty
from exporters.vocabulary import SHADOW_SOURCE, Window, iso_utc
from exporters.yamlfile import YamlFileError, load_mapping

from .pipeline import report_for, spec_to_json
from .render import render_json
from .report import BASELINE, Report
from .runner import Answer, FatalRunError, Runner, Target, answer_of_record, check_gateway
from .slice import PoolRow, Sampled, fetch_cases, segment_of
from .spec import ReplaySpec, SpecError, parse_spec
from .store import RunRow, call_attributes, write_results, write_run

__all__ = ["SHADOW_RUN_PREFIX", "ShadowCall", "read_shadow_calls", "shadow_data", "config_spec_data", "shadow_spec",
           "shadow_answer", "run_shadow_report", "new_shadow_run_id"]

SHADOW_RUN_PREFIX = "shadow-"
_NAME_RE = re.compile(r"[^A-Za-z0-9_.:@+-]")


@dataclasses.dataclass
class ShadowCall:
    trace_id: str  # the shadow call's own
    case_id: str  # the live call's trace id
    candidate: str  # the shadow model
    status: str
    error_type: str
    latency_ms: float
    cost_usd: float
    input_tokens: int
    output_tokens: int
    output: list[dict]  # semconv output messages


def read_shadow_calls(store: Any, window: Window, candidates: list[str] | None = None) -> list[ShadowCall]:
    """The newest shadow call per (live call, candidate) in the window."""
    where = ["source = {src:String}", "Timestamp >= fromUnixTimestamp64Milli({t0:Int64})",
             "Timestamp < fromUnixTimestamp64Milli({t1:Int64})", "replay_case_id != ''"]
    params: dict[str, Any] = {"src": SHADOW_SOURCE, "t0": int(window.start.timestamp() * 1000),
                              "t1": int(window.end.timestamp() * 1000)}
    if candidates:
        where.append("replay_candidate IN {cands:Array(String)}")
        params["cands"] = list(candidates)
    rows = store.query(
        "SELECT trace_id, replay_case_id, replay_candidate, status, error_type, latency_ms, cost_usd, input_tokens, "
        f"output_tokens, response_json FROM llm_calls WHERE {' AND '.join(where)} "
        "ORDER BY Timestamp DESC LIMIT 1 BY replay_case_id, replay_candidate", params)
    out = []
    for r in rows:
        output = loads_or_empty(r["response_json"])
        out.append(ShadowCall(r["trace_id"], r["replay_case_id"], r["replay_candidate"], r["status"],
                              r["error_type"], float(r["latency_ms"] or 0), float(r["cost_usd"] or 0),
                              int(r["input_tokens"] or 0), int(r["output_tokens"] or 0),
                              output if isinstance(output, list) else []))
    return out


def candidate_name(model: str) -> str:
    return _NAME_RE.sub("-", model)[:64]


def shadow_data(data: dict) -> dict:
    """A replay spec's mapping as shadow traffic reads it: its evaluators, gating and slice.segment_by apply; the
    cases are the shadowed live calls (a slice's filters or a dataset it names are not used)."""
    data = {k: v for k, v in data.items() if k != "dataset"}
    sl = data.get("slice") if isinstance(data.get("slice"), dict) else {}
    data["slice"] = {"segment_by": sl.get("segment_by") or ["customer"]}
    return data


def config_spec_data(config: Any, candidates: list[str] | None) -> dict:
    """Without --spec: the evaluators of the gateway config's shadow rule (`shadow: [{model, evaluators}]`), of the
    one rule there is or the one --candidate names."""
    path = config or os.environ.get("TAGWAY_CONFIG")
    if not path:
        raise SpecError("--shadow needs --spec S, or the gateway config (--config / TAGWAY_CONFIG) whose shadow rule "
                        "lists evaluators")
    try:
        rules = load_mapping(Path(path)).get("shadow") or []
    except YamlFileError as e:
        raise SpecError(str(e)) from None
    rules = [r for r in rules if isinstance(r, dict)]
    models = sorted({str(r.get("model")) for r in rules})
    matching = [r for r in rules if not candidates or r.get("model") in candidates]
    if not matching and candidates:
        raise SpecError(f"{path}: no shadow rule mirrors to {', '.join(map(repr, candidates))} (its rules mirror to "
                        f"{', '.join(models) or 'nothing'}); give --spec S, or --candidate one of those")
    if len(matching) != 1:
        raise SpecError(f"{path}: {len(matching)} shadow rule(s) match; give --spec S, or --candidate MODEL for one "
                        "rule's evaluators")
    rules = matching
    if not rules[0].get("evaluators"):
        raise SpecError(f"{path}: the shadow rule for {rules[0].get('model')!r} lists no evaluators; give --spec S")
    return {"evaluators": rules[0]["evaluators"]}


def shadow_spec(data: dict, source: str, models: list[str]) -> ReplaySpec:
    """The spec of a shadow report: `data` (see shadow_data) with the shadow models found as its candidates."""
    data = shadow_data(data)
    data["candidates"] = [{"name": candidate_name(m), "model": m} for m in models] or [{"name": "none", "model": "-"}]
    esc = dict((data.get("gating") or {}).get("escalation") or {})
    data["gating"] = {**(data.get("gating") or {}), "escalation": {**esc, "enabled": False}}  # no production draws
    return parse_spec(data, source)


def shadow_answer(call: ShadowCall) -> Answer:
    """A recorded shadow call as the answer the runner scores."""
    ok = call.status == "ok"
    return answer_of_record(call.output, call.trace_id, call.latency_ms, call.cost_usd, call.input_tokens,
                            call.output_tokens, ok=ok, http_status=200 if ok else 0,
                            error="" if ok else f"the shadow call errored ({call.error_type or call.status})")


def _segments(store: Any, case_ids: list[str], segment_by: list[str]) -> dict[str, str]:
    out = {}
    for a in call_attributes(store, case_ids):
        columns = {k: v for k, v in a.items() if k not in ("tags", "trace_id")}
        out[a["trace_id"]] = segment_of(PoolRow(a["trace_id"], tags=a["tags"], columns=columns), segment_by)
    return out


def new_shadow_run_id() -> str:
    return SHADOW_RUN_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + "%06x" % (time.time_ns() % 16**6)


async def run_shadow_report(store: Any, data: dict, source: str, window: Window, *, candidates: list[str] | None,
                            client: Any = None, api_key: str = "", run_id: str | None = None) -> Report:
    """Pair, score, store as a run, report. `client` (an httpx client on a gateway) is needed only by LLM-judge
    evaluators."""
    calls = read_shadow_calls(store, window, candidates)
    models = sorted({c.candidate for c in calls})
    spec = shadow_spec(data, source, models)
    if not calls:
        raise SpecError(f"no shadow call recorded from {iso_utc(window.start)} to {iso_utc(window.end)}"
                        + (f" for {', '.join(candidates)}" if candidates else "")
                        + " (is `shadow:` in the gateway config, and did sampled traffic arrive?)")
    judges = [e.name for e in spec.evaluators if e.kind == "llm_judge"]
    if judges:  # the judge's calls go through a gateway: reach it, with the key, before anything is stored
        if client is None:
            raise FatalRunError(f"the llm_judge evaluator(s) {', '.join(judges)} call a model through a gateway: "
                                "pass --gateway URL (or env TAGWAY_GATEWAY_URL)")
        await check_gateway(client, api_key, str(client.base_url))
    live_ids = sorted({c.case_id for c in calls})
    segments = _segments(store, live_ids, spec.segment_by)
    cases, skipped = fetch_cases(store, [Sampled(cid, segments.get(cid, "")) for cid in live_ids])
    by_id = {c.case_id: c for c in cases}
    rid = run_id or new_shadow_run_id()
    runner = Runner(client, spec, run_id=rid, api_key=api_key, dataset_id="", progress=False)
    rows = []
    baseline = Target(BASELINE, logged=True)
    for case in cases:
        rows.append(await runner.run_item(case, baseline))
    names = {m: candidate_name(m) for m in models}
    for call in calls:
        case = by_id.get(call.case_id)
        if case is not None:
            rows.append(await runner.run_item(case, Target(names[call.candidate], call.candidate),
                                              shadow_answer(call)))
    write_results(store, rows)
    notes = [f"shadow traffic from {iso_utc(window.start)} to {iso_utc(window.end)}: {len(calls)} shadow call(s) "
             f"recorded, shadowing {len(live_ids)} live call(s); sampled calls the gateway dropped under load (a full "
             "queue) were never sent and are not here: tagway_shadow_calls_total{outcome=\"dropped\"} counts them"]
    report = report_for(store, rid, spec, status="complete", n_cases=len(cases), skipped=skipped, notes=notes,
                        dataset=f"shadow {iso_utc(window.start)}..{iso_utc(window.end)}",
                        judge_spent=runner.judge_spent)  # this session's judge calls: the record lags a batch
    write_run(store, RunRow(rid, report.status, spec_to_json(spec), report.dataset, spec.judge_version,
                            [c.name for c in spec.candidates], list(spec.segment_by), len(cases), report.verdict,
                            # what this report paid: the shadow calls and its judge, not the logged production
                            # calls' cost (the baseline rows carry it; nobody paid it for the run)
                            render_json(report), sum(r.cost_usd for r in rows if r.candidate != BASELINE)
                            + report.judge_cost_usd, finished_at=time.time()))
    return report
