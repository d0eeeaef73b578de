// The jobs page: the project's newest jobs, refreshed in place every few seconds; older ones on request.
// A refresh asks for as many jobs as the page shows (one request per 100), not for every job the project ever
// had: a project with thousands of finished jobs costs the server no more than one with fifty.
import { api, el, gatesBadge, jobLabel, number, progressOf, replaceRows, showError, statusBadge, when }
  from "/static/common.js";

const REFRESH_MS = 2000;
const SHOWN_FIRST = 50;
const MAX_PAGE = 100; // the API's largest page
let wanted = SHOWN_FIRST;
let timer = null;
const moreButton = document.getElementById("more-jobs");
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

// The newest `wanted` jobs, and whether the project has older ones.
async function newestJobs() {
  const jobs = [];
  let after = null;
  for (;;) {
    const limit = Math.min(MAX_PAGE, wanted - jobs.length);
    const page = await api(`/v1/fine_tuning/jobs?limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    jobs.push(...page.data);
    if (!page.has_more || page.data.length === 0) return { jobs, more: false };
    if (jobs.length >= wanted) return { jobs, more: true };
    after = page.data[page.data.length - 1].id;
  }
}

async function refresh() {
  clearTimeout(timer);
  if (!document.hidden) { // a tab nobody looks at polls nothing; it catches up when shown again
    try {
      const { jobs, more } = await newestJobs();
      replaceRows(document.getElementById("jobs"), jobs.map(row));
      document.getElementById("no-jobs").hidden = jobs.length > 0;
      moreButton.hidden = !more;
      showError("jobs-error", null);
    } catch (error) {
      showError("jobs-error", `Could not load the jobs: ${error.message}`);
    }
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

compareButton.addEventListener("click", () => {
  window.location.assign(`/compare?jobs=${[...selected].map(encodeURIComponent).join(",")}`);
});
moreButton.addEventListener("click", () => {
  wanted += SHOWN_FIRST;
  refresh();
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refresh();
});
refresh();
