"""Tag resolution: who asked (customer) and why (intent, prompt version, free tags), from the sources in order of
authority: key-bound values > `x-tagway-*` headers > body `metadata` > body `user`. Pure functions."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Protocol

from exporters.vocabulary import NORMALISED_LEN, normalise, normalise_tag_key

from .config import Taxonomy
from .errors import GatewayError, bad_request, forbidden

__all__ = ["ResolvedTags", "normalise", "parse_tags_header", "resolve_tags", "session_id_of", "RESERVED"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
RESERVED = ("customer", "intent", "prompt_version")
MAX_LEN = NORMALISED_LEN
# Free tags per call. Each becomes a span attribute; an unbounded number would let one request push the span
# past the SDK's attribute limit (which drops the oldest attributes: tagway.kind and the customer first).
MAX_TAGS = 64
MAX_HEADER_ENTRIES = 4 * MAX_TAGS  # x-tagway-tags entries, repeats and empty ones included
SESSION_KEY = "session_id"  # metadata.session_id (or the x-tagway-session-id header): the call's session
MAX_SESSION_ID = 128


@dataclasses.dataclass(slots=True)
class ResolvedTags:
    customer: str = ""
    intent: str = ""
    prompt_version: str = ""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    end_user: str = ""
    session_id: str = ""


def check_header(name: str, value: str) -> str:
    if _CONTROL.search(value):
        raise bad_request(f"Header {name} contains control characters.", code="invalid_header", param=name)
    return value


def parse_tags_header(value: str) -> dict[str, str]:
    """`k=v,k2=v2` -> {k: v, k2: v2} (normalised). A segment without '=' is a 400, not silently dropped; a header of
    more than MAX_HEADER_ENTRIES entries is a 400 before any is read."""
    # Bounded work whatever the header's size: 300,000 pairs held the event loop (every tenant's calls) for seconds
    # per request, read three times, to end in the same 400.
    segments = value.split(",", MAX_HEADER_ENTRIES)
    if len(segments) > MAX_HEADER_ENTRIES:
        raise bad_request(f"x-tagway-tags holds more than {MAX_HEADER_ENTRIES} entries (at most {MAX_TAGS} tags per "
                          "call).", code="too_many_tags", param="x-tagway-tags")
    out: dict[str, str] = {}
    for seg in segments:
        if not seg.strip():
            continue
        k, sep, v = seg.partition("=")
        key = normalise_tag_key(k)
        if not sep or not key:
            raise bad_request(f"x-tagway-tags: {seg.strip()!r} is not key=value with a key of [a-z0-9_.-].",
                              code="invalid_tag", param="x-tagway-tags")
        value = normalise(v)
        if value:  # `team=` sets nothing
            out[key] = value
    return out


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise bad_request(f"metadata.{key} must be a string, number or boolean.", code="invalid_metadata",
                      param=f"metadata.{key}")


class Sender(Protocol):
    """Who sent the call, as far as tags care (an `auth.Principal`)."""
    customer: str  # the customer the key is bound to ('' for the admin key)
    may_set_customer: bool
    key_tags: Mapping[str, str]


def resolve_tags(sender: Sender, headers: Mapping[str, str], body: Mapping[str, Any], taxonomy: Taxonomy,
                 scrub: Callable[[str], str] = str) -> ResolvedTags:
    """Merge the sources, normalise, apply the taxonomy. `headers` holds the x-tagway-* headers by short name
    (customer, intent, prompt-version, tags); `body` is the request's JSON (its `metadata` and `user`); `scrub`
    redacts the body's metadata values before they become tags (an e-mail address in metadata must not become a
    tag value). Raises GatewayError (400/403) for bad input."""
    bound_customer, may_set_customer, key_tags = sender.customer, sender.may_set_customer, sender.key_tags
    metadata, user = body.get("metadata"), body.get("user")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("metadata must be an object.", code="invalid_metadata", param="metadata")
    if metadata and len(metadata) > MAX_TAGS:
        raise bad_request(f"Too many metadata keys: {len(metadata)} (at most {MAX_TAGS}).", code="too_many_tags",
                          param="metadata")
    meta = {normalise_tag_key(str(k)[:MAX_LEN]): normalise(scrub(_scalar(str(k)[:MAX_LEN], v)[:4 * MAX_LEN]))
            for k, v in (metadata or {}).items()}
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string.", code="invalid_type", param="user")
    end_user = user or ""

    def pick(name: str, header: str) -> str:
        if key_tags.get(name):
            return normalise(key_tags[name])
        if headers.get(header):
            return normalise(headers[header])
        return meta.get(name, "")

    # customer: the key's tenant unless the key may set it; an attempt to record as someone else is refused
    from_header = normalise(headers.get("customer", ""))
    asked = from_header or meta.get("customer", "")
    if may_set_customer:
        # a `user` that redaction changes (an e-mail address as user id) names no customer: the call stays the
        # key's, rather than a customer name holding personal data or one fake customer for every such user
        # Only its start can name one (normalise reads 4 * MAX_LEN characters), so only that is redacted, with a
        # margin for a secret cut there: redacting the whole of a 7 MB `user` held the event loop for 5 s.
        head = end_user[:5 * MAX_LEN]
        from_user = normalise(head) if head and scrub(head) == head else ""
        customer = asked or from_user or bound_customer
    else:
        if asked and asked != bound_customer:
            raise forbidden(f"This key is bound to customer {bound_customer!r} and may not record calls as {asked!r}.",
                            code="customer_not_allowed",
                            param="x-tagway-customer" if from_header else "metadata.customer")
        customer = bound_customer
    intent = pick("intent", "intent")
    prompt_version = pick("prompt_version", "prompt-version")
    tags = {k: v for k, v in meta.items() if k and v}
    tags.update(parse_tags_header(headers["tags"]) if headers.get("tags") else {})
    tags.update({normalise_tag_key(k): normalise(v) for k, v in key_tags.items() if k not in RESERVED})
    for r in RESERVED:  # customer, intent and prompt_version are fields, not free tags, whatever their source
        tags.pop(r, None)
    tags.pop("", None)
    if len(tags) > MAX_TAGS:
        raise bad_request(f"Too many tags: {len(tags)} (at most {MAX_TAGS} per call).", code="too_many_tags",
                          param="x-tagway-tags")
    out = ResolvedTags(customer=customer, intent=intent, prompt_version=prompt_version, tags=tags, end_user=end_user,
                       session_id=session_id_of(headers, metadata))
    return apply_taxonomy(out, taxonomy)


def session_id_of(headers: Mapping[str, str], metadata: Mapping[str, Any] | None) -> str:
    """The session the call belongs to: `x-tagway-session-id`, else `metadata.session_id`, kept as the client sent
    it (ids are opaque; case matters), at most MAX_SESSION_ID characters. Session tags (tag rules in session mode)
    attach to it. (metadata.session_id also stays a free tag, normalised, as every metadata key is.)"""
    sid = headers.get("session-id")  # x-tagway-* values were checked for control characters already
    param = "x-tagway-session-id"
    if not sid:
        raw = metadata.get(SESSION_KEY) if metadata else None
        if raw is None or raw == "":
            return ""
        sid, param = _scalar(SESSION_KEY, raw), f"metadata.{SESSION_KEY}"
        if _CONTROL.search(sid):
            raise bad_request(f"{param} must not contain control characters.", code="invalid_session_id",
                              param=param)
    sid = sid.strip()
    if len(sid) > MAX_SESSION_ID:
        raise bad_request(f"{param} must be at most {MAX_SESSION_ID} characters.", code="invalid_session_id",
                          param=param)
    return sid


def apply_taxonomy(t: ResolvedTags, tax: Taxonomy) -> ResolvedTags:
    def unknown(what: str, param: str) -> None:
        raise GatewayError(400, f"{what} is not in the tag taxonomy.", code="unknown_tag", param=param)

    for name in RESERVED:
        rule = tax.keys.get(name)
        value = getattr(t, name)
        if rule and rule.values is not None and value and value not in rule.values:
            if tax.unknown == "reject":
                unknown(f"{name} {value!r}", name)
            if tax.unknown == "drop":
                setattr(t, name, "")
    kept: dict[str, str] = {}
    for k, v in t.tags.items():
        rule = tax.keys.get(k)
        if rule is None and k == SESSION_KEY:  # metadata.session_id names the call's session: never unknown
            kept[k] = v
            continue
        if rule is None or (rule.values is not None and v not in rule.values):
            if tax.unknown == "reject":
                unknown(f"tag {k}={v!r}" if rule else f"tag key {k!r}", f"tags.{k}")
            if tax.unknown == "drop":
                continue
        kept[k] = v
    t.tags = kept
    missing = [k for k in tax.required if not (getattr(t, k) if k in RESERVED else t.tags.get(k))]
    if missing:
        raise GatewayError(400, f"Missing required tag(s): {', '.join(missing)}.", code="missing_tag",
                           param=missing[0])
    return t
