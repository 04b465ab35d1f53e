// tagway dashboard, shared by every page: number formatting (exactly as the CLI prints), the key, the HTTP calls,
// DOM helpers. Plain JS, no dependencies, nothing from elsewhere (the pages' CSP allows only this origin).
//
// The key: typed into the page's key form, or given once in the URL fragment (#key=...: a fragment is never sent
// to the server, so it is in no access log), it is kept in this tab's sessionStorage, removed from the address bar
// at once, and sent as a Bearer header on every data call. It never goes into a query string.
"use strict";

const KEY_STORE = "tagway.adminKey";
const PALETTE = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
  "#bcbd22", "#7f7f7f"];
const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const API_TIMEOUT_MS = 45000;  // longer than the server's query budget: its message comes first

// -- formatting (same as the CLI) ----------------------------------------------------------------------------
// Python's format() (what the CLI prints) gives the decimal closest to the exact binary value of v and, only
// when v lies exactly halfway, the even last digit. toFixed also works on the exact value but breaks a tie away
// from zero, so only a true tie needs handling. v * 10^digits must not be rounded before that test: 0.05 * 10
// gives exactly 0.5 in floating point although the double 0.05 is a little above 0.05 (Python: "0.1"). v is a
// tie only when v * 2^(digits+1) (exact: a power of two) is an odd integer, and then v * 10^digits is that odd
// integer times 5^digits, halved; the digits come from BigInt arithmetic, without rounding.
function fixed(v, digits) {
  if (!Number.isFinite(v)) return String(v);
  const neg = v < 0 || Object.is(v, -0);  // Python prints -0.0 as "-0.0"
  const a = Math.abs(v);
  const half = a * Math.pow(2, digits + 1);
  let s;
  if (a >= 1e21) {  // toFixed switches to exponent notation here; such a double is an integer
    s = BigInt(a).toString() + (digits ? "." + "0".repeat(digits) : "");
  } else if (Number.isInteger(half) && half % 2 === 1) {
    const lower = (BigInt(half) * 5n ** BigInt(digits) - 1n) / 2n;  // the tie is lower + 0.5
    const digitsOf = (lower % 2n === 0n ? lower : lower + 1n).toString().padStart(digits + 1, "0");
    const cut = digitsOf.length - digits;
    s = digitsOf.slice(0, cut) + (digits ? "." + digitsOf.slice(cut) : "");
  } else {
    s = a.toFixed(digits);
  }
  return neg ? "-" + s : s;
}
function grouped(s) {  // "1234567.89" -> "1,234,567.89"
  const neg = s.startsWith("-");
  const [i, f] = (neg ? s.slice(1) : s).split(".");
  const g = i.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return (neg ? "-" : "") + g + (f !== undefined ? "." + f : "");
}
const fmtInt = (n) => grouped(String(Math.trunc(n)));
const fmtRate = (x) => (x === null || x === undefined ? "-" : fixed(x * 100, 1) + "%");
const fmtCI = (ci) => fixed(ci.low * 100, 1) + "-" + fixed(ci.high * 100, 1) + "%";
const fmtDelta = (x) => {
  if (x === null || x === undefined) return "-";
  const s = fixed(x * 100, 1);
  return (s.startsWith("-") ? s : "+" + s) + " pp";
};
const fmtMs = (x) => (x === null || x === undefined ? "-" : grouped(fixed(x, 0)));
// A cost as the CLI prints it (exporters/tables.py fmt_usd): cents from a dollar up, two significant digits under
// it ($0.000027), so a cost that is not zero never reads $0; "-" for none.
function fmtCost(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "-";
  if (x === 0) return "$0.00";
  const sign = x < 0 ? "-" : "";
  const a = Math.abs(x);
  if (!Number.isFinite(a)) return sign + "$inf";
  const e = Number(a.toExponential().split("e")[1]);  // the decimal exponent of the exact value
  if (1 - e > 100) return sign + "$" + a.toExponential(1);  // toFixed stops at 100 digits (below 1e-99: no cost)
  let sig = fixed(a, Math.max(0, 1 - e));  // two significant digits, ties to even as Python rounds
  if (Number(sig) >= Number("1e" + (e + 1)) && e + 1 < 0) sig = fixed(a, -e);  // 0.0996 -> 0.10, not 0.100
  if (Number(sig) >= 1) return sign + "$" + grouped(fixed(a, 2));
  return sign + "$" + sig;
}
const label = (v) => (v === "" ? "(none)" : v);

