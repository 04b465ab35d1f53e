// tagway case board: the Calls list, a Call, the Case view, Replays (runs, a run, a trend), Charts and Coverage.
// One static shell (board.html) per page; the page name comes from the server (body[data-page]), an id from the
// path (/ui/calls/<trace id>), and every filter from the query string, so a link can be shared. Data comes from
// /admin/* with the admin key, or /v1/tagway/* with a tenant key (limited to its customer by the server).
// Everything from the store is put in the page as text (textContent, never innerHTML): markup in a filter value,
// a tag or a conversation shows as typed.
"use strict";

const PAGE = document.body.dataset.page;
const IDENT = (() => {
  const m = location.pathname.match(/\/ui\/[a-z]+\/([^/]+)\/?$/);
  if (!m) return null;
  try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
})();
const QS = new URLSearchParams(location.search);
const CONTENT_CHARS = 20000;  // captured content shown before "show all"
const WINDOWS = [["15m", "last 15 min"], ["1h", "last hour"], ["6h", "last 6 h"], ["24h", "last 24 h"],
  ["7d", "last 7 days"], ["30d", "last 30 days"], ["90d", "last 90 days"]];
const CALL_FILTERS = [["customer", "customer"], ["intent", "intent"], ["prompt_version", "prompt version"],
  ["model", "model"], ["error_type", "error type"], ["source", "source"]];
const SELECTION_PARAMS = ["since", "from", "to", "status"];

// -- small helpers ---------------------------------------------------------------------------------------------
const main = () => $("page");
const fmtTime = (iso) => (iso ? iso.slice(0, 19).replace("T", " ") : "-");
const fmtEpoch = (s) => (s ? new Date(s * 1000).toISOString().slice(0, 16).replace("T", " ") : "-");
const rate3 = (v) => (v === null || v === undefined ? "—" : fixed(v, 3));
const delta3 = (v) => {
  if (v === null || v === undefined) return "—";
  const s = fixed(v, 3);
  return s.startsWith("-") ? s : "+" + s;
};
const ci3 = (ci) => (ci ? fixed(ci[0], 3) + "–" + fixed(ci[1], 3) : "—");
const tagsText = (tags) => Object.entries(tags || {}).sort().map(([k, v]) => k + "=" + v).join("  ");

function card(title, ...children) {
  return el("section", { class: "card" }, title ? el("h2", {}, title) : null, ...children);
}
function dl(pairs) {
  const d = el("dl", { class: "kv" });
  for (const [k, v] of pairs) {
    if (v === null || v === undefined || v === "") continue;
    d.append(el("dt", {}, k), el("dd", { "data-field": k }, v instanceof Node ? v : String(v)));
  }
  return d;
}
// A call's cost as `tagway show` says it: the gateway records none for a model without a price, nor for a call
// without token usage; llm_calls stores 0 for both, and the call's span tells them apart (cost_known).
function callCost(c) {
  if (c.cost_known !== false) return fmtCost(c.cost_usd || 0);
  return (c.input_tokens || c.output_tokens) ? "unknown (no price for this model)" : "unknown (no token usage recorded)";
}
// An evaluation run's dataset version: the API gives the name and the version's ref (name@N) apart.
function datasetRef(r) {
  const v = r.dataset_version ? String(r.dataset_version) : "";
  return v.includes("@") ? v : r.dataset + (v ? "@" + v : "");
}
function badge(text, kind) { return el("span", { class: "badge " + (kind || text) }, text); }
function link(text, href, attrs) { return el("a", Object.assign({ href }, attrs || {}), text); }
function table(heads, rows, attrs) {
  return el("div", { class: "table-wrap" }, el("table", Object.assign({ class: "data" }, attrs || {}),
    el("thead", {}, el("tr", {}, ...heads.map((h) => el("th", { class: h.endsWith(" ") ? "r" : "" }, h.trim())))),
    el("tbody", {}, ...rows)));
}
function tryJSON(text) {
  if (typeof text !== "string") return text;
  try { return JSON.parse(text); } catch (e) { return undefined; }
}
function pretty(value) {
  const v = typeof value === "string" ? tryJSON(value) : value;
  return v === undefined ? String(value) : JSON.stringify(v, null, 2);
}
function pre(text, cls) { return el("pre", { class: cls || "" }, markedText(text)); }
function loaded(state) { document.body.setAttribute("data-loaded", state); }
function status(text) { $("status-line").textContent = text; }
function notFound(message) {
  status("");  // not "loading…" beside the answer
  clear(main());
  main().appendChild(el("section", { class: "card notfound", id: "not-found" },
    el("h2", {}, "Not found (404)"), el("p", {}, message)));
  document.title = "tagway · not found";
  loaded("404");
}
// A selection's query parameters from this page's URL (window, filters, status): carried from page to page.
function selectionParams(from) {
  const p = new URLSearchParams();
  for (const k of SELECTION_PARAMS) if (from.get(k)) p.set(k, from.get(k));
  for (const w of from.getAll("where")) p.append("where", w);
  return p;
}

