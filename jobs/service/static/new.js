// New job: upload a JSONL file, see how it validated and what cleaning would do, pick a model, start.
import { api, el, piiLabel, replaceRows, showError } from "/static/common.js";

const VALIDATION_POLL_MS = 700;
let fileId = null;
const start = document.getElementById("start");

async function loadModels() {
  // The catalog first, then the project's own fine-tuned models: a job may start from one (SFT, then DPO on it).
  const all = (await api("/v1/models")).data;
  const models = [...all.filter((m) => m.owned_by === "tunerun"), ...all.filter((m) => m.owned_by !== "tunerun")];
  document.getElementById("model").replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
}

function showValidation(file) {
  const box = document.getElementById("validation");
  box.hidden = false;
  const ok = file.status === "processed";
  document.getElementById("validation-status").replaceChildren(
    el("span", { class: `status status-${ok ? "succeeded" : "failed"}`, id: "file-status" }, file.status),
    ` ${file.filename} · ${file.bytes.toLocaleString()} bytes`, file.status_details ? ` · ${file.status_details}` : "");
  const cleaning = file.tunerun?.cleaning;
  const rows = cleaning ? [["Records", cleaning.records_read], ["Malformed", cleaning.malformed],
    ["Empty", cleaning.empty], ["Duplicates", cleaning.duplicates], ["Near-duplicates", cleaning.near_duplicates],
    ["Fuzzy duplicates", cleaning.fuzzy_duplicates], ["Kept", cleaning.kept],
    ...Object.entries(cleaning.pii_masked ?? {}).map(([k, v]) => [`PII masked: ${piiLabel(k)}`, v])] : [];
  replaceRows(document.getElementById("validation-counts"), rows.map(([k, v]) =>
    el("tr", {}, el("th", {}, k), el("td", { class: "num" }, v))));
  start.disabled = !ok;
  // A file of preference pairs trains with DPO, any other with supervised fine-tuning (the server says which).
  const pairs = file.tunerun?.preference_pairs;
  if (ok && pairs != null) chooseMethod(pairs ? "dpo" : "supervised");
}

function chooseMethod(method) {
  document.getElementById("method").value = method;
  document.getElementById("dpo-settings").hidden = method !== "dpo";
}

async function waitForValidation(id) {
  for (;;) {
    const file = await api(`/v1/files/${encodeURIComponent(id)}`);
    if (file.status !== "uploaded") return file;
    await new Promise((resolve) => setTimeout(resolve, VALIDATION_POLL_MS));
  }
}

document.getElementById("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("upload-error", null);
  start.disabled = true;
  fileId = null;
  const chosen = document.getElementById("file").files[0];
  if (!chosen) return;
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", chosen, chosen.name);
  try {
    document.getElementById("validation").hidden = true;
    const uploaded = await api("/v1/files", { method: "POST", form });
    const file = await waitForValidation(uploaded.id);
    fileId = file.id;
    showValidation(file);
  } catch (error) {
    showError("upload-error", `The file was not accepted: ${error.message}`);
  }
});

document.getElementById("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("start-error", null);
  const hyperparameters = {};
  const epochs = document.getElementById("epochs").value, lr = document.getElementById("lr").value;
  if (epochs) hyperparameters.n_epochs = Number(epochs);
  if (lr) hyperparameters.learning_rate_multiplier = Number(lr);
  const suffix = document.getElementById("suffix").value.trim();
  const type = document.getElementById("method").value, beta = document.getElementById("beta").value;
  if (type === "dpo" && beta) hyperparameters.beta = Number(beta);
  try {
    const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: {
      model: document.getElementById("model").value, training_file: fileId,
      method: { type, [type]: { hyperparameters } }, ...(suffix ? { suffix } : {}) } });
    window.location.assign(`/jobs/${encodeURIComponent(job.id)}`);
  } catch (error) {
    showError("start-error", `The job was not started: ${error.message}`);
  }
});

document.getElementById("method").addEventListener("change", (event) => chooseMethod(event.target.value));
loadModels().catch((error) => showError("start-error", `Could not load the models: ${error.message}`));
