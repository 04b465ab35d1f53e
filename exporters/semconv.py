"""Span attribute names shared by the gateway (which stamps them) and the storage schema (which reads them).

The `gen_ai.*` names follow the OpenTelemetry GenAI semantic conventions; `tagway.*` are ours. Keeping them in
one module means the materialized view that fills `llm_calls` and the code that stamps spans cannot drift apart.
"""
from __future__ import annotations

# OpenTelemetry GenAI semantic conventions
OPERATION = "gen_ai.operation.name"  # chat | text_completion | embeddings
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"  # JSON array string
REQUEST_STREAM = "gen_ai.request.stream"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"  # seconds, float
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
INPUT_MESSAGES = "gen_ai.input.messages"  # JSON string, semconv "parts" shape
OUTPUT_MESSAGES = "gen_ai.output.messages"  # JSON string, semconv "parts" shape
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"  # JSON string
ERROR_TYPE = "error.type"
OUTPUT_TYPE = "gen_ai.output.type"  # text | json | image | speech: what the request asked for
REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"  # of the output tokens, those spent reasoning
CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"  # of the input tokens, those read from the prompt cache
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
HTTP_STATUS = "http.response.status_code"
CONVERSATION_ID = "gen_ai.conversation.id"  # the session: x-tagway-session-id or metadata.session_id

# tagway's own
API = "tagway.api"  # the exact API of the call: chat.completions, responses, messages, files.create, ...
KIND = "tagway.kind"  # "call" (one per client request: fills llm_calls) | "attempt" (one per upstream try)
CUSTOMER = "tagway.customer"
INTENT = "tagway.intent"
PROMPT_VERSION = "tagway.prompt_version"
TAG_PREFIX = "tagway.tag."  # tagway.tag.<key> = value
COST_USD = "tagway.cost_usd"
SOURCE = "tagway.source"  # production | replay | demo | ...
KEY_ID = "tagway.key_id"
END_USER = "tagway.end_user"  # the body's `user` field
REQUESTED_MODEL = "tagway.model.requested"  # public name the client asked for
DEPLOYMENT = "tagway.deployment"  # deployment that served (or last failed)
ATTEMPTS = "tagway.attempts"  # number of upstream attempts
FALLBACKS_SKIPPED = "tagway.fallbacks_skipped"  # fallbacks the recorded tenant may not use (JSON array of names)
DEPLOYMENTS_COOLING = "tagway.deployments_cooling"  # passed over: cooling down after failures (JSON array of names)
REQUEST_PARAMS = "tagway.request.params"  # JSON: request parameters other than messages (tools, temperature, ...)
LATENCY_MS = "tagway.latency_ms"
TRUNCATED = "tagway.truncated"  # JSON {field: original length} for client values cut to their cap
CLIENT_DISCONNECTED = "tagway.client_disconnected"  # "true" when the client went away mid-call
CREATES_RESOURCE = "tagway.creates_resource"  # "true": the answer's id is a resource its customer owns (a file, ...)
# JSON array: ids the answer made known that its customer owns from then on (a batch's output and error files)
OWNS_RESOURCES = "tagway.owns_resources"
USAGE_ESTIMATED = "tagway.usage.estimated"  # "true": a stream cut short, its tokens estimated (usage_estimate.py)
REPLAY_RUN_ID = "replay.run_id"
REPLAY_CANDIDATE = "replay.candidate"
REPLAY_CASE_ID = "replay.case_id"

SCOPE_NAME = "tagway.gateway"
