"""A model with no known price: said once at start-up (its calls are recorded without a cost, so stats show $0 and
budgets do not count them), and its calls carry no cost, not a cost of 0."""
from __future__ import annotations

import logging
import os

import openai

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from tests.gateway_fixture import UPSTREAM_KEY, GatewayServer, MemoryRecorder

KEY = "tw-pricing-acme-0123456789abcdefghijklmnop"


def test_unpriced_models_are_named_at_start_and_their_calls_carry_no_cost(upstream, caplog):
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}
    cfg = GatewayConfig(
        models=[{"name": "priced", "model": "ok-priced", **up, "input_cost_per_token": 1e-6},  # the config's price
                {"name": "mapped", "model": "gpt-4o-mini", **up},  # litellm's local price map
                {"name": "house", "model": "ok-house", **up},  # neither
                {"name": "up/*", **up},  # a wildcard's price is its matched model's: known per call only
                {"name": "canned", "provider": "mock", "mock": {"reply": "hi"}}],  # calls no provider
        tenants=[{"customer": "acme", "keys": [{"id": "a", "hash": hash_key(KEY)}]}])
    recorder = MemoryRecorder()
    with caplog.at_level(logging.WARNING, logger="tagway"):
        server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    try:
        said = [r.getMessage() for r in caplog.records if "has no price" in r.getMessage()]
        assert said == ["model 'house' (openai/ok-house) has no price in litellm's map or the config: its calls are "
                        "recorded without a cost, so stats show $0 for them and budgets do not count them; set its "
                        "input_cost_per_token and output_cost_per_token"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        costs = {}
        for model in ("priced", "mapped", "house"):
            raw = client.chat.completions.with_raw_response.create(model=model,
                                                                   messages=[{"role": "user", "content": "hi"}])
            span = recorder.call(raw.headers["x-tagway-trace-id"])
            costs[model] = (raw.headers.get("x-tagway-cost-usd"), span.attributes.get(sc.COST_USD))
        assert costs["house"] == (None, None)
        assert all(h is not None and float(h) > 0 and a == float(h) for h, a in (costs["priced"], costs["mapped"]))
    finally:
        server.stop()
        recorder.shutdown()
