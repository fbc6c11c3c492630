// inferq status page: reads /ui/api/events (server-sent events over fetch, so an API key can go in a header),
// reconnects on its own (an edge restart), and renders with plain DOM calls. No dependencies, no build step.
"use strict";
let apiKey = null;  // held in memory only, never stored
let controller = null;

const $ = (sel) => document.querySelector(sel);
const headers = () => (apiKey ? { Authorization: `Bearer ${apiKey}` } : {});

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function setConnection(text, kind) {
  const pill = $("#connection");
  pill.textContent = text;
  pill.className = `pill ${kind}`;
}

const clip = (text, n) => (text.length > n ? `${text.slice(0, n)}…` : text);

function fmtAge(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.round(s / 60)}m`;
  return `${(s / 3600).toFixed(1)}h`;
}

function sparkline(values) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9);
    const pts = values.map((v, i) => `${(i / (values.length - 1)) * 100},${28 - (v / max) * 26}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts);
    svg.append(line);
  }
  return svg;
}

const isIdle = (m) => m.versions.every((v) => !v.workers && !v.queue_ready && !Object.values(v.states).some((n) => n > 0));

function renderModels(models) {
  const box = $("#models");
  box.replaceChildren();
  if (!models.length) { box.append(el("p", { class: "muted" }, "no models yet")); return; }
  const idle = models.filter(isIdle);
  for (const m of models.filter((m) => !isIdle(m))) {
    const aliases = Object.entries(m.aliases).map(([a, v]) => `${a}→${v}`).join(", ");
    const traffic = Object.entries(m.traffic).map(([a, w]) => `${a} ${w}%`).join(", ");
    const rows = m.versions.map((v) => el("tr", { "data-version": v.version },
      el("td", {}, `v${v.version}`),
      el("td", { class: "num" }, v.queue_ready ?? "?"),
      el("td", { class: "num" }, v.inflight),
      el("td", { class: "num" }, v.workers),
      el("td", { class: "num", "data-field": "succeeded" }, v.states.succeeded ?? 0),
      el("td", { class: "num", "data-field": "failed" }, (v.states.failed ?? 0) + (v.states.expired ?? 0)),
      el("td", { class: "num" }, v.p50_ms ?? "–"),
      el("td", { class: "num" }, v.p99_ms ?? "–"),
      el("td", { class: "num" }, `${(v.failure_rate * 100).toFixed(1)}%`)));
    const table = el("table", {},
      el("thead", {}, el("tr", {}, ...["version", "queue", "in flight", "workers", "succeeded", "failed", "p50 ms", "p99 ms", "fail %"]
        .map((h, i) => el("th", { class: i ? "num" : "" }, h)))),
      el("tbody", {}, ...rows));
    box.append(el("article", { class: "card", "data-model": m.name },
      el("h3", {}, m.name),
      el("div", { class: "meta" }, `default v${m.default_version}` + (aliases ? ` · aliases ${aliases}` : "") + (traffic ? ` · traffic ${traffic}` : "")),
      el("div", { class: "meta" }, "jobs/s"), sparkline(m.history.jobs_per_s),
      el("div", { class: "meta" }, "queue"), sparkline(m.history.queue),
      el("div", { class: "scroll" }, table)));
  }
  if (idle.length) {
    // Models with no worker, no queued job and no job in the ledger window: one chip each, not a card.
    box.append(el("div", { class: "idle-list" }, el("span", { class: "muted" }, "idle:"),
      ...idle.map((m) => el("article", { class: "chip", "data-model": m.name, title: `default v${m.default_version}` }, m.name))));
  }
}

function fmtBytes(n) {
  if (!n) return "";
  return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : `${Math.round(n / 2 ** 20)} MiB`;
}

// What the node is: a Jetson's model, SoC, L4T and power mode, or a host's CPU; and its memory.
function fmtDevice(d) {
  if (!d) return "";
  const parts = d.kind === "jetson"
    ? [d.model, d.soc, d.l4t && `L4T ${d.l4t}`, d.power_mode && `power ${d.power_mode}`]
    : [d.model, d.cpu_cores && `${d.cpu_cores} cores`];
  return [...parts, fmtBytes(d.memory_bytes)].filter(Boolean).join(" · ");
}

function fmtOutage(o) {
  return o ? `${o.lasted_s}s, ${fmtAge(o.ago_s)} ago` : "none";
}

function renderRows(selector, items, cells) {
  const body = $(`${selector} tbody`);
  body.replaceChildren(...items.map((item) => el("tr", {}, ...cells(item))));
}

