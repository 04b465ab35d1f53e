"""`tagway dataset ...` (versioned datasets) and `tagway coverage` (the coverage map), registered through the
`tagway.cli` entry point `datasets` (pyproject.toml), beside the replay commands whose options and error handling
they share (replay.cli). Every change makes a new version with a
message (-m), an author (--author, $TAGWAY_AUTHOR, else the login name) and a time. Bad input is one line on stderr
and exit 2 (unknown datasets and versions name the nearest ones); a change that changes nothing says so and makes
no version (exit 0).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from exporters import datasets as core

from ..cli import _print_table
from .cli_common import (AuthorOpt, ConfigOpt, DsnOpt, JsonOpt, MessageOpt, _author, _errors, _json_out, _open,
                         _when, dataset_app)
from ..spec import SpecError

__all__ = ["dataset_app", "register"]


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
    app.command("coverage")(coverage_cmd)


def _made(v: core.Version, what: str) -> None:
    typer.echo(f"{v.ref}: {what} ({v.n_cases} case(s))")


def _problems(problems: dict[str, str], *, strict: bool) -> None:
    """Traces that cannot be cases are named: with `strict` (named traces) the command stops, nothing added."""
    if not problems:
        return
    lines = [f"{t}: {why}" for t, why in list(problems.items())[:20]]
    more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
    if strict:
        raise core.DatasetStoreError(f"cannot add {len(problems)} trace(s), nothing added: " + "; ".join(lines) + more)
    for line in lines:
        typer.echo(f"skipped {line}", err=True)
    if more:
        typer.echo(f"skipped{more}", err=True)


# -- reading ------------------------------------------------------------------------------------------------------
@dataset_app.command("list")
def list_cmd(as_json: bool = JsonOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Every dataset: its latest version, cases, author and message."""
    with _errors():
        store, _ = _open(dsn, config)
        versions = core.latest_versions(store)
    if as_json:
        return _json_out([v.to_json() for v in versions])
    if not versions:
        typer.echo("no dataset yet (tagway dataset add NAME ...)")
        return
    _print_table("datasets (latest versions)", ["dataset", "latest", "cases", "updated", "author", "message"],
                 [[v.name, v.ref, str(v.n_cases), _when(v.created_at), v.author, v.message] for v in versions])