// -- chat rendering --------------------------------------------------------------------------------------------
function renderPart(part) {
  const t = part && part.type;
  if (t === "text") {
    const text = String(part.content === undefined ? "" : part.content);
    const j = /^\s*[[{]/.test(text) ? tryJSON(text) : undefined;
    return j !== undefined && typeof j === "object" ? pre(JSON.stringify(j, null, 2), "json")
      : el("div", { class: "text" }, markedText(text));
  }
  if (t === "tool_call") {
    return el("div", { class: "tool-call" }, el("div", { class: "tool-head" }, "tool call ",
      el("code", {}, part.name || "?"), part.id ? el("span", { class: "muted" }, " " + part.id) : null),
    pre(pretty(part.arguments === undefined ? "" : part.arguments), "json"));
  }
  if (t === "tool_call_response") {
    return el("div", { class: "tool-result" }, el("div", { class: "tool-head" }, "tool result",
      part.id ? el("span", { class: "muted" }, " " + part.id) : null), pre(pretty(part.response), "json"));
  }
  if (t === "uri") return el("div", { class: "text" }, "[" + (part.modality || "file") + "] ", markedText(part.uri || ""));
  return pre(JSON.stringify(part, null, 2), "json");
}
function bubble(role, parts, note) {
  return el("div", { class: "msg role-" + String(role).replace(/[^a-z]/g, ""), "data-role": role },
    el("div", { class: "msg-role" }, role, note ? el("span", { class: "muted" }, " · " + note) : null),
    ...(parts || []).map(renderPart));
}
function conversation(call, opts) {
  const box = el("div", { class: "chat", id: (opts && opts.id) || "conversation" });
  const system = tryJSON(call.system_instructions || "") || [];
  const input = tryJSON(call.request_json || "") || [];
  const output = tryJSON(call.response_json || "") || [];
  if (Array.isArray(system) && system.length) {
    box.appendChild(bubble("system", system.map((p) => { const q = Object.assign({}, p); delete q.role; return q; })));
  }
  if (Array.isArray(input)) for (const m of input) box.appendChild(bubble(m.role || "user", m.parts, m.name));
  else if (call.request_json) box.appendChild(pre(call.request_json));
  if (Array.isArray(output)) {
    for (const m of output) box.appendChild(bubble(m.role || "assistant", m.parts,
      m.finish_reason ? "finish: " + m.finish_reason : ""));
  } else if (call.response_json) box.appendChild(pre(call.response_json));
  if (!box.childNodes.length) box.appendChild(el("p", { class: "muted" }, "content not captured for this call"));
  return box;
}
function truncationNote(call) {
  const cut = Object.values(call.truncated || {}).reduce((a, b) => a + b, 0);
  if (!cut) return null;
  const p = new URLSearchParams(location.search);
  p.set("full", "1");
  return el("div", { class: "banner warn", id: "truncated" }, "Long content is cut here (" + fmtInt(cut) +
    " characters left out). ", link("show all", location.pathname + "?" + p.toString(), { id: "show-all" }));
}

// -- the Calls list --------------------------------------------------------------------------------------------
function splitWhere(list) {
  const known = {}, rest = [];
  for (const w of list) {
    const m = w.match(/^([a-z_]+)=(.*)$/s);
    if (m && CALL_FILTERS.some(([k]) => k === m[1]) && !(m[1] in known)) known[m[1]] = m[2];
    else rest.push(w);
  }
  return { known, rest };
}

function callsForm() {
  const { known, rest } = splitWhere(QS.getAll("where"));
  const since = el("select", { id: "f-since" });
  const cur = QS.get("since") || (QS.get("from") ? "" : "24h");
  for (const [v, t] of WINDOWS) since.appendChild(el("option", { value: v }, t));
  if (cur && !WINDOWS.some(([v]) => v === cur)) since.appendChild(el("option", { value: cur }, cur));
  if (!cur) since.appendChild(el("option", { value: "" }, "from/to in the URL"));
  since.value = cur;
  const inputs = CALL_FILTERS.map(([k, t]) => {
    const input = el("input", { id: "f-" + k, name: k, size: 12, spellcheck: false });
    input.value = known[k] || "";
    if (k === "customer" && WHO && !WHO.admin) { input.value = WHO.customer; input.disabled = true; }
    return el("label", {}, t, input);
  });
  const st = el("select", { id: "f-status" });
  for (const [v, t] of [["", "any"], ["ok", "ok"], ["error", "error"], ["cancelled", "cancelled"]]) {
    st.appendChild(el("option", { value: v }, t));
  }
  st.value = QS.get("status") || "";
  const more = el("input", { id: "f-where", spellcheck: false, placeholder: "tag.region=eu status!=ok",
    title: "more key=value (or key!=value) filters, ANDed: any column or tag.<key>" });
  more.value = rest.join(" ");
  const search = el("input", { id: "f-q", spellcheck: false, placeholder: "text in the conversation, or a trace id" });
  search.value = QS.get("q") || "";
  const form = el("form", { class: "card filters", id: "filters", autocomplete: "off" },
    el("label", {}, "Window", since), ...inputs, el("label", {}, "Status", st),
    el("label", { class: "grow" }, "More filters", more), el("label", { class: "grow" }, "Search", search),
    el("button", { type: "submit" }, "Apply"));
  if (QS.get("dataset")) {
    const without = new URLSearchParams(location.search);
    for (const k of ["dataset", "segment", "cursor"]) without.delete(k);
    form.appendChild(el("span", { class: "chip", id: "f-dataset" }, "dataset " + QS.get("dataset") +
      (QS.has("segment") ? " · segment " + QS.get("segment") : "") + " ",
    link("×", uiLink("calls", null, without), { title: "all calls, not only this dataset's" })));
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams();
    if (since.value) p.set("since", since.value);
    else for (const k of ["from", "to"]) if (QS.get(k)) p.set(k, QS.get(k));
    for (const [k] of CALL_FILTERS) {
      const v = $("f-" + k).value.trim();
      if (v && !$("f-" + k).disabled) p.append("where", k + "=" + v);
    }
    for (const w of splitFilters(more.value.trim())) p.append("where", w);
    if (st.value) p.set("status", st.value);
    if (search.value.trim()) p.set("q", search.value.trim());
    for (const k of ["dataset", "segment"]) if (QS.has(k)) p.set(k, QS.get(k));
    location.assign(uiLink("calls", null, p));
  });
  return form;
}

function callsApiParams() {
  const p = new URLSearchParams();
  for (const k of ["since", "from", "to", "status", "q", "dataset", "segment", "cursor", "limit"]) {
    if (QS.has(k) && QS.get(k) !== "") p.set(k, QS.get(k));
    else if (k === "segment" && QS.has(k)) p.set(k, "");
  }
  for (const w of QS.getAll("where")) p.append("where", w);
  return p;
}

function callRow(c) {
  return el("tr", { "data-trace-id": c.trace_id, class: "status-" + c.status },
    el("td", { class: "mono" }, link(fmtTime(c.Timestamp), uiLink("calls", c.trace_id), { class: "call-link" })),
    el("td", {}, badge(c.status)),
    el("td", { "data-col": "customer" }, label(c.customer)), el("td", {}, label(c.intent)),
    el("td", {}, label(c.prompt_version)), el("td", {}, c.model_requested),
    el("td", { class: "tags" }, tagsText(c.tags)),
    el("td", { class: "r" }, fmtMs(c.latency_ms)), el("td", { class: "r" }, fmtMs(c.ttft_ms)),
    el("td", { class: "r" }, fmtInt(c.input_tokens) + " / " + fmtInt(c.output_tokens)),
    el("td", { class: "r" }, fmtCost(c.cost_usd || 0)),
    el("td", {}, c.error_type ? c.error_type + (c.http_status ? " (" + c.http_status + ")" : "") : ""),
    el("td", { class: "excerpt" }, markedText(c.input_excerpt || "")));
}

async function pageCalls() {
  document.title = "tagway · calls";
  main().appendChild(callsForm());
  const page = await api(apiPrefix() + "calls", callsApiParams());
  const rows = page.calls.map(callRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 13, class: "muted" }, "no calls match these filters")));
  const nav = el("div", { class: "pager" });
  if (QS.get("cursor")) {
    const first = new URLSearchParams(location.search);
    first.delete("cursor");
    nav.appendChild(link("← first page", uiLink("calls", null, first), { id: "first-page" }));
  }
  if (page.next) {
    const next = new URLSearchParams(location.search);
    next.set("cursor", page.next);
    nav.appendChild(link("next page →", uiLink("calls", null, next), { id: "next-page" }));
  }
  main().append(card(null, table(["time", "status", "customer", "intent", "prompt", "model", "tags", "latency ms ",
    "ttft ms ", "tokens in/out ", "cost ", "error", "input"], rows, { id: "calls" }), nav));
  const w = page.window;
  const excluded = page.sources_excluded.length ? " · source not " + page.sources_excluded.join(", ") : "";
  status(`${page.calls.length} call(s)${page.next ? " (more on the next page)" : ""} · ${fmtTime(w.from)} to ` +
    `${fmtTime(w.to)} UTC${excluded}${page.search ? " · search " + JSON.stringify(page.search) : ""}`);
}

