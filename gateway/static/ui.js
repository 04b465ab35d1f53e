// tagway dashboard, the overview page (/ui): per-segment failure rates, error rate over time per tenant, top error
// types. Formatting, the key and HTTP are in common.js. A segment links to its calls (/ui/calls), an example
// trace id to its call page. A tenant key sees the same page limited to its customer (the server enforces it).
"use strict";

// -- state ---------------------------------------------------------------------------------------------------
// The filters come from the query string, as on every other page (/ui?by=tag.region&since=7d&where=intent=refund,
// `where` and `by` repeatable), and from the fragment (/ui#by=...), which the page keeps up to date as they change;
// the fragment wins where both name a filter. The query string's filters then move into the fragment, so the one
// left in the address bar is the form's state. A key goes only in the fragment (the server refuses ?key=).
const FILTERS = ["since", "by", "where", "status", "min_calls", "compare"];

function filterValue(params, name) {
  const all = params.getAll(name);
  if (!all.length) return null;
  return name === "where" ? all.join(" ") : name === "by" ? all.join(",") : all[0];
}

function readHash() {
  takeKeyFromFragment();
  const q = new URLSearchParams(location.search);
  const h = new URLSearchParams(location.hash.replace(/^#/, ""));
  const f = {};
  for (const name of FILTERS) {
    const v = filterValue(h, name) ?? filterValue(q, name);
    if (v !== null) f[name] = v;
    q.delete(name);
  }
  if ("since" in f && ![...$("f-since").options].some((o) => o.value === f.since)) {
    const o = document.createElement("option");
    o.value = o.textContent = f.since;
    $("f-since").appendChild(o);
  }
  const set = (id, name) => { if (name in f) $(id).value = f[name]; };
  set("f-since", "since"); set("f-by", "by"); set("f-where", "where"); set("f-status", "status");
  set("f-min", "min_calls");
  if ("compare" in f) $("f-compare").checked = ["1", "true", "yes", "on"].includes(f.compare);
  const rest = q.toString();
  history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  writeHash();
}

function formState() {
  return {
    since: $("f-since").value,
    by: $("f-by").value.trim(),
    where: $("f-where").value.trim(),
    status: $("f-status").value,
    min_calls: $("f-min").value.trim(),
    compare: $("f-compare").checked,
  };
}

function writeHash() {
  const s = formState();
  const h = new URLSearchParams();
  h.set("since", s.since);
  if (s.by && s.by !== "customer") h.set("by", s.by);
  if (s.where) h.set("where", s.where);
  if (s.status) h.set("status", s.status);
  if (s.min_calls && s.min_calls !== "20") h.set("min_calls", s.min_calls);
  if (s.compare) h.set("compare", "1");
  history.replaceState(null, "", location.pathname + location.search + "#" + h.toString());
}

function common(params, s) {
  params.set("since", s.since);
  for (const w of splitFilters(s.where)) params.append("where", w);
  if (s.status) params.set("status", s.status);
}

// -- rendering -----------------------------------------------------------------------------------------------
function rateClass(x, lowConfidence) {
  if (lowConfidence) return "";
  return x >= 0.10 ? "rate-bad" : x >= 0.02 ? "rate-warn" : "";
}

function renderSegments(report) {
  const table = $("segments");
  const thead = table.tHead, tbody = table.tBodies[0], tfoot = table.tFoot;
  clear(thead); clear(tbody); clear(tfoot);
  $("table-by").textContent = report.by.join(", ");
  const numeric = ["calls", "errors", "error rate", "95% CI"]
    .concat(report.compare ? ["prev rate", "delta"] : [])
    .concat(["p50 ms", "p95 ms", "p99 ms", "ttft p50", "tok in", "tok out", "cost"]);
  thead.appendChild(el("tr", {}, ...report.by.map((k) => el("th", {}, k)),
    ...numeric.map((k) => el("th", { class: "r" }, k)), el("th", {}, "note")));
  const maxRate = Math.max(0.0001, ...report.segments.map((s) => s.error_rate));
  for (const s of report.segments) {
    const cells = report.by.map((k, i) => el("td", { class: "seg", "data-col": k },
      i === 0 ? el("a", { href: segmentCallsLink(report, s), title: "list these calls" }, label(s.key[k])) : label(s.key[k])));
    const bar = el("span", { class: "bar" });
    bar.style.width = Math.round(40 * s.error_rate / maxRate) + "px";
    cells.push(
      el("td", { class: "r calls" }, fmtInt(s.calls)),
      el("td", { class: "r errors" }, s.errors ? el("a", { href: segmentCallsLink(report, s, "error"),
        title: "list the failed calls" }, fmtInt(s.errors)) : fmtInt(s.errors)),
      el("td", { class: "r rate " + rateClass(s.error_rate, s.low_confidence) }, fmtRate(s.error_rate)),
      el("td", { class: "r ci" }, fmtCI(s.error_rate_ci)));
    if (report.compare) {
      const d = s.delta_error_rate;
      cells.push(el("td", { class: "r prev" }, s.previous ? fmtRate(s.previous.error_rate) : "-"),
        el("td", { class: "r delta " + (d > 0.005 ? "delta-up" : d < -0.005 ? "delta-down" : "") }, fmtDelta(d)));
    }
    cells.push(
      el("td", { class: "r p50" }, fmtMs(s.latency_ms.p50)),
      el("td", { class: "r p95" }, fmtMs(s.latency_ms.p95)),
      el("td", { class: "r p99" }, fmtMs(s.latency_ms.p99)),
      el("td", { class: "r ttft" }, fmtMs(s.ttft_ms.p50)),
      el("td", { class: "r tin" }, fmtInt(s.input_tokens)),
      el("td", { class: "r tout" }, fmtInt(s.output_tokens)),
      el("td", { class: "r cost" }, fmtCost(s.cost_usd)),
      el("td", { class: "note" }, s.low_confidence ? el("span", { class: "badge" }, "low n (<" + report.min_calls + ")") : bar));
    tbody.appendChild(el("tr", {
      class: s.low_confidence ? "low-confidence" : "",
      "data-segment": report.by.map((k) => s.key[k]).join("|"),
    }, ...cells));
  }
  if (!report.segments.length) {
    tbody.appendChild(el("tr", {}, el("td", { colSpan: report.by.length + numeric.length + 1, class: "muted" },
      "no calls match this window and these filters")));
    return;
  }
  const t = report.total;
  const foot = [el("td", { class: "seg" }, "all")].concat(report.by.slice(1).map(() => el("td", {})));
  foot.push(el("td", { class: "r calls" }, fmtInt(t.calls)), el("td", { class: "r errors" }, fmtInt(t.errors)),
    el("td", { class: "r rate" }, fmtRate(t.error_rate)), el("td", { class: "r ci" }, fmtCI(t.error_rate_ci)));
  if (report.compare) {
    foot.push(el("td", { class: "r prev" }, t.previous ? fmtRate(t.previous.error_rate) : "-"),
      el("td", { class: "r delta" }, fmtDelta(t.delta_error_rate)));
  }
  foot.push(el("td", {}), el("td", {}), el("td", {}), el("td", {}),
    el("td", { class: "r tin" }, fmtInt(t.input_tokens)), el("td", { class: "r tout" }, fmtInt(t.output_tokens)),
    el("td", { class: "r cost" }, fmtCost(t.cost_usd)), el("td", {}));
  tfoot.appendChild(el("tr", { "data-segment": "all" }, ...foot));
}

function renderSummary(report) {
  const t = report.total;
  $("m-calls").textContent = fmtInt(t.calls);
  $("m-errors").textContent = fmtInt(t.errors);
  $("m-rate").textContent = fmtRate(t.error_rate);
  $("m-ci").textContent = t.calls ? "95% CI " + fmtCI(t.error_rate_ci) : "";
  $("m-cost").textContent = fmtCost(t.cost_usd);
  const worst = report.segments.find((s) => !s.low_confidence);
  $("m-worst-label").textContent = "worst segment with ≥ " + report.min_calls + " calls";
  $("m-worst").textContent = worst ? report.by.map((k) => label(worst.key[k])).join(" · ") : "-";
  $("m-worst-rate").textContent = worst
    ? fmtRate(worst.error_rate) + " of " + fmtInt(worst.calls) + " calls" +
      (t.calls ? " (overall " + fmtRate(t.error_rate) + ")" : "")
    : "";
}

function niceMax(x) {
  for (const m of [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1]) if (x <= m) return m;
  return 1;
}

function timeLabel(iso, long) {
  const d = new Date(iso);
  const p = (n) => String(n).padStart(2, "0");
  const hm = p(d.getUTCHours()) + ":" + p(d.getUTCMinutes());
  return long ? p(d.getUTCMonth() + 1) + "-" + p(d.getUTCDate()) + " " + hm : hm;
}

function renderChart(ts) {
  const box = $("chart"), legend = $("legend");
  clear(box); clear(legend);
  $("chart-by").textContent = "per " + ts.by + (ts.omitted ? " (top " + ts.series.length + ")" : "");
  const W = 1000, H = 260, L = 52, R = 16, T = 14, B = 30;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "error rate over time" });
  box.appendChild(root);
  const n = ts.buckets.length;
  if (!ts.series.length || !n) {
    root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "no calls in this window"));
    return;
  }
  let top = 0;
  for (const s of ts.series) for (const p of s.points) if (p.error_rate !== null) top = Math.max(top, p.error_rate);
  const ymax = niceMax(Math.max(top, 0.005));
  const x = (i) => L + (n === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const step = { 0.3: 0.05, 0.75: 0.15 }[ymax] || ymax / 5;
  for (let k = 0; k * step <= ymax + 1e-9; k++) {
    const v = k * step;
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    root.appendChild(svg("text", { x: L - 8, y: y(v) + 4, "text-anchor": "end", class: "axis" },
      fixed(v * 100, step < 0.01 ? 1 : 0) + "%"));
  }
  const long = ts.window.seconds > 86400;
  const ticks = Math.min(n, 7);
  for (let k = 0; k < ticks; k++) {
    const i = ticks === 1 ? 0 : Math.round((k * (n - 1)) / (ticks - 1));
    root.appendChild(svg("text", { x: x(i), y: H - 10, "text-anchor": k === 0 ? "start" : k === ticks - 1 ? "end" : "middle",
      class: "axis" }, timeLabel(ts.buckets[i], long)));
  }
  ts.series.forEach((s, si) => {
    const color = PALETTE[si % PALETTE.length];
    const g = svg("g", { "data-series": s.key });
    let d = "", open = false;
    s.points.forEach((p, i) => {
      if (p.error_rate === null) { open = false; return; }
      d += (open ? " L" : " M") + x(i).toFixed(1) + " " + y(p.error_rate).toFixed(1);
      open = true;
    });
    // the series with the most errors is drawn on top and thicker; the rest stay readable but quieter
    if (d) g.appendChild(svg("path", { d: d.trim(), fill: "none", stroke: color, "stroke-width": si === 0 ? 2.5 : 1.5,
      "stroke-opacity": si === 0 ? 1 : 0.75, "stroke-linejoin": "round", "stroke-linecap": "round" }));
    s.points.forEach((p, i) => {
      if (p.error_rate === null) return;
      const c = svg("circle", { cx: x(i).toFixed(1), cy: y(p.error_rate).toFixed(1), r: p.errors ? (si === 0 ? 3.5 : 2.5) : 1.5,
        fill: color });
      c.appendChild(svg("title", {}, `${label(s.key)} · ${timeLabel(p.t, long)} · ${fmtInt(p.errors)}/${fmtInt(p.calls)} = ${fmtRate(p.error_rate)}`));
      g.appendChild(c);
    });
    // worst series last in the SVG, so it is drawn on top
    root.insertBefore(g, root.querySelector("g[data-series]"));
    const sw = el("span", { class: "sw" });
    sw.style.background = color;
    legend.appendChild(el("span", { "data-series": s.key }, sw, label(s.key) + " ",
      el("span", { class: "muted" }, fmtRate(s.error_rate) + " of " + fmtInt(s.calls))));
  });
  if (ts.omitted) legend.appendChild(el("span", { class: "muted" }, "+" + ts.omitted + " more with fewer errors"));
}

