"""`tagway stats`, `tagway errors`, `tagway show`: which tenant / intent / prompt version is failing, from the terminal.

`register(app)` adds the commands to the main `tagway` Typer app. They all go through exporters.queries (the same
numbers as the stats API and the dashboard page). Bad input is one line on stderr and exit code 2; a store that a
running gateway holds (embedded chDB allows one process per data directory) is also exit 2, with the way around.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from typing import Annotated, Any, Callable, Optional

import orjson
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from exporters import queries as q
from exporters.dsn import DsnConfigError, default_dsn as _default_dsn, resolve_dsn as _resolve
from exporters.dirlock import holder_pid
from exporters.discovery import DiscoveryError
from exporters.remote_store import StoreGoneError
from exporters.store import LOCK_FILE, DsnError, Store, StoreError, StoreLockedError, chdb_path, redact_dsn
from exporters.store_access import MissingStoreError, open_store
from exporters.vocabulary import COLUMNS, NON_PRODUCTION_SOURCES

from exporters.tables import Col, Row, fit_table, fmt_usd, hidden_notice

__all__ = ["register", "resolve_dsn", "default_dsn", "fmt_rate", "fmt_ci", "fmt_delta"]

EXIT_BAD_INPUT = 2
EXIT_STORE = 1
EXIT_GONE = 3  # the gateway serving the store stopped mid-command


class _CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


# -- formatting (the page's ui.js formats rates the same way) ---------------------------------------------------
def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def fmt_ci(low: float, high: float) -> str:
    return f"{low * 100:.1f}-{high * 100:.1f}%"


def fmt_delta(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f} pp"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_cost(x: float | None) -> str:
    """$12.34 from a dollar up, two significant digits under it ($0.000027): never $0 for a cost that is not zero.
    The same in the replay reports (exporters.tables.fmt_usd); --json and --csv keep the exact numbers."""
    return fmt_usd(x)


def _label(value: str) -> str:
    return value if value != "" else "(none)"


def _text(value: Any, style: str = "") -> Text:
    """A Rich cell or title from data (filter values, recorded tags, error types, trace ids): a Text is never
    parsed for [markup] or :emoji: codes, so '[/]' is printed as typed instead of raising MarkupError."""
    return Text(str(value), style=style)


def _filters_line(sel: q.Selection) -> str:
    """'where k=v  status=error  source not replay, replay-judge' (empty when nothing narrows the rows)."""
    parts = [str(f) for f in sel.filters]
    if sel.status:
        parts.append(f"status={sel.status}")
    if sel.sources_excluded:
        parts.append(f"source not {', '.join(sel.sources_excluded)}")
    return "\nwhere " + "  ".join(parts) if parts else ""


# -- DSN and store ---------------------------------------------------------------------------------------------
def resolve_dsn(dsn: str | None = None, config: str | None = None) -> tuple[str, str]:
    """(dsn, database): --dsn, else $TAGWAY_DSN, else the gateway config (--config / $TAGWAY_CONFIG), else the
    embedded default next to the current directory (exporters.dsn, shared with `tagway replay`)."""
    try:
        r = _resolve(dsn, config)
    except DsnConfigError as e:
        raise _CliError(f"config: {e}") from None
    return r.dsn, r.database


def default_dsn() -> str:
    return _default_dsn()


def _open_store(dsn: str) -> Store:
    # the driver logs a connection failure as a warning before raising it: the error line below says it once
    logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)
    try:
        return open_store(dsn)  # through the running gateway when one serves this store (exporters.store_access)
    except (DiscoveryError, DsnError, MissingStoreError) as e:
        raise _CliError(str(e)) from None
    except StoreGoneError as e:
        raise _CliError(str(e), EXIT_GONE) from None
    except StoreLockedError:
        pid = holder_pid(chdb_path(dsn), LOCK_FILE)
        raise _CliError(
            f"the embedded store {redact_dsn(dsn)} is in use by another process{f' (pid {pid})' if pid else ''} that "
            "has not announced itself (chDB allows one process per data directory; a serving gateway writes its "
            "discovery file again within 2 s: retry): query through the gateway's HTTP API (GET /admin/stats with "
            "the admin key, or the /ui page) or use a ClickHouse server DSN") from None
    except StoreError as e:
        raise _CliError(str(e), EXIT_STORE) from None


def _store_message(e: StoreError, dsn: str) -> str:
    text = str(e)
    if "UNKNOWN_TABLE" in text or "Unknown table" in text or "does not exist" in text:
        return f"no llm_calls table in {redact_dsn(dsn)}: run `tagway db migrate` (or start the gateway) first"
    return f"query failed: {text}"


def _run(fn: Callable[[], None]) -> None:
    """Run a command body; every expected failure becomes one line on stderr and an exit code."""
    try:
        fn()
    except q.QueryInputError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except _CliError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.code) from None


def _with_store(dsn: str | None, config: str | None, body: Callable[[Store, str, str], None]) -> None:
    resolved, database = resolve_dsn(dsn, config)
    store = _open_store(resolved)
    try:
        body(store, resolved, database)
    except StoreGoneError as e:
        raise _CliError(f"{e} during the query", EXIT_GONE) from None
    except StoreError as e:
        raise _CliError(_store_message(e, resolved), EXIT_STORE) from None
    finally:
        store.close()


def _console(wide: bool = False) -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if wide or not console.is_terminal:  # --wide, or piped / captured: don't squeeze the table into the terminal
        console = Console(highlight=False, width=max(console.width, 250))
    return console


def _json_out(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- options shared by the commands ----------------------------------------------------------------------------
WhereOpt = Annotated[Optional[list[str]], typer.Option(
    "--where", "-w", help="Filter key=value (or key!=value) on a column or tag.<key>; repeat to AND. Replayed, "
                          f"judge and shadow calls (source {', '.join(NON_PRODUCTION_SOURCES)}) are left out unless a "
                          "filter names source, e.g. --where source=replay.")]
StatusOpt = Annotated[Optional[str], typer.Option("--status", help="Only calls with this status: ok, error, cancelled.")]
SinceOpt = Annotated[Optional[str], typer.Option("--since", help="Window back from now: a number and a unit s, m, h, d "
                                                                 "or w, e.g. 90s, 15m, 1.5h, 7d (default 24h).")]
FromOpt = Annotated[Optional[str], typer.Option("--from", help="Window start, ISO time (UTC unless it says).")]
ToOpt = Annotated[Optional[str], typer.Option("--to", help="Window end, ISO time (default now).")]
DsnOpt = Annotated[Optional[str], typer.Option("--dsn", help="ClickHouse DSN (default $TAGWAY_DSN, the config's store, "
                                                             "or the embedded store in ./tagway-data).")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="Gateway config file (default $TAGWAY_CONFIG).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for programs.")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column, however wide the terminal (by default columns "
                                                      "that do not fit are left out, never cut).")]


def _window_title(sel: q.Selection, since: str | None, from_: str | None) -> str:
    w = sel.window
    span = f"last {since or '24h'}" if not from_ else "window"
    return f"{span} ({w.start:%Y-%m-%d %H:%M} to {w.end:%Y-%m-%d %H:%M} UTC)"


# -- tagway stats ----------------------------------------------------------------------------------------------
def stats_command(
    by: Annotated[Optional[list[str]], typer.Option(
        "--by", "-b", help=f"Group by a column ({', '.join(COLUMNS)}), applied_tag (a tag rules or people "
                     "applied to the call or its session) or tag.<key>; repeat.")] = None,
    where: WhereOpt = None,
    status: StatusOpt = None,
    since: SinceOpt = None,
    from_: FromOpt = None,
    to: ToOpt = None,
    compare: Annotated[bool, typer.Option("--compare", help="Compare with the previous window of the same length.")] = False,
    min_calls: Annotated[int, typer.Option("--min-calls", help="Flag segments with fewer calls as low confidence.")] = 20,
    limit: Annotated[int, typer.Option("--limit", help="At most this many segments.")] = 500,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    wide: WideOpt = False,
    dsn: DsnOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Error rate per segment (worst first) with 95% Wilson intervals, latency, tokens and cost.

    Replayed, judge and shadow calls (non-production sources) are left out unless --where filters on source
    (--where source=replay shows them); --json lists what was left out in sources_excluded."""

    def body() -> None:
        if as_json and as_csv:
            raise _CliError("choose one of --json and --csv")
        keys = q.parse_by(by)
        sel = q.make_selection(where, status, since, from_, to)
        if min_calls < 0:
            raise q.QueryInputError("--min-calls must be >= 0")
        if not 1 <= limit <= 10_000:
            raise q.QueryInputError("--limit must be between 1 and 10000")

        def query(store: Store, resolved: str, database: str) -> None:
            report = q.segment_stats(store, sel, keys, compare=compare, min_calls=min_calls, limit=limit,
                                     database=database)
            if as_json:
                _json_out(report.to_dict())
            elif as_csv:
                sys.stdout.write(stats_csv(report))
            else:
                console = _console(wide)
                print_stats(report, console, _window_title(sel, since, from_), wide)
                if not report.segments:
                    _say_hints(console, store, sel, database)

        _with_store(dsn, config, query)

    _run(body)