// -- a Call ----------------------------------------------------------------------------------------------------
function caseParams() {
  const p = new URLSearchParams();
  if (QS.get("full") !== "1") p.set("max_chars", String(CONTENT_CHARS));
  return p;
}

function callFacts(c) {
  return dl([
    ["time", fmtTime(c.Timestamp) + " UTC"], ["customer", label(c.customer)], ["intent", label(c.intent)],
    ["prompt version", label(c.prompt_version)], ["tags", tagsText(c.tags)], ["operation", c.operation],
    ["model", c.model_requested], ["model served", c.model_served !== c.model_requested ? c.model_served : ""],
    ["provider", c.provider], ["deployment", c.deployment], ["stream", c.stream ? "yes" : "no"],
    ["finish reasons", c.finish_reasons], ["source", c.source], ["key id", c.key_id], ["end user", c.end_user],
  ]);
}

function attemptsTable(c) {
  const rows = (c.attempts_detail || []).map((a) => el("tr", { "data-attempt": String(a.attempt) },
    el("td", { class: "r" }, String(a.attempt)), el("td", {}, a.deployment), el("td", {}, a.provider),
    el("td", {}, a.model), el("td", {}, badge(a.status)), el("td", {}, a.error_type || ""),
    el("td", { class: "r" }, a.http_status ? String(a.http_status) : "-"),
    el("td", { class: "r" }, fmtMs(a.start_offset_ms)), el("td", { class: "r" }, fmtMs(a.duration_ms))));
  return rows.length ? table(["#", "deployment", "provider", "model", "status", "error", "http ", "start ms ",
    "duration ms "], rows, { id: "attempts" }) : null;
}

function replaysOfCall(view) {
  const rows = [];
  for (const run of view.runs) {
    for (const c of [run.baseline].concat(run.candidates).filter(Boolean)) {
      rows.push(el("tr", { "data-run": run.run_id, "data-candidate": c.candidate },
        el("td", { class: "mono" }, link(run.run_id, uiLink("replays", run.run_id))),
        el("td", {}, fmtEpoch(run.created_at)), el("td", {}, c.candidate), el("td", {}, c.model || ""),
        el("td", {}, badge(c.status)), el("td", {}, c.flip ? badge(c.flip) : ""),
        el("td", {}, link("case view", uiLink("cases", view.trace_id) + "#run-" + encodeURIComponent(run.run_id)))));
    }
  }
  return rows.length ? table(["run", "when", "candidate", "model", "result", "flip", ""], rows, { id: "replays" })
    : el("p", { class: "muted" }, "No replay has used this call as a case.");
}

async function pageCall() {
  let view;
  try {
    view = await api(apiPrefix() + "cases/" + encodeURIComponent(IDENT), caseParams());
  } catch (e) {
    if (e.status === 404) return notFound("No call with trace id " + JSON.stringify(IDENT) + (WHO && !WHO.admin
      ? " for customer " + WHO.customer : "") + ". It may be older than the store's retention, or mistyped.");
    throw e;
  }
  const c = view.call;
  document.title = "tagway · call " + c.trace_id;
  const links = el("div", { class: "links" }, link("case view", uiLink("cases", c.trace_id), { id: "to-case" }));
  if (c.session) {  // a session belongs to its customer: two tenants may use the same session id
    const p = new URLSearchParams([["since", "30d"], ["where", c.session], ["where", "customer=" + c.customer]]);
    links.appendChild(link("session (" + c.session + ")", uiLink("calls", null, p), { id: "to-session" }));
  }
  const same = new URLSearchParams([["since", "24h"], ["where", "customer=" + c.customer], ["where", "intent=" + c.intent]]);
  links.appendChild(link("calls like this", uiLink("calls", null, same)));
  if (c.replay_case_id) {
    links.append(link("original case " + c.replay_case_id, uiLink("cases", c.replay_case_id), { id: "to-original" }),
      link("run " + c.replay_run_id, uiLink("replays", c.replay_run_id)));
  }
  main().append(el("h1", {}, "Call ", el("code", { id: "trace-id" }, c.trace_id), " ", badge(c.status)), links);
  if (c.status !== "ok") {
    main().appendChild(card("Error", dl([["error type", c.error_type], ["http status", c.http_status ? String(c.http_status) : ""],
      ["message", c.error_message || ""]])));
  }
  const grid = el("div", { class: "grid2" });
  grid.append(card("Conversation", truncationNote(c), conversation(c)), el("div", {},
    card("Details", callFacts(c)),
    card("Timings, tokens, cost", dl([["latency", fmtMs(c.latency_ms) + " ms"],
      ["time to first byte", c.ttft_ms === null || c.ttft_ms === undefined ? "" : fmtMs(c.ttft_ms) + " ms"],
      ["attempts", String(c.attempts || 1)],
      ["tokens", fmtInt(c.input_tokens) + " in / " + fmtInt(c.output_tokens) + " out" + (c.usage_estimated ? " (estimated: the stream gave no count of its own)" : "")],
      ["cost", callCost(c)]]), attemptsTable(c)),
    c.request_params ? card("Request parameters", el("div", { id: "request-params" }, pre(pretty(c.request_params), "json"))) : null,
    card("Applied tags", await appliedTags(c, "message"), c.session_id ? await appliedTags(c, "session") : null),
    card("Replays of this call", replaysOfCall(view))));
  main().appendChild(grid);
  status("");
}

