// The jobs page's usage panel: the signed-in project's own figures over the last 30 days, from tunerun's own
// GET /v1/usage (the session names the project: no page can ask for another project's).
import { api, el, showError } from "/static/common.js";

const WINDOW_DAYS = 30;

function figures(usage) {
  const byStatus = Object.entries(usage.jobs).map(([status, count]) => `${count} ${status}`).join(", ");
  const rows = [
    ["Jobs", byStatus ? `${usage.jobs_total} (${byStatus})` : "0", "jobs"],
    ["Trained tokens", usage.trained_tokens.toLocaleString(), "trained-tokens"],
    ["Worker-hours", usage.worker_hours.toFixed(2), "worker-hours"],
    ["GPU-hours", usage.gpu_hours.toFixed(2), "gpu-hours"],
  ];
  return rows.flatMap(([label, value, figure]) => [el("dt", {}, label), el("dd", { dataset: { figure } }, value)]);
}

async function show() {
  const since = Math.floor(Date.now() / 1000) - WINDOW_DAYS * 86400;
  try {
    document.getElementById("usage").replaceChildren(...figures(await api(`/v1/usage?since=${since}`)));
    showError("usage-error", null);
  } catch (error) {
    showError("usage-error", `Could not load the usage: ${error.message}`);
  }
}

show();