def stats_csv(report: q.StatsReport) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = list(report.by) + ["calls", "errors", "cancelled", "error_rate", "ci_low", "ci_high", "low_confidence",
                              "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "input_tokens",
                              "output_tokens", "cost_usd", "complaints", "complaint_rate", "rated", "feedback_score"]
    if report.compare:
        head += ["prev_calls", "prev_errors", "prev_error_rate", "delta_error_rate"]
    w.writerow(head)

    def num(x: float | None) -> str:
        return "" if x is None else repr(x)

    for s in report.segments:
        low, high = s.error_rate_ci
        row = [s.key[k] for k in report.by] + [
            s.calls, s.errors, s.cancelled, repr(s.error_rate), repr(low), repr(high), str(s.low_confidence).lower(),
            num(s.latency_p50), num(s.latency_p95), num(s.latency_p99), num(s.ttft_p50), s.input_tokens,
            s.output_tokens, repr(s.cost_usd), s.complaints, repr(s.complaint_rate), s.rated, num(s.feedback_score)]
        if report.compare:
            row += [s.prev_calls, s.prev_errors, num(s.prev_error_rate), num(s.delta_error_rate)]
        w.writerow(row)
    return buf.getvalue()


def _customers(g: q.ErrorGroup) -> str:
    """Who has the errors: '3: initech, acme, globex', '5: initech, acme, globex +2'."""
    if not g.customers:
        return "0"
    more = g.customers - len(g.top_customers)
    return f"{g.customers}: {', '.join(g.top_customers)}" + (f" +{more}" if more > 0 else "")