// -- applied tags (tag rules and people; seed 002) ---------------------------------------------------------------
// A message is the call itself; its session is the customer's session id (a tenant key names it without the
// customer). Every change goes through the API and lands in the audit log shown under it.
function tagTarget(c, kind) {
  if (kind === "message") return "message:" + c.trace_id;
  return "session:" + (WHO && !WHO.admin ? "" : c.customer + "/") + c.session_id;
}
async function appliedTags(c, kind) {
  const target = tagTarget(c, kind);
  const box = el("div", { class: "applied-tags", id: "applied-" + kind });
  const q = () => new URLSearchParams([["target", target]]);
  async function change(action, tag) {
    try {
      if (action === "apply") await api(apiPrefix() + "tags", null, { method: "POST", body: { target, tag } });
      else await api(apiPrefix() + "tags", new URLSearchParams([["target", target], ["tag", tag]]), { method: "DELETE" });
      showError("");
    } catch (e) {
      if (!authFailed(e)) showError(e.message);
    }
    await render();
  }
  async function render() {
    const now = await api(apiPrefix() + "tags", q());
    const log = await api(apiPrefix() + "tags/audit", q());
    clear(box);
    const rows = now.tags.map((t) => el("tr", { "data-tag": t.tag }, el("td", {}, badge(t.tag, "tag")),
      el("td", {}, t.actor), el("td", { class: "mono" }, t.run_id || ""),
      el("td", {}, el("button", { type: "button", class: "link remove-tag", onclick: () => change("remove", t.tag) }, "remove"))));
    const input = el("input", { id: "tag-input-" + kind, placeholder: "tag name", spellcheck: false });
    const form = el("form", { class: "add-tag", id: "add-tag-" + kind, autocomplete: "off" }, input,
      el("button", { type: "submit" }, "add tag"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const tag = input.value.trim();
      if (tag) change("apply", tag);
    });
    const events = log.events.map((e) => el("tr", { "data-action": e.action },
      el("td", { class: "mono" }, fmtEpoch(e.event_time)), el("td", {}, e.tag), el("td", {}, e.action), el("td", {}, e.actor),
      el("td", { class: "mono" }, e.run_id ? e.run_id + " (" + e.mode + ")" : ""),
      el("td", {}, e.field ? e.field + " = " + e.field_value : "")));
    box.append(el("h3", {}, kind === "message" ? "on this call" : "on its session " + c.session_id),
      rows.length ? table(["tag", "applied by", "run", ""], rows, { id: "tags-" + kind })
        : el("p", { class: "muted", id: "no-tags-" + kind }, "no applied tag"),
      form, ...(events.length ? [el("details", { class: "audit" }, el("summary", {}, "audit log (" + events.length + ")"),
        table(["time", "tag", "action", "by", "run", "field value"], events, { id: "audit-" + kind }))] : []));
    box.setAttribute("data-ready", String(Date.now()));
  }
  await render();
  return box;
}

// -- Evaluations -------------------------------------------------------------------------------------------------
const APPLIED = "Applied Tags";
async function pageEvals() {
  document.title = "tagway · evaluations";
  const data = await api(apiPrefix() + "evals");
  const rows = data.runs.map((r) => el("tr", { "data-run": r.run_id },
    el("td", { class: "mono" }, link(r.run_id, uiLink("evals", r.run_id), { class: "run-link" })),
    el("td", {}, fmtEpoch(r.created_at)), el("td", {}, r.mode), el("td", {}, badge(r.status)),
    el("td", {}, datasetRef(r)), el("td", {}, r.evaluators.join(", ")),
    el("td", { class: "r" }, r.summary.applied === undefined ? "" : "+" + r.summary.applied + " −" + r.summary.removed)));
  main().append(el("h1", {}, "Evaluation runs"), card(null, rows.length
    ? table(["run", "when", "mode", "status", "dataset", "evaluators", "tags "], rows, { id: "eval-runs" })
    : el("p", { class: "muted" }, "No evaluation run yet: tagway eval run --evaluator E --dataset D")));
  status(data.runs.length + " run(s)" + (data.limited_to_customer ? " for customer " + data.limited_to_customer : ""));
}
function evalTarget(r) {
  if (r.target_kind === "message" && r.target_id) return link(r.target, uiLink("calls", r.target_id));
  if (r.target_kind === "session" && r.target_id) {
    const [customer, ...rest] = r.target_id.split("/");
    const p = new URLSearchParams([["since", "30d"], ["where", "session_id=" + rest.join("/")], ["where", "customer=" + customer]]);
    return link(r.target, uiLink("calls", null, p));
  }
  return r.target;
}
async function pageEval() {
  let run;
  try {
    run = await api(apiPrefix() + "evals/" + encodeURIComponent(IDENT));
  } catch (e) {
    if (e.status === 404) return notFound("No evaluation run " + JSON.stringify(IDENT) + ".");
    throw e;
  }
  document.title = "tagway · evaluation " + run.run_id;
  const preview = run.mode === "preview";
  const fields = [...new Set(run.rows.flatMap((r) => Object.keys(r.fields || {})))].slice(0, 6);
  const scored = run.rows.some((r) => r.passed !== null);
  const heads = ["evaluator", "target", "customer", "status", ...fields].concat(scored ? ["pass", "score "] : [])
    .concat([preview ? APPLIED + " (preview: not applied)" : APPLIED]);
  const rows = run.rows.map((r) => el("tr", { "data-target": r.target, class: "status-" + r.status },
    el("td", {}, r.evaluator + "@" + r.evaluator_version), el("td", { class: "mono" }, evalTarget(r)),
    el("td", {}, label(r.customer)), el("td", {}, badge(r.status), r.error ? el("span", { class: "muted" }, " " + r.error) : null),
    ...fields.map((f) => el("td", { "data-field": f }, r.fields[f] === undefined ? "—" : String(r.fields[f]))),
    ...(scored ? [el("td", {}, r.passed === null ? "—" : String(r.passed)), el("td", { class: "r" }, r.score === null ? "—" : fixed(r.score, 3))] : []),
    el("td", { class: "applied" }, ((preview ? r.matched_tags : r.applied_tags) || []).join(", ") || "—")));
  const changes = run.tag_changes.map((e) => el("tr", { "data-action": e.action },
    el("td", { class: "mono" }, e.target_kind + ":" + e.target_id), el("td", {}, e.tag), el("td", {}, e.action),
    el("td", {}, e.actor), el("td", {}, e.field + " = " + e.field_value)));
  const s = run.summary || {};
  main().append(el("h1", {}, "Evaluation ", el("code", {}, run.run_id), " ", badge(run.status)),
    card(null, dl([["mode", run.mode], ["dataset", datasetRef(run)],
      ["evaluators", run.evaluators.join(", ")], ["rows", (s.scored || 0) + " scored, " + (s.errored || 0) + " errored, " +
        (s.skipped || 0) + " skipped"], ["tags", preview ? "preview: none applied or removed" : changes.length + " change(s)"],
      ["note", s.reconcile_error || ""]])),
    card("Results", table(heads, rows, { id: "eval-rows" })),
    ...(preview ? [] : [card("Tag changes", changes.length ? table(["target", "tag", "action", "by", "field value"], changes,
      { id: "tag-changes" }) : el("p", { class: "muted" }, "no tag changed"))]));
  status(run.rows.length + " row(s)" + (run.limited_to_customer ? " for customer " + run.limited_to_customer : ""));
}

