"""One evaluation run: `tagway eval run --evaluator E --dataset D --mode full|delta|preview`.

1. Load the evaluators (saved definitions, NAME or NAME@VERSION, or a YAML file that is saved first) and the
   dataset's rows; the run's scope per evaluator: every row (full, preview) or the rows it has not covered on this
   dataset in a reconciled full or delta run (delta).
2. Targets: each row (message mode), or the rows' sessions with all their calls (session mode).
3. Score every (evaluator, target): an LLM evaluator's judge through the gateway (a recorded `replay-judge` call),
   its answer validated against the output schema; a deterministic one in process. A failure is an errored row.
4. Store the results (run id, mode, evaluator version, field values, the tags the rules matched).
5. Unless preview: reconcile the tags the run's rules name on the targets it scored (replay.evals.rules), under the
   tag lock, so two runs on the same tags never interleave: the second waits up to `lock_wait` seconds, then the
   run ends `unreconciled` (its results are kept; its tags were left as they were) with a message naming the
   holder.

Errored rows are left as they were (their tags are not touched) and listed; the exit code says so (3).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import httpx

from exporters import evals as store_evals
from exporters.tagstate import MESSAGE, SESSION, TagEvent, TagLock, TagLockBusy, current_tags, write_events
from exporters.vocabulary import JUDGE_SOURCE

from ..evaluators import EvalContext, run_one, stored_specs
from ..pipeline import new_run_id
from ..runner import GATEWAY_APP, Answer, GatewayPoster, fatal_check, gateway_client
from .definition import DefinitionError, EvaluatorDefinition, load_definition, parse_definition, parse_ref
from .judge import answers_text, judge_request, parse_answer
from .rules import Outcome, matched_rules, plan_changes
from .schema import SchemaAnswerError
from .targets import DatasetRows, EvalTarget, Skipped, load_rows, message_targets, session_targets

__all__ = ["MODES", "LoadedEvaluator", "EvalOptions", "EvalRunResult", "resolve_evaluators", "run_evaluation",
           "reconcile", "EXIT_OK", "EXIT_INCOMPLETE"]

MODES = ("full", "delta", "preview")
EXIT_OK, EXIT_INCOMPLETE = 0, 3
_DEFINITION_SUFFIXES = (".yaml", ".yml", ".json")


@dataclasses.dataclass
class LoadedEvaluator:
    definition: EvaluatorDefinition
    version: int

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def ref(self) -> str:
        return f"{self.definition.name}@{self.version}"


@dataclasses.dataclass
class EvalOptions:
    mode: str = "full"
    gateway_url: str | None = None
    transport: httpx.AsyncBaseTransport | None = None
    in_process: bool = False
    app_ref: str = GATEWAY_APP
    gateway_config: Path | None = None
    api_key: str = ""
    concurrency: int = 8
    retries: int = 3
    backoff_base: float = 0.25
    lock_wait: float = 60.0
    run_id: str | None = None


@dataclasses.dataclass
class EvalRunResult:
    run: store_evals.EvalRun
    results: list[store_evals.EvalResult]
    events: list[TagEvent]

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.run.status in ("complete",) else EXIT_INCOMPLETE


def _is_file(ref: str) -> bool:
    return ref.lower().endswith(_DEFINITION_SUFFIXES) or "/" in ref


def resolve_evaluators(store: Any, refs: Sequence[str]) -> list[LoadedEvaluator]:
    """Each --evaluator: a YAML file (validated, then saved: a new version when its content changed) or a saved
    NAME / NAME@VERSION. Raises DefinitionError (one line)."""
    if not refs:
        raise DefinitionError("give at least one --evaluator (a saved NAME[@VERSION] or a YAML file)")
    out: list[LoadedEvaluator] = []
    for ref in refs:
        if _is_file(ref):
            d = load_definition(ref)
            version, _ = store_evals.save_evaluator(store, d.name, d.to_json(), d.content_hash())
        else:
            name, want = parse_ref(ref)
            found = store_evals.get_evaluator(store, name, want)
            if found is None:
                saved = [r["name"] for r in store_evals.list_evaluators(store)]
                what = f"version {want} of evaluator {name!r}" if want is not None else f"evaluator {name!r}"
                raise DefinitionError(f"no {what} (saved: {', '.join(saved) or 'none'}; `tagway eval save FILE` "
                                      "saves one)")
            version, text = found
            with stored_specs():  # as it was saved
                d = parse_definition(_loads(text), f"stored evaluator {name}@{version}")
        out.append(LoadedEvaluator(d, version))
    names = [e.name for e in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise DefinitionError(f"evaluator {dup!r} is given twice")
    return out


def _loads(text: str) -> Any:
    import orjson  # noqa: PLC0415 - only stored definitions need it
    return orjson.loads(text)


# -- scoring ---------------------------------------------------------------------------------------------------
def _judge_headers(api_key: str, run_id: str, ev: LoadedEvaluator, target: EvalTarget) -> dict[str, str]:
    h = {"authorization": f"Bearer {api_key}", "content-type": "application/json", "x-tagway-source": JUDGE_SOURCE,
         "x-tagway-replay-run-id": run_id, "x-tagway-replay-candidate": f"eval:{ev.name}",
         "x-tagway-replay-case-id": target.id[:128], "x-tagway-prompt-version": f"{ev.name}.v{ev.version}"}
    if target.customer:
        h["x-tagway-customer"] = target.customer
    return h


class _Scorer:
    def __init__(self, run_id: str, mode: str, dataset: str, poster: GatewayPoster | None, api_key: str) -> None:
        self.run_id, self.mode, self.dataset, self.poster, self.api_key = run_id, mode, dataset, poster, api_key

    def _result(self, ev: LoadedEvaluator, t: EvalTarget) -> store_evals.EvalResult:
        return store_evals.EvalResult(self.run_id, self.mode, self.dataset, ev.name, ev.version, t.kind, t.id,
                                      t.customer, list(t.dataset_rows), [c.case_id for c in t.calls])

    async def score(self, ev: LoadedEvaluator, t: EvalTarget, *, probe: bool = False) -> store_evals.EvalResult:
        res = self._result(ev, t)
        d = ev.definition
        if d.is_llm:
            assert self.poster is not None
            ans: Answer = await self.poster.post(judge_request(d, t.calls),
                                                 _judge_headers(self.api_key, self.run_id, ev, t))
            if not ans.ok:
                if probe:
                    fatal_check(f"evaluator {d.name}'s judge", str(d.model), ans)
                res.status, res.error = "errored", f"judge call failed: {ans.error}"
                return res
            try:
                res.fields = parse_answer(d, ans.text)
            except SchemaAnswerError as e:
                res.status, res.error = "errored", str(e)
                return res
            res.reason = f"judge {d.model} (trace {ans.trace_id})"
            res.matched_tags = list(dict.fromkeys(r.tag for r in matched_rules(d.rules, res.fields)))
            return res
        last = t.calls[-1]
        ctx = EvalContext(output=answers_text(t.calls), message=last.baseline_message,
                          latency_ms=sum(c.baseline_latency_ms or 0.0 for c in t.calls),
                          cost_usd=sum(c.baseline_cost_usd or 0.0 for c in t.calls),
                          vars={"customer": t.customer, "intent": last.intent, "tags": last.tags, "case_id": t.id,
                                "messages": last.messages, "calls": [c.case_id for c in t.calls]})
        r = await run_one(d.spec(), ctx)
        if r.error:
            res.status, res.error = "errored", r.error
        else:
            res.passed, res.score, res.reason, res.fields = r.passed, r.score, r.reason, dict(r.fields)
        return res


@contextlib.asynccontextmanager
async def _poster(opts: EvalOptions, needed: bool) -> AsyncIterator[GatewayPoster | None]:
    if not needed:
        yield None
        return
    async with gateway_client(base_url=opts.gateway_url, transport=opts.transport, in_process=opts.in_process,
                              app_ref=opts.app_ref, app_config=opts.gateway_config,
                              concurrency=opts.concurrency) as client:
        yield GatewayPoster(client, retries=opts.retries, backoff_base=opts.backoff_base)


async def _probe(scorer: _Scorer, work: list[tuple[LoadedEvaluator, EvalTarget]]) -> dict[int, store_evals.EvalResult]:
    """The first judge call, alone: an unknown judge model, a refused key or an unreachable gateway stops the run
    (FatalRunError) before anything is stored or the rest is sent."""
    first = next((i for i, (ev, _) in enumerate(work) if ev.definition.is_llm), None)
    return {} if first is None else {first: await scorer.score(*work[first], probe=True)}


async def _score_all(scorer: _Scorer, work: list[tuple[LoadedEvaluator, EvalTarget]],
                     done: dict[int, store_evals.EvalResult],
                     concurrency: int) -> list[store_evals.EvalResult]:
    """Every item not `done` yet, with at most `concurrency` at once."""
    results: list[store_evals.EvalResult | None] = [done.get(i) for i in range(len(work))]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            results[i] = await scorer.score(*work[i])

    await asyncio.gather(*(one(i) for i in range(len(work)) if results[i] is None))
    return [r for r in results if r is not None]


# -- reconciliation --------------------------------------------------------------------------------------------
def _value_text(v: Any) -> str:
    return "" if v is None else v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)


def reconcile(store: Any, run_id: str, mode: str, evaluators: Sequence[LoadedEvaluator],
              results: Sequence[store_evals.EvalResult], *, lock_wait: float = 60.0) -> list[TagEvent]:
    """Make the tags the run's rules name agree with its results, per target kind, under the tag lock. Returns
    the events written (one per change). Raises TagLockBusy when another run holds the tags past `lock_wait`."""
    written: list[TagEvent] = []
    for kind in (MESSAGE, SESSION):
        evs = [e for e in evaluators if e.definition.mode == kind and e.definition.rules]
        rules = {e.name: e.definition.rules for e in evs}
        outs = [Outcome(r.evaluator, r.evaluator_version, r.target_id, r.customer, r.status == "scored", r.fields,
                        rules[r.evaluator]) for r in results
                if r.target_kind == kind and r.evaluator in rules and r.status in ("scored", "errored")]
        if not outs:
            continue
        managed = sorted({r.tag for e in evs for r in e.definition.rules})
        keys = [f"evaluator:{e.name}" for e in evs] + [f"tag:{t}" for t in managed]
        with TagLock(store, keys, run_id=run_id, holder=f"eval run {run_id}", wait=lock_wait):
            present = current_tags(store, kind, {o.target_id for o in outs}, managed)
            changes = plan_changes(outs, {t: set(tags) for t, tags in present.items()})
            events = [TagEvent(kind, c.target_id, c.tag, c.action, c.actor, customer=c.customer, run_id=run_id,
                               mode=mode, evaluator=c.evaluator, evaluator_version=c.evaluator_version, rule=c.rule,
                               field=c.field, field_value=_value_text(c.value)) for c in changes]
            write_events(store, events)
        written += events
    return written


# -- the run ---------------------------------------------------------------------------------------------------
def _plan(store: Any, rows: DatasetRows, evaluators: Sequence[LoadedEvaluator],
          mode: str) -> tuple[list[tuple[LoadedEvaluator, EvalTarget]], list[tuple[LoadedEvaluator, Skipped]]]:
    work: list[tuple[LoadedEvaluator, EvalTarget]] = []
    skipped: list[tuple[LoadedEvaluator, Skipped]] = []
    for ev in evaluators:
        scope = rows.cases
        if mode == "delta":
            covered = store_evals.covered_rows(store, ev.name, rows.name)
            scope = [c for c in scope if c.case_id not in covered]
        if ev.definition.mode == MESSAGE:
            targets = message_targets(scope)
        else:
            targets, missing = session_targets(store, scope)
            if missing and not targets:
                n = sum(len(s.trace_ids) for s in missing)
                first = missing[0].trace_ids[:3]
                raise DefinitionError(f"evaluator {ev.name} is in session mode, but none of the {n} row(s) in its "
                                      f"scope has a session: {missing[0].reason} (e.g. {', '.join(first)})")
            skipped += [(ev, s) for s in missing]
        work += [(ev, t) for t in targets]
    return work, skipped


def _skipped_results(run_id: str, mode: str, dataset: str,
                     skipped: Sequence[tuple[LoadedEvaluator, Skipped]]) -> list[store_evals.EvalResult]:
    """Rows that became no target are results too (status skipped, the reason), so they are listed and a delta run
    does not count them as new again."""
    return [store_evals.EvalResult(run_id, mode, dataset, ev.name, ev.version, ev.definition.mode, "",
                                   dataset_rows=[tid], trace_ids=[tid], status="skipped", error=s.reason)
            for ev, s in skipped for tid in s.trace_ids]


def _summary(rows: DatasetRows, results: Sequence[store_evals.EvalResult], events: Sequence[TagEvent],
             reconcile_error: str) -> dict:
    count = {k: sum(1 for r in results if r.status == k) for k in ("scored", "errored", "skipped")}
    return {"rows": len(rows.cases) + sum(rows.skipped.values()), "targets": count["scored"] + count["errored"],
            **count, "applied": sum(1 for e in events if e.action == "apply"),
            "removed": sum(1 for e in events if e.action == "remove"), "dataset_skipped": rows.skipped,
            "reconcile_error": reconcile_error}


def _interrupted(store: Any, run: store_evals.EvalRun, e: BaseException) -> None:
    """Mark a run stopped midway `incomplete` (no result of it was stored: they are written together), if the store
    still answers; a store that went away with the gateway keeps it `running`."""
    run.status = "incomplete"
    run.summary = {"interrupted": f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__}
    run.finished_at = time.time()
    try:
        store_evals.write_run(store, run)
    except Exception:
        pass


async def run_evaluation(store: Any, evaluators: Sequence[LoadedEvaluator], dataset_ref: str,
                         opts: EvalOptions) -> EvalRunResult:
    if opts.mode not in MODES:
        raise DefinitionError(f"--mode {opts.mode!r}: use one of {', '.join(MODES)}")
    rows = load_rows(store, dataset_ref)
    run_id = opts.run_id or new_run_id()
    if store_evals.get_run(store, run_id) is not None:
        raise DefinitionError(f"evaluation run {run_id!r} already exists: choose another --run-id")
    work, skipped = _plan(store, rows, evaluators, opts.mode)
    run = store_evals.EvalRun(run_id, opts.mode, "running", rows.name, rows.version, [e.ref for e in evaluators])
    # a run refused (no gateway, an unreachable one, an unknown judge model, a refused key) stores nothing
    async with _poster(opts, any(ev.definition.is_llm for ev, _ in work)) as poster:
        scorer = _Scorer(run_id, opts.mode, rows.name, poster, opts.api_key)
        probed = await _probe(scorer, work)
        store_evals.write_run(store, run)
        try:
            results = await _score_all(scorer, work, probed, opts.concurrency)
        except BaseException as e:  # stopped midway (Ctrl-C, the gateway gone): not left "running" where we can say
            _interrupted(store, run, e)
            raise
    results += _skipped_results(run_id, opts.mode, rows.name, skipped)
    await asyncio.to_thread(store_evals.write_results, store, results)
    events: list[TagEvent] = []
    reconcile_error = ""
    if opts.mode != "preview":
        try:
            events = await asyncio.to_thread(reconcile, store, run_id, opts.mode, evaluators, results,
                                             lock_wait=opts.lock_wait)
        except TagLockBusy as e:
            reconcile_error = f"tags not reconciled: {e}"
    errored = any(r.status == "errored" for r in results)
    run.status = "unreconciled" if reconcile_error else "incomplete" if errored else "complete"
    run.summary = _summary(rows, results, events, reconcile_error)
    run.finished_at = time.time()
    store_evals.write_run(store, run)
    return EvalRunResult(run, results, events)
