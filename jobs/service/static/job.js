// The job page: progress and actions, curves, base vs fine-tuned, the data report, checkpoints, downloads,
// events and the run's report. Refreshed while the job runs; everything comes from /v1.
import { ApiError, TERMINAL, api, el, gatesBadge, jobLabel, number, parseCsv, piiLabel, progressOf, replaceRows,
  showError, statusBadge, when } from "/static/common.js";

const REFRESH_MS = 3000;
const jobId = document.getElementById("job").dataset.jobId;
const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
const charts = {};
const SCORE_NAMES = ["exact_match", "f1", "rouge_l"];

function lineChart(id, datasets, yTitle, scores = false) {
  const canvas = document.getElementById(id);
  if (!charts[id]) {
    const scales = { x: { type: "linear", title: { display: true, text: "step" } },
                     y: { title: { display: !!yTitle, text: yTitle ?? "" } } };
    if (scores) scales.scores = { position: "right", min: 0, max: 1, title: { display: true, text: "score" },
                                  grid: { drawOnChartArea: false } };
    charts[id] = new window.Chart(canvas, {
      type: "line",
      data: { datasets: [] },
      options: {
        animation: false, parsing: false, responsive: true, maintainAspectRatio: false, scales,
        plugins: { legend: { display: datasets.length > 1 } },
      },
    });
  }
  charts[id].data.datasets = datasets;
  charts[id].update("none");
}

const series = (rows, name) => rows.filter((r) => r[name] !== null && r[name] !== undefined)
  .map((r) => ({ x: r.step, y: r[name] }));

async function drawCurves(job) {
  if (!job.result_files.length) return;
  const rows = parseCsv(await api(`/v1/files/${encodeURIComponent(job.result_files[0])}/content`));
  lineChart("chart-loss", [{ label: "training loss", data: series(rows, "train_loss"), pointRadius: 0 }], "loss");
  lineChart("chart-lr", [{ label: "learning rate", data: series(rows, "learning_rate"), pointRadius: 0 }], "lr");
  lineChart("chart-eval", [
    { label: "held-out loss", data: series(rows, "valid_loss"), yAxisID: "y" },
    ...SCORE_NAMES.map((name) => ({ label: name, data: series(rows, name), yAxisID: "scores" })),
  ], "loss", true);
}