// -- the Case view ---------------------------------------------------------------------------------------------
function evaluationsTable(evals) {
  if (!evals || !evals.length) return null;
  return table(["evaluator", "type", "verdict", "score ", "reason"], evals.map((e) => el("tr", { "data-evaluator": e.name || e.type },
    el("td", {}, e.name || ""), el("td", {}, e.type || ""), el("td", {}, badge(e.passed ? "pass" : "fail")),
    el("td", { class: "r" }, e.score === null || e.score === undefined ? "-" : fixed(e.score, 2)),
    el("td", { class: "reason" }, markedText(e.reason || "")))));
}
function resultColumn(title, r) {
  if (!r) return el("div", { class: "side" }, el("h3", {}, title), el("p", { class: "muted" }, "no result"));
  return el("div", { class: "side", "data-candidate": r.candidate },
    el("h3", {}, title, " ", badge(r.status), r.flip ? badge(r.flip) : null),
    dl([["model", r.model], ["score", r.score === null || r.score === undefined ? "" : fixed(r.score, 2)],
      ["judge version", r.judge_version], ["error", r.error], ["latency", fmtMs(r.latency_ms) + " ms"],
      ["replayed call", r.replay_trace_id ? link(r.replay_trace_id, uiLink("calls", r.replay_trace_id)) : ""]]),
    pre(r.output || "", "output"), evaluationsTable(r.evaluations));
}
function diffView(diff) {
  const box = el("div", { class: "diff" });
  for (const [op, text] of diff) box.appendChild(op === "=" ? document.createTextNode(text)
    : el(op === "-" ? "del" : "ins", {}, text));
  return box;
}
function sectionsView(sections) {
  const out = [], missing = [];
  for (const s of sections) {
    if (s.rows === null) { missing.push(s.title); continue; }
    const cols = s.rows.length ? Object.keys(s.rows[0]) : [];
    const box = card(s.title, s.rows.length ? table(cols, s.rows.map((r) => el("tr", {},
      ...cols.map((k) => el("td", {}, typeof r[k] === "number" && k.endsWith("_at") ? fmtEpoch(r[k]) : String(r[k] ?? "")))))
    ) : el("p", { class: "muted" }, "none"));
    box.setAttribute("data-section", s.name);
    out.push(box);
  }
  if (missing.length) out.push(el("p", { class: "muted", id: "sections-missing" },
    missing.join(", ") + ": not recorded in this store yet."));
  return out;
}

async function pageCase() {
  let view;
  try {
    view = await api(apiPrefix() + "cases/" + encodeURIComponent(IDENT), caseParams());
  } catch (e) {
    if (e.status === 404) return notFound("No case with trace id " + JSON.stringify(IDENT) + ".");
    throw e;
  }
  const c = view.call;
  document.title = "tagway · case " + c.trace_id;
  main().append(el("h1", {}, "Case ", el("code", { id: "trace-id" }, c.trace_id)),
    el("div", { class: "links" }, link("call page", uiLink("calls", c.trace_id), { id: "to-call" })));
  main().appendChild(card("Production trace", dl([["time", fmtTime(c.Timestamp) + " UTC"], ["status", c.status +
    (c.error_type ? " (" + c.error_type + ")" : "")], ["customer", label(c.customer)], ["intent", label(c.intent)],
  ["prompt version", label(c.prompt_version)], ["model", c.model_requested], ["tags", tagsText(c.tags)],
  ["latency", fmtMs(c.latency_ms) + " ms"], ["cost", callCost(c)]]),
  truncationNote(c), conversation(c, { id: "production" })));
  if (!view.runs.length) main().appendChild(card("Replays", el("p", { class: "muted", id: "no-runs" },
    "No replay has used this case yet.")));
  for (const run of view.runs.slice().reverse()) {
    const box = card(null, el("h2", { id: "run-" + run.run_id }, "Run ", link(run.run_id, uiLink("replays", run.run_id),
      { class: "run-link" }), " ", run.verdict ? badge(run.verdict) : null),
    dl([["when", fmtEpoch(run.created_at)], ["spec", run.spec_name], ["dataset", run.dataset_id],
      ["judge version", run.judge_version], ["run status", run.status]]));
    box.setAttribute("data-run", run.run_id);
    for (const cand of run.candidates) {
      box.append(el("div", { class: "compare", "data-candidate": cand.candidate },
        resultColumn("baseline", run.baseline), resultColumn("candidate " + cand.candidate, cand)),
      cand.diff ? el("div", { class: "diff-wrap" }, el("h3", {}, "baseline → " + cand.candidate + " (word diff)"),
        diffView(cand.diff)) : null);
    }
    if (!run.candidates.length) box.appendChild(resultColumn("baseline", run.baseline));
    main().appendChild(box);
  }
  main().append(...sectionsView(view.sections));
  status(view.runs.length + " run(s) used this case");
}

// -- Replays ---------------------------------------------------------------------------------------------------
function trendLink(run) {
  if (run.spec_name) return link(run.spec_name, uiLink("trend", null, new URLSearchParams([["spec", run.spec_name]])));
  return "";
}
async function pageRuns() {
  document.title = "tagway · replays";
  const p = new URLSearchParams();
  for (const k of ["spec", "dataset"]) if (QS.get(k)) p.set(k, QS.get(k));
  const data = await api(apiPrefix() + "replays", p);
  const rows = data.runs.map((r) => el("tr", { "data-run": r.run_id },
    el("td", { class: "mono" }, link(r.run_id, uiLink("replays", r.run_id), { class: "run-link" })),
    el("td", {}, fmtEpoch(r.created_at)), el("td", {}, trendLink(r)),
    el("td", {}, r.dataset_id ? link(r.dataset_id, uiLink("trend", null, new URLSearchParams([["dataset", r.dataset_id]]))) : ""),
    el("td", {}, r.candidates.map((c) => c + (r.models[c] ? " (" + r.models[c] + ")" : "")).join(", ")),
    el("td", { class: "r" }, fmtInt(r.n_cases)), el("td", {}, badge(r.status)),
    el("td", {}, r.verdict ? badge(r.verdict) : "-"), el("td", { class: "r" }, fmtCost(r.cost_usd || 0))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 9, class: "muted" }, "no replay runs yet")));
  main().append(el("h1", {}, "Replay runs"), card(null, table(["run", "started", "spec (trend)", "dataset (trend)",
    "candidates", "cases ", "status", "verdict", "cost "], rows, { id: "runs" })));
  if (data.limited_to_customer) main().appendChild(el("p", { class: "muted" }, "Limited to runs that replayed " +
    data.limited_to_customer + "'s calls; costs are those of its cases."));
  status(data.runs.length + " run(s)");
}

