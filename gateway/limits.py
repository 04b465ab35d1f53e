"""Rate limits and budgets per key and per tenant, and per model under either, checked before a call is forwarded.

Rate limits are token buckets (requests per minute, tokens per minute) that refill continuously: a key with
`rpm: 60` may burst 60 calls, then one a second. Tokens are only known once a call ends, so a call is admitted
while its buckets are not in debt and its tokens are charged afterwards (as LiteLLM's proxy does): a client that
overdraws waits until the bucket refills. Budgets cap the spend (recorded `cost_usd` of production calls) per
period: `per` is a duration (1h, 1d, 7d, 30d: windows aligned to the Unix epoch, UTC) or `month` (calendar month,
UTC); at `soft` (a fraction) responses carry a warning header, at the budget calls are refused until the next
period. Spend is read from the store (every `refresh_seconds`, off the event loop) and topped up in-process by
each call's cost. A call's cost is known only when it ends, so the calls in flight count too, each at the scope's
recent average cost a call: a burst of concurrent calls stops at the budget (give or take one call), instead of
every call of the burst being admitted against the spend before it. Until a call of the scope has ended (since the
gateway started) that cost is unknown, so its calls are admitted one at a time until then.

Buckets live in the process. With `tagway serve --workers N` each worker enforces its 1/N share of every rate
limit (the OpenAI SDK's clients spread over workers evenly enough for this); budgets are shared through the store.
Everything here runs on the event loop thread: no locks.
"""
from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import logging
import math
import time
from typing import Any, Callable, Iterable

from .errors import GatewayError

__all__ = ["TokenBucket", "Limiter", "Budgets", "CallLimits", "period_bounds", "Refusal", "model_scope",
           "split_scope", "scope_text"]

log = logging.getLogger("tagway.limits")


# A limit's scope is (kind, id): ("key", "acme-ci"), ("tenant", "acme"), or, for a limit on one model under a key or
# tenant (`limits.models`), ("key-model", "acme-ci" + SEP + "gpt-4o"). Key ids hold no control character
# (gateway/auth.key_id_problem) and customer names are normalised (gateway/tags.py), so the first SEP splits the id
# from the model name, whatever either holds besides ("team/ci" on "openai/gpt-4o").
SEP = "\x1f"


def model_scope(kind: str, who: str, model: str) -> tuple[str, str]:
    return f"{kind}-model", f"{who}{SEP}{model}"


def split_scope(scope: tuple[str, str]) -> tuple[str, str, str | None]:
    """(kind, id, model or None): model_scope("key", "acme-ci", "gpt-4o") -> ("key", "acme-ci", "gpt-4o")."""
    kind, who = scope
    if kind.endswith("-model"):
        owner, _, model = who.partition(SEP)
        return kind.removesuffix("-model"), owner, model
    return kind, who, None


def scope_text(scope: tuple[str, str]) -> str:
    """How refusals and warnings name a scope: `key 'acme-ci'`, `tenant 'acme' on model 'gpt-4o'`."""
    kind, who, model = split_scope(scope)
    return f"{kind} {who!r}" + (f" on model {model!r}" if model is not None else "")



def usd_text(usd: float) -> str:
    """Dollars as a person reads them: cents from a dollar up, else enough significant digits to tell small sums
    apart ($0.000012 of $0.00001, not $0.00 of $1e-05)."""
    if usd >= 1 or usd == 0:
        return f"${usd:,.2f}"
    if usd < 1e-6:
        return f"${usd:.2g}"
    text = f"{usd:.6f}".rstrip("0")
    return "$" + (text if len(text.split(".")[1]) >= 2 else f"{usd:.2f}")

class TokenBucket:
    __slots__ = ("limit", "capacity", "rate", "level", "stamp")

    def __init__(self, per_minute: float, now: float) -> None:
        self.limit = per_minute
        # at least one request: a bucket smaller than one (rpm 1 shared by 2 workers: 0.5 each) never admits any
        self.capacity = max(1.0, float(per_minute))
        self.rate = per_minute / 60.0  # per second
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self._refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount  # may go into debt (tokens are charged after the call)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call must wait: an OpenAI-shaped 429 with `retry-after`."""
    code: str  # rate_limited | budget_exceeded | budget_in_flight
    message: str
    retry_after: float

    def error(self) -> GatewayError:
        spent = self.code == "budget_exceeded"  # only a spent budget is final until the period ends
        e = GatewayError(429, self.message, type_="insufficient_quota" if spent else "rate_limit_error",
                         code=self.code, error_type=self.code)
        e.headers = [(b"retry-after", b"%d" % max(1, math.ceil(self.retry_after))),
                     (b"retry-after-ms", b"%d" % max(1, math.ceil(self.retry_after * 1000))),
                     (b"x-should-retry", b"false" if spent else b"true")]
        return e


