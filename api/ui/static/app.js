// sDPO dashboard: plain JavaScript over the JSON API (see api/ui/router.py for how the key is kept).
// Every value from the API reaches the page through textContent (never innerHTML).
"use strict";

const KEY = "sdpo_api_key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const COLORS = ["#3558d6", "#d9822b", "#1f8a4c", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#b7950b"];

// ---------------------------------------------------------------------------------------------
// Small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
const when = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "–");
const clock = (unix) => (unix ? new Date(unix * 1000).toLocaleTimeString() : "");
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);

function progressBar(p, status) {
  const pct = p ? p.percent : 0;
  const cls = status === "succeeded" ? "bar done" : status === "failed" ? "bar bad" : "bar";
  const fill = h("span");
  fill.style.width = `${Math.max(0, Math.min(100, pct || 0))}%`;
  return h("div", { class: cls, title: `${fmt(pct, 1)} %`, "data-percent": pct }, fill);
}

function progressText(job) {
  const p = job.progress;
  if (!p) return "";
  if (p.queue_position) return `queued, position ${p.queue_position}`;
  const parts = [`step ${p.step} of ${p.n_steps}`];
  if (p.max_steps) parts.push(`global step ${p.global_step}/${p.max_steps}`);
  parts.push(`${fmt(p.percent, 1)} %`);
  if (p.tokens_per_second) parts.push(`${Math.round(p.tokens_per_second)} tok/s`);
  if (p.eta_seconds !== null && p.eta_seconds !== undefined && !TERMINAL.has(job.status)) {
    parts.push(`ETA ${duration(p.eta_seconds)}`);
  }
  return parts.join(" · ");
}

// ---------------------------------------------------------------------------------------------
// The API, with the key from sessionStorage