function segmentChart(rows) {
  const W = 1000, rowH = 26, L = 220, R = 60, T = 20;
  const H = T + rows.length * rowH + 24;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "pass rate per segment", id: "segment-chart" });
  const x = (v) => L + v * (W - L - R);
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    root.append(svg("line", { x1: x(v), x2: x(v), y1: T - 6, y2: H - 20, class: "grid" }),
      svg("text", { x: x(v), y: H - 6, "text-anchor": "middle", class: "axis" }, fixed(v, 2)));
  }
  rows.forEach((r, i) => {
    const y = T + i * rowH;
    const g = svg("g", { "data-segment": r.segment });
    g.appendChild(svg("text", { x: L - 8, y: y + 15, "text-anchor": "end", class: "axis" }, r.segment));
    if (r.before !== null && r.before !== undefined) {
      g.appendChild(svg("rect", { x: L, y: y + 3, width: Math.max(0, x(r.before) - L), height: 8, class: "bar-before" }));
    }
    if (r.n && r.after !== null && r.after !== undefined) {  // no bar for n = 0
      const bad = r.marks.includes("regression");
      g.appendChild(svg("rect", { x: L, y: y + 12, width: Math.max(0, x(r.after) - L), height: 8,
        class: bad ? "bar-bad" : "bar-after" }));
      if (r.after_ci) g.appendChild(svg("line", { x1: x(r.after_ci[0]), x2: x(r.after_ci[1]), y1: y + 16, y2: y + 16, class: "whisker" }));
    }
    const t = svg("title", {}, `${r.segment}: baseline ${rate3(r.before)}, candidate ${rate3(r.after)} (n ${r.n})`);
    g.appendChild(t);
    root.appendChild(g);
  });
  return el("div", { class: "chart" }, root, el("div", { class: "legend" },
    el("span", {}, el("span", { class: "sw before" }), "baseline"), el("span", {}, el("span", { class: "sw after" }),
      "candidate (95% CI)"), el("span", {}, el("span", { class: "sw bad" }), "regression")));
}

function segmentCalls(run, segment) {
  const p = new URLSearchParams([["since", "90d"], ["dataset", run.dataset_id], ["segment", segment]]);
  return uiLink("calls", null, p);
}

function runTable(run, cand, t) {
  const rowOf = (r, isTotal) => el("tr", { "data-segment": r.segment, class: r.marks.includes("regression") ? "failing" : "" },
    el("td", {}, isTotal || !run.dataset_id ? r.segment : link(r.segment, segmentCalls(run, r.segment), { class: "segment-link" })),
    el("td", { class: "r" }, String(r.n)), el("td", { class: "r" }, rate3(r.before)),
    el("td", { class: "r" }, rate3(r.n ? r.after : null)), el("td", { class: "r" }, r.n ? ci3(r.after_ci) : "—"),
    el("td", { class: "r delta " + (r.delta < 0 ? "delta-up" : r.delta > 0 ? "delta-down" : "") }, delta3(r.delta)),
    el("td", { class: "r" }, r.delta_ci ? ci3(r.delta_ci) : "—"),
    el("td", { class: "r" }, String(r.errored || 0)),
    el("td", { class: "r" }, r.pass_fail === undefined || r.pass_fail === null ? "" : "↓" + r.pass_fail + " ↑" + r.fail_pass),
    el("td", { class: "marks", title: r.why || "" }, ...r.marks.map((m) => badge(m, m.replace(/[^a-z]/g, ""))),
      r.too_few ? el("span", { class: "muted" }, " too few cases to judge" + (r.more_cases ? ": ~" + r.more_cases + " more" : ""))
        : r.more_cases ? el("span", { class: "muted" }, " ~" + r.more_cases + " more cases would decide") : null));
  const body = t.rows.map((r) => rowOf(r, false));
  const tbl = table(["segment", "n ", "baseline ", "candidate ", "95% CI ", "delta ", "delta 95% CI ", "errored ",
    "flips ", "verdict"], body, { id: "segments-" + cand, "data-candidate": cand });
  tbl.querySelector("table").appendChild(el("tfoot", {}, rowOf(t.overall, true)));
  return tbl;
}

function gateLine(g) {
  if (g.alpha !== undefined) {
    return `paired sign test per segment, alpha ${g.alpha} (Holm), margin ${g.margin}, errors: ${g.errors || "fail"}, ` +
      `inconclusive: ${g.inconclusive || "pass"}`;
  }
  return g.aggregate ? `${g.aggregate} ${g.metric || "pass_rate"} >= ${g.threshold}` : "";  // runs stored before
}

async function pageRun() {
  let run;
  try {
    run = await api(apiPrefix() + "replays/" + encodeURIComponent(IDENT));
  } catch (e) {
    if (e.status === 404) return notFound("No replay run " + JSON.stringify(IDENT) + ".");
    throw e;
  }
  document.title = "tagway · run " + run.run_id;
  const g = run.gating || {};
  main().append(el("h1", {}, "Run ", el("code", { id: "run-id" }, run.run_id), " ", badge(run.status),
    run.verdict ? badge(run.verdict) : null),
  card(null, dl([["started", fmtEpoch(run.created_at)], ["finished", fmtEpoch(run.finished_at)],
    ["spec", run.spec_name ? trendLink(run) : ""], ["dataset", run.dataset_id], ["judge version", run.judge_version],
    ["baseline", run.baseline_mode], ["candidates", run.candidates.map((c) => c + (run.models[c] ? " (" + run.models[c] + ")" : "")).join(", ")],
    ["cases", fmtInt(run.n_cases)], ["cost", fmtCost(run.cost_usd || 0)],
    ["gate", gateLine(g)]]),
  (run.reasons || []).length ? el("ul", { class: "reasons", id: "reasons" }, ...run.reasons.map((r) => el("li", {}, r))) : null));
  if (run.limited_to_customer) main().appendChild(el("p", { class: "muted", id: "tenant-note" }, "Limited to " +
    run.limited_to_customer + "'s cases. The gate's marks were decided over every customer's cases and are shown with the admin key only."));
  for (const [cand, t] of Object.entries(run.table)) {
    main().appendChild(card("Candidate " + cand + " vs baseline, per segment", segmentChart(t.rows), runTable(run, cand, t)));
  }
  const flipRows = run.flipped.map((f) => el("tr", { "data-case": f.case_id, class: "flip-" + f.flip },
    el("td", { class: "mono" }, link(f.case_id, uiLink("cases", f.case_id), { class: "case-link" })),
    el("td", {}, f.candidate), el("td", {}, f.segment), el("td", {}, badge(f.flip)),
    el("td", {}, f.baseline + " → " + f.result)));
  main().appendChild(card("Flipped cases", flipRows.length ? table(["case (trace id)", "candidate", "segment", "flip", "baseline → candidate"],
    flipRows, { id: "flipped" }) : el("p", { class: "muted" }, "No case flipped between baseline and candidate.")));
  status(run.flipped.length + " flipped case(s)");
}