class Limiter:
    """rpm/tpm buckets by (scope, id), e.g. ("key", "acme-1") or ("tenant", "acme"). `share` is this process's
    fraction of each limit (1/N with N workers)."""

    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.clock = clock
        self._rpm: dict[tuple[str, str], TokenBucket] = {}
        self._tpm: dict[tuple[str, str], TokenBucket] = {}
        self.refused = 0

    def _bucket(self, table: dict, who: tuple[str, str], per_minute: int, now: float) -> TokenBucket:
        b = table.get(who)
        limit = per_minute * self.share
        if b is None or b.limit != limit:  # new, or the limit changed
            b = table[who] = TokenBucket(limit, now)
        return b

    def admit(self, limits: Iterable[tuple[tuple[str, str], int | None, int | None]]) -> Refusal | None:
        """`limits`: (who, rpm, tpm) for each scope the call falls under. Takes one request from every rpm
        bucket if all admit it; else takes nothing and says which refused, and for how long."""
        now = self.clock()
        checks = []
        for who, rpm, tpm in limits:
            if rpm:
                b = self._bucket(self._rpm, who, rpm, now)
                wait = b.wait_for(1, now)
                if wait > 0:
                    return self._refuse(f"{scope_text(who)} is over its limit of {rpm} requests per minute", wait)
                checks.append(b)
            if tpm:
                b = self._bucket(self._tpm, who, tpm, now)
                if b.level <= 0 and b.wait_for(1, now) > 0:  # in debt from earlier calls' tokens
                    return self._refuse(f"{scope_text(who)} is over its limit of {tpm} tokens per minute",
                                        b.wait_for(1, now))
        for b in checks:
            b.take(1, now)
        return None

    def charge(self, limits: Iterable[tuple[tuple[str, str], int | None, int | None]], tokens: int) -> None:
        if tokens <= 0:
            return
        now = self.clock()
        for who, _rpm, tpm in limits:
            if tpm:
                self._bucket(self._tpm, who, tpm, now).take(tokens, now)

    def _refuse(self, message: str, wait: float) -> Refusal:
        self.refused += 1
        return Refusal("rate_limited", f"Rate limit reached: {message}. Retry in {wait:.1f}s.", wait)


def period_bounds(per: str, now: float) -> tuple[float, float]:
    """[start, end) of the budget period holding `now` (Unix seconds). `month`: the calendar month (UTC); a
    duration: windows of that length aligned to the Unix epoch."""
    if per == "month":
        d = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        start = dt.datetime(d.year, d.month, 1, tzinfo=dt.timezone.utc)
        days = calendar.monthrange(d.year, d.month)[1]
        return start.timestamp(), (start + dt.timedelta(days=days)).timestamp()
    from exporters.vocabulary import parse_duration  # noqa: PLC0415 - light, but only budgets need it

    length = parse_duration(per, "per").total_seconds()
    start = math.floor(now / length) * length
    return start, start + length


IN_FLIGHT_RETRY_SECONDS = 2.0  # a refusal for calls in flight: soon, when they have ended
_COST_WEIGHT = 0.2  # of the newest call in the average cost a call that calls in flight are counted at
# calls reach the store a few seconds after they end (batching): their cost stays counted in-process this long
# after a refresh, even if the store already had it (counting it twice errs on the side of the budget)
_STORE_LAG = 15.0


@dataclasses.dataclass(slots=True)
class _Spend:
    period_start: float
    stored: float = 0.0  # spend in the period, as the store last said
    recent: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (time, cost) added in-process
    recent_usd: float = 0.0  # their sum, kept as they are added: every call's check reads it

    def total(self) -> float:
        return self.stored + self.recent_usd


