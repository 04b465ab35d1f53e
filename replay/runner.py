"""Run cases against targets THROUGH THE GATEWAY, so every replayed call is itself a tagged, logged span.

One `httpx.AsyncClient` (a gateway base URL, or any transport: the in-process mode wraps the gateway's ASGI app,
imported by name at run time so `replay` never imports `gateway`). A pool of `concurrency` workers; retries with
exponential backoff on 429/5xx/transport errors; a cost budget (no new case starts once spent >= max_cost); each
finished result goes to `sink` in small batches, so a crashed or stopped run resumes where it was.

Request contract with the gateway: the original call's customer/intent/tags plus the replay keys as
`x-tagway-*` headers; the gateway answers with `x-tagway-trace-id` and `x-tagway-cost-usd`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence
from urllib.parse import quote

import httpx
import orjson

from exporters import anthropic_format, responses_format
from exporters.dsn import is_http_url
from exporters.genai_messages import loads_or_empty
from exporters.responses_format import API_MARK
from exporters.tables import fmt_usd
from exporters.vocabulary import JUDGE_SOURCE, REDACTED_MARK, REPLAY_SOURCE, TRUNCATED_MARK

from .evaluators import EvalContext, evaluate
from .refs import load_ref
from .slice import Case
from .spec import Candidate, PromptSpec, ReplaySpec
from .store import ResultRow

__all__ = ["Target", "RunOutcome", "FatalRunError", "Runner", "GatewayPoster", "Answer", "Caller", "text_of",
           "fatal_check",
           "targets_for", "build_request", "replay_headers", "apply_prompt", "gateway_client", "gateway_for",
           "recorded_answer", "answer_of_record",
           "GATEWAY_APP", "NO_GATEWAY", "RETRY_STATUSES"]

GATEWAY_APP = "gateway.app:create_app"
NO_GATEWAY = "no gateway: pass --gateway URL (or env TAGWAY_GATEWAY_URL), or --in-process"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# an Answer's error_code when the gateway could not be reached at all after the tries (refused, reset, dropped): no
# outcome of the candidate's, and the gateway is taken as gone; a timeout is "timeout" (a slow answer is one)
GONE = "connection"
_GONE_ERRORS = (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
CHAT_PATH = "/v1/chat/completions"
# a recorded call that spoke another API (its params carry API_MARK) is re-sent to that API: path, request, answer
API_PATHS = {"responses": "/v1/responses", "messages": "/v1/messages"}
_API_REQUEST = {"responses": responses_format.request_from_chat,
                "messages": lambda msgs, params: anthropic_format.request_from_chat(msgs, params, API_MARK)}
_API_ANSWER = {"responses": responses_format.answer_as_chat, "messages": anthropic_format.answer_as_chat}


class FatalRunError(RuntimeError):
    """The run cannot go on (unknown model, rejected key, unreachable gateway): one line for the user.
    `unreachable`: the gateway stopped answering (it may come back: the run can be resumed as it is)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclasses.dataclass
class Target:
    """What a case runs against: a candidate, or the baseline (`logged`: no call, the recorded answer)."""
    name: str
    model: str | None = None  # None: the original call's model
    prompt: PromptSpec | None = None
    prompt_text: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    logged: bool = False


def targets_for(spec: ReplaySpec, base_dir: Path | None = None) -> list[Target]:
    """The baseline first, then the candidates; prompt files are read once, here."""
    b = spec.baseline
    out = [Target("baseline", b.model, b.prompt, b.prompt.text(base_dir) if b.prompt else None, dict(b.params),
                  logged=b.mode == "logged")]
    for c in spec.candidates:
        out.append(_candidate_target(c, base_dir))
    return out


def _candidate_target(c: Candidate, base_dir: Path | None) -> Target:
    return Target(c.name, c.model, c.prompt, c.prompt.text(base_dir) if c.prompt else None, dict(c.params))


def inline_prompts(spec: ReplaySpec, targets: list[Target]) -> ReplaySpec:
    """The spec with each prompt file replaced by the text `targets` read from it (mode and version kept)."""
    texts = {t.name: t.prompt_text for t in targets}

    def inlined(prompt: Any, name: str) -> Any:
        if prompt is None or prompt.file is None or texts.get(name) is None:
            return prompt
        return prompt.model_copy(update={"system": texts[name], "file": None})

    return spec.model_copy(update={
        "baseline": spec.baseline.model_copy(update={"prompt": inlined(spec.baseline.prompt, "baseline")}),
        "candidates": [c.model_copy(update={"prompt": inlined(c.prompt, c.name)}) for c in spec.candidates]})