// -- Trend -----------------------------------------------------------------------------------------------------
function lineChart(id, labels, series, fmtY, opts) {
  const W = 1000, H = (opts && opts.height) || 200, L = 72, R = 16, T = 14, B = 28;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", id });
  const n = labels.length;
  let top = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v !== undefined) top = Math.max(top, v);
  const ymax = opts && opts.ymax !== undefined ? opts.ymax : (top > 0 ? top * 1.1 : 1);
  const x = (i) => L + (n <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  for (let k = 0; k <= 4; k++) {
    const v = (ymax * k) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, fmtY(v)));
  }
  const ticks = Math.min(n, 7);
  for (let k = 0; k < ticks; k++) {
    const i = ticks === 1 ? 0 : Math.round((k * (n - 1)) / (ticks - 1));
    const anchor = ticks > 1 && k === 0 ? "start" : ticks > 1 && k === ticks - 1 ? "end" : "middle";
    root.appendChild(svg("text", { x: x(i), y: H - 8, "text-anchor": anchor, class: "axis" }, labels[i]));
  }
  series.forEach((s) => {
    const g = svg("g", { "data-series": s.key });
    let d = "", open = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { open = false; return; }
      d += (open ? " L" : " M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      open = true;
    });
    if (d) g.appendChild(svg("path", { d: d.trim(), fill: "none", stroke: s.color, "stroke-width": 2,
      "stroke-dasharray": s.dash ? "6 4" : "none" }));
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const bad = s.bad && s.bad[i];
      const c = svg("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: bad ? 6 : 2.5, fill: bad ? "#c62828" : s.color,
        class: bad ? "regression-point" : "" });
      c.appendChild(svg("title", {}, `${s.key} · ${labels[i]} · ${fmtY(v)}${bad ? " · regression" : ""}`));
      g.appendChild(c);
    });
    root.appendChild(g);
  });
  return el("div", { class: "chart" }, root);
}
function legend(series) {
  return el("div", { class: "legend" }, ...series.map((s) => {
    const sw = el("span", { class: "sw" });
    sw.style.background = s.color;
    return el("span", { "data-series": s.key }, sw, s.key + " ", el("span", { class: "muted" }, s.note || ""));
  }));
}

async function pageTrend() {
  document.title = "tagway · trend";
  const p = new URLSearchParams();
  for (const k of ["spec", "dataset"]) if (QS.get(k)) p.set(k, QS.get(k));
  const tr = await api(apiPrefix() + "replays/trend", p);
  const labels = tr.runs.map((r) => (r.run_id.length > 24 ? "…" + r.run_id.slice(-23) : r.run_id));
  const series = tr.segments.map((s, i) => {
    const values = tr.runs.map(() => null), bad = tr.runs.map(() => false);
    for (const pt of s.points) { values[pt.run] = pt.after; bad[pt.run] = bad[pt.run] || pt.regression; }
    return { key: s.segment, color: PALETTE[i % PALETTE.length], values, bad };
  });
  main().append(el("h1", {}, "Trend: ", tr.spec ? "spec " + tr.spec : "dataset " + tr.dataset),
    card("Candidate pass rate per segment across runs (regressions marked)",
      lineChart("trend-chart", labels, series, (v) => fixed(v, 2), { ymax: 1 }), legend(series)));
  const heads = ["segment"].concat(tr.runs.map((r) => r.run_id + " "));
  const rows = tr.segments.map((s) => el("tr", { "data-segment": s.segment }, el("td", {}, s.segment),
    ...tr.runs.map((r, i) => {
      const pts = s.points.filter((pt) => pt.run === i);
      return el("td", { class: "r" + (pts.some((pt) => pt.regression) ? " failing" : ""), "data-run": r.run_id },
        pts.map((pt) => rate3(pt.after) + " (" + delta3(pt.delta) + ")" + (pt.regression ? " regression" : "")).join(" · ") || "—");
    })));
  const runLinks = el("div", { class: "links" }, ...tr.runs.map((r) => link(r.run_id, uiLink("replays", r.run_id))));
  main().appendChild(card("Per run: candidate pass rate (delta vs baseline)", table(heads, rows, { id: "trend" }), runLinks));
  status(tr.runs.length + " run(s)");
}

// -- Charts ----------------------------------------------------------------------------------------------------
function chartsForm() {
  const { known, rest } = splitWhere(QS.getAll("where"));
  const since = el("select", { id: "f-since" });
  for (const [v, t] of WINDOWS) since.appendChild(el("option", { value: v }, t));
  const cur = QS.get("since") || "24h";
  if (!WINDOWS.some(([v]) => v === cur)) since.appendChild(el("option", { value: cur }, cur));
  since.value = cur;
  const by = el("input", { id: "f-by", size: 16, spellcheck: false });
  by.value = QS.get("by") || "customer";
  const top = el("input", { id: "f-top", type: "number", min: 1, max: 20, class: "num" });
  top.value = QS.get("top") || "5";
  const where = el("input", { id: "f-where", spellcheck: false, placeholder: "intent=refund tag.region=eu" });
  where.value = Object.entries(known).map(([k, v]) => k + "=" + v).concat(rest).join(" ");
  const form = el("form", { class: "card filters", id: "filters", autocomplete: "off" },
    el("label", {}, "Window", since), el("label", {}, "Per", by), el("label", {}, "Top", top),
    el("label", { class: "grow" }, "Filters", where), el("button", { type: "submit" }, "Apply"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams([["since", since.value], ["by", by.value.trim() || "customer"], ["top", top.value]]);
    for (const w of splitFilters(where.value.trim())) p.append("where", w);
    location.assign(uiLink("charts", null, p));
  });
  return form;
}

