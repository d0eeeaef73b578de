// Compare: held-out metrics, gates, data counts and hyperparameters of two or more jobs, the best marked, and
// their curves overlaid. The table is GET /v1/fine_tuning/compare (what `tunerun compare` prints).
import { api, el, number, parseCsv, showError } from "/static/common.js";

const wanted = (new URLSearchParams(window.location.search).get("jobs") ?? "").split(",").filter(Boolean);
const HYPER = ["n_epochs", "batch_size", "learning_rate_multiplier", "seed"];
const DATA = ["records_read", "duplicates", "near_duplicates", "fuzzy_duplicates", "too_long_dropped",
  "train_records", "eval_records", "pii_masked"];

function table(result) {
  const runs = result.runs;
  const head = el("tr", {}, el("th", {}, ""), runs.map((r) => el("th", {},
    el("a", { href: `/jobs/${encodeURIComponent(r.run_id)}` }, r.suffix ? `${r.suffix} (${r.run_id})` : r.run_id))));
  const line = (label, values, marks = []) => el("tr", {}, el("th", {}, label),
    values.map((v, i) => el("td", { class: marks[i] ? "num best" : "num", "data-best": marks[i] ? "true" : null },
      v, marks[i] ? " ★" : "")));
  const rows = [line("model", runs.map((r) => r.model)), line("status", runs.map((r) => r.state)),
    line("gates", runs.map((r) => (r.gates_passed === null ? "–" : r.gates_passed ? "passed" : "failed"))),
    line("evaluated at step", runs.map((r) => r.evaluated_step ?? "–"))];
  for (const metric of result.metrics) {
    const best = new Set(result.best[metric] ?? []);
    rows.push(line(metric, runs.map((r) => number(r.metrics[metric])), runs.map((r) => best.has(r.run_id))));
  }
  for (const name of HYPER) rows.push(line(name, runs.map((r) => r.hyperparameters[name] ?? "–")));
  for (const name of DATA) rows.push(line(`data: ${name}`, runs.map((r) => r.data[name] ?? "–")));
  const comparison = document.getElementById("comparison");
  comparison.querySelector("thead").replaceChildren(head);
  comparison.querySelector("tbody").replaceChildren(...rows);
}

async function curves(runs) {
  const loss = [], em = [];
  for (const r of runs) {
    const label = r.suffix ?? r.run_id;
    let rows = [];
    try {
      rows = parseCsv(await api(`/v1/files/${encodeURIComponent(r.result_file)}/content`));
    } catch { continue; }  // no metrics yet
    loss.push({ label, data: rows.filter((x) => x.train_loss !== null).map((x) => ({ x: x.step, y: x.train_loss })),
      pointRadius: 0 });
    em.push({ label, data: rows.filter((x) => x.exact_match !== null).map((x) => ({ x: x.step, y: x.exact_match })) });
  }
  const options = { animation: false, parsing: false, responsive: true, maintainAspectRatio: false,
    scales: { x: { type: "linear", title: { display: true, text: "step" } } } };
  new window.Chart(document.getElementById("chart-compare-loss"), { type: "line", data: { datasets: loss }, options });
  new window.Chart(document.getElementById("chart-compare-eval"), { type: "line", data: { datasets: em }, options });
  document.getElementById("compare-charts").hidden = false;
}

async function main() {
  if (wanted.length < 2) return;
  document.getElementById("compare-help").hidden = true;
  try {
    const result = await api(`/v1/fine_tuning/compare?job_ids=${wanted.map(encodeURIComponent).join(",")}`);
    const warning = document.getElementById("compare-warning");
    warning.hidden = !result.warnings.length;
    warning.textContent = result.warnings.join(" ");
    table(result);
    await curves(result.runs);
  } catch (error) {
    showError("compare-error", `Could not compare: ${error.message}`);
  }
}
main();
