"""What a dataset declares to grow by itself from production (`tagway dataset auto-populate NAME ...`), kept with
the dataset in the store (exporters.autopopulate):

    auto_populate:
      where: [intent=refund, tag.tier=enterprise]  # the stats / replay filter vocabulary; only ok calls unless a
                                                   # filter names status
      since: 7d         # the first population also takes what was recorded this long before the declaration
      sample: 0.1       # the share of new matching traces to add, decided by the trace id's hash
      max: 200          # at most this many added per population; the rest wait for the next one
      evaluators: [sentiment]   # saved evaluators run in delta mode on every new version

Sampling is a pure function of the trace id (its place in the replay sampler's seeded order), so populating again,
or another dataset with the same rate, never picks a different set, and a higher rate only adds traces.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from exporters import autopopulate as store_ap
from exporters.vocabulary import NON_PRODUCTION_SOURCES, parse_duration, parse_filters

from ..spec import SliceSpec, SpecError
from .build import slice_spec

__all__ = ["AutoPopulate", "declaration", "is_sampled", "stored", "SEGMENT_BY"]

SEGMENT_BY = ("customer",)  # the segment of an added case, as `tagway dataset add`'s default --stratify


class AutoPopulate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    where: list[str] = Field(default_factory=list)
    since: str | None = None
    sample: float = 1.0
    max: int | None = None
    evaluators: list[str] = Field(default_factory=list)

    def slice(self, start: float, end: float, pool_max: int) -> SliceSpec:
        """The production calls recorded in [start, end) that match the filter, oldest first up to `pool_max`."""
        s = slice_spec(self.where, None, sample_n=None, stratify=list(SEGMENT_BY), min_per_segment=0, seed=0)
        return s.model_copy(update={"since": None, "from_": start, "to": end, "limit": None, "pool_max": pool_max})

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def declaration(where: Sequence[str], since: str | None, sample: float, max_: int | None,
                evaluators: Sequence[str]) -> AutoPopulate:
    """A checked declaration; bad input raises SpecError (or QueryInputError for a filter), one line."""
    if not (isinstance(sample, (int, float)) and math.isfinite(sample) and 0 <= sample <= 1):
        raise SpecError(f"--sample {sample}: a rate between 0 and 1 (0.1 takes 10% of the new matching traces)")
    if max_ is not None and max_ < 1:
        raise SpecError(f"--max {max_}: at least 1 (or leave it out: no cap)")
    if since is not None:
        parse_duration(since)
    filters = parse_filters(where)
    production_only = [f for f in filters if f.key == "source" and f.op == "=" and f.value in NON_PRODUCTION_SOURCES]
    if production_only:
        raise SpecError(f"--where {production_only[0]}: auto-population takes production traffic only (replayed and "
                        "judge calls are never added)")
    slice_spec([str(f) for f in filters], None, sample_n=None, stratify=list(SEGMENT_BY), min_per_segment=0, seed=0)
    return AutoPopulate(where=[str(f) for f in filters], since=since, sample=float(sample), max=max_,
                        evaluators=list(dict.fromkeys(evaluators)))


def stored(store: Any, name: str) -> tuple[AutoPopulate, float] | None:
    """`name`'s declaration and when it was made, or None."""
    d = store_ap.get_declaration(store, name)
    return (AutoPopulate.model_validate(d.spec), d.declared_at) if d is not None else None


def is_sampled(trace_id: str, rate: float) -> bool:
    """Is the trace in a `rate` sample? Its hash, read as a number in [0, 1), is below the rate. A hash of its own:
    the sampler's order (`order_key`, which `dataset add --sample` takes a prefix of) would correlate with it, and
    the traces a sampled dataset left out, the highest in that order, then passed about 2% of a 50% rate."""
    digest = hashlib.blake2b(f"autopopulate:{trace_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < rate