function render(state) {
  renderModels(state.models);
  const mayDrain = state.viewer.may_drain;  // admin keys only: the page is read-only otherwise
  renderRows("#workers", state.workers, (w) => [
    el("td", { title: w.worker_id }, w.worker_id), el("td", { "data-field": "served" }, `${w.model}:${w.version}` + (w.variant ? ` · ${w.variant}` : "")),
    el("td", { class: `state-${w.state}` }, w.state), el("td", {}, w.node), el("td", {}, w.providers.join(", ")),
    el("td", { class: "num" }, w.jobs), el("td", { class: "num" }, w.failed), el("td", { class: "num" }, w.mean_batch),
    el("td", { class: "num" }, w.inflight), el("td", {}, fmtAge(w.age_s)),
    el("td", {}, mayDrain && w.state === "ready" ? el("button", { type: "button", class: "small", "data-drain": w.worker_id }, "Drain") : "")]);
  $("#nodes-section").hidden = !state.nodes.length;  // only where edge-node agents run
  renderRows("#nodes", state.nodes, (n) => [
    el("td", {}, n.node), el("td", {}, n.providers.join(", ")), el("td", { class: "num" }, n.capacity),
    el("td", { class: "num" }, n.workers), el("td", { class: "num" }, n.restarts), el("td", { class: "reason" }, n.last_exit),
    el("td", { "data-field": "device" }, fmtDevice(n.device)), el("td", { "data-field": "outage" }, fmtOutage(n.last_outage)),
    el("td", {}, fmtAge(n.age_s))]);
  renderRows("#decisions", state.decisions, (d) => [
    el("td", {}, `${d.model}:${d.version}`), el("td", { class: "num" }, d.backlog), el("td", { class: "num" }, d.current),
    el("td", { class: "num" }, d.desired), el("td", { class: "num" }, d.consumers), el("td", { class: "reason" }, d.reason),
    el("td", {}, fmtAge(d.age_s))]);
  renderRows("#jobs", state.jobs, (j) => [
    el("td", {}, el("a", { href: "#", "data-job": j.job_id }, j.job_id)), el("td", {}, `${j.model}:${j.version}`),
    el("td", { class: `status-${j.status}` }, j.status), el("td", { class: "reason", title: j.error ? j.error.message : "" }, j.error ? `${j.error.code}: ${clip(j.error.message, 140)}` : ""),
    el("td", {}, j.worker ?? ""), el("td", { class: "num" }, j.attempts), el("td", {}, j.updated_at ?? ""),
    el("td", {}, state.viewer.may_cancel && j.status === "queued" ? el("button", { type: "button", class: "small", "data-cancel": j.job_id }, "Cancel") : "")]);
  if (state.stale) setConnection("live · stale data", "stale"); else setConnection("live", "live");
  $("#footer").textContent = `edge ${state.edge.ready ? "ready" : "not ready"} · ${state.edge.jobs_in_memory} jobs in the ledger window · refreshed ${state.refreshed_at ?? "never"}`;
}

async function lookup(jobId) {
  const box = $("#timeline");
  const resp = await fetch(`/ui/api/jobs/${encodeURIComponent(jobId)}`, { headers: headers() });
  const doc = await resp.json();
  if (!resp.ok) { box.replaceChildren(el("p", { class: "error" }, doc.error?.message ?? resp.statusText)); return; }
  const steps = doc.timeline.map((s) => el("li", { class: `status-${s.state}` },
    `${s.state} at ${s.at}` + (s.worker ? ` on ${s.worker}` : "") + (s.error ? ` — ${s.error.code}: ${s.error.message}` : "")));
  const timings = Object.entries(doc.timings).map(([k, v]) => `${k} ${v}`).join(" · ");
  box.replaceChildren(el("h3", {}, `Job ${doc.job_id}`),
    el("div", { class: "muted" }, `${doc.model}:${doc.version} · attempts ${doc.attempts}` + (doc.trace_id ? ` · trace ${doc.trace_id}` : "")),
    el("ol", {}, ...steps), el("div", { class: "muted" }, timings));
}

async function stream() {
  for (;;) {
    controller = new AbortController();
    try {
      const resp = await fetch("/ui/api/events", { headers: headers(), signal: controller.signal });
      if (resp.status === 401) { $("#key-form").hidden = false; setConnection("API key needed", "down"); return; }
      if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) render(JSON.parse(data));
        }
      }
    } catch (err) {
      if (err.name === "AbortError") return;
    }
    setConnection("reconnecting…", "down");
    await new Promise((r) => setTimeout(r, 1000));
  }
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("#api-key").value.trim() || null;
  $("#key-form").hidden = true;
  if (controller) controller.abort();
  stream();
});
$("#lookup").addEventListener("submit", (e) => { e.preventDefault(); const id = $("#job-id").value.trim(); if (id) lookup(id); });
async function drain(workerId) {
  const resp = await fetch(`/ui/api/workers/${encodeURIComponent(workerId)}/drain`, { method: "POST", headers: headers() });
  if (!resp.ok) alert((await resp.json()).error?.message ?? resp.statusText);
}

async function cancel(jobId) {
  const resp = await fetch(`/ui/api/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", headers: headers() });
  if (!resp.ok) alert((await resp.json()).error?.message ?? resp.statusText); else lookup(jobId);
}

document.addEventListener("click", (e) => {
  const worker = e.target?.dataset?.drain;
  if (worker) { e.preventDefault(); e.target.disabled = true; drain(worker); return; }
  const doomed = e.target?.dataset?.cancel;
  if (doomed) { e.preventDefault(); e.target.disabled = true; cancel(doomed); return; }
  const id = e.target?.dataset?.job;
  if (id) { e.preventDefault(); $("#job-id").value = id; lookup(id); }
});
stream();
