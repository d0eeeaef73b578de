// The playground on a job page: one message (or a held-out example) sent to the base model and to the job's
// fine-tuned model side by side, through the same /v1/chat/completions an application calls. A held-out example is
// sent as the exact prompt the evaluation used (/v1/completions), so both answers can be read beside its reference.
import { api, showError, stream } from "./common.js";

const jobId = document.getElementById("job").dataset.jobId;
const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
const $ = (id) => document.getElementById(id);
const MAX_TOKENS = 64;
let models = null;
let examples = [];

// The held-out example picked, if any ("" is the user's own message: Number("") would be example 0).
function picked() {
  const value = $("playground-example").value;
  return value === "" ? undefined : examples[Number(value)];
}

function request() {
  const example = picked();
  if (example) return { path: "/v1/completions", body: { prompt: example.prompt } };
  const message = { role: "user", content: $("playground-prompt").value };
  return { path: "/v1/chat/completions", body: { messages: [message] } };
}

async function send() {
  const { path, body } = request();
  showError("playground-error", null);
  $("playground-send").disabled = true;
  const answers = [[models.base, $("playground-base")], [models.tuned, $("playground-tuned")]];
  for (const [, out] of answers) out.textContent = "";
  try {
    const options = { temperature: 0, max_tokens: MAX_TOKENS };
    await Promise.all(answers.map(([model, out]) => stream(path, { ...body, ...options, model },
      (text) => { out.textContent += text; })));
  } catch (error) {
    showError("playground-error", `Could not get both answers: ${error.message}`);
  } finally {
    $("playground-send").disabled = false;
  }
}

async function view() {
  const { path, body } = request();
  const shown = $("playground-rendered");
  try {
    shown.textContent = path === "/v1/completions" ? body.prompt
      : (await api("/v1/chat/completions/render", { method: "POST", json: { ...body, model: models.tuned } })).prompt;
    shown.hidden = false;
  } catch (error) {
    showError("playground-error", `Could not render the prompt: ${error.message}`);
  }
}

function pick() {
  const example = picked();
  $("playground-prompt").value = example ? example.prompt : "";
  $("playground-prompt").readOnly = Boolean(example);
  $("playground-rendered").hidden = true;
}

async function open() {
  const job = await api(base);
  if (job.status !== "succeeded" || !job.fine_tuned_model) {
    setTimeout(open, 5000);  // the playground opens once the job has a model to call
    return;
  }
  models = { base: job.model, tuned: job.fine_tuned_model };
  $("playground-base-name").textContent = `Base · ${models.base}`;
  $("playground-tuned-name").textContent = `Fine-tuned · ${models.tuned}`;
  examples = (await api(`${base}/evaluation`)).examples ?? [];
  $("playground-example").append(...examples.map((example, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = `#${example.index ?? i}: ${example.prompt.slice(-80)}`;
    return option;
  }));
  $("playground").hidden = false;
}

$("playground-send").addEventListener("click", send);
$("playground-view").addEventListener("click", view);
$("playground-example").addEventListener("change", pick);
open().catch((error) => showError("playground-error", `Could not open the playground: ${error.message}`));