const key = () => sessionStorage.getItem(KEY);

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${key()}` }, options.headers || {});
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { method: options.method || "GET", headers, body: options.body });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: { message: text } }; }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    go(`/ui/login?next=${encodeURIComponent(location.pathname)}`);
    throw new ApiError(401, body);
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// Server-sent events through fetch (EventSource cannot send the Authorization header). Reconnects
// with Last-Event-ID after a dropped connection, so every event arrives once, in order.
function followEvents(jobId, onEvent, onDone) {
  let lastId = null;
  let stopped = false;
  const controller = { abort: null };
  async function connect() {
    while (!stopped) {
      const abort = new AbortController();
      controller.abort = () => abort.abort();
      try {
        const headers = { Authorization: `Bearer ${key()}`, Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(`/v1/fine_tuning/jobs/${jobId}/events?stream=true`,
                                     { headers, signal: abort.signal });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const raw = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const frame = { event: "message", data: "", id: null };
            for (const line of raw.split("\n")) {
              if (line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "data") frame.data += (frame.data ? "\n" : "") + value;
              else if (field === "event") frame.event = value;
              else if (field === "id") frame.id = value;
            }
            if (!frame.data) continue;
            if (frame.id) lastId = frame.id;
            const data = JSON.parse(frame.data);
            if (frame.event === "done") { stopped = true; onDone(data); return; }
            onEvent(data);
          }
        }
      } catch (e) {
        if (stopped) return;
      }
      await new Promise((r) => setTimeout(r, 1000));  // the server closed or the network dropped
    }
  }
  connect();
  return { stop() { stopped = true; if (controller.abort) controller.abort(); } };
}

// ---------------------------------------------------------------------------------------------
// Pages

const main = () => document.getElementById("main");
let cleanup = [];

function go(path) { location.assign(path); }

function setPage(title, nav, ...children) {
  document.title = `${title} · sDPO`;
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
  main().replaceChildren(...children);
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  cleanup.push(() => clearInterval(id));
}

// ---- login

function loginPage() {
  const next = new URLSearchParams(location.search).get("next") || "/ui/";
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off",
                             placeholder: "sk-sdpo-…", required: true });
  const message = h("p", { class: "error", id: "login-error" });
  const form = h("form", { class: "card", id: "login-form", onsubmit: async (e) => {
    e.preventDefault();
    message.textContent = "";
    const candidate = input.value.trim();
    const r = await fetch("/v1/models", { headers: { Authorization: `Bearer ${candidate}` } });
    if (r.ok) {
      sessionStorage.setItem(KEY, candidate);
      go(next.startsWith("/ui/") ? next : "/ui/");
    } else {
      message.textContent = "This key was refused by the API.";
    }
  } },
  h("label", { for: "api-key" }, "API key"), input, " ", h("button", { type: "submit" }, "Log in"), message,
  h("p", { class: "muted small" }, "The key stays in this browser tab (sessionStorage) and is sent only to this ",
    "server's API, as the Authorization header."));
  setPage("Log in", "", h("h1", {}, "Log in"), form);
  input.focus();
}

// ---- jobs list

async function jobsPage() {
  const tbody = h("tbody", { id: "jobs" });
  const table = h("table", {}, h("thead", {}, h("tr", {}, ["Job", "Model", "Status", "Progress", "", "Created"]
    .map((t) => h("th", {}, t)))), tbody);
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet. ", h("a", { href: "/ui/upload" },
    "Upload a preference file and start one."));
  setPage("Jobs", "jobs", h("div", { class: "row" }, h("h1", { class: "grow" }, "Fine-tuning jobs"),
    h("a", { href: "/ui/upload" }, h("button", { type: "button" }, "New job"))), table, empty);
  async function refresh() {
    const list = await api("/v1/fine_tuning/jobs?limit=100");
    empty.hidden = list.data.length > 0;
    tbody.replaceChildren(...list.data.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `/ui/jobs/${job.id}`, class: "mono" }, job.id),
        job.user_provided_suffix ? h("div", { class: "muted small" }, job.user_provided_suffix) : null),
      h("td", {}, job.model, job.fine_tuned_model ? h("div", { class: "muted small mono" }, job.fine_tuned_model) : null),
      h("td", {}, badge(job.status)),
      h("td", {}, progressBar(job.progress, job.status)),
      h("td", { class: "small muted" }, progressText(job)),
      h("td", { class: "small" }, when(job.created_at)))));
  }
  await refresh();
  every(2000, () => refresh().catch(() => {}));
}

// ---- upload + start a job

// Data smells the validator found (the file is valid and trains): code, message, sample line numbers.
function warningsView(file) {
  const warnings = file.warnings || [];
  if (!warnings.length) return null;
  const unit = file.file_type === "parquet" ? "rows" : "lines";
  return h("div", { id: "report-warnings" },
    h("h3", {}, `${warnings.length} warning${warnings.length === 1 ? "" : "s"}`),
    h("table", { class: "report-warnings" },
      h("thead", {}, h("tr", {}, h("th", {}, "warning"), h("th", {}, "pairs"), h("th", {}, "what"), h("th", {}, unit))),
      h("tbody", {}, warnings.map((w) => h("tr", { "data-code": w.code },
        h("td", { class: "mono" }, w.code), h("td", {}, w.count), h("td", {}, w.message),
        h("td", { class: "small" }, w.lines.join(", ") + (w.count > w.lines.length ? "…" : "")))))));
}

function reportView(file) {
  const stats = file.stats || {};
  const sources = Object.entries(stats.sources || {}).map(([s, n]) => `${s}: ${n}`).join(", ") || "–";
  const warnings = file.warnings || [];
  return h("div", { class: "card", id: "report", "data-valid": "true" },
    h("h2", {}, "Validation report: ", h("span", { class: "badge succeeded" }, "valid"),
      warnings.length ? h("span", { class: "badge queued", id: "warning-badge" },
        `${warnings.length} warning${warnings.length === 1 ? "" : "s"}`) : null),
    h("dl", { class: "kv" },
      h("dt", {}, "file"), h("dd", { class: "mono", id: "file-id" }, file.id),
      h("dt", {}, "name"), h("dd", {}, file.filename),
      h("dt", {}, "format"), h("dd", {}, `${file.format} (${file.file_type || "jsonl"})`),
      h("dt", {}, "pairs"), h("dd", { id: "file-rows" }, file.rows),
      h("dt", {}, "sources"), h("dd", {}, sources),
      h("dt", {}, "duplicates"), h("dd", {}, stats.duplicates ?? "–"),
      h("dt", {}, "bytes"), h("dd", {}, file.bytes),
      h("dt", {}, "sha256"), h("dd", { class: "mono small" }, file.sha256)),
    warningsView(file));
}

function invalidReportView(error) {
  const rows = (error.errors || []).map((e) => h("tr", {}, h("td", {}, e.line), h("td", { class: "mono" }, e.field || ""),
    h("td", {}, e.reason)));
  const unit = error.file_type === "parquet" ? "row" : "line";
  return h("div", { class: "card", id: "report", "data-valid": "false" },
    h("h2", {}, "Validation report: ", h("span", { class: "badge failed" }, "invalid")),
    h("p", { class: "error" }, error.message),
    rows.length ? h("table", { class: "report-errors" }, h("thead", {}, h("tr", {}, h("th", {}, unit),
      h("th", {}, "field"), h("th", {}, "reason"))), h("tbody", {}, rows)) : null);
}

async function uploadPage() {
  const fileInput = h("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.parquet,application/jsonl" });
  const uploadMsg = h("p", { class: "error" });
  const reportBox = h("div", { id: "report-box" });
  const models = await api("/v1/models");
  const files = await api("/v1/files?limit=200");
  const modelSelect = h("select", { id: "job-model", name: "model" },
    models.data.map((m) => h("option", { value: m.id }, m.id)));
  const fileOptions = (selected) => files.data.map((f) => h("option", { value: f.id, selected: f.id === selected },
    `${f.filename} · ${f.rows} pairs · ${f.id}`));
  const trainSelect = h("select", { id: "job-training-file", name: "training_file" }, fileOptions(null));
  const validSelect = h("select", { id: "job-validation-file", name: "validation_file" },
    h("option", { value: "" }, "(none)"), fileOptions(null));
  const method = h("select", { id: "job-method" }, h("option", { value: "sdpo" }, "sdpo (stepwise)"),
    h("option", { value: "dpo" }, "dpo (one step)"));
  const nSteps = h("input", { type: "number", id: "job-steps", min: 1, max: 32, value: 2 });
  const strategy = h("select", { id: "job-strategy" }, ["random", "stratified", "easy_to_hard", "hard_to_easy"]
    .map((s) => h("option", { value: s }, s)));
  const epochs = h("input", { type: "number", id: "job-epochs", min: 1, max: 50, value: 1 });
  const beta = h("input", { type: "number", id: "job-beta", min: 0.001, max: 10, step: "any", value: 0.1 });
  const suffix = h("input", { type: "text", id: "job-suffix", maxlength: 40, placeholder: "optional" });
  const jobMsg = h("p", { class: "error", id: "job-error" });

  const uploadForm = h("form", { class: "card", id: "upload-form", onsubmit: async (e) => {
    e.preventDefault();
    uploadMsg.textContent = "";
    if (!fileInput.files.length) { uploadMsg.textContent = "Choose a .jsonl or .parquet file first."; return; }
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", fileInput.files[0]);
    const button = e.submitter || uploadForm.querySelector("button");
    button.disabled = true;
    try {
      const file = await api("/v1/files", { method: "POST", body });
      files.data.unshift(file);
      trainSelect.replaceChildren(...fileOptions(file.id));
      validSelect.replaceChildren(h("option", { value: "" }, "(none)"), ...fileOptions(null));
      reportBox.replaceChildren(reportView(file));
    } catch (err) {
      if (err.body && err.body.error) reportBox.replaceChildren(invalidReportView(err.body.error));
      else uploadMsg.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  } }, h("label", { for: "file-input" },
    "Preference file (JSONL or Parquet: prompt / chosen / rejected, conversational or OpenAI format)"),
  fileInput, " ", h("button", { type: "submit", id: "upload-button" }, "Upload and validate"), uploadMsg);

  const jobForm = h("form", { class: "card", id: "job-form", onsubmit: async (e) => {
    e.preventDefault();
    jobMsg.textContent = "";
    const hyper = { n_epochs: Number(epochs.value), beta: Number(beta.value) };
    const body = { model: modelSelect.value, training_file: trainSelect.value };
    if (validSelect.value) body.validation_file = validSelect.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    body.method = method.value === "dpo"
      ? { type: "dpo", dpo: { hyperparameters: hyper } }
      : { type: "sdpo", sdpo: { hyperparameters: hyper,
                                partition: { strategy: strategy.value, n_steps: Number(nSteps.value) } } };
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      go(`/ui/jobs/${job.id}`);
    } catch (err) {
      jobMsg.textContent = err.message;
    }
  } },
  h("div", { class: "grid2" },
    h("div", {}, h("label", { for: "job-model" }, "Base model"), modelSelect),
    h("div", {}, h("label", { for: "job-training-file" }, "Training file"), trainSelect),
    h("div", {}, h("label", { for: "job-validation-file" }, "Validation file"), validSelect),
    h("div", {}, h("label", { for: "job-method" }, "Method"), method),
    h("div", {}, h("label", { for: "job-steps" }, "Steps T (sdpo)"), nSteps),
    h("div", {}, h("label", { for: "job-strategy" }, "Partition (sdpo)"), strategy),
    h("div", {}, h("label", { for: "job-epochs" }, "Epochs per step"), epochs),
    h("div", {}, h("label", { for: "job-beta" }, "beta"), beta),
    h("div", {}, h("label", { for: "job-suffix" }, "Suffix"), suffix)),
  h("p", {}, h("button", { type: "submit", id: "start-job" }, "Start job")), jobMsg);

  setPage("Upload & start", "upload", h("h1", {}, "Upload a preference file"), uploadForm, reportBox,
    h("h2", {}, "Start a fine-tuning job"), jobForm);
}

// ---- one job

function makeChart(canvas, title, yLabel, kind) {
  /* global Chart */
  return new Chart(canvas, {
    type: kind === "bar" ? "bar" : "line",
    data: kind === "bar" ? { labels: [], datasets: [{ label: title, data: [], backgroundColor: COLORS }] }
      : kind === "steps" ? { labels: [], datasets: DRIFT_SERIES.map(([, label], i) => (
        { label, data: [], borderColor: COLORS[i], backgroundColor: COLORS[i] })) }
      : { datasets: [] },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: kind === "bar" || kind === "steps",
      plugins: { legend: { display: kind !== "bar", labels: { boxWidth: 12 } } },
      scales: kind === "bar" || kind === "steps"
        ? { x: { title: { display: true, text: "sDPO step" } }, y: { title: { display: true, text: yLabel } } }
        : { x: { type: "linear", ticks: { precision: 0 },
                 title: { display: true, text: "optimizer step (all sDPO steps)" } },
            y: { title: { display: true, text: yLabel } } },
      elements: { point: { radius: 2 }, line: { borderWidth: 2 } },
    },
  });
}

// Drift from the base per sDPO step (StepMetrics.drift, sdpo_engine/drift.py); M0 is the base itself: 0.
const DRIFT_SERIES = [["chosen_logratio_per_token", "chosen log-ratio / token"],
                      ["rejected_logratio_per_token", "rejected log-ratio / token"],
                      ["reward_margin", "reward margin vs base"]];

class MetricCharts {
  constructor(root) {
    this.series = { loss: "loss", margin: "rewards/margins", accuracy: "rewards/accuracies" };
    this.charts = {};
    this.boxes = {};
    this.offsets = {};  // sDPO step -> optimizer steps of the steps before it
    this.maxSteps = {};
    this.gamma = {};
    const spec = [["loss", "DPO loss", "loss"], ["margin", "Reward margin", "chosen − rejected reward"],
                  ["accuracy", "Reward accuracy", "share of pairs preferred"],
                  ["gamma", "Mean γ_ref per step", "mean reference log-ratio", "bar"],
                  ["drift", "Drift from the base (validation pairs)", "nats per token · reward vs base", "steps"]];
    for (const [name, title, yLabel, kind] of spec) {
      const canvas = h("canvas", { "aria-label": title, role: "img" });
      const box = h("div", { class: "chart", id: `chart-${name}`, "data-points": 0 }, h("h3", {}, title),
                    h("div", { class: "canvas" }, canvas));
      root.append(box);
      this.boxes[name] = box;
      this.charts[name] = makeChart(canvas, title, yLabel, kind);
    }
    this.pending = false;
  }

  offset(step) {
    let total = 0;
    for (let s = 1; s < step; s++) total += this.maxSteps[s] || 0;
    return total;
  }

  addMetrics(step, data) {
    if (data.max_steps) this.maxSteps[step] = data.max_steps;
    const x = this.offset(step) + (data.global_step || 0);
    for (const [name, keyName] of Object.entries(this.series)) {
      const value = data[keyName];
      if (value === undefined || value === null) continue;
      const chart = this.charts[name];
      let ds = chart.data.datasets.find((d) => d.step === step);
      if (!ds) {
        const color = COLORS[(step - 1) % COLORS.length];
        ds = { label: `step ${step}`, step, data: [], borderColor: color, backgroundColor: color };
        chart.data.datasets.push(ds);
        chart.data.datasets.sort((a, b) => a.step - b.step);
      }
      ds.data.push({ x, y: value });
    }
    this.schedule();
  }

  setGamma(step, value) {
    if (value === undefined || value === null) return;
    this.gamma[step] = value;
    const chart = this.charts.gamma;
    const steps = Object.keys(this.gamma).map(Number).sort((a, b) => a - b);
    chart.data.labels = steps.map((s) => `M${s - 1} → M${s}`);
    chart.data.datasets[0].data = steps.map((s) => this.gamma[s]);
    this.schedule();
  }

  setDrift(step, drift) {
    if (!drift || drift.chosen_logratio_per_token === undefined) return;
    this.drift = this.drift || { 0: Object.fromEntries(DRIFT_SERIES.map(([key]) => [key, 0])) };
    this.drift[step] = drift;
    const chart = this.charts.drift;
    const steps = Object.keys(this.drift).map(Number).sort((a, b) => a - b);
    chart.data.labels = steps.map((s) => (s === 0 ? "M0 (base)" : `M${s}`));
    DRIFT_SERIES.forEach(([key], i) => { chart.data.datasets[i].data = steps.map((s) => this.drift[s][key]); });
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      for (const [name, chart] of Object.entries(this.charts)) {
        chart.update("none");
        const points = chart.data.datasets.reduce((n, d) => n + d.data.length, 0);
        this.boxes[name].dataset.points = points;
      }
    });
  }

  destroy() { Object.values(this.charts).forEach((c) => c.destroy()); }
}

function gateText(g) {
  if (g.status === "passed") return `passed (${g.metric}, ${g.steps_checked} step(s))`;
  const why = g.reason === "max_drift" ? `drift ${fmt(g.drift, 4)} > max_drift ${fmt(g.max_drift, 4)}`
    : `${g.metric} ${fmt(g.previous.value, 4)} → ${fmt(g.value, 4)}`;
  return `failed after step ${g.failed_step} (${why}); ${g.on_fail}: result is step ${g.result_step}`;
}

function lineageView(job, steps) {
  const nodes = [h("div", { class: "node base", "data-node": "base" },
    h("div", { class: "title" }, "base"), h("div", { class: "mono small" }, job.model),
    h("div", { class: "muted small" }, "reference of step 1"))];
  for (const s of steps) {
    const m = s.metrics || {};
    nodes.push(h("div", { class: "arrow", title: `step ${s.index}: DPO against its own start, frozen` }, "→"));
    nodes.push(h("div", { class: `node ${s.status}`, "data-step": s.index, "data-status": s.status,
                          "data-checkpoint": s.output_checkpoint || "" },
      h("div", { class: "title" }, `M${s.index}`, " ", badge(s.status)),
      h("div", { class: "mono small" }, s.output_checkpoint || "(no checkpoint yet)"),
      h("div", { class: "muted small" }, `reference: ${s.reference_checkpoint || (s.index === 1 ? "base" : "–")}`),
      m.first_loss !== null && m.first_loss !== undefined
        ? h("div", { class: "small" }, `loss ${fmt(m.first_loss, 3)} → ${fmt(m.last_loss, 3)} · γ̄ ${fmt(m.mean_gamma_ref, 3)}`)
        : null,
      m.reward_accuracy !== null && m.reward_accuracy !== undefined
        ? h("div", { class: "small" }, `reward acc ${fmt(m.reward_accuracy, 2)} · margin ${fmt(m.reward_margin, 3)}`)
        : null,
      s.error ? h("div", { class: "small error" }, s.error.message) : null));
  }
  return h("div", { class: "lineage", id: "lineage" }, nodes);
}

// Per-step samples (method.<type>.samples, sdpo_engine/samples.py): the validation file's first prompts
// answered by the base (step 1, before training) and by every finished step, side by side base → M1 → … → MT.
async function showSamples(box, job, steps) {
  const asked = (job.method[job.method.type] || {}).samples;
  const done = steps.filter((s) => s.status === "succeeded" && (s.metrics || {}).samples_seconds != null);
  const key = done.map((s) => s.index).join(",");
  if (!asked || box.dataset.steps === key) return;  // fetched once per finished step
  const got = await Promise.all(done.map((s) => api(`/v1/fine_tuning/jobs/${job.id}/steps/${s.index}/samples`)));
  box.dataset.steps = key;
  if (!got.length) {
    box.replaceChildren(h("h2", {}, "Samples"), h("p", { class: "muted small" },
      `Greedy answers to ${asked.n_prompts} validation prompt(s) appear here after each step.`));
    return;
  }
  const base = got.find((g) => g.base_answers);
  const columns = [...(base ? [["base", base.base_answers, base.base_seconds]] : []),
                   ...got.map((g) => [`M${g.index}`, g.answers, g.seconds])];
  const table = h("table", { class: "samples", id: "samples", "data-columns": columns.length },
    h("thead", {}, h("tr", {}, h("th", {}, "prompt"),
      columns.map(([name, , secs]) => h("th", {}, name, h("div", { class: "muted small" }, `${fmt(secs, 2)} s`))))),
    h("tbody", {}, got[0].prompts.map((prompt, i) => h("tr", {}, h("td", { class: "prompt" }, prompt),
      columns.map(([name, answers]) => h("td", { "data-model": name, class: "mono small" },
        answers[i] || h("span", { class: "muted" }, "(empty answer)")))))));
  box.replaceChildren(h("h2", {}, "Samples (greedy, seeded; generation seconds under each model)"),
    h("div", { class: "samples-scroll" }, table));
}

async function jobPage(jobId) {
  const header = h("div", { class: "card", id: "job-header" });
  const lineageBox = h("div", { id: "lineage-box" });
  const samplesBox = h("div", { id: "samples-box" });
  const chartsBox = h("div", { class: "charts", id: "charts" });
  const log = h("div", { class: "log", id: "events", "data-count": 0 });
  setPage(jobId, "jobs", h("h1", {}, "Job ", h("span", { class: "mono" }, jobId)), header,
    h("h2", {}, "Reference lineage"), lineageBox, samplesBox, h("h2", {}, "Per-step metrics (live)"), chartsBox,
    h("h2", {}, "Events"), log);
  const charts = new MetricCharts(chartsBox);
  cleanup.push(() => charts.destroy());
  let job = null;

  async function refresh() {
    const [j, steps] = await Promise.all([api(`/v1/fine_tuning/jobs/${jobId}`),
                                          api(`/v1/fine_tuning/jobs/${jobId}/steps`)]);
    job = j;
    for (const s of steps.data) charts.setGamma(s.index, (s.metrics || {}).mean_gamma_ref);
    for (const s of steps.data) charts.setDrift(s.index, (s.metrics || {}).drift);
    const actions = [];
    const act = (label, action) => h("button", { type: "button", class: "secondary", id: `job-${action}`, onclick: async () => {
      await api(`/v1/fine_tuning/jobs/${jobId}/${action}`, { method: "POST" }).catch((e) => alert(e.message));
      refresh();
    } }, label);
    if (!TERMINAL.has(job.status)) actions.push(act("Cancel", "cancel"));
    if (job.status === "running" || job.status === "queued") actions.push(act("Pause", "pause"));
    if (job.status === "paused") actions.push(act("Resume", "resume"));
    header.replaceChildren(h("div", { class: "row" },
      h("div", { class: "grow" },
        h("div", {}, badge(job.status), " ", h("span", { id: "progress-text" }, progressText(job))),
        h("div", { style: null }, progressBar(job.progress, job.status)),
        h("dl", { class: "kv small" },
          h("dt", {}, "model"), h("dd", {}, job.model),
          h("dt", {}, "method"), h("dd", {}, `${job.method.type}, ${job.n_steps} step(s)` +
            (job.method.sdpo && job.method.sdpo.partition ? `, partition ${job.method.sdpo.partition.strategy}` : "")),
          h("dt", {}, "training file"), h("dd", { class: "mono" }, job.training_file),
          h("dt", {}, "fine-tuned model"), h("dd", { class: "mono", id: "fine-tuned-model" }, job.fine_tuned_model || "–"),
          h("dt", {}, "created"), h("dd", {}, when(job.created_at)),
          h("dt", {}, "finished"), h("dd", {}, when(job.finished_at)),
          job.gate ? h("dt", {}, "gate") : null, job.gate ? h("dd", { id: "gate", "data-status": job.gate.status },
            gateText(job.gate)) : null,
          job.error ? h("dt", {}, "error") : null, job.error ? h("dd", { class: "error" }, job.error.message) : null)),
      h("div", {}, actions)));
    lineageBox.replaceChildren(lineageView(job, steps.data));
    await showSamples(samplesBox, job, steps.data);
  }

  function addLog(e) {
    const line = h("div", { class: `${e.level} ${e.type}`, "data-event": e.id },
      h("span", { class: "t" }, clock(e.created_at)), e.step ? h("span", { class: "t" }, `[step ${e.step}]`) : null,
      e.message);
    log.prepend(line);
    while (log.childNodes.length > 500) log.lastChild.remove();
    log.dataset.count = Number(log.dataset.count) + 1;
  }

  await refresh();
  let stale = false;
  const stream = followEvents(jobId, (e) => {
    addLog(e);
    const data = e.data || {};
    if (e.type === "metrics") charts.addMetrics(data.step || e.step, data);
    else {
      if (data.phase === "reference_logps") charts.setGamma(e.step, data.mean_gamma_ref);
      stale = true;  // a lifecycle message: the status or the lineage changed
    }
  }, () => { refresh(); });
  cleanup.push(() => stream.stop());
  every(1500, () => {
    if (job && (stale || !TERMINAL.has(job.status))) { stale = false; refresh().catch(() => {}); }
  });
}

// ---------------------------------------------------------------------------------------------

async function route() {
  cleanup.forEach((f) => f());
  cleanup = [];
  const path = location.pathname.replace(/\/+$/, "") || "/ui";
  const logout = document.getElementById("logout");
  if (path === "/ui/login") { logout.hidden = true; return loginPage(); }
  if (!key()) return go(`/ui/login?next=${encodeURIComponent(location.pathname)}`);
  logout.hidden = false;
  logout.onclick = () => { sessionStorage.removeItem(KEY); go("/ui/login"); };
  try {
    const m = path.match(/^\/ui\/jobs\/([\w-]+)$/);
    if (m) return await jobPage(m[1]);
    if (path === "/ui/upload") return await uploadPage();
    return await jobsPage();
  } catch (err) {
    if (err.status !== 401) setPage("Error", "", h("p", { class: "error" }, err.message));
  }
}

document.addEventListener("DOMContentLoaded", route);
