"""The vocabulary of `llm_calls`: the words every entry point (`tagway stats`, the stats API, replay slices and
specs, the gateway's source marks) uses for the columns a user may group or filter by, `tag.<key>`, durations and
windows, filters and source names. Defined once here so that what one entry point rejects, all reject with the
same one-line message (`QueryInputError`, with `param` naming the input at fault).

Durations: a number (decimals allowed) and a unit, s m h d w: `90s`, `15m`, `1.5h`, `7d`, `2w`; longer than zero,
at most MAX_WINDOW. Filters: `key=value` or `key!=value`, the key a column name or `tag.<key>`.

Names and values reach SQL only as server-side parameters (`{name:Type}` placeholders, see `Params`): a key is
looked up in COLUMNS or, for `tag.<key>`, checked against TAG_KEY_RE and bound as `tags[{k0:String}]`.

`applied_tag` is the tags rules and people put on a call or its session after the fact (exporters.tagstate): a
filter `applied_tag=<name>` keeps the calls that carry it now, on themselves or on their session; grouping by it
gives each tag its own row (a call with two tags counts in both, one with none under "").
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
from typing import Any, Iterable

from .tagstate import TagInputError, has_tag_condition, validate_tag_name

__all__ = [
    "QueryInputError", "COLUMNS", "TAG_PREFIX", "APPLIED_TAG", "TAG_KEY_RE", "STATUSES", "PRODUCTION_SOURCE",
    "REPLAY_SOURCE", "JUDGE_SOURCE", "SHADOW_SOURCE", "NON_PRODUCTION_SOURCES", "REDACTED_MARK", "TRUNCATED_MARK",
    "MAX_WINDOW", "MAX_VALUE_LEN", "Window",
    "Filter", "Params", "show", "iso_utc", "validate_tag_key", "parse_duration", "parse_time", "parse_window",
    "parse_dimension", "parse_filter", "parse_filters", "column_expr", "filter_condition", "normalise",
    "NORMALISED_LEN", "NORMALISED_COLUMNS", "normalise_tag_key",
]

# Group-by / filter names -> llm_calls columns. `model` is what the client asked for (model_requested).
COLUMNS: dict[str, str] = {
    "customer": "customer",
    "intent": "intent",
    "prompt_version": "prompt_version",
    "model": "model_requested",
    "model_served": "model_served",
    "provider": "provider",
    "operation": "operation",
    "status": "status",
    "error_type": "error_type",
    "source": "source",
    "key_id": "key_id",
    "stream": "stream",
    "session_id": "session_id",  # x-tagway-session-id / metadata.session_id (a session is per customer)
}
TAG_PREFIX = "tag."
APPLIED_TAG = "applied_tag"  # a tag applied to the call or its session (exporters.tagstate), not a column
TAG_KEY_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
STATUSES = ("ok", "error", "cancelled")

# `tagway.source` values. Calls that are not production traffic carry a source from NON_PRODUCTION_SOURCES: stats
# and replay slices leave them out unless a filter names `source`, and only keys that may speak for other customers
# may set them. A new kind is one more name here.
PRODUCTION_SOURCE = "production"
REPLAY_SOURCE = "replay"  # the replay runner's candidate calls
JUDGE_SOURCE = "replay-judge"  # its LLM judge's calls
SHADOW_SOURCE = "shadow"  # copies of sampled live calls sent to a candidate by the gateway (gateway/shadow.py)
NON_PRODUCTION_SOURCES: tuple[str, ...] = (REPLAY_SOURCE, JUDGE_SOURCE, SHADOW_SOURCE)

# What the gateway's redaction and content cap write into captured text (gateway/redact.py builds its replacements
# from these): recorded content that holds one is not what the client was sent.
REDACTED_MARK = "[REDACTED"
TRUNCATED_MARK = "[truncated by tagway:"

MAX_WINDOW = dt.timedelta(days=400)
MAX_VALUE_LEN = 1024
NORMALISED_LEN = 128  # what the gateway keeps of a customer, intent, prompt version, source or tag value
_NOT_NORMAL = re.compile(r"[^a-z0-9_.-]+")
# columns whose values the gateway records normalised (gateway/tags.py); tag values are too
NORMALISED_COLUMNS = ("customer", "intent", "prompt_version", "source")


def normalise(value: str) -> str:
    """Lower-case, and every run of characters outside [a-z0-9_.-] becomes one '_' ('Refund Flow' -> 'refund_flow'):
    how the gateway records names and tag values, and so how filters on them are read."""
    # bounded work whatever the input's size: a 1 MB value costs what 512 characters cost
    value = value[:4 * NORMALISED_LEN]
    # A gateway normalises the same few intents, versions and tag values on every call (~7 a call): remembered,
    # each is one lookup instead of four string passes and a regex (~2.5 us -> ~0.1 us).
    return _normalise_cached(value) if len(value) <= _CACHED_LEN else _normalise(value)


def _normalise(value: str) -> str:
    return _NOT_NORMAL.sub("_", value.strip().lower()).strip("_")[:NORMALISED_LEN]


_CACHED_LEN = 160  # longer values are rare (free text in metadata) and not kept: the cache holds ~2-4 MB at most
_normalise_cached = functools.lru_cache(maxsize=4096)(_normalise)


def normalise_tag_key(key: str) -> str:
    """Tag keys additionally use '_' for '-', so `prompt-version`, `Prompt Version` and `prompt_version` agree: how
    the gateway records them (gateway/tags.py), and so how a query's `tag.<key>` is read."""
    return normalise(key).replace("-", "_")


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FILTER_RE = re.compile(r"^\s*([^=!\s]+)\s*(!=|=)(.*)$", re.S)