def _say_hints(console: Console, store: Store, sel: q.Selection, database: str) -> None:
    """After an empty answer: a filter value no call has, and the recorded values closest to it."""
    for hint in q.filter_hints(store, sel, database):
        console.print(hint, style="yellow", markup=False)


def _score(score: float | None, rated: int) -> str:
    return "-" if score is None else f"{score:.2f} (n={rated:,})"


def print_stats(report: q.StatsReport, console: Console, window_title: str, wide: bool = False) -> None:
    title = _text(f"Error rate by {', '.join(report.by)}, {window_title}{_filters_line(report.selection)}",
                  "table.title")
    # what stays when the terminal is narrow: the segment, calls, errors, the rate (and its change); then the CI,
    # p50 and the note; latency tails, tokens and cost go first
    cols = [Col(k, "left", wrap=True, min_width=16) for k in report.by]
    cols += [Col("calls"), Col("errors"), Col("error rate"), Col("95% CI", priority=8)]
    if report.compare:
        cols += [Col("prev rate", priority=5), Col("delta")]
    cols += [Col("p50 ms", priority=7), Col("p95 ms", priority=4), Col("p99 ms", priority=6),
             Col("ttft p50", priority=2), Col("tok in", priority=1), Col("tok out", priority=1),
             Col("cost", priority=3)]
    rated = bool(report.total.complaints or report.total.rated)  # feedback columns only when there is feedback
    if rated:
        cols += [Col("complaints", priority=8), Col("score", priority=7)]
    cols += [Col("note", "left", priority=9, wrap=True)]
    rows: list[Row] = []
    for s in report.segments:
        low, high = s.error_rate_ci
        rate_style = "bold red" if s.error_rate >= 0.10 and not s.low_confidence else (
            "yellow" if s.error_rate >= 0.02 and not s.low_confidence else "")
        cells: list[Any] = [_text(_label(s.key[k])) for k in report.by]
        cells += [f"{s.calls:,}", f"{s.errors:,}", Text(fmt_rate(s.error_rate), style=rate_style), fmt_ci(low, high)]
        if report.compare:
            d = s.delta_error_rate
            cells += [fmt_rate(s.prev_error_rate),
                      Text(fmt_delta(d), style="red" if d is not None and d > 0.005 else
                           ("green" if d is not None and d < -0.005 else ""))]
        cells += [fmt_ms(s.latency_p50), fmt_ms(s.latency_p95), fmt_ms(s.latency_p99), fmt_ms(s.ttft_p50),
                  f"{s.input_tokens:,}", f"{s.output_tokens:,}", fmt_cost(s.cost_usd)]
        if rated:
            cells += [f"{s.complaints:,} ({fmt_rate(s.complaint_rate)})", _score(s.feedback_score, s.rated)]
        cells += [Text(f"low n (<{report.min_calls})", style="dim") if s.low_confidence else ""]
        rows.append(Row(cells, "dim" if s.low_confidence else None))
    t = report.total
    low, high = t.error_rate_ci
    total_cells: list[Any] = ["all"] + [""] * (len(report.by) - 1)
    total_cells += [f"{t.calls:,}", f"{t.errors:,}", fmt_rate(t.error_rate), fmt_ci(low, high)]
    if report.compare:
        total_cells += [fmt_rate(t.prev_error_rate), fmt_delta(t.delta_error_rate)]
    total_cells += ["", "", "", "", f"{t.input_tokens:,}", f"{t.output_tokens:,}", fmt_cost(t.cost_usd)]
    if rated:
        total_cells += [f"{t.complaints:,} ({fmt_rate(t.complaint_rate)})", _score(t.feedback_score, t.rated)]
    total_cells += [""]
    if report.segments:
        rows.append(Row(total_cells, "bold", section=True))
    table, hidden = fit_table(console, cols, rows, wide=wide, title=title, title_justify="left",
                              header_style="bold", show_footer=False)
    console.print(table)
    _say_hidden(console, hidden)
    if not report.segments:
        console.print("no calls match this window and these filters")
    flagged = sum(1 for s in report.segments if s.low_confidence)
    if flagged:
        console.print(f"{flagged} segment(s) under --min-calls {report.min_calls} are flagged 'low n' (low confidence).",
                      style="dim")
    if report.gone:
        shown = ", ".join(f"{' / '.join(_label(v) for v in g['key'].values())} ({g['prev_calls']:,} calls, "
                          f"{g['prev_errors']:,} errors)" for g in report.gone[:10])
        more = f" and {len(report.gone) - 10} more (--json lists them)" if len(report.gone) > 10 else ""
        console.print(f"no calls in this window, {len(report.gone)} segment(s) with calls in the previous one: "
                      f"{shown}{more}", markup=False)
    if report.truncated:
        console.print(f"only the first {len(report.segments)} segments are shown (--limit).", style="dim")
    for line in untagged_notes(report):
        console.print(line, style="dim", markup=False)