@dataset_app.command("show")
def show_cmd(ref: str = typer.Argument(..., help="NAME (the latest version) or NAME@N."), as_json: bool = JsonOpt,
             dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """One version: who made it and why, its targets and its cases (trace, segment, keys, difficulty, label,
    lock)."""
    with _errors():
        store, _ = _open(dsn, config)
        v = core.get_version(store, ref)
        cases = core.read_cases(store, v)
    if as_json:
        return _json_out({**v.to_json(), "cases": [c.to_json() for c in cases]})
    typer.echo(f"{v.ref}: {v.n_cases} case(s), {v.op} by {v.author} at {_when(v.created_at)}: {v.message or '-'}")
    for t in v.targets.get("slices", []):
        typer.echo(f"target: {','.join(t['filters'])}: {t['n']}")
    if v.targets.get("mix"):
        typer.echo("difficulty mix: " + ", ".join(f"{k} {s:.0%}" for k, s in v.targets["mix"].items()))
    _print_table(f"cases of {v.ref}", ["trace", "segment", "customer", "intent", "prompt", "model", "difficulty",
                                       "label", "lock"],
                 [[c.trace_id, c.segment, c.customer, c.intent, c.prompt_version, c.model, c.difficulty or "-",
                   (c.label + ("*" if c.adjudicated else "")) if c.label else "-",
                   f"expect {c.expect}" if c.locked else ""] for c in cases])


@dataset_app.command("log")
def log_cmd(name: str = typer.Argument(...), as_json: bool = JsonOpt, dsn: Optional[str] = DsnOpt,
            config: Optional[Path] = ConfigOpt) -> None:
    """Every version of NAME, newest first: when, who, what (op) and why (message)."""
    with _errors():
        store, _ = _open(dsn, config)
        versions = core.history(store, name)
    if as_json:
        return _json_out([v.to_json() for v in versions])
    for v in versions:
        typer.echo(f"{v.ref}\t{_when(v.created_at)}\t{v.author}\t{v.op}\t{v.n_cases} case(s)\t{v.message}")


_DIFF_FIELDS = ("segment", "difficulty", "label", "critique", "adjudicated", "locked", "expect", "lock_note")


@dataset_app.command("diff")
def diff_cmd(a: str = typer.Argument(..., help="NAME@N (or NAME)"), b: str = typer.Argument(..., help="NAME@M"),
             as_json: bool = JsonOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """What changed from A to B: cases added, removed, and changed (label, critique, difficulty, lock, ...)."""
    with _errors():
        store, _ = _open(dsn, config)
        va, vb = core.get_version(store, a), core.get_version(store, b)
        ca = {c.trace_id: c for c in core.read_cases(store, va)}
        cb = {c.trace_id: c for c in core.read_cases(store, vb)}
    added = [t for t in cb if t not in ca]
    removed = [t for t in ca if t not in cb]
    changed = {t: {f: [getattr(ca[t], f), getattr(cb[t], f)] for f in _DIFF_FIELDS
                   if getattr(ca[t], f) != getattr(cb[t], f)} for t in cb if t in ca}
    changed = {t: d for t, d in changed.items() if d}
    # the coverage targets a version sets (`dataset target`): a version that changes only those is a change too
    targets = {k: [va.targets.get(k), vb.targets.get(k)] for k in sorted(set(va.targets) | set(vb.targets))
               if va.targets.get(k) != vb.targets.get(k)}
    if as_json:
        return _json_out({"from": va.ref, "to": vb.ref, "added": added, "removed": removed, "changed": changed,
                          "targets": targets})
    typer.echo(f"{va.ref} -> {vb.ref}: {len(added)} added, {len(removed)} removed, {len(changed)} changed"
               + (f", {len(targets)} target(s) changed" if targets else ""))
    for t in added:
        typer.echo(f"+ {t}")
    for t in removed:
        typer.echo(f"- {t}")
    for t, d in changed.items():
        typer.echo(f"~ {t}: " + "; ".join(f"{f} {x!r} -> {y!r}" for f, (x, y) in d.items()))
    for k, (x, y) in targets.items():
        typer.echo(f"~ target {k}: {x!r} -> {y!r}")


@dataset_app.command("export")
def export_cmd(ref: str = typer.Argument(...),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default, or -: stdout)."),
               force: bool = typer.Option(False, "--force", help="Overwrite a file that is not a tagway dataset."),
               dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """A version as JSONL with its content (a header line, then one case a line): it can live in a repo, and be
    imported after the calls are gone."""
    from .jsonl import export_lines, write_export
    from .versions import load
    if out is not None and str(out) == "-":  # the usual spelling of stdout (it wrote a file named "-")
        out = None
    with _errors():
        if out is not None:
            from .pinned import check_writable, is_dataset_file
            check_writable(out, "export file", force=force, keep_unless=is_dataset_file)
        store, _ = _open(dsn, config)
        ds = load(store, ref)
        if out is None:
            sys.stdout.write(b"\n".join(export_lines(ds)).decode() + "\n")
            return
        n = write_export(ds, out, force=force)
    typer.echo(f"exported {ds.ref} ({n} case(s)) to {out}", err=True)


@dataset_app.command("import")
def import_cmd(file: Path = typer.Argument(..., help="A JSONL file (tagway dataset export, or replay dataset save)."),
               name: Optional[str] = typer.Option(None, "--name", help="Dataset to import into (default: the "
                                                  "file's own name)."),
               force: bool = typer.Option(False, "--force", help="Also when the file does not keep a lock of the "
                                          "latest version (needs --reason)."),
               reason: str = typer.Option("", "--reason", help="Why the locks go (kept in the log)."),
               message: str = MessageOpt, author: Optional[str] = AuthorOpt,
               dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """A new version holding exactly the file's cases (and its targets). Every line is checked first: a bad line
    stops the import with its line number, and nothing is imported. A lock of the latest version that the file does
    not keep goes only with --force and --reason, as with `remove`; cases and labels it drops are said."""
    from .jsonl import parse_file
    from .versions import import_version
    with _errors():
        if reason and not force:
            raise core.DatasetStoreError("--reason goes with --force (it says why locks go)")
        parsed = parse_file(file)
        target = name or (parsed.header.name if parsed.header else "")
        if not target:
            raise core.DatasetStoreError(f"{file} has no dataset header: say --name NAME")
        core.validate_name(target)
        store, _ = _open(dsn, config, create=True)  # the file brings the cases: a new store may start here
        origin = f" (exported from {parsed.header.ref})" if parsed.header and parsed.header.ref else ""
        msg = message or f"import {file.name}{origin}"
        lost: dict[str, list[str]] = {}
        v = import_version(store, target, parsed.items, parsed.header.targets if parsed.header else {},
                           message=lambda: msg + (f" (forced: {reason})" if lost.get("locks") else ""),
                           author=_author(author), force=force, reason=reason, losses=lost)
    dropped = [f"{len(lost[k])} {what}" for k, what in (("cases", "case(s) removed"), ("locks", "lock(s) dropped"),
                                                         ("labels", "label(s) cleared or changed")) if lost.get(k)]
    against = f"; against {v.name}@{v.parent}: {', '.join(dropped)}" if dropped else ""
    _made(v, f"imported {len(parsed.items)} case(s) from {file}{against}")


# -- changes ------------------------------------------------------------------------------------------------------
@dataset_app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="The dataset (created when it does not exist)."),
    where: Optional[List[str]] = typer.Option(None, "--where", help="key=value / key!=value, as tagway stats."),
    since: str = typer.Option("30d", "--since", help="How far back to look (e.g. 7d, 30d)."),
    sample_n: Optional[int] = typer.Option(None, "--sample", help="How many new cases to take (default: all "
                                           "that match, up to 10,000)."),
    stratify: str = typer.Option("customer", "--stratify", help="Segment keys (comma separated) to sample by; "
                                 "also each case's segment."),
    min_per_segment: int = typer.Option(0, "--min-per-segment", help="Floor of cases per segment in a sample."),
    seed: int = typer.Option(0, "--seed"),
    from_feedback: Optional[str] = typer.Option(None, "--from-feedback", help="complaints | negative | any: rated "
                                                "calls, complaint-linked first."),
    from_run: Optional[str] = typer.Option(None, "--from-run", help="A replay run's cases."),
    flipped: bool = typer.Option(False, "--flipped", help="With --from-run: only the cases that went pass -> fail "
                                 "(the ones the gate found)."),
    trace: Optional[List[str]] = typer.Option(None, "--trace", help="Trace ids to add (repeatable)."),
    difficulty: Optional[str] = typer.Option(None, "--difficulty", help="easy | medium | hard | safety for the "
                                             "added cases."),
    message: str = MessageOpt, author: Optional[str] = AuthorOpt,
    dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Add production traces as cases (a new version): a filtered, stratified sample, rated calls, a run's
    (flipped) cases, or named traces. A trace already in the dataset is never added twice."""
    from exporters.vocabulary import parse_dimension
    from . import build
    from .capture import capture
    from .versions import add_cases
    with _errors():
        core.validate_name(name)
        modes = [m for m, on in (("--where/--since", bool(where) and not from_feedback),
                                 ("--from-feedback", bool(from_feedback)), ("--from-run", bool(from_run)),
                                 ("--trace", bool(trace))) if on]
        if len(modes) > 1:
            raise SpecError(f"choose one way to pick cases: {', '.join(modes)}")
        if flipped and not from_run:
            raise SpecError("--flipped goes with --from-run RUN_ID")
        if sample_n is not None and sample_n < 1:
            raise SpecError("--sample must be at least 1")
        keys = [parse_dimension(k, "by") for k in stratify.split(",") if k.strip()] or ["customer"]
        store, database = _open(dsn, config)
        exclude = _existing(store, name)
        author_ = _author(author)
        if trace:
            picked_ids, strict = list(dict.fromkeys(trace)), True
            already = sum(1 for t in picked_ids if t in exclude)
        else:
            s = build.slice_spec(where or [], since, sample_n=sample_n, stratify=keys, min_per_segment=min_per_segment,
                                 seed=seed)
            if from_run:
                sel = build.from_run(store, from_run, flipped=flipped, exclude=exclude)
                origin = "run"
            elif from_feedback:
                sel = build.from_feedback(store, s, from_feedback, exclude, database=database)
                origin = "feedback"
            else:
                sel = build.from_where(store, s, exclude)
                origin = "where"
            picked_ids, strict, already = [p.trace_id for p in sel.picked], False, sel.already
            for line in sel.notes:
                typer.echo(f"note: {line}", err=True)
            if not picked_ids and sel.already:
                raise core.NoChange(f"nothing new: the {sel.already} matching call(s) are all in {name!r} already; "
                                    "no new version")
            if not picked_ids:
                raise core.DatasetStoreError(f"nothing to add: {sel.matched} call(s) matched")
        fresh = [t for t in picked_ids if t not in exclude]
        if trace and not fresh:
            raise core.NoChange(f"nothing new: every named trace is already in {name!r}; no new version")
        caps, problems = capture(store, fresh, segment_by=keys, origin="trace" if trace else origin,
                                 added_by=author_)
        _problems(problems, strict=strict)
        result = add_cases(store, name, caps, message=message or _default_message(trace, from_feedback, from_run,
                                                                                 where), author=author_,
                           difficulty=difficulty or "")
    dups = already + len(result.duplicates)
    _made(result.version, f"added {len(result.added)} case(s)" + (f", {dups} already in it" if dups else ""))


def _default_message(trace: Any, feedback: Any, run: Any, where: Any) -> str:
    if trace:
        return f"add {len(trace)} trace(s)"
    if feedback:
        return f"add rated calls ({feedback})"
    if run:
        return f"add cases of run {run}"
    return "add " + (" ".join(where) if where else "production calls")


def _existing(store: Any, name: str) -> set[str]:
    try:
        return {c.trace_id for c in core.read_cases(store, core.history(store, name)[0])}
    except core.DatasetNotFound:
        return set()


@dataset_app.command("remove")
def remove_cmd(name: str = typer.Argument(...), traces: List[str] = typer.Argument(..., help="Trace ids."),
               force: bool = typer.Option(False, "--force", help="Also remove locked cases (needs --reason)."),
               reason: str = typer.Option("", "--reason", help="Why a locked case goes (kept in the log)."),
               message: str = MessageOpt, author: Optional[str] = AuthorOpt,
               dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """A new version without TRACES. A locked case goes only with --force and --reason, which the log keeps."""
    from .versions import remove_cases
    with _errors():
        store, _ = _open(dsn, config)
        msg = message or f"remove {len(traces)} case(s)"
        if force and reason:
            msg += f" (forced: {reason})"
        v = remove_cases(store, name, traces, message=msg, author=_author(author), force=force, reason=reason)
    _made(v, f"removed {len(set(traces))} case(s)")


@dataset_app.command("lock")
def lock_cmd(trace_id: str = typer.Argument(..., help="The fixed bug's trace id."),
             dataset: str = typer.Option(..., "--dataset", help="The dataset that keeps the lock."),
             expect: str = typer.Option("pass", "--expect", help="pass | fail: the outcome every candidate must "
                                        "keep."),
             note: str = typer.Option("", "--note", help="What the bug was (shown when the lock breaks)."),
             create: bool = typer.Option(False, "--create", help="Start the dataset with this lock when it does "
                                         "not exist yet (a mistyped name is refused otherwise)."),
             message: str = MessageOpt, author: Optional[str] = AuthorOpt,
             dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Turn a fixed bug's trace into a permanent case with its expected outcome: a locked case that does not keep
    it fails the gate as a regression, whatever the segment statistics."""
    from .capture import capture
    from .versions import lock_case
    with _errors():
        if expect not in core.EXPECTS:
            raise core.DatasetStoreError(f"--expect {expect!r}: pass or fail")
        store, _ = _open(dsn, config)
        if not create and core.validate_name(dataset) not in core.dataset_names(store):
            raise core.DatasetStoreError(f"{core.not_found(store, dataset)}; --create starts it with this lock")
        author_ = _author(author)
        item = None
        if trace_id not in _existing(store, core.validate_name(dataset)):
            caps, problems = capture(store, [trace_id], origin="lock", added_by=author_)
            _problems(problems, strict=True)
            item = caps[0]
        v = lock_case(store, dataset, item, trace_id, expect=expect, note=note, author=author_,
                      message=message or f"lock {trace_id} (expect {expect})" + (f": {note}" if note else ""))
    _made(v, f"locked {trace_id}: expect {expect}")


@dataset_app.command("label")
def label_cmd(name: str = typer.Argument(...), traces: List[str] = typer.Argument(..., help="Case trace ids."),
              passed: bool = typer.Option(False, "--pass", help="The human label: pass."),
              failed: bool = typer.Option(False, "--fail", help="The human label: fail."),
              label: Optional[str] = typer.Option(None, "--label", help="pass | fail (same as --pass / --fail)."),
              critique: str = typer.Option("", "--critique", help="Why: the nuance a binary label leaves out."),
              labeller: Optional[str] = typer.Option(None, "--labeller", help="Who labelled (default: the author)."),
              adjudicated: bool = typer.Option(False, "--adjudicated", help="The adjudicator's call on a contested "
                                               "case."),
              message: str = MessageOpt, author: Optional[str] = AuthorOpt,
              dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Label cases pass or fail with a critique (a new version)."""
    from .versions import label_cases
    with _errors():
        given = [v for v, on in (("pass", passed), ("fail", failed), (label, label is not None)) if on]
        if len(given) != 1:  # --pass --fail was the last one silently, as a click flag pair
            raise core.DatasetStoreError("give the label once: --pass, --fail or --label pass|fail")
        value = given[0]
        if value not in core.LABELS:
            raise core.DatasetStoreError(f"bad label {value!r}: a label is pass or fail (binary; the nuance goes in "
                                         "--critique)")
        store, _ = _open(dsn, config)
        author_ = _author(author)
        v = label_cases(store, name, traces, label=value, critique=critique, labeller=labeller or author_,
                        adjudicated=adjudicated, author=author_,
                        message=message or f"label {len(traces)} case(s) {value}")
    _made(v, f"labelled {len(traces)} case(s) {value}")


@dataset_app.command("difficulty")
def difficulty_cmd(name: str = typer.Argument(...),
                   traces: Optional[List[str]] = typer.Argument(None, help="Case trace ids (with --set)."),
                   set_: Optional[str] = typer.Option(None, "--set", help="easy | medium | hard | safety."),
                   propose: bool = typer.Option(False, "--propose", help="Propose from the cases' recent runs."),
                   apply: bool = typer.Option(False, "--apply", help="With --propose: make the version."),
                   runs: int = typer.Option(10, "--runs", help="Recent runs per case to look at."),
                   message: str = MessageOpt, author: Optional[str] = AuthorOpt,
                   dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Set cases' difficulty by hand, or propose it from history: every recent run passes -> easy, it flips ->
    medium, it usually fails -> hard."""
    from .design import propose_difficulty, run_history
    from .versions import set_difficulty
    with _errors():
        if (set_ is None) == (not propose):
            raise core.DatasetStoreError("give --set DIFFICULTY TRACE..., or --propose")
        store, _ = _open(dsn, config)
        if set_ is not None:
            if not traces:
                raise core.DatasetStoreError("--set needs the trace ids of the cases")
            v = set_difficulty(store, name, {t: set_ for t in traces}, source="hand", author=_author(author),
                               message=message or f"difficulty {set_} for {len(traces)} case(s)")
            _made(v, f"set {len(traces)} case(s) {set_}")
            return
        version = core.get_version(store, name)
        cases = core.read_cases(store, version)
        ids = [c.trace_id for c in cases if c.difficulty_source != "hand" and (not traces or c.trace_id in traces)]
        proposals = propose_difficulty(run_history(store, ids, runs=runs))
        current = {c.trace_id: c.difficulty for c in cases}
        for t, (d, why) in proposals.items():
            typer.echo(f"{t}\t{current.get(t) or '-'} -> {d}\t{why}")
        typer.echo(f"{len(proposals)} of {len(ids)} case(s) have enough history", err=True)
        if apply and proposals:
            v = set_difficulty(store, name, {t: d for t, (d, _) in proposals.items()}, source="history",
                               author=_author(author), message=message or "difficulty proposed from run history")
            _made(v, f"difficulty of {len(proposals)} case(s) from history")


@dataset_app.command("targets")
def targets_cmd(name: str = typer.Argument(...),
                target: Optional[List[str]] = typer.Option(None, "--target", help="'FILTERS: N', e.g. "
                                                           "'intent=refund,tag.tier=enterprise: 30' (repeatable)."),
                mix: Optional[str] = typer.Option(None, "--mix", help="easy=0.4,medium=0.3,hard=0.2,safety=0.1"),
                clear: bool = typer.Option(False, "--clear", help="Drop the existing targets first."),
                message: str = MessageOpt, author: Optional[str] = AuthorOpt,
                dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Declare coverage targets per slice (any filter) and a difficulty mix (a new version)."""
    from .design import known_tag_keys, parse_mix, parse_target
    from .versions import set_targets
    with _errors():
        if not target and mix is None and not clear:
            raise core.DatasetStoreError("give --target 'FILTERS: N', --mix or --clear")
        store, _ = _open(dsn, config)
        latest = core.get_version(store, name)
        tags = known_tag_keys(store, core.read_cases(store, latest)) if target else set()
        new = [parse_target(t, tags) for t in target or []]
        old = {} if clear else dict(latest.targets)
        slices = {tuple(t["filters"]): t for t in old.get("slices", [])}
        slices.update({tuple(t["filters"]): t for t in new})
        targets = {"slices": list(slices.values())} if slices else {}
        m = parse_mix(mix) if mix is not None else old.get("mix")
        if m:
            targets["mix"] = m
        v = set_targets(store, name, targets, author=_author(author), message=message or "coverage targets")
    _made(v, f"{len(targets.get('slices', []))} slice target(s)" + (", difficulty mix" if m else ""))


@dataset_app.command("coverage")
def dataset_coverage_cmd(ref: str = typer.Argument(...),
                         since: str = typer.Option("30d", "--since", help="Production window to compare with."),
                         as_json: bool = JsonOpt, dsn: Optional[str] = DsnOpt,
                         config: Optional[Path] = ConfigOpt) -> None:
    """Target vs have per slice and per difficulty, and what production holds for each slice (calls, failure
    rate, complaints) to draw from."""
    from exporters.vocabulary import parse_window
    from .design import dataset_coverage
    with _errors():
        window = parse_window(since)
        store, database = _open(dsn, config)
        v = core.get_version(store, ref)
        report = dataset_coverage(store, v, core.read_cases(store, v), window, database=database)
    if as_json:
        return _json_out(report.to_dict())
    typer.echo(f"{report.ref}: {report.cases} case(s); production over the last {since}")
    if report.slices:
        _print_table("slices: target vs have", ["slice", "target", "have", "missing", "calls", "failure rate",
                                                "complaints"],
                     [[",".join(s.filters), str(s.target), str(s.have), str(s.missing), str(s.production["calls"]),
                       _pct(s.production["errors"], s.production["calls"]), str(s.production["complaints"])]
                      for s in report.slices])
    else:
        typer.echo("no slice targets (tagway dataset targets NAME --target 'FILTERS: N')")
    _print_table("difficulty: target vs have", ["difficulty", "share", "target", "have"],
                 [[m.difficulty, "-" if m.share is None else f"{m.share:.0%}", "-" if m.target is None else
                   str(m.target), str(m.have)] for m in report.mix] + [["(not set)", "", "", str(report.unset)]])


def _pct(k: int, n: int) -> str:
    return "-" if not n else f"{k / n:.1%}"


# -- the coverage map ---------------------------------------------------------------------------------------------
def coverage_cmd(by: Optional[List[str]] = typer.Option(None, "--by", help="Slice dimensions (repeatable)."),
                 dataset: Optional[List[str]] = typer.Option(None, "--dataset", help="Datasets whose cases count "
                                                             "(default: all; their latest versions)."),
                 since: str = typer.Option("30d", "--since"),
                 where: Optional[List[str]] = typer.Option(None, "--where", help="key=value, as tagway stats."),
                 top: int = typer.Option(50, "--top", help="Slices to show (the JSON has them all)."),
                 as_json: bool = JsonOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Where production fails or complains and the datasets have no (or too few) cases: per slice, calls, failure
    rate, complaint rate, the cases covering it and their target, gaps first. Only calls that reached an upstream
    count: calls the gateway refused itself (a wrong key, a bad request, a rate limit) are in `tagway errors`."""
    from exporters.coverage import coverage_map
    from exporters.queries import make_selection, parse_by
    with _errors():
        if top < 1:
            raise SpecError("--top must be at least 1")
        sel = make_selection(where or [], None, since)
        dims = parse_by(by)
        store, database = _open(dsn, config)
        m = coverage_map(store, sel, dims, datasets=dataset or None, database=database)
    if as_json:
        return _json_out(m.to_dict())
    _print_table(f"coverage by {', '.join(dims)}, last {since}, against {', '.join(m.datasets) or 'no dataset'}: "
                 f"{len(m.gaps)} gap(s)",
                 [*dims, "calls", "failure rate", "complaint rate", "cases", "target", ""],
                 [[*(s.key[k] or "(none)" for k in dims), str(s.calls), _pct(s.errors, s.calls),
                   _pct(s.complaints, s.calls), str(s.cases), "-" if s.target is None else str(s.target),
                   f"GAP: {s.missing} case(s) missing" if s.gap else ""] for s in m.slices[:top]])
    if len(m.slices) > top:
        typer.echo(f"... {len(m.slices) - top} more slice(s) (--top, --json)")


from . import populate_cli  # noqa: E402,F401 - adds `dataset auto-populate` and `dataset populate` to dataset_app
