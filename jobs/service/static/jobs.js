// The jobs page: every job of the project, newest first, refreshed in place every few seconds.
import { allPages, el, gatesBadge, jobLabel, number, progressOf, replaceRows, showError, statusBadge, when }
  from "/static/common.js";

const REFRESH_MS = 2000;
const selected = new Set();
const compareButton = document.getElementById("compare-selected");

function row(job) {
  const progress = progressOf(job);
  const scores = job.tunerun?.last_eval ?? {};
  const box = el("input", { type: "checkbox", "aria-label": `select ${job.id}`, checked: selected.has(job.id) });
  box.addEventListener("change", () => {
    if (box.checked) selected.add(job.id); else selected.delete(job.id);
    compareButton.disabled = selected.size < 2;
  });
  return el("tr", { dataset: { jobId: job.id, status: job.status } },
    el("td", {}, box),
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, jobLabel(job))),
    el("td", {}, job.model),
    el("td", {}, statusBadge(job.status)),
    el("td", { class: "progress-cell" },
      el("progress", { max: 1, value: progress.value, "data-value": progress.value.toFixed(4) }),
      el("span", { class: "progress-text" }, progress.text)),
    el("td", { class: "num" }, number(job.tunerun?.last_loss)),
    el("td", { class: "num" }, number(scores.exact_match)),
    el("td", { class: "num" }, number(scores.f1)),
    el("td", { class: "num" }, number(scores.rouge_l)),
    el("td", {}, gatesBadge(job.tunerun?.gates_passed)),
    el("td", {}, when(job.created_at)));
}

async function refresh() {
  try {
    const jobs = await allPages("/v1/fine_tuning/jobs");
    replaceRows(document.getElementById("jobs"), jobs.map(row));
    document.getElementById("no-jobs").hidden = jobs.length > 0;
    showError("jobs-error", null);
  } catch (error) {
    showError("jobs-error", `Could not load the jobs: ${error.message}`);
  }
  setTimeout(refresh, REFRESH_MS);
}

compareButton.addEventListener("click", () => {
  window.location.assign(`/compare?jobs=${[...selected].map(encodeURIComponent).join(",")}`);
});
refresh();