// -- where things are ------------------------------------------------------------------------------------------
// The app root ("/" or the prefix the gateway is mounted under), from this page's own path: /ui, /ui/calls/abc...
const apiBase = location.pathname.replace(/\/ui(\/.*)?$/, "/");
function uiLink(page, ident, params) {
  const qs = params && params.toString();
  return apiBase + "ui" + (page ? "/" + page : "") + (ident !== undefined && ident !== null ? "/" + encodeURIComponent(ident) : "")
    + (qs ? "?" + qs : "");
}

// "intent=refund tag.region=eu, model=gpt-4o" -> ["intent=refund", "tag.region=eu", "model=gpt-4o"]
function splitFilters(text) {
  return text.split(/[\s,]+(?=[A-Za-z0-9_.\-]+!?=)/).map((s) => s.trim().replace(/,$/, "")).filter(Boolean);
}

// -- the key ---------------------------------------------------------------------------------------------------
// #key=... -> sessionStorage; the fragment's other parts stay, the key leaves the address bar (and history).
function takeKeyFromFragment() {
  const h = new URLSearchParams(location.hash.replace(/^#/, ""));
  const key = h.get("key");
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  h.delete("key");
  const rest = h.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
}
const haveKey = () => !!sessionStorage.getItem(KEY_STORE);

// -- HTTP ------------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code || ""; }
}

async function api(path, params, opts) {
  const key = sessionStorage.getItem(KEY_STORE) || "";
  const url = apiBase + path + (params && params.toString() ? "?" + params.toString() : "");
  const timeout = (opts && opts.timeoutMs) || API_TIMEOUT_MS;
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeout);
  let res;
  try {
    const headers = { Authorization: "Bearer " + key };
    const init = { headers, cache: "no-store", signal: ctl.signal, method: (opts && opts.method) || "GET" };
    if (opts && opts.body !== undefined) {  // a change (tags): JSON in the body, never in the URL
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    res = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, e.name === "AbortError"
      ? "The gateway did not answer within " + Math.round(timeout / 1000) + " s: narrow the time window or the filters and try again."
      : "The gateway could not be reached: " + e.message, e.name === "AbortError" ? "client_timeout" : "unreachable");
  } finally {
    clearTimeout(timer);
  }
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const err = body && body.error ? body.error : {};
    throw new ApiError(res.status, err.message || "HTTP " + res.status, err.code);
  }
  return body;
}

// Who holds the key: {admin, customer, key_id}. Admin pages read /admin/*, a tenant key /v1/tagway/* (limited to
// its customer by the server).
let WHO = null;
async function whoami() {
  if (!WHO) WHO = await api("v1/tagway/whoami");
  return WHO;
}
const apiPrefix = () => (WHO && WHO.admin ? "admin/" : "v1/tagway/");

// -- DOM helpers ---------------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "title") e.title = v;
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function showError(msg) { const b = $("error"); b.textContent = msg; b.hidden = !msg; }

// Redaction and truncation markers left in captured content: shown as marks, never hidden.
const MARKER_RE = /(\[REDACTED(?::[a-z]+)?\]|\.\.\.\[(?:truncated by tagway: )?\d+ more characters\])/;
function markedText(text) {
  const frag = document.createDocumentFragment();
  String(text).split(MARKER_RE).forEach((part, i) => {
    if (!part) return;
    frag.appendChild(i % 2 ? el("mark", { class: part.startsWith("[REDACTED") ? "redacted" : "cut" }, part)
      : document.createTextNode(part));
  });
  return frag;
}

// -- the key panel (every page has the same markup) ------------------------------------------------------------
function showKeyPanel(message) {
  $("key-panel").hidden = false;
  $("key-error").textContent = message || "";
  $("key-error").hidden = !message;
  $("key-state").textContent = "no key";
  $("key-change").hidden = true;
  $("key-input").focus();
}
function keyReady() {
  $("key-panel").hidden = true;
  $("key-state").textContent = WHO ? (WHO.admin ? "admin key" : "tenant key: " + WHO.customer) : "key set";
  $("key-change").hidden = false;
}
function wireKeyPanel(onKey) {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("key-input").value.trim();
    if (!k) return;
    sessionStorage.setItem(KEY_STORE, k);
    $("key-input").value = "";
    WHO = null;
    onKey();
  });
  $("key-change").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); WHO = null; showKeyPanel(); });
}
// 401/403 -> forget the key and ask again; anything else is the caller's.
function authFailed(e) {
  if (e.status === 401 || (e.status === 403 && e.code === "admin_key_required")) {
    sessionStorage.removeItem(KEY_STORE);
    WHO = null;
    showKeyPanel(e.message);
    return true;
  }
  return false;
}