class Budgets:
    """Spend against budget per (scope, id). `read_spend(scope, id, since)` returns the recorded spend since a Unix
    time, or (spend, priced calls), which also tells what a call costs before one has ended since the start; it is
    called off the event loop by `refresh()`."""

    def __init__(self, read_spend: Callable[[str, str, float], Any] | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._read = read_spend
        self.clock = clock
        self._spend: dict[tuple[str, str], _Spend] = {}
        self._periods: dict[tuple[str, str], str] = {}
        self._in_flight: dict[tuple[str, str], int] = {}  # admitted calls not ended yet
        self._per_call: dict[tuple[str, str], float] = {}  # recent average cost of a call (EWMA of ended calls)
        self._ended: set[tuple[str, str]] = set()  # scopes a call has ended in since start
        self.wake: Any = None  # an asyncio.Event the gateway's refresh loop waits on (set: read the store now)
        self.refused = 0
        self.refused_in_flight = 0

    def _current(self, who: tuple[str, str], per: str) -> _Spend:
        start, _ = period_bounds(per, self.clock())
        s = self._spend.get(who)
        if s is None or s.period_start != start:  # first sight, or a new period began
            s = self._spend[who] = _Spend(start)
        return s

    def spent(self, who: tuple[str, str], per: str) -> float:
        return self._current(who, per).total()

    def check(self, who: tuple[str, str], usd: float, per: str, soft: float) -> tuple[Refusal | None, str]:
        """A refusal at the budget, else the warning header value past `soft` (or '')."""
        if self._periods.get(who) != per and self.wake is not None:
            # a budget new since the start, or given another period (`keys limits --budget-per`): its recorded spend
            # in the period is read now, not counted from $0 for up to 30 s
            self.wake.set()
        self._periods[who] = per
        spent = self.spent(who, per)
        if spent >= usd:
            self.refused += 1
            _, end = period_bounds(per, self.clock())
            return Refusal("budget_exceeded", f"Budget reached: {scope_text(who)} spent {usd_text(spent)} of "
                           f"{usd_text(usd)} per {per}; calls resume when the period ends.",
                           max(1.0, end - self.clock())), ""
        n = self._in_flight.get(who, 0)
        if n and who not in self._ended:  # no call has ended yet: what one costs is unknown, so one at a time
            self.refused_in_flight += 1
            return Refusal("budget_in_flight", f"Budget: {scope_text(who)} spent {usd_text(spent)} of "
                           f"{usd_text(usd)} per {per}, and a call is in flight whose cost is not known yet (the "
                           "first since the gateway started); retry once it ends.", IN_FLIGHT_RETRY_SECONDS), ""
        pending = n * self._per_call.get(who, 0.0)
        if spent + pending >= usd:  # the calls in flight will likely spend the rest: wait for them, not the period
            self.refused_in_flight += 1
            return Refusal("budget_in_flight", f"Budget nearly reached: {scope_text(who)} spent "
                           f"{usd_text(spent)} of {usd_text(usd)} per {per}, and {n} call(s) in flight will likely "
                           f"spend ~{usd_text(pending)}; retry once they end.", IN_FLIGHT_RETRY_SECONDS), ""
        if spent >= soft * usd:
            kind, owner, model = split_scope(who)  # the header's form: `key acme-ci [model gpt-4o] spent ...`
            return None, (f"{kind} {owner}" + (f" model {model}" if model is not None else "") +
                          f" spent {usd_text(spent)} of {usd_text(usd)} per {per} ({spent / usd:.0%})")
        return None, ""

    def add(self, who: tuple[str, str], per: str, cost: float) -> None:
        if cost > 0:
            s = self._current(who, per)
            s.recent.append((self.clock(), cost))
            s.recent_usd += cost

    def begin(self, who: tuple[str, str]) -> None:
        """An admitted call: it counts against the budget at the scope's average cost a call until it ends."""
        self._in_flight[who] = self._in_flight.get(who, 0) + 1

    def end(self, who: tuple[str, str], cost: float) -> None:
        """The call `begin` counted ended having cost `cost` (0 for one that failed or was not priced)."""
        self._ended.add(who)
        n = self._in_flight.get(who, 0) - 1
        if n > 0:
            self._in_flight[who] = n
        else:
            self._in_flight.pop(who, None)
        if cost > 0:  # unpriced or failed calls cost nothing and say nothing of what the next call costs
            prev = self._per_call.get(who)
            self._per_call[who] = cost if prev is None else prev + _COST_WEIGHT * (cost - prev)

    def refresh(self) -> None:
        """Re-read every tracked spend from the store (blocking: run it on a thread)."""
        if self._read is None:
            return
        for who, per in list(self._periods.items()):
            now = self.clock()
            start, _ = period_bounds(per, now)
            try:
                stored = self._read(who[0], who[1], start)
            except Exception as e:  # the store is down: keep counting in-process
                log.warning("cannot read spend for %s %s (%s); using the last known figure", *who, e)
                continue
            if isinstance(stored, tuple):  # (spend, priced calls): what a call costs is known from the record
                stored, priced = stored
                if priced and who not in self._per_call:
                    # calls in flight count at this average from the first one after a start, not one at a time
                    self._per_call[who] = stored / priced
                    self._ended.add(who)
            old = self._spend.get(who)
            recent = [(t, c) for t, c in (old.recent if old and old.period_start == start else ())
                      if t > now - _STORE_LAG]
            self._spend[who] = _Spend(start, stored, recent, sum(c for _, c in recent))

    def report(self) -> list[dict]:
        """Every tracked budget's spend in its current period (for /admin/budgets)."""
        out = []
        for who, per in sorted(self._periods.items()):
            start, end = period_bounds(per, self.clock())
            kind, owner, model = split_scope(who)
            out.append({"scope": kind, "id": owner, **({"model": model} if model is not None else {}), "per": per,
                        "period_start": start, "period_end": end, "spent_usd": round(self.spent(who, per), 6)})
        return out


Scope = tuple[tuple[str, str], Any]  # ((scope, id), LimitsConfig)


def _add(out: list[Scope], kind: str, who: str, lim: Any, model: str) -> None:
    out.append(((kind, who), lim))
    on_model = lim.models.get(model) if model and lim.models else None
    if on_model is not None:
        out.append((model_scope(kind, who, model), on_model))


class CallLimits:
    """The limits a call falls under (its key's and its recorded tenant's), checked and charged as one."""

    def __init__(self, share: float = 1.0, read_spend: Callable[[str, str, float], Any] | None = None) -> None:
        self.limiter = Limiter(share)
        self.budgets = Budgets(read_spend)

    @staticmethod
    def scopes(key_id: str, key_limits: Any, tenant: Any, model: str = "") -> list[Scope]:
        """The scopes a call to `model` falls under: the key's and the tenant's limits, and their limits on that
        model (`limits.models`, by the name the client asked for); `model` "" leaves the latter out."""
        out: list[Scope] = []
        if key_limits is not None:
            _add(out, "key", key_id, key_limits, model)
        if tenant is not None and tenant.limits is not None:
            _add(out, "tenant", tenant.customer, tenant.limits, model)
        return out

    @staticmethod
    def all_scopes(key_id: str, key_limits: Any, tenant: Any) -> list[Scope]:
        """Every scope of a key's or a tenant's limits, each model's included (budgets known at start-up)."""
        out = CallLimits.scopes(key_id, key_limits, tenant)
        for (kind, who), lim in list(out):
            out += [(model_scope(kind, who, m), on_model) for m, on_model in (lim.models or {}).items()]
        return out

    def register(self, scopes: Iterable[Scope]) -> None:
        """Budgets known at start-up, so their spend is read from the store before the first call."""
        for who, lim in scopes:
            if lim.budget is not None:
                self.budgets._periods[who] = lim.budget.per

    def admit(self, scopes: list[Scope]) -> tuple[Refusal | None, list[str]]:
        """A refusal (429), or the budget warnings to send along."""
        warnings = []
        for who, lim in scopes:
            if lim.budget is not None:
                refusal, warning = self.budgets.check(who, lim.budget.usd, lim.budget.per, lim.budget.soft)
                if refusal is not None:
                    return refusal, []
                if warning:
                    warnings.append(warning)
        refusal = self.limiter.admit([(who, lim.rpm, lim.tpm) for who, lim in scopes])
        if refusal is not None:
            return refusal, []
        for who, lim in scopes:
            if lim.budget is not None:
                self.budgets.begin(who)
        return None, warnings

    def finish(self, scopes: list[Scope], tokens: int, cost: float) -> None:
        """A call `admit` let through ended: its tokens and cost are charged (every admitted call comes here once)."""
        self.limiter.charge([(who, lim.rpm, lim.tpm) for who, lim in scopes], tokens)
        for who, lim in scopes:
            if lim.budget is not None:
                self.budgets.end(who, cost)
                if cost:
                    self.budgets.add(who, lim.budget.per, cost)

    @property
    def refused(self) -> dict[str, int]:
        return {"rate_limited": self.limiter.refused, "budget_exceeded": self.budgets.refused,
                "budget_in_flight": self.budgets.refused_in_flight}