// The calls page for a segment of the table (same window and filters, plus the segment's values).
function segmentCallsLink(report, seg, status) {
  const s = formState();
  const p = new URLSearchParams();
  common(p, s);
  for (const k of report.by) p.append("where", k + "=" + seg.key[k]);
  if (status) p.set("status", status);
  return uiLink("calls", null, p);
}

function renderErrors(report) {
  const tbody = $("errors").tBodies[0];
  clear(tbody);
  for (const g of report.errors) {
    const ids = el("td", { class: "mono" });
    for (const id of g.example_trace_ids) {
      ids.appendChild(el("a", { class: "trace", title: "open this call", href: uiLink("calls", id) },
        id.length > 16 ? id.slice(0, 16) + "…" : id));
    }
    tbody.appendChild(el("tr", { "data-error-type": g.error_type },
      el("td", {}, label(g.error_type)), el("td", { class: "r" }, fmtInt(g.count)),
      el("td", { class: "r" }, fmtRate(g.share)), el("td", {}, g.http_statuses.join(",") || "-"),
      el("td", { class: "r" }, String(g.customers)), el("td", {}, g.last_seen.slice(0, 19).replace("T", " ")), ids));
  }
  const shownCalls = report.errors.reduce((n, g) => n + g.count, 0);
  const moreTypes = (report.error_types || 0) - report.errors.length;
  if (moreTypes > 0) {  // the top 10: say what the table leaves out, so the shares need not add up to 100%
    tbody.appendChild(el("tr", { class: "more" }, el("td", { colSpan: 7, class: "muted" },
      `+${fmtInt(moreTypes)} more error type(s) with ${fmtInt(report.total_errors - shownCalls)} call(s)`)));
  }
  if (!report.errors.length) {
    tbody.appendChild(el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "no errors in this window")));
  }
}

