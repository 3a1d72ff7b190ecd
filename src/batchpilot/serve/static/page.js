/* The planner page: the form ⇄ the URL, /api/view for the plan, /api/export for files, /api/run for run folders.
   The plan and the run reports arrive as HTML made by batchpilot.report.html (the static report's own
   presentation, every value escaped by the server); this script only builds the form and fetches. */
"use strict";
(() => {
  const $ = id => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      node.setAttribute(k, v === true ? "" : String(v));
    }
    node.append(...children.flat().filter(c => c !== null && c !== undefined));
    return node;
  }
  const TARGETS = ["global-batch-tokens", "global-batch", "like", "train-tokens"];
  const FORM_FIELDS = ["model", "gpu", "gpus", "gpus-per-node", "inter-node-bandwidth", "network", "seq-len",
                       "max-deviation", "micro-batch", "grad-accum", "tp", "pp", "vpp", "ep", "cp", "zero", "recompute",
                       "precision", "optimizer", "engine", "attention", "param-dtype", "fp8-recipe",
                       "reshard-after-forward", "loss", "loss-chunks", "recompute-every", "headroom", "top"];
  const CHECKS = ["sp", "hybrid-shard", "offload", "compile", "fp8-all-gather"];
  const CHOICES = ["precision", "optimizer", "engine", "attention", "recompute", "param-dtype", "fp8-recipe",
                   "reshard-after-forward", "loss"];
  const STARTER = {model: "llama-3-8b", gpu: "h100-sxm", gpus: "64", "seq-len": "8192",
                   "global-batch-tokens": "4Mi"};
  let meta = null;
  let upload = null;          // {name, text} of an uploaded config.json
  let lastQuery = null;       // the query of the plan shown
  let timer = null;
  let sequence = 0;

  function options(select, values, selected) {
    for (const v of values) select.append(el("option", {value: v, selected: v === selected}, v));
  }

  function uploadMode() { return document.querySelector("input[name=model-source]:checked").value === "upload"; }

  function showModelSource() {
    const up = uploadMode();
    document.querySelectorAll(".upload").forEach(n => { n.hidden = !up; });
    $("f-model").disabled = up;
    $("f-model").previousElementSibling.hidden = up;
    $("f-model").hidden = up;
  }

  /* The fields of the form as the query (empty fields left out, defaults kept so the link says everything). */
  function query() {
    const q = new URLSearchParams();
    for (const name of FORM_FIELDS) {
      if (name === "model" && uploadMode()) continue;
      const value = $(`f-${name}`).value.trim();
      if (value) q.set(name, value);
    }
    const kind = $("target-kind").value, target = $("target-value").value.trim();
    if (target) q.set(kind, target);
    for (const name of CHECKS) if ($(`f-${name}`).checked) q.set(name, "true");
    if (uploadMode() && upload) q.set("config-name", upload.name);
    return q;
  }

  function fill(q) {
    for (const name of FORM_FIELDS) {
      const node = $(`f-${name}`);
      const value = q.get(name) ?? (meta.defaults[name] ?? "");
      if (node.tagName === "SELECT" && value && ![...node.options].some(o => o.value === value)) {
        node.append(el("option", {value}, value));   // the server says whether it is a preset
      }
      node.value = value;
    }
    const kind = TARGETS.find(k => q.has(k)) ?? "global-batch-tokens";
    $("target-kind").value = kind;
    $("target-value").value = q.get(kind) ?? "";
    for (const name of CHECKS) $(`f-${name}`).checked = ["true", "1"].includes(q.get(name) ?? "");
  }

  function setStatus(text) { $("status").textContent = text; }

  function showError(body) {
    $("error").hidden = false;
    $("error-text").textContent = `error: ${body.error}`;
    const fixes = body.suggestions ?? [];
    $("suggestions-block").hidden = fixes.length === 0;
    $("suggestions").replaceChildren(...fixes.map(f => el("li", {}, f)));
    $("result").hidden = true;
    $("exports").hidden = true;
  }

  async function request(path, q) {
    const url = `${path}?${q.toString()}`;
    if (uploadMode()) {
      if (!upload) throw {error: "--model is missing: choose a config.json to upload"};
      return fetch(url, {method: "POST", body: upload.text, headers: {"Content-Type": "application/json"}});
    }
    return fetch(url);
  }

  async function runPlan() {
    const q = query();
    const mine = ++sequence;
    history.replaceState(null, "", `?${q.toString()}${location.hash === "#runs" ? "#runs" : ""}`);
    $("share").href = location.href;
    setStatus("planning …");
    const started = performance.now();
    let response, body;
    try {
      response = await request("/api/view", q);
      body = await response.json();
    } catch (problem) {
      if (mine !== sequence) return;
      showError(problem && problem.error ? problem : {error: `the server did not answer (${problem})`});
      setStatus("");
      return;
    }
    if (mine !== sequence) return;   // a newer request was sent meanwhile
    if (!response.ok) { showError(body); setStatus(""); return; }
    $("error").hidden = true;
    lastQuery = q;
    $("result").innerHTML = body.html;  // made and escaped by batchpilot.report.html
    $("result").hidden = false;
    $("exports").hidden = false;
    setStatus(`planned in ${((performance.now() - started) / 1000).toFixed(1)} s: ` +
              `${body.plan.search.layouts} layouts searched`);
  }

  function filename(response, fallback) {
    const match = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") ?? "");
    return match ? match[1] : fallback;
  }

  async function download(format) {
    if (!lastQuery) return;
    const q = new URLSearchParams(lastQuery);
    q.set("export", format);
    setStatus(`exporting ${format} …`);
    const response = await request("/api/export", q);
    if (!response.ok) { showError(await response.json()); setStatus(""); return; }
    const blob = await response.blob();
    const link = el("a", {href: URL.createObjectURL(blob), download: filename(response, `${format}.txt`)});
    document.body.append(link);
    link.click();
    link.remove();
    setStatus(`exported ${format}`);
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(runPlan, 350);
  }

  async function readUpload(file) {
    if (!file) return;
    if (file.size > meta.max_upload_bytes) {
      upload = null;
      showError({error: `the upload is ${file.size.toLocaleString("en-US")} bytes; the limit is ` +
                        `${meta.max_upload_bytes.toLocaleString("en-US")} (a config.json is a few KiB)`});
      return;
    }
    upload = {name: file.name, text: await file.text()};
    $("config-status").textContent = `${file.name}: ${file.size.toLocaleString("en-US")} bytes`;
    schedule();
  }

  /* ---------------------------------------------------------------------------------------- run folders */
  async function listRuns() {
    const body = await (await fetch("/api/runs")).json();
    if (body.error) { $("run-error").hidden = false; $("run-error").textContent = `error: ${body.error}`; return; }
    $("runs-root").textContent = body.root;
    $("run-list").replaceChildren(...(body.runs.length ? body.runs.map(name =>
      el("li", {}, el("button", {type: "button", "data-run": name}, name))) : [el("li", {}, "none found")]));
  }

  async function openRun(name) {
    const response = await fetch(`/api/run?path=${encodeURIComponent(name)}`);
    const body = await response.json();
    if (!response.ok) {
      $("run-error").hidden = false;
      $("run-error").textContent = `error: ${body.error}`;
      return;
    }
    $("run-error").hidden = true;
    $("run-view").innerHTML = body.html;  // the run's report, made and escaped by batchpilot.report.html
    $("run-view").querySelector("h1").id = "run-title";
  }

  function showTab() {
    const runs = location.hash === "#runs" && meta.runs;
    $("planner").hidden = runs;
    $("runs").hidden = !runs;
    $("tab-planner").toggleAttribute("aria-current", !runs);
    $("tab-runs").toggleAttribute("aria-current", runs);
    if (runs) listRuns();
  }

  /* ------------------------------------------------------------------------------------------------ start */
  async function start() {
    meta = await (await fetch("/api/fields")).json();
    options($("f-model"), meta.presets);
    options($("f-gpu"), meta.accelerators);
    for (const key of CHOICES) options($(`f-${key}`), meta.choices[key]);
    options($("f-network"), meta.networks);
    $("like-names").replaceChildren(...meta.like.map(n => el("option", {value: n})));
    $("max-upload").textContent = `${meta.max_upload_bytes / 1024} KiB`;
    meta.formats.forEach(f => $("export-buttons").append(
      el("button", {type: "button", "data-format": f}, `download ${f}`)));
    $("tab-runs").hidden = !meta.runs;
    const q = new URLSearchParams(location.search);
    fill(q.has("seq-len") || q.has("model") ? q : new URLSearchParams(STARTER));
    showModelSource();
    $("form").addEventListener("submit", e => { e.preventDefault(); clearTimeout(timer); runPlan(); });
    $("form").addEventListener("change", e => {
      if (e.target.name === "model-source") { showModelSource(); }
      if (e.target.id === "f-config") { readUpload(e.target.files[0]); return; }
      schedule();
    });
    $("export-buttons").addEventListener("click", e => {
      const format = e.target.closest("button")?.dataset.format;
      if (format) download(format);
    });
    $("run-list").addEventListener("click", e => {
      const name = e.target.closest("button")?.dataset.run;
      if (name) openRun(name);
    });
    window.addEventListener("hashchange", showTab);
    showTab();
    document.body.dataset.ready = "true";
    await runPlan();
  }

  start();
})();
