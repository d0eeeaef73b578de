"""A spec that is dumped and read back is the same spec and runs the same way: every shipped example, every method
kind, and every resolved job (what crosses to the workers as job.yaml)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunerun.cluster.targets import job_model
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import ResolvedJob, resolve
from tunerun.jobs.spec import JobSpec, MethodSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "jobs" / "examples").glob("*.yaml"))
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
# The examples' models (8B and 70B Llama shapes) are not here: a config.json of that shape stands in for each.
LLAMA = dict(model_type="llama", vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False)


def runs_the_same(first: JobSpec, second: JobSpec) -> None:
    method = (first.method.kind, first.method.label, first.method.sharded_qlora, first.method.zero)
    assert second == first
    assert (second.method.kind, second.method.label, second.method.sharded_qlora, second.method.zero) == method


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_and_its_resolved_job_survive_a_dump(example, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA))
    spec = load_job(example, [f"model.path={model}", f"data.train={TICKETS}", "data.eval=null"], model=job_model())
    runs_the_same(spec, JobSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))))
    job = resolve(spec, run_id="round-trip")
    again = ResolvedJob.model_validate(yaml.safe_load(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)))
    assert again == job and again.deepspeed == job.deepspeed
    runs_the_same(job.spec, again.spec)


@pytest.mark.parametrize("method", [
    {}, {"kind": "qlora"}, {"kind": "qlora", "zero": {}}, {"kind": "lora"}, {"kind": "full"},
    {"kind": "full", "zero": {"stage": 2}}, {"kind": "auto"},
])
def test_every_method_reads_back_as_the_same_method(method):
    # A dumped qlora spec used to carry the default zero block and read back as QLoRA under ZeRO-3 (and a dumped
    # lora spec its quantization block, refused on the way back)
    spec = MethodSpec.model_validate(method)
    again = MethodSpec.model_validate(spec.model_dump())
    assert again == spec and again.sharded_qlora == spec.sharded_qlora == ("zero" in method and
                                                                           method["kind"] == "qlora")
    assert MethodSpec.model_validate(json.loads(spec.model_dump_json())) == spec