# -- request building (pure) --------------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def text_of(content: Any) -> str:
    """The text of an OpenAI message content (a string, or the text of its parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def apply_prompt(case: Case, prompt: PromptSpec | None, text: str | None) -> list[dict]:
    """The case's messages with the target's system prompt: `replace` swaps the leading system/developer messages
    for `text`; `template` fills `{original_system}`, `{customer}`, `{intent}`, `{prompt_version}`, `{tag_<k>}` and
    bare tag keys (unknown `{names}` and other braces are left as they are, so JSON examples survive)."""
    msgs = [dict(m) for m in case.messages]
    if prompt is None or text is None:
        return msgs
    lead = 0
    while lead < len(msgs) and msgs[lead].get("role") in ("system", "developer"):
        lead += 1
    system = text
    if prompt.mode == "template":
        original = "\n\n".join(text_of(m.get("content")) for m in msgs[:lead])
        variables = {**case.tags, **{f"tag_{k}": v for k, v in case.tags.items()}, "original_system": original,
                     "customer": case.customer, "intent": case.intent, "prompt_version": case.prompt_version}
        system = _VAR_RE.sub(lambda m: str(variables[m.group(1)]) if m.group(1) in variables else m.group(0), text)
    return [{"role": "system", "content": system}, *msgs[lead:]]


def build_request(case: Case, target: Target) -> dict:
    """The chat request: rebuilt messages + the original request params, overridden by the target's params and
    model. Replay is never streamed (the answer is scored whole and the gateway reports its cost)."""
    body = {**case.params, **target.params}
    messages = apply_prompt(case, target.prompt, target.prompt_text)
    api = body.get(API_MARK)
    if api in _API_REQUEST:  # a Responses / Anthropic messages call: the same API again (the mark stays for GatewayPoster.post)
        body = {**_API_REQUEST[api](messages, body), API_MARK: api}
    else:
        body["messages"] = messages
    body.update(model=target.model or case.model, stream=False)
    body.pop("stream_options", None)
    return body


def replay_headers(case: Case, *, api_key: str, run_id: str, candidate: str, prompt_version: str,
                   source: str = REPLAY_SOURCE) -> dict[str, str]:
    h = {"authorization": f"Bearer {api_key}", "content-type": "application/json",
         "x-tagway-source": source, "x-tagway-replay-run-id": run_id, "x-tagway-replay-candidate": candidate,
         "x-tagway-replay-case-id": case.case_id}
    if case.customer:
        h["x-tagway-customer"] = case.customer
    if case.intent:
        h["x-tagway-intent"] = case.intent
    if prompt_version:
        h["x-tagway-prompt-version"] = prompt_version
    if case.tags:
        h["x-tagway-tags"] = ",".join(f"{k}={v}" for k, v in sorted(case.tags.items()))
    return h


def _prompt_version(case: Case, target: Target) -> str:
    return (target.prompt.version if target.prompt and target.prompt.version else None) or case.prompt_version


# -- running ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunOutcome:
    results: list[ResultRow]
    cost_usd: float
    complete: bool  # every item ran (and, with errors: exclude, got a score: no errored result)
    stop_reason: str = ""
    pending: int = 0  # items not run (budget or stop)
    errored: int = 0  # items that ran but have no score (gateway error after retries, evaluator/judge failure)


@dataclasses.dataclass
class Answer:
    ok: bool
    message: dict
    text: str
    http_status: int
    attempts: int
    latency_ms: float
    cost_usd: float
    trace_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    error_code: str = ""


def recorded_answer(call: dict, case: Case, target: Target) -> Answer | None:
    """An answered call the gateway recorded (a row of replay.store.recorded_calls) as the answer the runner scores
    for (case, target), or None when it may not be the answer this request would get: another model, prompt version
    or system prompt (a prompt file edited since), or a record that is not the answer the client got: no content
    captured, or content that redaction or the content cap changed (scoring `[REDACTED:email]` for an address, or a
    cut answer, would flip cases that did not change)."""
    if call.get("model_requested") != (target.model or case.model):
        return None
    if call.get("prompt_version") != _prompt_version(case, target):
        return None
    if target.prompt_text is not None:
        system = apply_prompt(case, target.prompt, target.prompt_text)[0]["content"]
        if _parts_text(call.get("system_instructions")) != system:
            return None
    text = call.get("response_json") or ""
    if not text or REDACTED_MARK in text or TRUNCATED_MARK in text:
        return None
    output = loads_or_empty(text)
    if not isinstance(output, list) or not output:
        return None
    return answer_of_record(output, call["trace_id"], float(call.get("latency_ms") or 0.0),
                            float(call.get("cost_usd") or 0.0), int(call.get("input_tokens") or 0),
                            int(call.get("output_tokens") or 0), http_status=int(call.get("http_status") or 200),
                            attempts=int(call.get("attempts") or 1))


def answer_of_record(output: list[dict], trace_id: str, latency_ms: float, cost_usd: float, input_tokens: int,
                     output_tokens: int, *, ok: bool = True, http_status: int = 200, attempts: int = 1,
                     error: str = "") -> Answer:
    """A recorded call's output messages (semconv) as the answer the runner scores, read as a logged baseline's
    (Case.baseline_message / baseline_text); a failed call (`ok` False) has no message."""
    shown = Case(trace_id, "", baseline_output=output if ok else [])
    return Answer(ok, shown.baseline_message if ok else {}, shown.baseline_text if ok else "", http_status, attempts,
                  latency_ms, cost_usd, trace_id, input_tokens, output_tokens, error=error)


def _parts_text(system_instructions: str | None) -> str | None:
    """The text of recorded system instructions (semconv parts), or None when there is none to read."""
    parts = loads_or_empty(system_instructions)
    if not isinstance(parts, list) or not parts:
        return None
    return "".join(str(p.get("content", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text")


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        err = resp.json().get("error") or {}
        if isinstance(err, dict):
            return str(err.get("message") or resp.reason_phrase), str(err.get("code") or err.get("type") or "")
        return str(err), ""
    except ValueError:
        return resp.text[:200] or resp.reason_phrase, ""


def _float_header(resp: httpx.Response, name: str) -> float:
    try:
        return float(resp.headers.get(name, "") or 0.0)
    except ValueError:
        return 0.0


WHOAMI_PATH = "/v1/tagway/whoami"  # which key this is, and whether it may mark calls as replay


def interleaved(cases: Sequence[Case]) -> list[Case]:
    """The cases in turns across their segments (each segment's own order kept): a run stopped early (its
    max_cost, Ctrl-C) has scored a share of every segment, not spent its budget on the first segments in the
    sampler's order and reached none of the rest (a replay trial's globex refund, never run)."""
    by_segment: dict[str, list[Case]] = {}
    for c in cases:
        by_segment.setdefault(c.segment, []).append(c)
    queues = list(by_segment.values())
    return [q[i] for i in range(max((len(q) for q in queues), default=0)) for q in queues if i < len(q)]


@dataclasses.dataclass(frozen=True)
class Caller:
    """Which key a run's calls go with, as the gateway says it (WHOAMI_PATH): what a run records as its key, and
    what a resume is checked against."""
    key_id: str
    admin: bool


def fatal_check(who: str, model: str, ans: Answer) -> None:
    """Raise FatalRunError when an answer says the run cannot go on: the model is not served, the key is refused,
    or the gateway cannot be reached (`who` names the caller: a candidate, a judge)."""
    if ans.http_status == 404 or ans.error_code == "model_not_found":
        raise FatalRunError(f"{who}: model {model!r} is not served by the gateway (404 "
                            f"{ans.error_code or 'not found'}): {ans.error}")
    if ans.http_status in (401, 403):
        why = ans.error.removeprefix(f"HTTP {ans.http_status}: ")  # said once
        need = "replay needs the admin key or a key that may set its customer: " if ans.http_status == 403 else ""
        raise FatalRunError(f"the gateway rejected the API key (HTTP {ans.http_status}): {why}; {need}pass "
                            "--api-key (pytest: --tagway-api-key) or set TAGWAY_API_KEY / TAGWAY_ADMIN_KEY")
    if ans.error_code == "upstream_auth_error":  # the gateway's provider key: no case of this model can run
        raise FatalRunError(f"{who}: model {model!r}: {ans.error.removeprefix('HTTP 502: ')}")
    if ans.error_code in (GONE, "timeout"):
        raise FatalRunError(ans.error, unreachable=True)


def transport_reason(e: BaseException) -> str:
    """What went wrong on the wire, in words: a refused connection says so (httpx-aiohttp reports it as a
    ConnectTimeout, which sends the user looking for a slow network)."""
    seen, x = 0, e
    while x is not None and seen < 8:
        if isinstance(x, ConnectionRefusedError):
            return "connection refused (is the gateway running there?)"
        x, seen = x.__cause__ or x.__context__, seen + 1
    return f"{type(e).__name__}: {e}"


def models_named(spec: ReplaySpec) -> list[tuple[str, str]]:
    """(who, model) of every model a run calls by name: the candidates, a re-run baseline's, the LLM judges'."""
    out = [(f"candidate {c.name}", c.model) for c in spec.candidates]
    if spec.baseline.mode == "rerun" and spec.baseline.model:
        out.append(("baseline", spec.baseline.model))
    out += [(f"judge {e.name}", str(e.option("model"))) for e in spec.evaluators
            if e.kind == "llm_judge" and e.option("model")]
    return out


async def check_models(client: httpx.AsyncClient, api_key: str, named: Sequence[tuple[str, str]]) -> None:
    """Before a run stores anything: the gateway serves every model it names to this key (`GET /v1/models/{id}`
    resolves wildcard routes too, and records no call). A model it does not serve was a stored run stopped at its
    first case, incomplete for good. Raises FatalRunError."""
    for who, model in dict.fromkeys(named):
        try:
            # quoted: a '?' or '#' in a model id must stay in the path (the gateway decodes it; '/' stays a '/')
            resp = await client.get(f"/v1/models/{quote(model, safe='/:@+')}",
                                    headers={"authorization": f"Bearer {api_key}"})
        except httpx.HTTPError as e:
            raise FatalRunError(f"cannot reach the gateway: {transport_reason(e)}") from None
        if resp.status_code == 404 and _error_of(resp)[1] == "model_not_found":  # the gateway's answer, not a proxy's
            raise FatalRunError(f"{who}: model {model!r} is not served by the gateway (or not to this key)"
                                f"{await _closest_model(client, api_key, model)}: GET /v1/models lists the models "
                                "it serves")


async def _closest_model(client: httpx.AsyncClient, api_key: str, model: str) -> str:
    """'; did you mean 'gpt-4o-mini'?' when the gateway serves a model named like `model` (a misspelt name), else
    "". Never raises: the error it decorates is what matters."""
    import difflib  # noqa: PLC0415
    try:
        resp = await client.get("/v1/models", headers={"authorization": f"Bearer {api_key}"})
        served = [str(m.get("id")) for m in resp.json().get("data") or [] if isinstance(m, dict) and m.get("id")]
    except (httpx.HTTPError, ValueError, AttributeError):
        return ""
    close = difflib.get_close_matches(model, served, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


async def check_gateway(client: httpx.AsyncClient, api_key: str, where: str) -> Caller | None:
    """Before a run stores anything: the gateway answers and takes the key. `GET /v1/models` records no call, so a
    wrong --gateway or --api-key costs one line instead of a stored run of errored cases (and, for a bad key, a
    burst of refused calls in the gateway's record). Raises FatalRunError. Returns which key it is (None when the
    gateway does not say: too old, a 5xx, a proxy in front; a resume then refuses a run that recorded a key)."""
    try:
        resp = await client.get("/v1/models", headers={"authorization": f"Bearer {api_key}"})
    except httpx.HTTPError as e:
        raise FatalRunError(f"cannot reach the gateway at {where}: {transport_reason(e)}") from None
    if resp.status_code in (401, 403):
        why, _ = _error_of(resp)
        raise FatalRunError(f"the gateway at {where} rejected the API key (HTTP {resp.status_code}): {why}; pass "
                            "--api-key (pytest: --tagway-api-key) or set TAGWAY_API_KEY / TAGWAY_ADMIN_KEY")
    if resp.status_code != 200:
        raise FatalRunError(f"{where} does not answer as a tagway gateway (GET /v1/models: HTTP {resp.status_code});"
                            " pass the gateway's base URL, e.g. http://127.0.0.1:4000")
    # A tenant key lists the models but may not mark calls as replay: every case would be refused (403) after the
    # run was stored. The gateway says which keys may (`may_mark_replay`; a gateway too old to say is not asked).
    try:
        who = await client.get(WHOAMI_PATH, headers={"authorization": f"Bearer {api_key}"})
        said = who.json() if who.status_code == 200 else {}
        may = said.get("may_mark_replay")
        key_id = said.get("key_id")
    except (httpx.HTTPError, ValueError, AttributeError):
        said, may, key_id = {}, None, None
    if may is False:
        raise FatalRunError(f"the gateway at {where} does not let this API key mark calls as replay: replay needs the "
                            "admin key or a key that may set its customer; pass --api-key (pytest: "
                            "--tagway-api-key) or set TAGWAY_API_KEY / TAGWAY_ADMIN_KEY")
    return Caller(key_id, said.get("admin") is True) if isinstance(key_id, str) and key_id else None


class GatewayPoster:
    """POSTs chat requests to the gateway with retries (exponential backoff with jitter, `retry-after` honoured) on
    408/409/429/5xx and transport errors; what came back is an `Answer` (never an exception)."""

    def __init__(self, client: httpx.AsyncClient, *, retries: int = 3, backoff_base: float = 0.25,
                 backoff_max: float = 8.0) -> None:
        self.client, self.retries = client, retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max

    async def post(self, body: dict, headers: dict[str, str]) -> Answer:
        """A chat request, or (its body marked with API_MARK) one for the API the recorded call spoke."""
        api = body.get(API_MARK)
        path = API_PATHS.get(api, CHAT_PATH)
        payload = orjson.dumps({k: v for k, v in body.items() if k != API_MARK} if api else body)
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            try:
                resp = await self.client.post(path, content=payload, headers=headers)
            except httpx.TransportError as e:
                if attempt > self.retries:
                    return Answer(False, {}, "", 0, attempt, 0.0, 0.0, "",
                                  error=f"gateway unreachable after {attempt} attempt(s): {transport_reason(e)}",
                                  error_code=GONE if isinstance(e, _GONE_ERRORS) else "timeout")
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            latency = (time.perf_counter() - t0) * 1000
            if (resp.status_code in RETRY_STATUSES and attempt <= self.retries
                    and resp.headers.get("x-should-retry") != "false"):  # as the OpenAI SDKs read it
                await asyncio.sleep(self._backoff(attempt, resp.headers.get("retry-after")))
                continue
            cost = _float_header(resp, "x-tagway-cost-usd")
            trace_id = resp.headers.get("x-tagway-trace-id", "")
            if resp.status_code != 200:
                msg, code = _error_of(resp)
                return Answer(False, {}, "", resp.status_code, attempt, latency, cost, trace_id,
                              error=f"HTTP {resp.status_code}: {msg}", error_code=code)
            if api in _API_ANSWER:
                try:
                    message, text, tin, tout = _API_ANSWER[api](resp.json())
                except (ValueError, AttributeError, TypeError):
                    return Answer(False, {}, "", 200, attempt, latency, cost, trace_id,
                                  error=f"gateway answered 200 with a body that is not a {api} answer")
                return Answer(True, message, text, 200, attempt, latency, cost, trace_id, tin, tout)
            try:
                data = resp.json()
                choice = (data.get("choices") or [{}])[0]
                message = choice.get("message") or {}
            except (ValueError, AttributeError, IndexError):
                return Answer(False, {}, "", 200, attempt, latency, cost, trace_id,
                              error="gateway answered 200 with a body that is not a chat completion")
            usage = data.get("usage") or {}
            content = message.get("content")
            text = content if isinstance(content, str) else text_of(content)
            return Answer(True, message, text, 200, attempt, latency, cost, trace_id,
                          int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass
        delay = min(self.backoff_base * (2 ** (attempt - 1)), self.backoff_max)
        return delay * (0.5 + random.random() / 2)  # jitter: concurrent retries do not come back together


class Runner:
    """Runs (case, target) items with bounded concurrency. `sink(rows)` persists a batch (called in a thread)."""

    def __init__(self, client: httpx.AsyncClient, spec: ReplaySpec, *, run_id: str, api_key: str,
                 dataset_id: str = "", sink: Callable[[list[ResultRow]], Any] | None = None,
                 concurrency: int | None = None, retries: int | None = None, max_cost: float | None = None,
                 progress: bool = True, backoff_base: float = 0.25, backoff_max: float = 8.0,
                 batch_size: int = 16, flush_interval: float = 1.0, spent_before: float = 0.0) -> None:
        self.client = client
        self.spec = spec
        self.run_id = run_id
        self.api_key = api_key
        self.dataset_id = dataset_id
        self.sink = sink
        self.concurrency = concurrency or spec.concurrency
        self.retries = spec.retries if retries is None else retries
        self.max_cost = spec.max_cost if max_cost is None else max_cost
        self.progress = progress
        self.poster = GatewayPoster(client, retries=self.retries, backoff_base=backoff_base, backoff_max=backoff_max)
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.spent = spent_before
        self.judge_spent = 0.0  # this session's judge calls (in `spent` too): the report shows them apart
        self.judge_version = spec.judge_version
        self._buffer: list[ResultRow] = []
        self._last_flush = time.monotonic()
        self._flush_lock = asyncio.Lock()
        self._probing = False  # while True, an unknown model / rejected key / dead gateway stops the run
        self._gone = ""  # why the gateway is taken as gone (a call could not reach it after its tries): stop the run

    def _judge_fn(self, case: Case, target: Target) -> Callable:
        async def judge(model: str, messages: list[dict], params: dict) -> str:
            headers = replay_headers(case, api_key=self.api_key, run_id=self.run_id, candidate=target.name,
                                     prompt_version=self.judge_version or case.prompt_version, source=JUDGE_SOURCE)
            ans = await self.poster.post({**params, "model": model, "messages": messages, "stream": False}, headers)
            self.spent += ans.cost_usd
            self.judge_spent += ans.cost_usd
            if ans.error_code == GONE:
                self._gone = ans.error
            if not ans.ok:
                raise RuntimeError(ans.error)
            return ans.text
        return judge

    # -- one item -----------------------------------------------------------------------------------------------
    async def run_item(self, case: Case, target: Target, answer: Answer | None = None) -> ResultRow:
        """Run and score one item; `answer` scores an answer already recorded for the target (a shadow call, or a
        call of this run that the gateway recorded) instead of calling the gateway."""
        prompt_version = _prompt_version(case, target)
        if answer is not None:
            ans, model = answer, target.model or case.model
        elif target.logged:
            ans = Answer(case.baseline_status == "ok", case.baseline_message, case.baseline_text, 0, 0,
                          float(case.baseline_latency_ms or 0.0), float(case.baseline_cost_usd or 0.0), case.case_id)
            model = case.model
        else:
            body = build_request(case, target)
            model = body["model"]
            headers = replay_headers(case, api_key=self.api_key, run_id=self.run_id, candidate=target.name,
                                     prompt_version=prompt_version)
            ans = await self.poster.post(body, headers)
            self.spent += ans.cost_usd
            if ans.error_code == GONE:
                self._gone = ans.error
        row = ResultRow(run_id=self.run_id, case_id=case.case_id, candidate=target.name, segment=case.segment,
                        status="errored", replay_trace_id="" if target.logged else ans.trace_id,
                        customer=case.customer, intent=case.intent, prompt_version=prompt_version, model=model,
                        tags=dict(case.tags), dataset_id=self.dataset_id, judge_version=self.judge_version,
                        latency_ms=ans.latency_ms, cost_usd=ans.cost_usd, input_tokens=ans.input_tokens,
                        output_tokens=ans.output_tokens, http_status=ans.http_status, attempts=ans.attempts)
        if not ans.ok:
            # an error is an outcome: the call (or, for a logged baseline, the production call) failed
            row.error = ans.error if not target.logged else f"the production call errored ({case.baseline_status})"
            row.passed = None
            if not target.logged and answer is None:
                self._check_fatal(target, model, ans)
            return row
        ctx = EvalContext(output=ans.text, message=ans.message, reference=case.baseline_text,
                          reference_tool_calls=case.baseline_message.get("tool_calls") or [],
                          latency_ms=ans.latency_ms, cost_usd=ans.cost_usd,
                          vars={"customer": case.customer, "intent": case.intent, "prompt_version": prompt_version,
                                "tags": case.tags, "case_id": case.case_id, "candidate": target.name,
                                "messages": case.messages, "label": case.label, "critique": case.critique,
                                "is_reference": target.logged,
                                "baseline_logged": self.spec.baseline.mode == "logged"},
                          judge=self._judge_fn(case, target))
        verdict = await evaluate(self.spec.evaluators, ctx, self.spec.case_threshold)
        row.status, row.score = verdict.status, verdict.score
        row.passed = None if verdict.status == "errored" else verdict.passed
        row.error = verdict.reason if verdict.status == "errored" else ""
        row.evaluations = [dataclasses.asdict(r) for r in verdict.results]
        row.output = ans.text or (orjson.dumps(ans.message.get("tool_calls")).decode()
                                  if ans.message.get("tool_calls") else "")
        return row

    def _check_fatal(self, target: Target, model: str, ans: Answer) -> None:
        if self._probing:
            fatal_check(target.name, model, ans)

    # -- persistence --------------------------------------------------------------------------------------------
    async def _emit(self, row: ResultRow, results: list[ResultRow]) -> None:
        results.append(row)
        if self.sink is None:
            return
        self._buffer.append(row)
        if len(self._buffer) >= self.batch_size or time.monotonic() - self._last_flush >= self.flush_interval:
            await self.flush()

    async def flush(self) -> None:
        async with self._flush_lock:
            batch, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if batch and self.sink is not None:
                await asyncio.to_thread(self.sink, batch)

    # -- the run ------------------------------------------------------------------------------------------------
    async def run(self, cases: Sequence[Case], targets: Sequence[Target],
                  skip: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
                  recorded: Mapping[tuple[str, str], Answer] | None = None) -> RunOutcome:
        """Every (case, target) not in `skip`, case-major so a partial run still has paired results. An item with
        an answer in `recorded` (by (target name, case id): a call already paid for) is scored from it first, with
        no call, outside the budget unless an LLM judge scores it. Then the first item of each calling target runs
        alone (a probe): an unknown model or a rejected key stops the run before the rest is sent. A call that
        cannot reach the gateway after its tries stops the run too (FatalRunError, unreachable), once what completed
        is stored: the items it left, and those the gateway's going left errored, are no outcome, and stay for
        `resume`."""
        recorded = recorded or {}
        judged = any(e.kind == "llm_judge" for e in self.spec.evaluators)  # scoring an answer makes paid calls
        items = [(c, t) for c in interleaved(cases) for t in targets if (t.name, c.case_id) not in skip]
        results: list[ResultRow] = []
        from_record = [it for it in items if (it[1].name, it[0].case_id) in recorded]
        to_call = [it for it in items if (it[1].name, it[0].case_id) not in recorded]
        probes: list[tuple[Case, Target]] = []
        for t in targets:
            first = next((it for it in to_call if it[1] is t), None)
            if first is not None and not t.logged:
                probes.append(first)
        probe_ids = {id(p) for p in probes}
        rest = [it for it in to_call if id(it) not in probe_ids]
        stop_reason = ""
        done = 0
        # the bar counts calls: each case runs once per target (candidates, and the baseline when it is re-run)
        label = f"replay {len(cases)} case(s) x {len(targets)}" if len(targets) > 1 else f"replay {len(cases)} case(s)"
        with _progress(self.progress, len(items), label) as bar:
            async def one(case: Case, target: Target) -> bool:
                """Run one item unless the budget is spent (then say so) or the gateway is gone: then False."""
                nonlocal stop_reason, done
                if self._gone:
                    return False
                answer = recorded.get((target.name, case.case_id))
                if (answer is None or judged) and self.max_cost is not None and self.spent >= self.max_cost:
                    stop_reason = f"budget reached: spent {fmt_usd(self.spent, 4)} of max_cost ${self.max_cost:g}"
                    return False
                row = await self.run_item(case, target, answer)
                if self._gone and row.status == "errored":  # the gateway went away under it: not the case's outcome
                    return False
                await self._emit(row, results)
                done += 1
                bar(done, self.spent)
                return True

            async def pool(batch: list[tuple[Case, Target]]) -> None:
                queue = iter(batch)

                async def worker() -> None:
                    for case, target in queue:
                        if not await one(case, target):
                            return

                await asyncio.gather(*(worker() for _ in range(min(self.concurrency, max(len(batch), 1)))))

            try:
                await pool(from_record)
                self._probing = True
                for case, target in probes if not stop_reason else ():
                    if not await one(case, target):
                        break
                self._probing = False
                await pool(rest if not stop_reason else [])
            finally:
                self._probing = False
                await asyncio.shield(self.flush())
        if self._gone:
            raise FatalRunError(f"the gateway went away mid-run: {self._gone}", unreachable=True)
        left = len(items) - done
        errored = sum(1 for r in results if r.status == "errored")
        # with `errors: fail` an errored result is an outcome (a failed case); with `exclude` it still needs a score
        scored = errored == 0 or self.spec.gating.errors == "fail"
        return RunOutcome(results, self.spent, left == 0 and scored, stop_reason if left else "", left, errored)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str = "replay"):
    if not enabled:
        yield lambda done, cost: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), TextColumn("{task.fields[cost]}"), console=Console(stderr=True),
                    transient=False)
    with prog:
        task = prog.add_task("replay", total=total, cost=fmt_usd(0.0))
        yield lambda done, cost: prog.update(task, completed=done, cost=fmt_usd(cost))


# -- the client ---------------------------------------------------------------------------------------------------

def _load_app(ref: str, config: str | Path | None = None) -> Any:
    try:
        factory = load_ref(ref)
    except ImportError as e:
        raise FatalRunError(f"in-process mode needs {ref} (the gateway package): {e}") from None
    try:
        return factory(str(config)) if config else factory()
    except Exception as e:  # e.g. the gateway's ConfigError: one line for the user, not a traceback
        where = f"{ref}, config {config}" if config else ref
        reason = "; ".join(str(e).splitlines()) or type(e).__name__
        raise FatalRunError(f"the in-process gateway could not be built ({where}): {reason}") from None


def check_in_process(app_ref: str = GATEWAY_APP, config: str | Path | None = None) -> None:
    """Before a run stores anything: the in-process gateway can be built, and no gateway serves its store."""
    _refuse_beside_a_serving_gateway(_load_app(app_ref, config))


def _refuse_beside_a_serving_gateway(app: Any) -> None:
    """An in-process gateway on an embedded store that a gateway already serves cannot start (chDB allows one
    process per data directory; its spool lock is hit first, whose message sends the user the wrong way): say
    which gateway serves it and how to replay through it."""
    from exporters import discovery
    config = getattr(app, "config", None)
    storage = getattr(config, "storage", None)
    if storage is None:
        return
    directory = discovery.store_dir(storage.resolved_dsn())
    if directory is None:
        return
    ann = discovery.serving(directory)  # an unreadable file: the start-up that follows says what is wrong
    if ann is not None:
        raise FatalRunError(f"the gateway {ann.describe()} serves the store {directory}: use --gateway {ann.url} "
                            "(--in-process would start a second gateway on the same store)")


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """Run the ASGI lifespan protocol (startup/shutdown), which httpx.ASGITransport does not do by itself."""
    receive_q: asyncio.Queue = asyncio.Queue()
    send_q: asyncio.Queue = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def receive() -> dict:
        return await receive_q.get()

    async def send(msg: dict) -> None:
        await send_q.put(msg)

    task = asyncio.create_task(app(scope, receive, send))
    await receive_q.put({"type": "lifespan.startup"})
    getter = asyncio.create_task(send_q.get())
    done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter not in done:  # the app does not speak lifespan (it returned or raised): nothing to run
        getter.cancel()
        yield
        return
    msg = getter.result()
    if msg["type"] == "lifespan.startup.failed":
        raise FatalRunError(f"the in-process gateway failed to start: {msg.get('message', '')}")
    try:
        yield
    finally:
        await receive_q.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(send_q.get(), timeout=10)
            await asyncio.wait_for(task, timeout=10)


def _fast_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    """httpx over aiohttp when `httpx-aiohttp` is installed: httpcore's pool spends most of its time assigning
    requests to connections under concurrency (bench/replay_bench.py, instant server,
    concurrency 32: ~300 cases/s with httpcore, ~1,050 with aiohttp). None: httpx's
    default transport."""
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return None
    return AiohttpTransport(limits=limits)


def store_dsn_for(resolved: Any, gateway: str | None, api_key: str) -> str:
    """The DSN a replay command opens: the one resolved from its flags, config and environment (exporters.dsn), or,
    when it was given none of them but a gateway (`resolved.source` "default"), the store that gateway names to the
    admin key (WHOAMI_PATH), used only when it is the store a gateway on this machine at that port announces (never
    a path a remote gateway, or something posing as one, names). Otherwise the run would be stored in a new
    ./tagway-data beside the gateway's store, where neither its dashboard nor `replay report --config` finds it:
    refused in one line, unless the gateway named no store and there is one here already (as before)."""
    from exporters import discovery  # noqa: PLC0415
    from exporters.store import chdb_path  # noqa: PLC0415

    from .spec import SpecError  # noqa: PLC0415

    if resolved.source != "default" or not gateway or not is_http_url(gateway):
        return resolved.dsn  # a URL that is none is said where the gateway is first used
    why, where = "", {}
    try:
        r = httpx.get(gateway.rstrip("/") + WHOAMI_PATH, headers={"authorization": f"Bearer {api_key}"}, timeout=10)
    except (httpx.HTTPError, ValueError) as e:
        why = f"the gateway did not answer: {transport_reason(e)}"
    else:
        try:
            body = r.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        if r.status_code in (401, 403):
            why = f"the gateway refused the key (HTTP {r.status_code})"
        elif r.status_code != 200:
            why = f"the gateway answered HTTP {r.status_code}"
        elif body.get("admin") is not True:
            why = "it names its store only to the admin key"
        elif isinstance(body.get("store"), dict):
            where = body["store"]
    embedded, server = where.get("embedded"), where.get("server")
    if isinstance(embedded, str) and embedded:
        ann = discovery.serving(embedded) if os.path.isdir(embedded) else None
        if ann is not None and discovery.this_host(gateway) and \
                urllib.parse.urlsplit(ann.url).port == urllib.parse.urlsplit(gateway).port:
            return f"chdb://{embedded}"
        why = f"its store {embedded} is not the one a gateway on this machine announces at that address"
    elif server:
        why = f"it records to {server}"
    if not where and Path(chdb_path(resolved.dsn)).is_dir():
        return resolved.dsn
    raise SpecError(f"which store? --gateway {gateway} was given but no store ({why}): pass the gateway's "
                    "--config, or --dsn, so the run is stored where the gateway records, not in a new ./tagway-data")


def gateway_for(flag: str | None, store: Any, *, in_process: bool = False) -> str | None:
    """Where calls go: --gateway (env TAGWAY_GATEWAY_URL), else the gateway serving the embedded store this command
    reached through it (exporters.store_access: its announced loopback URL), else None (the caller says so)."""
    if flag or in_process:
        return flag
    ann = getattr(store, "announcement", None)  # --verbose said "store: through the running gateway (...)" already
    return ann.url if ann is not None else None


@contextlib.asynccontextmanager
async def gateway_client(*, base_url: str | None = None, transport: httpx.AsyncBaseTransport | None = None,
                         in_process: bool = False, app_ref: str = GATEWAY_APP, app_config: str | Path | None = None,
                         timeout: float = 120.0, concurrency: int = 8) -> AsyncIterator[httpx.AsyncClient]:
    """An AsyncClient on the gateway: its URL, a given transport, or (in-process) the gateway's ASGI app (built from
    `app_config`, a config file path, when given)."""
    limits = httpx.Limits(max_connections=max(concurrency * 2, 10), max_keepalive_connections=max(concurrency, 10))
    tm = httpx.Timeout(timeout, connect=min(timeout, 10.0))
    if in_process:
        app = _load_app(app_ref, app_config)
        _refuse_beside_a_serving_gateway(app)
        async with _lifespan(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tagway.in-process",
                                         timeout=tm) as client:
                yield client
        return
    if not base_url and transport is None:
        raise FatalRunError(NO_GATEWAY)
    if base_url and not is_http_url(base_url):
        raise FatalRunError(f"--gateway {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:4000")
    if transport is None:
        transport = _fast_transport(limits)
    async with httpx.AsyncClient(base_url=base_url or "http://gateway", transport=transport, timeout=tm,
                                 limits=limits) as client:
        yield client
