// The claracore dashboard: plain JavaScript, no framework, no build step.
//
// Rules kept throughout:
// - Anything that came from the server is put in the page as text
//   (textContent, attribute values), never parsed as HTML: recorded prompts
//   and log lines may hold markup.
// - State-changing requests carry the session's CSRF token.
// - Rows have fixed heights and cells reserve their space, so live events
//   never move the layout around.
// - An endpoint that answers 404 (an older daemon) gives a "not available"
//   note instead of a broken page; pages fall back to polling.

const $ = (sel, root = document) => root.querySelector(sel);

/** Makes an element: el("td", {dataset: {field: "state"}}, "text", child…). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "text") node.textContent = v;
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const app = {
  session: null,
  models: new Map(), // name -> merged /v1/models + /admin/ps entry
  events: null, // EventSource of /admin/events, or null
  eventsAvailable: null, // null: unknown yet
  page: null,
  cleanup: [], // run when the page changes
  live: [], // recent request events, newest first
};

const isAdmin = () => !!app.session && app.session.scopes.includes("admin");

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** fetch against the daemon's API with the session; JSON in and out. */
async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (method !== "GET" && app.session) headers["x-csrf-token"] = app.session.csrf;
  if (body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  if (resp.status === 401 && path !== "/ui/session") {
    location.assign("/ui/login");
    throw new HttpError(401, "logged out");
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    data = null;
  }
  if (!resp.ok) {
    const msg = (data && data.error && (data.error.message || data.error)) || resp.statusText;
    throw new HttpError(resp.status, String(msg));
  }
  return data;
}

function note(text, cls = "note") {
  return el("p", { class: cls, text });
}