function showHeader(job) {
  document.getElementById("job-title").textContent = jobLabel(job);
  const meta = document.getElementById("job-meta");
  meta.replaceChildren(statusBadge(job.status), ` ${job.model} · created ${when(job.created_at)}`,
    job.fine_tuned_model ? el("span", { class: "model-name" }, ` · ${job.fine_tuned_model}`) : null);
  const progress = progressOf(job);
  document.getElementById("progress").value = progress.value;
  document.getElementById("progress-text").textContent = progress.text;
  const hyper = job.hyperparameters ?? {};
  const facts = [["Run", job.tunerun?.run_id], ["Training file", job.training_file],
    ["Epochs", hyper.n_epochs], ["Batch size", hyper.batch_size],
    ["Learning-rate multiplier", number(hyper.learning_rate_multiplier, 3)], ["Seed", job.seed],
    ["Last training loss", number(job.tunerun?.last_loss)], ["Trained tokens", job.trained_tokens ?? "–"],
    ...Object.entries(job.metadata ?? {}).map(([k, v]) => [`metadata · ${k}`, v])];
  if (job.error) facts.push(["Error", job.error.message]);
  document.getElementById("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  document.getElementById("cancel").hidden = TERMINAL.has(job.status);
  document.getElementById("pause").hidden = job.status !== "running";
  document.getElementById("resume").hidden = job.status !== "paused";
}

function showEvaluation(evaluation) {
  const before = evaluation.base?.metrics ?? {}, after = evaluation.tuned?.metrics ?? {};
  const names = evaluation.metric_names.filter((n) => before[n] !== undefined || after[n] !== undefined);
  replaceRows(document.getElementById("base-vs-tuned"), names.map((name) => {
    const change = before[name] !== undefined && after[name] !== undefined ? after[name] - before[name] : null;
    return el("tr", { dataset: { metric: name } }, el("th", {}, name), el("td", { class: "num" }, number(before[name])),
      el("td", { class: "num" }, number(after[name])),
      el("td", { class: "num" }, change === null ? "–" : `${change >= 0 ? "+" : ""}${change.toFixed(4)}`));
  }));
  const gates = evaluation.gates;
  const gateText = !gates ? "Gates: judged at the final evaluation."
    : gates.results.length === 0 ? "Gates: none set." : gates.results.map((g) =>
      `${g.metric} ${number(g.value)} (${g.passed ? "meets" : "misses"} ${g.condition})`)
      .join("; ");
  document.getElementById("gates").replaceChildren(gatesBadge(gates?.passed), ` ${gateText}`);
  replaceRows(document.getElementById("examples"), evaluation.examples.map((e) => el("tr", {},
    el("td", {}, el("pre", {}, e.prompt ?? "")), el("td", {}, el("pre", {}, e.reference ?? "")),
    el("td", {}, el("pre", {}, e.base_output ?? "–")), el("td", {}, el("pre", {}, e.tuned_output ?? "–")))));
}

function showDataReport(report) {
  const counts = [["Records read", report.records_read], ...report.removed.map((r) => [`Removed: ${r.step}`, r.records]),
    ["Truncated (kept)", report.truncated], ["Training records", report.train_records],
    ["Held-out records", report.eval_records], ["Held-out copies of training records", report.contaminated_eval]];
  const pii = Object.entries(report.pii_masked ?? {});
  document.getElementById("data-report").replaceChildren(
    el("table", { id: "data-counts" }, el("tbody", {}, counts.map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", { class: "num" }, v ?? "–"))))),
    el("h3", {}, "PII masked (hits per type)"),
    pii.length ? el("table", { id: "pii-counts" }, el("tbody", {}, pii.map(([k, v]) =>
      el("tr", {}, el("th", {}, piiLabel(k)), el("td", { class: "num" }, v))))) : el("p", { class: "empty" }, "None found."));
}

function showCheckpoints(found) {
  replaceRows(document.getElementById("checkpoints"), found.map((c) => el("tr", {},
    el("td", {}, c.step_number), el("td", { class: "num" }, number(c.metrics.train_loss)),
    el("td", { class: "num" }, number(c.metrics.valid_loss)), el("td", { class: "num" }, number(c.metrics.exact_match)))));
}

function showArtifacts(found) {
  const list = document.getElementById("artifacts");
  if (!found.length) return;
  list.replaceChildren(...found.map((a) => el("li", {}, el("a", { href: a.download_url, download: "" },
    `${a.kind}: ${a.path}`), ` · ${a.files} files · ${(a.bytes / 1e6).toFixed(1)} MB`)));
}

function showEvents(found) {
  document.getElementById("events").replaceChildren(...found.map((e) => el("li", { class: `level-${e.level}` },
    el("time", {}, when(e.created_at)), " ", e.message)));
}

async function optional(promise, show) {
  try {
    show(await promise);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
}

async function refresh() {
  let job;
  try {
    job = await api(base);
    showHeader(job);
    await Promise.all([
      drawCurves(job),
      api(`${base}/evaluation`).then(showEvaluation),
      optional(api(`${base}/data_report`), showDataReport),
      api(`${base}/checkpoints?limit=100`).then((page) => showCheckpoints(page.data)),
      api(`${base}/artifacts`).then((page) => showArtifacts(page.data)),
      api(`${base}/events?limit=100`).then((page) => showEvents(page.data)),
    ]);
    if (TERMINAL.has(job.status)) showReport();
    showError("job-error", null);
  } catch (error) {
    showError("job-error", `Could not load the job: ${error.message}`);
  }
  if (!job || !TERMINAL.has(job.status)) setTimeout(refresh, REFRESH_MS);
}

function showReport() {
  const frame = document.getElementById("report");
  if (!frame.hidden) return;
  fetch(`${base}/report`, { credentials: "same-origin" }).then((r) => {
    if (!r.ok) return;
    frame.src = `${base}/report`;
    frame.hidden = false;
    document.getElementById("report-missing").hidden = true;
  });
}

async function act(action) {
  try {
    showError("job-error", null);
    showHeader(await api(`${base}/${action}`, { method: "POST" }));
  } catch (error) {
    showError("job-error", `Could not ${action} the job: ${error.message}`);
  }
}

for (const action of ["cancel", "pause", "resume"]) {
  document.getElementById(action).addEventListener("click", () => act(action));
}
refresh();