class QueryInputError(ValueError):
    """Invalid input. `str(e)` is one line for a user; `param` names the input at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def show(text: str, limit: int = 80) -> str:
    """Quote user input for an error message, shortened, on one line."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text.replace("\n", " ").replace("\r", " "))


# -- tag keys and columns --------------------------------------------------------------------------------------
def validate_tag_key(key: str, param: str = "by") -> str:
    """Keys are matched exactly (a query never guesses which key was meant), but the error names the key the gateway
    would have recorded for this one, when there is one: `Region` -> `region`."""
    if not TAG_KEY_RE.match(key or ""):
        recorded = normalise_tag_key(key or "")
        hint = f" (the gateway records {show(key)} as {show(recorded)})" if TAG_KEY_RE.match(recorded) else ""
        raise QueryInputError(f"invalid tag key {show(key or '')}: tag keys match [a-z0-9_.-]{{1,64}}{hint}",
                              param=param)
    return key


def parse_dimension(name: str, param: str = "by") -> str:
    """Validate a group-by (param "by") or filter key: a COLUMNS name or `tag.<key>`. Returns it stripped."""
    key = (name or "").strip()
    if key in COLUMNS or key == APPLIED_TAG:
        return key
    if key.startswith(TAG_PREFIX):
        validate_tag_key(key[len(TAG_PREFIX):], param)
        return key
    what = "group-by column" if param == "by" else "filter column"
    raise QueryInputError(f"unknown {what} {show(key)}: use one of {', '.join(COLUMNS)}, {APPLIED_TAG} or tag.<key>",
                          param=param)


# -- durations and windows -------------------------------------------------------------------------------------
def parse_duration(text: str, param: str = "since") -> dt.timedelta:
    """'90s', '15m', '1.5h', '7d', '2w' -> timedelta; longer than zero, at most MAX_WINDOW."""
    raw = str(text or "")
    m = _DURATION_RE.match(raw)
    if not m:
        raise QueryInputError(f"invalid window {show(raw)}: use a number and a unit (s, m, h, d, w), e.g. 90s, 15m, "
                              "1.5h, 7d", param=param)
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds <= 0:
        raise QueryInputError(f"invalid window {show(raw)}: it must be longer than zero", param=param)
    if seconds > MAX_WINDOW.total_seconds():
        raise QueryInputError(f"window {show(raw)} is too long (at most {MAX_WINDOW.days}d)", param=param)
    return dt.timedelta(seconds=seconds)


def parse_time(text: str, param: str) -> dt.datetime:
    """An ISO timestamp -> aware UTC datetime; naive times are UTC, like the stored timestamps."""
    raw = (text or "").strip()
    try:
        value = dt.datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise QueryInputError(f"invalid {param} time {show(raw)}: use an ISO timestamp such as "
                              "2026-11-24T09:00:00Z", param=param) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    try:
        value = value.astimezone(dt.timezone.utc)
    except OverflowError:  # year 1 or 9999 moved past what a datetime holds: out of range below, as it is
        pass
    if not _EPOCH_YEARS[0] <= value.year <= _EPOCH_YEARS[1]:  # ClickHouse's DateTime range: past it, an overflow
        raise QueryInputError(f"{param} time {show(raw)} is out of range: use a time from {_EPOCH_YEARS[0]} to "
                              f"{_EPOCH_YEARS[1]}", param=param)
    return value


_EPOCH_YEARS = (1970, 2105)  # whole years of DateTime (1970-01-01 to 2106-02-07), which the queries compare with


