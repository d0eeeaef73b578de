// What every page shares: the API with the session cookie (and its CSRF token), and DOM building that only ever
// writes text (a job's suffix, metadata or a model's output can never become markup).

const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, { method = "GET", json, form } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body, credentials: "same-origin" });
  if (response.status === 401) {
    window.location.assign("/signin?expired=1");
    throw new ApiError(401, "Your session has ended.");
  }
  const type = response.headers.get("content-type") ?? "";
  const payload = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, payload?.error?.message ?? `${response.status}`);
  return payload;
}

// A streamed completion (server-sent events, as OpenAI sends them): onText gets each piece of text as it arrives.
export async function stream(path, json, onText) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin", body: JSON.stringify({ ...json, stream: true }),
    headers: { Accept: "text/event-stream", "Content-Type": "application/json", "X-CSRF-Token": csrf },
  });
  if (!response.ok) {
    const payload = await response.json().catch(() => null);
    throw new ApiError(response.status, payload?.error?.message ?? `${response.status}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(502, "the answer ended before it was complete");
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (event === "[DONE]") return;
      const chunk = JSON.parse(event);
      if (chunk.error) throw new ApiError(503, chunk.error.message);
      const choice = chunk.choices?.[0];
      if (choice) onText(choice.delta?.content ?? choice.text ?? "");
    }
  }
}

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function replaceRows(table, rows) {
  table.querySelector("tbody").replaceChildren(...rows);
}

export function showError(id, error) {
  const node = document.getElementById(id);
  node.hidden = !error;
  node.textContent = error ? String(error.message ?? error) : "";
}

export const number = (value, digits = 4) =>
  value === null || value === undefined ? "–" : typeof value === "number" ? value.toFixed(digits) : String(value);

export const percent = (value) => (value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)}%`);

export function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : `${m}:${String(r).padStart(2, "0")}`;
}

export const when = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "–");

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusBadge(status) {
  return el("span", { class: `status status-${status}`, "data-status": status }, status.replace("_", " "));
}

export function gatesBadge(passed) {
  if (passed === null || passed === undefined) return el("span", { class: "gates" }, "–");
  return el("span", { class: `gates ${passed ? "pass" : "fail"}` }, passed ? "passed" : "failed");
}

// The job's progress, as the jobs page and the job page show it: step / total, tokens per second, time left.
export function progressOf(job) {
  const t = job.tunerun ?? {};
  const step = t.step ?? 0, total = t.total_steps ?? 0;
  const done = job.status === "succeeded";
  const eta = job.estimated_finish ? job.estimated_finish - Date.now() / 1000 : null;
  const parts = [total ? `step ${step}/${total}` : job.status === "queued" ? "waiting" : "preparing"];
  if (t.tokens_per_s) parts.push(`${Math.round(t.tokens_per_s)} tok/s`);
  if (!TERMINAL.has(job.status) && eta !== null) parts.push(`ETA ${duration(eta)}`);
  return { value: done ? 1 : total ? step / total : 0, text: parts.join(" · ") };
}

export function jobLabel(job) {
  return job.user_provided_suffix ? `${job.user_provided_suffix} (${job.id})` : job.id;
}

// Result-file CSV (step, train_loss, learning_rate, tokens_per_s, valid_loss, exact_match, …) → rows of numbers.
export function parseCsv(text) {
  const [header, ...lines] = text.trim().split(/\r?\n/);
  const names = header.split(",");
  return lines.filter(Boolean).map((line) => {
    const cells = line.split(",");
    return Object.fromEntries(names.map((name, i) => [name, cells[i] === "" ? null : Number(cells[i])]));
  });
}

// A PII type of the data report as people read it ("iban_checksum_failed" → "iban, checksum failed").
export const piiLabel = (kind) => kind.replace("_checksum_failed", ", checksum failed").replaceAll("_", " ");