// -- loading -------------------------------------------------------------------------------------------------
let loading = 0;

async function load() {
  if (!haveKey()) { showKeyPanel(); return; }
  writeHash();
  const s = formState();
  const stats = new URLSearchParams();
  common(stats, s);
  for (const b of s.by.split(",").map((x) => x.trim()).filter(Boolean)) stats.append("by", b);
  if (s.min_calls !== "") stats.set("min_calls", s.min_calls);
  if (s.compare) stats.set("compare", "1");
  const series = new URLSearchParams();
  common(series, s);
  if (s.min_calls !== "") series.set("min_calls", s.min_calls);
  const errors = new URLSearchParams();
  common(errors, s);
  errors.set("limit", "10");
  const mine = ++loading;
  $("status-line").textContent = "loading…";
  try {
    await whoami();
    keyReady();
    const pre = apiPrefix();
    const [report, ts, errs] = await Promise.all([
      api(pre + "stats", stats), api(pre + "timeseries", series), api(pre + "errors", errors)]);
    if (mine !== loading) return;
    showError("");
    renderSummary(report);
    renderSegments(report);
    renderChart(ts);
    renderErrors(errs);
    const w = report.window;
    // replayed and judge calls are left out unless the filters name source (exporters/queries.py)
    const excluded = (report.sources_excluded || []).length ? ` · source not ${report.sources_excluded.join(", ")}` : "";
    $("status-line").textContent = `${report.segments.length} segment(s) · ${w.from.slice(0, 16).replace("T", " ")} to ` +
      `${w.to.slice(0, 16).replace("T", " ")} UTC${excluded} · bucket ${ts.step_seconds / 60} min · updated ` +
      new Date().toISOString().slice(11, 19) + " UTC";  // in UTC, as every other time on the page
    document.body.setAttribute("data-loaded", "1");
  } catch (e) {
    if (mine !== loading) return;
    $("status-line").textContent = "";
    if (!authFailed(e)) showError(e.message);
    document.body.setAttribute("data-loaded", "error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  readHash();
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
  for (const id of ["f-since", "f-status", "f-compare"]) $(id).addEventListener("change", load);
  wireKeyPanel(load);
  load();
});