function fmtMs(v) {
  if (v === null || v === undefined) return "—";
  if (v >= 1000) return `${(v / 1000).toFixed(2)} s`;
  return v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.floor(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function fmtBytesMb(mb) {
  if (mb === null || mb === undefined) return "—";
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${Math.round(mb)} MiB`;
}

function fmtTime(ms) {
  if (!ms) return "—";
  return new Date(ms).toLocaleTimeString();
}

// ---------------------------------------------------------------- events

const listeners = new Set(); // (type, data) => void

function onEvent(fn) {
  listeners.add(fn);
  app.cleanup.push(() => listeners.delete(fn));
}

const EVENT_TYPES = ["state", "progress", "request_started", "request", "queue", "history_drops", "reload", "audit", "reset"];

async function startEvents() {
  const status = $("[data-testid=live-status]");
  try {
    const probe = await fetch("/admin/events", { credentials: "same-origin", headers: { accept: "text/event-stream" } });
    if (probe.body) probe.body.cancel().catch(() => {});
    if (!probe.ok) {
      app.eventsAvailable = false;
      status.textContent = probe.status === 404 ? "live events not available (polling)" : `events: ${probe.status}`;
      return;
    }
  } catch (_) {
    app.eventsAvailable = false;
    status.textContent = "live events not available (polling)";
    return;
  }
  app.eventsAvailable = true;
  const es = new EventSource("/admin/events");
  app.events = es;
  es.onopen = () => (status.textContent = "live");
  es.onerror = () => (status.textContent = "reconnecting…");
  for (const type of EVENT_TYPES) {
    es.addEventListener(type, (ev) => {
      let data = {};
      try {
        data = JSON.parse(ev.data);
      } catch (_) {
        return;
      }
      dispatchEvent(type, data);
    });
  }
}

function dispatchEvent(type, data) {
  if (type === "request_started" || type === "request") rememberRequest(type, data);
  if (type === "state" || type === "progress" || type === "queue") updateModel(type, data);
  for (const fn of listeners) fn(type, data);
}

function rememberRequest(type, data) {
  const id = String(data.id);
  let entry = app.live.find((r) => r.key === id);
  if (!entry) {
    entry = { key: id, started_at_ms: Date.now(), running: true };
    app.live.unshift(entry);
    if (app.live.length > 200) app.live.pop();
  }
  Object.assign(entry, data);
  if (type === "request") entry.running = false;
}

function updateModel(type, data) {
  const m = app.models.get(data.model);
  if (!m) return;
  if (type === "state") {
    m.state = data.state;
    m.last_error = data.state === "failed" ? data.reason || m.last_error : m.last_error;
    if (data.state !== "starting") m.progress = null;
  } else if (type === "progress") {
    m.state = "starting";
    m.progress = data;
  } else if (type === "queue") {
    m.waiting = data.waiting;
  }
}

// ---------------------------------------------------------------- models

async function fetchModels() {
  const [ps, list] = await Promise.allSettled([api("/admin/ps"), api("/v1/models")]);
  const next = new Map();
  if (list.status === "fulfilled") {
    for (const m of list.value.data || []) next.set(m.id, { name: m.id, state: m.state || m.status, ...pick(m) });
  }
  if (ps.status === "fulfilled") {
    for (const m of ps.value.models || []) next.set(m.name, { ...(next.get(m.name) || {}), ...m });
  }
  if (ps.status === "rejected" && list.status === "rejected") throw ps.reason;
  app.models = next;
  return next;
}

function pick(m) {
  const out = {};
  for (const k of ["progress", "load_ms"]) if (m[k] !== undefined) out[k] = m[k];
  return out;
}

function memoryOf(m) {
  const mb = m.memory_mb ?? m.rss_mb ?? m.vram_mb ?? (m.rss_bytes ? m.rss_bytes / 1048576 : null);
  return fmtBytesMb(mb);
}

function progressCell(m) {
  const cell = el("td", { class: "progress-cell" });
  const bar = el("progress", { dataset: { field: "progress" }, max: "1" });
  const p = m.progress;
  if (m.state === "starting" || m.state === "loading") {
    if (p && typeof p.fraction === "number") bar.value = p.fraction;
    else if (p && p.expected_ms) bar.value = Math.min(0.99, p.elapsed_ms / p.expected_ms);
    bar.title = p ? `${fmtMs(p.elapsed_ms)}${p.expected_ms ? ` of about ${fmtMs(p.expected_ms)}` : ""}` : "starting";
    cell.append(bar);
  } else {
    cell.append(el("span", { class: "reserve" }));
  }
  return cell;
}

function modelRow(m) {
  const tr = el("tr", { dataset: { model: m.name } });
  const state = m.state || "stopped";
  tr.append(
    el("th", { scope: "row", text: m.name }),
    el("td", { dataset: { field: "state" }, class: `state state-${state}`, text: state }),
    progressCell(m),
    el("td", { dataset: { field: "pid" }, text: m.pid ?? "—" }),
    el("td", { dataset: { field: "memory" }, text: memoryOf(m) }),
    el("td", { dataset: { field: "uptime" }, text: fmtDuration(m.uptime_s) }),
    el("td", { dataset: { field: "inflight" }, text: `${m.inflight ?? 0}${m.waiting ? ` (+${m.waiting} waiting)` : ""}` }),
    el("td", { dataset: { field: "load-time" }, text: fmtMs(m.load_ms) }),
    el("td", { dataset: { field: "last-error" }, class: "error-text", title: m.last_error || "", text: m.last_error || "" }),
  );
  if (isAdmin()) {
    const actions = el("td", { class: "actions" });
    const busy = state === "starting" || state === "stopping";
    actions.append(
      el("button", { type: "button", dataset: { action: "load", model: m.name }, disabled: busy || state === "ready", on: { click: () => modelAction(m.name, "load") }, text: "Load" }),
      el("button", { type: "button", dataset: { action: "stop", model: m.name }, disabled: busy || state === "stopped", on: { click: () => modelAction(m.name, "stop") }, text: "Stop" }),
    );
    tr.append(actions);
  }
  return tr;
}

async function modelAction(name, action) {
  const m = app.models.get(name);
  if (m) {
    m.state = action === "load" ? "starting" : "stopping";
    renderModelRows();
  }
  try {
    await api(`/admin/models/${encodeURIComponent(name)}/${action}`, { method: "POST" });
  } catch (e) {
    if (m) m.last_error = e.message;
  }
  await refreshModels();
}

let modelsBody = null;

function renderModelRows() {
  if (!modelsBody) return;
  const rows = [...app.models.values()].sort((a, b) => a.name.localeCompare(b.name)).map(modelRow);
  modelsBody.replaceChildren(...rows);
  if (rows.length === 0) modelsBody.append(el("tr", {}, el("td", { colspan: "10", text: "No models configured." })));
}

async function refreshModels() {
  try {
    await fetchModels();
  } catch (e) {
    /* keep the last rows */
  }
  renderModelRows();
}

async function pageModels(main) {
  const head = ["Model", "State", "Progress", "PID", "Memory", "Uptime", "In flight", "Load time", "Last error"];
  if (isAdmin()) head.push("Actions");
  modelsBody = el("tbody");
  main.append(
    el("h1", { text: "Models" }),
    el("div", { class: "table-wrap" }, el("table", { class: isAdmin() ? "models admin" : "models" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))), modelsBody)),
  );
  await refreshModels();
  let pending = null;
  onEvent((type) => {
    if (type === "state" || type === "progress" || type === "queue") {
      renderModelRows();
      if (type === "state" && !pending) pending = setTimeout(() => ((pending = null), refreshModels()), 250);
    } else if (type === "reset") refreshModels();
  });
  // Uptime and memory move without events; polled slowly (fast when
  // events are not available).
  const timer = setInterval(refreshModels, app.eventsAvailable ? 5000 : 2000);
  app.cleanup.push(() => clearInterval(timer), () => (modelsBody = null));
}

// ---------------------------------------------------------------- activity

const WINDOWS = [["15m", "15 min"], ["1h", "1 hour"], ["24h", "24 hours"], ["7d", "7 days"]];
const OUTCOMES = ["ok", "cancelled", "upstream_error", "timeout", "rejected"];

function select(name, options, value) {
  const s = el("select", { name, id: `f-${name}` });
  for (const [v, label] of options) s.append(el("option", { value: v, text: label, selected: v === value }));
  return s;
}

function requestRow(r, onOpen) {
  const id = String(r.request_id ?? r.key ?? r.id);
  const tr = el("tr", { dataset: { requestId: id }, tabindex: "0", class: r.running ? "running" : "" });
  const open = () => onOpen(r);
  tr.addEventListener("click", open);
  tr.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      open();
    }
  });
  const tokens = r.prompt_tokens != null || r.completion_tokens != null ? `${r.prompt_tokens ?? "—"} / ${r.completion_tokens ?? "—"}` : "—";
  tr.append(
    el("td", { text: fmtTime(r.started_at_ms) }),
    el("td", { text: r.model ?? "—" }),
    el("td", { text: r.endpoint ?? "" }),
    el("td", { text: r.key_name ?? "" }),
    el("td", { dataset: { field: "status" }, text: r.running ? "running" : r.status ?? "" }),
    el("td", { dataset: { field: "outcome" }, class: `outcome-${r.outcome || "running"}`, text: r.running ? "…" : r.outcome ?? "" }),
    el("td", { text: r.running ? "…" : fmtMs(r.latency_ms) }),
    el("td", { text: fmtMs(r.ttft_ms) }),
    el("td", { text: tokens }),
  );
  return tr;
}

async function findHistoryRow(r) {
  if (typeof r.id === "number" && r.request_id) return api(`/admin/history/${r.id}`);
  const key = String(r.request_id ?? r.key ?? r.id);
  // A live row knows the request id; its history row is written in a
  // batch, so look a few times.
  for (let i = 0; i < 5; i++) {
    const page = await api("/admin/history?limit=200");
    const found = (page.requests || []).find((h) => h.request_id === key || String(h.id) === key);
    if (found) return api(`/admin/history/${found.id}`);
    await new Promise((res) => setTimeout(res, 300));
  }
  throw new HttpError(404, "no history row for this request yet");
}

function detailView(detail, row) {
  detail.replaceChildren(el("h2", { text: "Request" }), note("Loading…"));
  detail.hidden = false;
  findHistoryRow(row).then(
    (h) => {
      const dl = el("dl", { class: "detail-grid" });
      const add = (label, field, value) => dl.append(el("dt", { text: label }), el("dd", { dataset: field ? { field } : {}, text: value }));
      add("Request id", null, h.request_id);
      add("Model", null, h.model ?? "—");
      add("Endpoint", null, h.endpoint);
      add("Key", null, h.key_name ?? "—");
      add("Client", null, h.client);
      add("Status", null, `${h.status} ${h.outcome}${h.error ? ` — ${h.error}` : ""}`);
      add("Latency", "latency", fmtMs(h.latency_ms));
      add("Time to first token", "ttft", fmtMs(h.ttft_ms));
      add("Tokens (prompt / completion / cached)", "tokens", `${h.prompt_tokens ?? "—"} / ${h.completion_tokens ?? "—"} / ${h.cached_tokens ?? "—"}`);
      add("Prompt speed", null, h.prompt_per_second ? `${h.prompt_per_second.toFixed(1)} tok/s` : "—");
      add("Generation speed", null, h.predicted_per_second ? `${h.predicted_per_second.toFixed(1)} tok/s` : "—");
      const content = el("pre", { dataset: { field: "content" }, class: "content" });
      // textContent only: recorded content is data, never markup.
      content.textContent =
        h.request_content == null && h.response_content == null
          ? "(no content recorded under this server's content policy)"
          : `— request —\n${h.request_content ?? ""}\n\n— response —\n${h.response_content ?? ""}${h.content_truncated ? "\n\n(truncated)" : ""}`;
      detail.replaceChildren(
        el("h2", { text: "Request" }),
        el("button", { type: "button", class: "close", on: { click: () => (detail.hidden = true) }, text: "Close" }),
        dl,
        el("h3", { text: "Content" }),
        content,
      );
    },
    (e) => detail.replaceChildren(el("h2", { text: "Request" }), note(`Not available: ${e.message}`)),
  );
}

async function pageActivity(main) {
  const names = [...(await fetchModels().catch(() => app.models)).keys()].sort();
  const f = {
    model: select("model", [["", "all models"], ...names.map((n) => [n, n])], ""),
    outcome: select("outcome", [["", "any outcome"], ...OUTCOMES.map((o) => [o, o])], ""),
    key: el("input", { name: "key", id: "f-key", type: "search", placeholder: "key name" }),
    window: select("window", WINDOWS, "24h"),
  };
  const label = (text, input) => el("label", { for: input.id }, text, input);
  const filters = el("form", { class: "filters", on: { submit: (e) => e.preventDefault() } }, label("Model", f.model), label("Outcome", f.outcome), label("Key", f.key), label("Window", f.window));
  const body = el("tbody");
  const detail = el("section", { dataset: { testid: "request-detail" }, class: "detail", hidden: true, "aria-live": "polite" });
  const status = el("p", { class: "note reserve-line" });
  const head = ["Time", "Model", "Endpoint", "Key", "Status", "Outcome", "Latency", "TTFT", "Tokens in/out"];
  main.append(
    el("h1", { text: "Activity" }),
    filters,
    status,
    el("div", { class: "activity" }, el("div", { class: "table-wrap tall" }, el("table", { class: "requests" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))), body)), detail),
  );
  let history = [];
  const matches = (r) =>
    (!f.model.value || r.model === f.model.value) &&
    (!f.outcome.value || (!r.running && r.outcome === f.outcome.value)) &&
    (!f.key.value || (r.key_name || "").includes(f.key.value));
  const render = () => {
    const seen = new Set();
    const rows = [];
    for (const r of [...app.live, ...history]) {
      const k = String(r.request_id ?? r.key ?? r.id);
      if (seen.has(k) || !matches(r)) continue;
      seen.add(k);
      rows.push(requestRow(r, (row) => detailView(detail, row)));
      if (rows.length >= 200) break;
    }
    body.replaceChildren(...rows);
  };
  const load = async () => {
    const q = new URLSearchParams({ limit: "100", since: f.window.value });
    if (f.model.value) q.set("model", f.model.value);
    if (f.outcome.value) q.set("outcome", f.outcome.value);
    try {
      const page = await api(`/admin/history?${q}`);
      history = page.requests || [];
      status.textContent = app.eventsAvailable ? "Live: new requests appear as they start." : "Live events not available: refreshed every 3 s.";
    } catch (e) {
      status.textContent = e.status === 404 || e.status === 503 ? "History not available on this server." : `History: ${e.message}`;
    }
    render();
  };
  for (const input of Object.values(f)) input.addEventListener(input === f.key ? "input" : "change", () => (input === f.key ? render() : load()));
  await load();
  onEvent((type) => {
    if (type === "request_started" || type === "request") render();
    if (type === "reset") load();
  });
  if (!app.eventsAvailable) {
    const t = setInterval(load, 3000);
    app.cleanup.push(() => clearInterval(t));
  }
}

// ---------------------------------------------------------------- stats

// The SVG namespace, taken from an <svg> the HTML parser made (index.html's
// template), so no URL needs to be written here.
const SVG = document.getElementById("svg-ns").content.firstElementChild.namespaceURI;

function svgEl(tag, attrs = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

/** A grouped bar chart: one group per model, one bar per series. */
function barChart(name, title, models, series, format) {
  const W = 560, H = 240, left = 56, bottom = 44, top = 28;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, "data-chart": name, class: "chart" });
  svg.append(svgEl("title", {}, title), svgEl("text", { x: 8, y: 18, class: "chart-title" }, title));
  const values = models.flatMap((m) => series.map((s) => m[s.key] ?? 0));
  const max = Math.max(1, ...values);
  const plotH = H - top - bottom, plotW = W - left - 8;
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    svg.append(svgEl("line", { x1: left, x2: W - 8, y1: y, y2: y, class: "grid" }), svgEl("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, format((max * i) / 4)));
  }
  if (models.length === 0) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle" }, "no requests in this window"));
    return svg;
  }
  const groupW = plotW / models.length;
  const barW = Math.max(4, Math.min(40, (groupW - 12) / series.length));
  models.forEach((m, gi) => {
    const gx = left + gi * groupW + (groupW - barW * series.length) / 2;
    series.forEach((s, si) => {
      const v = m[s.key];
      const h = v ? (plotH * v) / max : 0;
      const rect = svgEl("rect", { x: gx + si * barW, y: top + plotH - h, width: barW - 2, height: h, class: `bar bar-${si}` });
      rect.append(svgEl("title", {}, `${m.model} ${s.label}: ${v == null ? "—" : format(v)}`));
      svg.append(rect);
    });
    svg.append(svgEl("text", { x: left + gi * groupW + groupW / 2, y: H - bottom + 16, class: "axis", "text-anchor": "middle" }, m.model));
  });
  series.forEach((s, si) => {
    const x = left + si * 150;
    svg.append(svgEl("rect", { x, y: H - 16, width: 10, height: 10, class: `bar bar-${si}` }), svgEl("text", { x: x + 14, y: H - 7, class: "axis" }, s.label));
  });
  return svg;
}

async function pageStats(main) {
  const win = select("window", WINDOWS, "1h");
  win.id = "f-window";
  const charts = el("div", { class: "charts" });
  const status = el("p", { class: "note reserve-line" });
  main.append(el("h1", { text: "Stats" }), el("form", { class: "filters", on: { submit: (e) => e.preventDefault() } }, el("label", { for: "f-window" }, "Window", win)), status, charts);
  const num = (v) => (v >= 100 ? Math.round(v).toString() : v.toFixed(v >= 10 ? 1 : 2).replace(/\.?0+$/, "") || "0");
  const load = async () => {
    let models = [];
    try {
      const s = await api(`/admin/stats?window=${encodeURIComponent(win.value)}`);
      models = s.models || [];
      status.textContent = s.history_rows_dropped ? `${s.history_rows_dropped} history rows were dropped (queue full or disk failing).` : "";
    } catch (e) {
      status.textContent = e.status === 404 || e.status === 503 ? "Stats not available on this server." : `Stats: ${e.message}`;
    }
    charts.replaceChildren(
      barChart("requests", "Requests and errors", models, [{ key: "requests", label: "requests" }, { key: "errors", label: "errors" }], num),
      barChart("latency", "Latency p50 / p95", models, [{ key: "latency_p50_ms", label: "p50" }, { key: "latency_p95_ms", label: "p95" }], fmtMs),
      barChart("ttft", "Time to first token p50 / p95", models, [{ key: "ttft_p50_ms", label: "p50" }, { key: "ttft_p95_ms", label: "p95" }], fmtMs),
      barChart("tokens", "Tokens per second", models, [{ key: "prompt_tokens_per_second", label: "prompt tok/s" }, { key: "generation_tokens_per_second", label: "generation tok/s" }], num),
    );
  };
  win.addEventListener("change", load);
  await load();
  const t = setInterval(load, 10000);
  app.cleanup.push(() => clearInterval(t));
}

// ---------------------------------------------------------------- logs

const LOG_LINES = 1000;

async function pageLogs(main) {
  const names = [...(await fetchModels().catch(() => app.models)).keys()].sort();
  const sel = select("model", names.map((n) => [n, n]), names[0]);
  const pre = el("pre", { dataset: { testid: "log-lines" }, class: "log", tabindex: "0" });
  const status = el("p", { class: "note reserve-line" });
  main.append(el("h1", { text: "Logs" }), el("form", { class: "filters", on: { submit: (e) => e.preventDefault() } }, el("label", { for: "f-model" }, "Model", sel)), status, pre);
  let es = null;
  const stop = () => es && (es.close(), (es = null));
  app.cleanup.push(stop);
  const append = (line) => {
    const text = `${line.stream === "stderr" ? "! " : "  "}${line.text}\n`;
    // Text nodes only: a log line may hold anything.
    pre.append(document.createTextNode(text));
    while (pre.childNodes.length > LOG_LINES) pre.firstChild.remove();
    if (pre.scrollHeight - pre.scrollTop - pre.clientHeight < 80) pre.scrollTop = pre.scrollHeight;
  };
  const open = async () => {
    stop();
    pre.replaceChildren();
    const model = sel.value;
    if (!model) {
      status.textContent = "No models configured.";
      return;
    }
    if (!isAdmin()) {
      status.textContent = "Logs need the admin scope (prompts can appear in them).";
      return;
    }
    const path = `/admin/logs/${encodeURIComponent(model)}`;
    const probe = await fetch(path, { credentials: "same-origin" }).catch(() => null);
    if (!probe || !probe.ok) {
      status.textContent = !probe || probe.status === 404 ? "Logs are not available on this server." : `Logs: ${probe.status}`;
      return;
    }
    status.textContent = `Following ${model}.`;
    es = new EventSource(`${path}?follow=1`);
    es.addEventListener("line", (ev) => {
      try {
        append(JSON.parse(ev.data));
      } catch (_) {
        /* skip a malformed line */
      }
    });
    // A reconnect replays the ring: start over then.
    es.onopen = () => pre.replaceChildren();
    es.onerror = () => (status.textContent = `Reconnecting to ${model}…`);
  };
  sel.addEventListener("change", open);
  await open();
}

// ---------------------------------------------------------------- audit

async function pageAudit(main) {
  const body = el("tbody");
  const status = el("p", { class: "note reserve-line" });
  const head = ["Time", "Principal", "Action", "Target", "Result"];
  main.append(el("h1", { text: "Audit" }), status, el("div", { class: "table-wrap tall" }, el("table", { class: "audit" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))), body)));
  const load = async () => {
    try {
      const page = await api("/admin/audit?limit=200");
      body.replaceChildren(
        ...(page.audit || []).map((a) =>
          el("tr", { dataset: { audit: a.id } }, el("td", { text: new Date(a.at_ms).toLocaleString() }), el("td", { text: a.principal }), el("td", { text: a.action }), el("td", { text: a.target ?? "" }), el("td", { text: a.result })),
        ),
      );
      status.textContent = "";
    } catch (e) {
      status.textContent = e.status === 403 ? "The audit trail needs the admin scope." : `Audit: ${e.message}`;
    }
  };
  await load();
  onEvent((type) => type === "audit" && load());
}

// ---------------------------------------------------------------- shell

const PAGES = { models: pageModels, activity: pageActivity, stats: pageStats, logs: pageLogs, audit: pageAudit };

async function show(name) {
  if (!PAGES[name] || (name === "audit" && !isAdmin())) name = "models";
  for (const fn of app.cleanup.splice(0)) fn();
  app.page = name;
  for (const a of document.querySelectorAll("nav a[data-page]")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const old = $("main");
  const main = el("main", { dataset: { page: name }, id: "page", tabindex: "-1" });
  old.replaceWith(main);
  try {
    await PAGES[name](main);
  } catch (e) {
    if (e.status !== 401) main.append(note(`This page could not load: ${e.message}`, "error"));
  }
}

async function logout() {
  try {
    await api("/ui/logout", { method: "POST" });
  } finally {
    location.assign("/ui/login");
  }
}

async function boot() {
  try {
    app.session = await api("/ui/session");
  } catch (e) {
    location.assign("/ui/login");
    return;
  }
  const s = app.session;
  $("[data-testid=principal]").textContent = `${s.principal} (${s.scopes.join(", ")})`;
  $("[data-testid=open-banner]").hidden = !s.open;
  const logoutButton = $("button[data-action=logout]");
  logoutButton.hidden = s.login === "open";
  logoutButton.addEventListener("click", logout);
  const auditLink = $("a[data-page=audit]");
  if (isAdmin()) auditLink.hidden = false;
  else auditLink.remove();
  await startEvents();
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  await show(location.hash.slice(1) || "models");
}

boot();
