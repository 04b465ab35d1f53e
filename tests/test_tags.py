"""Tag resolution rules (pure)."""
from __future__ import annotations

import pytest

from types import SimpleNamespace

from gateway.config import Taxonomy
from gateway.errors import GatewayError
from gateway.tags import normalise, parse_tags_header, resolve_tags


def resolve(bound_customer="acme", may_set_customer=False, key_tags=None, headers=None, metadata=None, user=None,
            taxonomy=None):
    sender = SimpleNamespace(customer=bound_customer, may_set_customer=may_set_customer, key_tags=key_tags or {})
    body = {k: v for k, v in (("metadata", metadata), ("user", user)) if v is not None}
    return resolve_tags(sender, headers or {}, body, taxonomy or Taxonomy())


def test_normalise():
    assert normalise("  Refund Flow ") == "refund_flow"
    assert normalise("EU-West.1") == "eu-west.1"
    assert normalise("a/b\\c'd") == "a_b_c_d"
    assert normalise("x" * 300) == "x" * 128


def test_parse_tags_header():
    assert parse_tags_header("Region=EU, tier = Gold") == {"region": "eu", "tier": "gold"}
    with pytest.raises(GatewayError) as e:
        parse_tags_header("region")
    assert e.value.status == 400 and e.value.param == "x-tagway-tags"


def test_authority_order():
    t = resolve(key_tags={"intent": "bound"}, headers={"intent": "hdr", "prompt-version": "v2", "tags": "a=h"},
                metadata={"intent": "meta", "prompt_version": "v1", "a": "m", "b": "m"})
    assert (t.intent, t.prompt_version, t.tags) == ("bound", "v2", {"a": "h", "b": "m"})


@pytest.mark.parametrize("unknown,expect", [("keep", {"region": "mars", "color": "red"}),
                                            ("drop", {})])
def test_taxonomy_keep_drop(unknown, expect):
    tax = Taxonomy(keys={"region": {"values": ["eu", "us"]}}, unknown=unknown)
    assert resolve(headers={"tags": "region=mars,color=red"}, taxonomy=tax).tags == expect


def test_taxonomy_reject_and_required():
    tax = Taxonomy(keys={"region": {"values": ["eu", "us"]}, "intent": {"values": ["refund"]}}, unknown="reject",
                   required=["intent", "region"])
    with pytest.raises(GatewayError) as e:
        resolve(headers={"tags": "region=mars", "intent": "refund"}, taxonomy=tax)
    assert e.value.status == 400 and e.value.code == "unknown_tag" and "mars" in e.value.message
    with pytest.raises(GatewayError) as e:
        resolve(headers={"tags": "color=red", "intent": "refund"}, taxonomy=tax)
    assert "color" in e.value.message
    with pytest.raises(GatewayError) as e:
        resolve(headers={"tags": "region=eu", "intent": "chitchat"}, taxonomy=tax)
    assert "chitchat" in e.value.message
    with pytest.raises(GatewayError) as e:
        resolve(headers={"intent": "refund"}, taxonomy=tax)
    assert e.value.code == "missing_tag" and "region" in e.value.message
    ok = resolve(headers={"tags": "region=EU", "intent": "Refund"}, taxonomy=tax)
    assert (ok.intent, ok.tags) == ("refund", {"region": "eu"})


@pytest.mark.parametrize("unknown", ["reject", "drop"])
def test_a_strict_taxonomy_still_takes_the_documented_session_id(unknown):
    """metadata.session_id names the call's session (README): a taxonomy that refuses or drops unknown keys left
    apps no way to send one in the body (400 'tag key session_id is not in the tag taxonomy')."""
    tax = Taxonomy(keys={"region": {"values": ["eu"]}}, unknown=unknown)
    t = resolve(metadata={"session_id": "Chat-42", "region": "eu"}, taxonomy=tax)
    assert t.session_id == "Chat-42" and t.tags == {"region": "eu", "session_id": "chat-42"}
    if unknown == "reject":
        with pytest.raises(GatewayError):  # any other unknown key still is
            resolve(metadata={"session_id": "Chat-42", "color": "red"}, taxonomy=tax)


def test_customer_rules():
    with pytest.raises(GatewayError) as e:
        resolve(headers={"customer": "globex"})
    assert e.value.status == 403
    assert resolve(headers={"customer": "Acme"}).customer == "acme"
    assert resolve(may_set_customer=True, headers={"customer": "globex"}).customer == "globex"
    assert resolve(may_set_customer=True, user="Hooli").customer == "hooli"
    assert resolve(may_set_customer=True).customer == "acme"
    # the refusal names where the customer came from
    assert e.value.param == "x-tagway-customer"
    with pytest.raises(GatewayError) as e:
        resolve(metadata={"customer": "globex"})
    assert (e.value.status, e.value.param) == (403, "metadata.customer")


def test_a_user_that_redaction_changes_names_no_customer():
    """A platform key's calls take their customer from `user` when nothing else names it. An e-mail address there
    (redacted in the recorded `user`) was kept as a customer name in stats, rollups and the dashboard; the call is
    now the key's own customer's (not one fake customer for every such user)."""
    from gateway.redact import Redactor
    scrub = Redactor(["email", "card", "bearer"], []).text
    sender = SimpleNamespace(customer="platform", may_set_customer=True, key_tags={})
    for user in ("carol@example.com", "Carol <carol@example.com>"):
        got = resolve_tags(sender, {}, {"user": user}, Taxonomy(), scrub)
        assert got.customer == "platform" and got.end_user == user  # the proxy redacts the recorded user
    assert resolve_tags(sender, {}, {"user": "Hooli"}, Taxonomy(), scrub).customer == "hooli"