async function pageCharts() {
  document.title = "tagway · charts";
  main().appendChild(chartsForm());
  const p = selectionParams(QS);
  if (!p.has("since") && !p.has("from")) p.set("since", "24h");
  for (const k of ["by", "top", "step"]) if (QS.get(k)) p.set(k, QS.get(k));
  const ts = await api(apiPrefix() + "charts", p);
  const long = ts.window.seconds > 86400;
  const labels = ts.buckets.map((b) => (long ? b.slice(5, 10) + " " : "") + b.slice(11, 16));
  const colour = (s, i) => (s.other ? "#9aa1ad" : PALETTE[i % PALETTE.length]);
  const make = (metric) => ts.series.map((s, i) => ({ key: s.key, color: colour(s, i), values: s.points.map((pt) => pt[metric]) }));
  const lat = [];
  ts.series.forEach((s, i) => {
    lat.push({ key: s.key + " p50", color: colour(s, i), values: s.points.map((pt) => pt.p50_ms) });
    lat.push({ key: s.key + " p95", color: colour(s, i), values: s.points.map((pt) => pt.p95_ms), dash: true });
  });
  const legendSeries = ts.series.map((s, i) => ({ key: s.key, color: colour(s, i),
    note: fmtInt(s.calls) + " calls · " + fmtRate(s.error_rate) + " errors · " + fmtCost(s.cost_usd) }));
  main().append(
    card("Calls per " + (ts.step_seconds / 60) + " min, per " + ts.by + " (top " + ts.top + " + other)",
      lineChart("chart-calls", labels, make("calls"), (v) => fmtInt(Math.round(v))), legend(legendSeries)),
    card("Error rate", lineChart("chart-errors", labels, make("error_rate"), (v) => fmtRate(v))),
    card("Latency p50 (solid) and p95 (dashed), ms", lineChart("chart-latency", labels, lat, (v) => fmtMs(v))),
    card("Cost", lineChart("chart-cost", labels, make("cost_usd"), (v) => fmtCost(v))));
  const excluded = ts.sources_excluded.length ? " · source not " + ts.sources_excluded.join(", ") : "";
  status(ts.series.length + " series · " + fmtTime(ts.window.from) + " to " + fmtTime(ts.window.to) + " UTC" + excluded);
}

// -- Coverage (issue 12): where production fails or complains and the datasets hold too few cases -------------
function coverageForm() {
  const since = el("select", { id: "f-since" });
  for (const [v, t] of WINDOWS) since.appendChild(el("option", { value: v }, t));
  const cur = QS.get("since") || "30d";
  if (!WINDOWS.some(([v]) => v === cur)) since.appendChild(el("option", { value: cur }, cur));
  since.value = cur;
  const by = el("input", { id: "f-by", size: 22, spellcheck: false, placeholder: "customer intent" });
  by.value = (QS.getAll("by").length ? QS.getAll("by") : ["customer", "intent"]).join(" ");
  const ds = el("input", { id: "f-dataset", size: 18, spellcheck: false, placeholder: "all datasets" });
  ds.value = QS.getAll("dataset").join(" ");
  const where = el("input", { id: "f-where", spellcheck: false, placeholder: "intent=refund tag.region=eu" });
  where.value = QS.getAll("where").join(" ");
  const form = el("form", { class: "card filters", id: "filters", autocomplete: "off" },
    el("label", {}, "Window", since), el("label", {}, "Slices by", by), el("label", {}, "Datasets", ds),
    el("label", { class: "grow" }, "Filters", where), el("button", { type: "submit" }, "Apply"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams([["since", since.value]]);
    for (const b of by.value.trim().split(/[\s,]+/).filter(Boolean)) p.append("by", b);
    for (const d of ds.value.trim().split(/[\s,]+/).filter(Boolean)) p.append("dataset", d);
    for (const w of splitFilters(where.value.trim())) p.append("where", w);
    location.assign(uiLink("coverage", null, p));
  });
  return form;
}

async function pageCoverage() {
  document.title = "tagway · coverage";
  main().appendChild(coverageForm());
  if (WHO && !WHO.admin) {  // datasets belong to the operator: the map needs the admin key
    main().appendChild(card("Coverage", el("p", { id: "admin-only" }, "The coverage map needs the admin key.")));
    status("");
    return;
  }
  const p = new URLSearchParams([["since", QS.get("since") || "30d"]]);
  for (const k of ["by", "dataset", "where"]) for (const v of QS.getAll(k)) p.append(k, v);
  if (!QS.getAll("by").length) { p.append("by", "customer"); p.append("by", "intent"); }
  const m = await api("admin/coverage", p);
  const rows = m.slices.map((s) => el("tr", { class: s.gap ? "failing" : "", "data-gap": s.gap ? "1" : "0" },
    ...m.by.map((k) => el("td", {}, s.key[k] || "(none)")),
    el("td", { class: "r" }, fmtInt(s.calls)), el("td", { class: "r" }, fmtRate(s.failure_rate)),
    el("td", { class: "r" }, fmtRate(s.complaint_rate)), el("td", { class: "r" }, fmtInt(s.cases)),
    el("td", { class: "r" }, s.target === null ? "-" : fmtInt(s.target)),
    el("td", {}, s.gap ? badge("gap: " + s.missing + " missing", "regression") : "")));
  const heads = m.by.concat(["calls ", "failure rate ", "complaint rate ", "cases ", "target ", ""]);
  main().append(el("h1", {}, "Coverage: where evaluation is thin"),
    card(m.gaps + " gap(s): slices that fail or complain with fewer cases than their target (or none), worst first",
      table(heads, rows, { id: "coverage" })));
  status((m.datasets.length ? "against " + m.datasets.join(", ") : "no dataset yet") + " · " +
    fmtTime(m.window.from) + " to " + fmtTime(m.window.to) + " UTC");
}

// -- start -----------------------------------------------------------------------------------------------------
const PAGES = { calls: () => (IDENT ? pageCall() : pageCalls()), cases: pageCase,
  replays: () => (IDENT ? pageRun() : pageRuns()), trend: pageTrend, charts: pageCharts, coverage: pageCoverage,
  evals: () => (IDENT ? pageEval() : pageEvals()) };

function renderNav() {
  const nav = $("nav");
  for (const [page, text, href] of [["overview", "Overview", apiBase + "ui"], ["calls", "Calls", uiLink("calls")],
    ["charts", "Charts", uiLink("charts")], ["replays", "Replays", uiLink("replays")],
    ["coverage", "Coverage", uiLink("coverage")], ["evals", "Evaluations", uiLink("evals")]]) {
    nav.appendChild(el("a", { href, class: page === PAGE || (page === "replays" && PAGE === "trend") ? "here" : "" }, text));
  }
}

async function start() {
  clear(main());
  if (!haveKey()) { showKeyPanel(); loaded("nokey"); return; }
  status("loading…");
  try {
    await whoami();
    keyReady();
    if (!PAGES[PAGE]) return notFound("No such page.");
    await PAGES[PAGE]();
    showError("");
    if (!document.body.hasAttribute("data-loaded")) loaded("1");
  } catch (e) {
    status("");
    if (!authFailed(e)) showError(e.message);
    loaded("error");
    document.body.setAttribute("data-error-code", e.code || String(e.status));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromFragment();
  renderNav();
  wireKeyPanel(start);
  start();
});