def untagged_notes(report: Any) -> list[str]:
    """A `tag.KEY` dimension no call in the window carries: KEY may be a tag that tag rules or people applied after
    the fact, which is `applied_tag`, not a call's own tag (every call then sat under "(none)" without a word)."""
    out = []
    for k in report.by:
        if (k.startswith("tag.") and report.segments and not report.truncated  # --limit may hide the carriers
                and not any(s.key.get(k) for s in report.segments)):
            key = k[len("tag."):]
            out.append(f"no call here carries the tag {key!r} (every call is under (none)); a tag applied by tag "
                       f"rules or people is --by applied_tag or --where applied_tag={key}")
    return out


def _say_hidden(console: Console, hidden: list[str]) -> None:
    if hidden:
        console.print(hidden_notice(console, hidden), style="dim", markup=False)


# -- tagway errors ---------------------------------------------------------------------------------------------
def errors_command(
    where: WhereOpt = None,
    status: StatusOpt = None,
    since: SinceOpt = None,
    from_: FromOpt = None,
    to: ToOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many error types.")] = 10,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
    dsn: DsnOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Top error types for the filters, with example trace ids (see `tagway show TRACE_ID`)."""

    def body() -> None:
        sel = q.make_selection(where, status, since, from_, to)
        if not 1 <= limit <= 1000:
            raise q.QueryInputError("--limit must be between 1 and 1000")

        def query(store: Store, resolved: str, database: str) -> None:
            report = q.top_errors(store, sel, limit=limit, database=database)
            if as_json:
                _json_out(report.to_dict())
                return
            console = _console(wide)
            title = _text(f"Top error types, {_window_title(sel, since, from_)}{_filters_line(sel)}", "table.title")
            cols = [Col("error type", "left", wrap=True, min_width=16), Col("count"), Col("share", priority=5),
                    Col("http", "left", priority=4), Col("customers", "left", wrap=True, priority=3),
                    Col("first seen", "left", priority=1), Col("last seen", "left", priority=2),
                    Col("example trace ids", "left", wrap=True)]
            rows = [Row([_text(_label(g.error_type)), f"{g.count:,}", fmt_rate(g.share),
                         ",".join(str(s) for s in g.http_statuses) or "-", _text(_customers(g)),
                         _text(g.first_seen[:19].replace("T", " ")), _text(g.last_seen[:19].replace("T", " ")),
                         _text(" ".join(g.example_trace_ids))])
                    for g in report.groups]
            table, hidden = fit_table(console, cols, rows, wide=wide, title=title, title_justify="left",
                                      header_style="bold")
            console.print(table)
            _say_hidden(console, hidden)
            types, calls = report.omitted
            if types > 0:
                console.print(f"... and {types:,} more error type(s) with {calls:,} call(s) (--limit {limit}: "
                              f"raise it to list them)")
            if not report.groups:
                console.print(f"no {sel.status or 'error'} calls match this window and these filters")
                _say_hints(console, store, sel, database)

        _with_store(dsn, config, query)

    _run(body)


# -- tagway show -----------------------------------------------------------------------------------------------
def show_command(
    trace_id: Annotated[str, typer.Argument(help="The trace id of the call (from `tagway errors` or a span).")],
    cases: Annotated[bool, typer.Option("--cases", help="Also every replay result for this call across runs "
                                                        "(outputs, verdicts and reasons, judge version, diff).")] = False,
    as_json: JsonOpt = False,
    dsn: DsnOpt = None,
    config: ConfigOpt = None,
) -> None:
    """One call: tags, timings, tokens, cost, and the request/response when content capture was on."""

    def body() -> None:
        q.parse_trace_id(trace_id)  # bad input fails before a store is opened

        def query(store: Store, resolved: str, database: str) -> None:
            if cases:
                return show_case(store, resolved, database)
            from exporters.calls import call_detail  # noqa: PLC0415
            # the call's columns plus what only its spans hold (the error message, each fallback attempt), as
            # GET /admin/calls/{trace_id} answers
            call = call_detail(store, trace_id, database=database)
            if call is None:
                raise _CliError(f"no call with trace id {trace_id.strip()!r} in {redact_dsn(resolved)}")
            if as_json:
                _json_out(call)
            else:
                print_call(call, _console())

        def show_case(store: Store, resolved: str, database: str) -> None:
            from exporters.cases import case_view  # noqa: PLC0415

            from .case_cli import print_case  # noqa: PLC0415
            view = case_view(store, trace_id, database=database)
            if view is None:
                raise _CliError(f"no call with trace id {trace_id.strip()!r} in {redact_dsn(resolved)}")
            if as_json:
                _json_out(view)
            else:
                print_case(view, _console(), print_call)

        _with_store(dsn, config, query)

    _run(body)


def _pretty_json(text: str) -> str:
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return text


def print_call(call: dict[str, Any], console: Console) -> None:
    status = call.get("status", "")
    style = {"ok": "green", "error": "bold red", "cancelled": "yellow"}.get(status, "")
    table = Table(show_header=False, box=None, pad_edge=False, title=_text(f"call {call.get('trace_id')}", "bold"),
                  title_justify="left", title_style="bold")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")

    def row(name: str, value: Any, style: str = "") -> None:
        if value in (None, "", {}, []):
            return
        table.add_row(name, _text(value, style))

    row("time", call.get("Timestamp"))
    row("span id", call.get("span_id"))
    row("status", status + (f"  ({call['error_type']})" if call.get("error_type") else ""), style)
    row("message", call.get("error_message"))
    row("http status", call.get("http_status") or None)
    row("customer", call.get("customer"))
    row("intent", call.get("intent"))
    row("prompt version", call.get("prompt_version"))
    tags = call.get("tags") or {}
    row("tags", "  ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    row("operation", call.get("operation"))
    row("model", call.get("model_requested"))
    if call.get("model_served") and call.get("model_served") != call.get("model_requested"):
        row("model served", call.get("model_served"))
    row("provider", call.get("provider"))
    row("deployment", call.get("deployment"))
    row("attempts", call.get("attempts") or None)
    for a in call.get("attempts_detail") or ():  # a fallback call: what each upstream try hit
        outcome = f"{a['http_status'] or '-'} {a['error_type']}".strip() if a["status"] == "error" else \
            f"{a['http_status'] or 'ok'}"
        row(f"  attempt {a['attempt']}", f"{a['deployment']} ({a['provider']} {a['model']}): {outcome}, "
            f"{a['duration_ms']:,.1f} ms", "red" if a["status"] == "error" else "")
    for key, name, why in (("deployments_cooling", "passed over", "cooling down after failures: sent on to its "
                                                                   "fallback"),
                           ("fallbacks_skipped", "fallbacks skipped", "this customer may not use them")):
        names = call.get(key)
        row(name, f"{', '.join(names)} ({why})" if names else None)
    row("stream", "yes" if call.get("stream") else "no")
    row("latency", f"{call['latency_ms']:,.1f} ms" if call.get("latency_ms") is not None else None)
    row("time to first token", f"{call['ttft_ms']:,.1f} ms" if call.get("ttft_ms") is not None else None)
    row("tokens", f"{call.get('input_tokens', 0):,} in / {call.get('output_tokens', 0):,} out"
        + (" (estimated: the stream gave no count of its own)" if call.get("usage_estimated") else ""))
    row("cost", _call_cost(call), "" if call.get("cost_known", True) else "dim")
    row("finish reasons", call.get("finish_reasons"))
    row("source", call.get("source"))
    row("key id", call.get("key_id"))
    row("end user", call.get("end_user"))
    if call.get("client_disconnected"):
        row("client disconnected", "yes")
    row("replay run", call.get("replay_run_id"))
    row("replay candidate", call.get("replay_candidate"))
    row("replay case", call.get("replay_case_id"))
    console.print(table)
    for name, key in (("system instructions", "system_instructions"), ("request", "request_json"),
                      ("request parameters", "request_params"), ("response", "response_json")):
        if call.get(key):
            console.print(Text(name, style="bold"))
            console.print(Text(_pretty_json(call[key])))
    if not call.get("request_json") and not call.get("response_json"):
        console.print(Text("content not captured for this call", style="dim"))


def _call_cost(call: dict[str, Any]) -> str:
    """The call's cost, or why it has none: the gateway records no cost for a model without a price, nor for a
    call without token usage (most failed calls); llm_calls stores 0 for both (exporters.calls.call_detail tells
    them from a real $0 by the call's span)."""
    if call.get("cost_known", True):
        return fmt_cost(call.get("cost_usd") or 0.0)
    used = call.get("input_tokens") or call.get("output_tokens")
    return "unknown (no price for this model)" if used else "unknown (no token usage recorded)"


# -- wiring ----------------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add `stats`, `errors` and `show` to the main `tagway` CLI."""
    app.command("stats")(stats_command)
    app.command("errors")(errors_command)
    app.command("show")(show_command)