def iso_utc(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class Window:
    start: dt.datetime  # aware, UTC, inclusive
    end: dt.datetime  # aware, UTC, exclusive

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def previous(self) -> "Window":
        """The window of the same length just before this one."""
        return Window(self.start - (self.end - self.start), self.start)

    def to_dict(self) -> dict[str, Any]:
        return {"from": iso_utc(self.start), "to": iso_utc(self.end), "seconds": self.seconds}


def parse_window(since: str | None = None, from_: str | None = None, to: str | None = None,
                 now: dt.datetime | None = None, default_since: str = "24h") -> Window:
    """`since` (a duration back from now) or `from_`/`to` (ISO timestamps; `to` defaults to now)."""
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    if since and (from_ or to):
        raise QueryInputError("give either a window (since) or from/to times, not both", param="since")
    if from_ or to:
        if not from_:
            raise QueryInputError("a window with a `to` time needs a `from` time (or use since)", param="from")
        start = parse_time(from_, "from")
        end = parse_time(to, "to") if to else now
        if end <= start:
            if start > now and not to:  # `to` is now: a from time in the future is the mistake
                raise QueryInputError(f"the from time {iso_utc(start)} is in the future (the to time defaults to now, "
                                      f"{iso_utc(now)})", param="from")
            raise QueryInputError("the from time must be before the to time", param="from")
        if start >= now:  # nothing can be recorded there yet: an empty answer would read as "all quiet"
            raise QueryInputError(f"the window starts at {iso_utc(start)}, in the future (now is {iso_utc(now)})",
                                  param="from")
        if end - start > MAX_WINDOW:
            raise QueryInputError(f"the window from/to is too long (at most {MAX_WINDOW.days}d)", param="from")
        return Window(start, end)
    # A relative window is whole minutes: the last `since` of them, the current one included (a duration that is
    # not whole minutes is rounded up to them). Its ends are then the rollups' bucket edges, so no call is read raw
    # (exporters.rollup_plan), and it ends at the end of the current minute: every call stored so far is in it.
    end = _floor_minute(now) + dt.timedelta(minutes=1)
    return Window(_floor_minute(end - parse_duration(since or default_since)), end)


def _floor_minute(t: dt.datetime) -> dt.datetime:
    return t.replace(second=0, microsecond=0)


# -- filters ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Filter:
    key: str  # a COLUMNS name, applied_tag or tag.<key>
    value: str
    op: str = "="  # "=" or "!="

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "op": self.op, "value": self.value}

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def parse_filter(text: str) -> Filter:
    """'intent=refund', 'tag.region=eu', 'status!=ok'."""
    raw = str(text or "")
    m = _FILTER_RE.match(raw)
    if not m:
        raise QueryInputError(f"invalid filter {show(raw)}: use key=value (or key!=value)", param="where")
    key, op, value = parse_dimension(m.group(1), "where"), m.group(2), m.group(3).strip()
    if len(value) > MAX_VALUE_LEN:
        raise QueryInputError(f"filter value for {key} is too long (at most {MAX_VALUE_LEN} characters)",
                              param="where")
    if key == "stream":
        low = value.lower()
        if low not in ("true", "false", "1", "0"):
            raise QueryInputError(f"invalid filter {show(raw)}: stream is true or false", param="where")
        value = "true" if low in ("true", "1") else "false"
    if key == APPLIED_TAG:
        try:
            validate_tag_name(value)
        except TagInputError as e:
            raise QueryInputError(f"invalid filter {show(raw)}: {e.message}", param="where") from None
    if (key in NORMALISED_COLUMNS or key.startswith(TAG_PREFIX)) and value:
        value = normalise(value)  # 'customer=ACME' finds acme: values are recorded normalised
    if key == "status" and value not in STATUSES:
        raise QueryInputError(f"invalid filter {show(raw)}: status is one of {', '.join(STATUSES)}", param="where")
    return Filter(key, value, op)


# -- SQL -------------------------------------------------------------------------------------------------------
class Params:
    """Allocates `{name:Type}` placeholders; the values go to ClickHouse as server-side parameters. `prefix` keeps
    the names apart from a caller's own fixed parameter names."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.values: dict[str, Any] = {}

    def add(self, kind: str, type_: str, value: Any) -> str:
        name = f"{self.prefix}{kind}{len(self.values)}"
        self.values[name] = value
        return f"{{{name}:{type_}}}"


def column_expr(key: str, p: Params) -> str:
    """The SQL expression of a validated key: its column, `tags[<bound key>]`, or, for applied_tag, one row per
    tag (over a source that has the `applied_tags` column: exporters.tagstate.applied_tags_source)."""
    if key == APPLIED_TAG:
        return "arrayJoin(if(empty(applied_tags), [''], applied_tags))"
    if key.startswith(TAG_PREFIX):
        return f"tags[{p.add('k', 'String', key[len(TAG_PREFIX):])}]"
    return COLUMNS[key]


def filter_condition(f: Filter, p: Params, database: str = "") -> str:
    """The SQL condition of a filter over `llm_calls` (`database`: where the tag tables are, for applied_tag)."""
    if f.key == APPLIED_TAG:
        cond = has_tag_condition(p.add("v", "String", f.value), database)
        return cond if f.op == "=" else f"NOT {cond}"
    expr = column_expr(f.key, p)
    value = p.add("v", "Bool", f.value == "true") if f.key == "stream" else p.add("v", "String", f.value)
    return f"{expr} {f.op} {value}"


def parse_filters(items: Iterable[str]) -> tuple[Filter, ...]:
    return tuple(parse_filter(i) for i in items if str(i).strip())
