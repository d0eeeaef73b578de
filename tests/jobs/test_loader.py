"""Loading job specs: what a user sees when a spec is right, wrong, or changed with --set."""
from __future__ import annotations

import textwrap

import pytest

from tunerun.cluster.targets import job_model
from tunerun.jobs.errors import Problem, SpecError
from tunerun.jobs.loader import apply_overrides, load_job, load_job_text, parse_override

MINIMAL = """\
name: demo
model: {path: ./m}
data: {train: d.jsonl}
"""


def spec_text(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


def problems_of(text: str, overrides=()) -> list[Problem]:
    with pytest.raises(SpecError) as caught:
        load_job_text(spec_text(text), "job.yaml", overrides, model=job_model())  # as the CLI loads it
    return caught.value.problems


def only(problems: list[Problem], path: str) -> Problem:
    matching = [p for p in problems if p.path == path]
    assert len(matching) == 1, problems
    return matching[0]


# --- valid specs --------------------------------------------------------------------------------------

def test_minimal_spec_loads_with_defaults(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(MINIMAL)
    spec = load_job(job)
    assert (spec.name, spec.model.path, spec.data.train) == ("demo", "./m", "d.jsonl")
    assert spec.method.kind == "qlora"
    assert spec.training.global_batch_size == 8 and spec.resources.num_workers == 2
    assert spec.grad_accumulation == 2


def test_anchors_and_merge_keys_still_work():
    spec = load_job_text(spec_text("""
        model: {path: ./m}
        data: {train: &train d.jsonl, eval: *train}
        method:
          kind: lora
          lora:
            <<: {r: 8, alpha: 16}
            r: 4
    """))
    assert spec.data.eval == "d.jsonl"
    assert (spec.method.lora.r, spec.method.lora.alpha) == (4, 16)


# --- YAML safety and syntax ---------------------------------------------------------------------------

def test_python_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    problems = problems_of(f"""
        name: demo
        model: {{path: ./m}}
        data: !!python/object/apply:os.system ["touch {marker}"]
    """)
    assert not marker.exists()
    assert problems == [Problem("", "line 3, column 7: tag !!python/object/apply:os.system is not allowed: "
                                    "a job spec holds plain values only", 3)]


@pytest.mark.parametrize("value", ["!!binary bmFtZQo=", "!shell echo"])
def test_other_tags_are_refused(value):
    (problem,) = problems_of(f"model: {{path: {value}}}\ndata: {{train: d.jsonl}}\n")
    assert problem.line == 1 and "is not allowed" in problem.message


def test_invalid_syntax_gives_line_and_column():
    (problem,) = problems_of("""
        name: demo
        model:
          path: ./m
           dtype: bfloat16
    """)
    assert problem.line == 4
    assert problem.message.startswith("line 4, column 9: ")


def test_unclosed_flow_list_gives_line_and_column():
    (problem,) = problems_of("eval:\n  metrics: [loss, f1\ndata: {train: d.jsonl}\n")
    assert problem.message.startswith("line 3, column 5: ") and problem.line == 3


def test_unprintable_character_names_its_line():
    (problem,) = problems_of("name: demo\nmodel: {path: \x07}\n")
    assert problem.line == 2 and "U+0007" in problem.message


@pytest.mark.parametrize("text, expected", [
    ("- name: demo\n", "got a list"),
    ("just-a-string\n", "got a string"),
    ("", "the spec is empty"),
    ("# only a comment\n", "the spec is empty"),
])
def test_top_level_must_be_a_mapping(text, expected):
    (problem,) = problems_of(text)
    assert problem.path == "" and expected in problem.message


def test_duplicate_top_level_key():
    problems = problems_of("""
        name: demo
        model: {path: ./m}
        data: {train: d.jsonl}
        name: other
    """)
    assert problems == [Problem("name", "duplicate key (first at line 1)", 4)]


def test_duplicate_nested_keys_are_all_reported():
    problems = problems_of("""
        model: {path: ./m}
        data: {train: d.jsonl}
        training:
          micro_batch_size: 2
          learning_rate: 1.0e-4
          seed: 1
          learning_rate: 2.0e-4
        targets:
          slurm: {partition: gpu, partition: cpu}
    """)
    assert problems == [
        Problem("training.learning_rate", "duplicate key (first at line 5)", 7),
        Problem("targets.slurm.partition", "duplicate key (first at line 9)", 9),
    ]


# --- pydantic errors as problems with lines -----------------------------------------------------------

def test_misspelt_key_suggests_the_right_one_on_its_line():
    problems = problems_of("""
        name: demo
        model: {path: ./m}
        data: {train: d.jsonl}
        training:
          epochs: 2
          micro_batch_siz: 4
    """)
    assert problems == [Problem("training.micro_batch_siz", "unknown key — did you mean 'micro_batch_size'?", 6)]


def test_unknown_key_without_a_close_match_lists_allowed_keys():
    problem = only(problems_of(MINIMAL + "targets:\n  nomad: {}\n"), "targets.nomad")
    assert problem.message == "unknown key; allowed: ray, slurm, k8s"  # the registry's order
    assert problem.line == 5


def test_misspelt_top_level_section():
    problem = only(problems_of(MINIMAL + "trainig: {epochs: 2}\n"), "trainig")
    assert problem.message == "unknown key — did you mean 'training'?" and problem.line == 4


def test_all_problems_at_once_sorted_by_line():
    text = """
        name: demo
        model: {path: ./m}
        data: {train: d.jsonl}
        resources:
          workers_per_node: 0
        training:
          micro_batch_siz: 4
    """
    with pytest.raises(SpecError) as caught:
        load_job_text(spec_text(text), "job.yaml")
    assert caught.value.problems == [
        Problem("resources.workers_per_node", "must be ≥ 1 (got 0)", 5),
        Problem("training.micro_batch_siz", "unknown key — did you mean 'micro_batch_size'?", 7),
    ]
    assert str(caught.value).splitlines()[0] == "job.yaml: 2 problems"


def test_missing_required_fields_give_an_example_at_the_parent_line():
    problems = problems_of("""
        name: demo
        model:
          dtype: float16
    """)
    assert problems == [
        Problem("model.path", "required — e.g. model.path: ./models/my-model", 2),
        Problem("data", "required — e.g. data: {train: data/train.jsonl}", None),
    ]


def test_wrong_literal_says_what_was_expected_and_suggests():
    problem = only(problems_of(MINIMAL + "method:\n  kind: qlra\n"), "method.kind")
    assert problem.message == "expected one of full, lora, qlora, auto (got 'qlra') — did you mean 'qlora'?"
    assert problem.line == 5


def test_wrong_list_item_is_placed_on_the_item_line():
    problem = only(problems_of(MINIMAL + "eval:\n  metrics:\n    - loss\n    - rogue_l\n"), "eval.metrics.1")
    assert problem.line == 7 and "did you mean 'rouge_l'?" in problem.message


def test_union_field_gives_one_problem():
    problems = problems_of(MINIMAL + "method:\n  lora: {target_modules: all_linear}\n")
    assert problems == [Problem("method.lora.target_modules", "expected all-linear or a valid list "
                                "(got 'all_linear') — did you mean 'all-linear'?", 5)]


def test_union_field_points_at_the_bad_list_item():
    problems = problems_of(MINIMAL + "method:\n  lora:\n    target_modules: [q_proj, 3]\n")
    assert [(p.path, p.line) for p in problems] == [("method.lora.target_modules.1", 6)]
    assert problems[0].message.startswith("must be a valid string (got 3) — quote it")


def test_number_that_should_be_text_hints_at_quoting():
    problem = only(problems_of(MINIMAL + "targets:\n  slurm: {time: 4:00:00}\n"), "targets.slurm.time")
    assert problem.message.startswith("must be a valid string (got 14400) — quote it")


def test_bad_name_suggests_a_valid_one_without_pydantic_prefix():
    problem = only(problems_of(MINIMAL.replace("name: demo", "name: Bad Name!")), "name")
    assert problem.message.endswith("try 'bad-name'") and "Value error" not in problem.message
    assert problem.line == 1


def test_batch_arithmetic_points_at_global_batch_size_line():
    problems = problems_of(MINIMAL + "training:\n  micro_batch_size: 3\n  global_batch_size: 8\n")
    problem = only(problems, "training.global_batch_size")
    assert problem.line == 6 and "2 × 3 = 6" in problem.message and "(got 8)" in problem.message


def test_batch_arithmetic_falls_back_to_the_written_parent():
    problem = only(problems_of(MINIMAL + "training:\n  micro_batch_size: 3\n"), "training.global_batch_size")
    assert problem.line == 4


def test_batch_arithmetic_without_any_written_parent_has_no_line():
    problem = only(problems_of(MINIMAL + "resources: {workers_per_node: 3}\n"), "training.global_batch_size")
    assert problem.line is None


def test_zero_block_with_lora_is_reported_at_method_zero():
    problems = problems_of(MINIMAL + "method:\n  kind: lora\n  zero:\n    stage: 3\n")
    assert problems == [Problem("method.zero", "applies to kind full or qlora, not 'lora': "
                                               "remove method.zero or set method.kind: full", 6)]


def test_zero_stage_2_with_qlora_is_reported_at_its_line():
    problems = problems_of(MINIMAL + "method:\n  kind: qlora\n  zero:\n    stage: 2\n")
    problem = only(problems, "method.zero.stage")
    assert problem.line == 7 and "QLoRA runs under ZeRO stage 3 only (got 2)" in problem.message
    assert load_job_text(spec_text(MINIMAL + "method:\n  kind: qlora\n  zero:\n    stage: 3\n"), "job.yaml",
                         ()).method.sharded_qlora


def test_keep_best_needs_an_eval_at_every_checkpoint():
    problems = problems_of(MINIMAL + "eval: {every_steps: 20}\ncheckpoint:\n  every_steps: 30\n  keep_best: 1\n")
    problem = only(problems, "checkpoint.every_steps")
    assert problem.line == 6 and "multiple of eval.every_steps (20)" in problem.message
    assert "e.g. every_steps: 40" in problem.message


def test_keep_best_metric_must_be_measured():
    problems = problems_of(MINIMAL + "eval: {metrics: [loss]}\ncheckpoint: {keep_best: 2, best_metric: rouge_l}\n")
    problem = only(problems, "checkpoint.best_metric")
    assert "'rouge_l' is not measured" in problem.message and "loss, perplexity" in problem.message


def test_keep_best_on_a_measured_metric_loads():
    job = load_job_text(spec_text(MINIMAL + "eval: {every_steps: 10}\n"
                                  "checkpoint: {every_steps: 20, keep_best: 1, best_metric: exact_match}\n"))
    assert job.checkpoint.keep_best == 1 and not job.checkpoint.best_is_lowest


def test_nested_cross_field_error_joins_paths():
    problems = problems_of(MINIMAL + "method:\n  kind: full\n  zero:\n    stage: 2\n    offload_params: true\n")
    assert [(p.path, p.line) for p in problems] == [("method.zero.offload_params", 8)]


def test_identical_problems_are_reported_once():
    problems = problems_of(MINIMAL, ["max_steps", "max_steps"])
    assert [p.path for p in problems] == ["max_steps"]


# --- control characters ---------------------------------------------------------------------------------

def test_newline_in_a_string_is_refused():
    problems = problems_of("""
        model: {path: ./m}
        data:
          train: |
            d.jsonl
            rm -rf /
    """)
    assert problems == [Problem("data.train", "must not contain control characters or newlines "
                                              "(they could reach a launch script)", 3)]


@pytest.mark.parametrize("snippet, path", [
    ('targets:\n  slurm: {setup: ["module load cuda", "a\\tb"]}\n', "targets.slurm.setup.1"),
    ('storage: {uri: "s3://bucket/p\\r"}\n', "storage.uri"),
    ('eval: {gates: {"exact\\nmatch": ">= 0.8"}}\n', "eval.gates.exact\\nmatch"),
    ('targets: {k8s: {image: "tunerun:latest\\x1b[2J"}}\n', "targets.k8s.image"),
])
def test_control_characters_anywhere_are_refused(snippet, path):
    problem = only(problems_of(MINIMAL.replace("name: demo\n", "") + snippet), path)
    assert "control characters" in problem.message


# --- --set overrides ------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, expected", [
    ("training.max_steps=20", (["training", "max_steps"], 20)),
    ("method.lora.target_modules=[q_proj,v_proj]", (["method", "lora", "target_modules"], ["q_proj", "v_proj"])),
    ("data.eval=null", (["data", "eval"], None)),
    ("training.learning_rate=1e-4", (["training", "learning_rate"], "1e-4")),  # YAML 1.1 wants 1.0e-4
    ("name=a=b", (["name"], "a=b")),
    (" model.path = ./m", (["model", "path"], "./m")),
])
def test_parse_override_reads_values_as_yaml(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["training.max_steps", "=3", "training..max_steps=3", "training.=3"])
def test_malformed_override_names_the_item(item):
    with pytest.raises(SpecError) as caught:
        parse_override(item)
    (problem,) = caught.value.problems
    assert repr(item) in problem.message and "dotted.key=value" in problem.message


@pytest.mark.parametrize("item", ["model.path=!!python/object/apply:os.system [ls]", "eval.metrics=[loss",
                                  "method.lora={r: 1, r: 2}"])
def test_override_value_must_be_safe_valid_yaml(item):
    with pytest.raises(SpecError) as caught:
        parse_override(item)
    assert f"cannot parse the value of --set {item!r}" in caught.value.problems[0].message


def test_apply_overrides_creates_sections_and_leaves_input_alone():
    data = {"model": {"path": "./m"}, "targets": None}
    result = apply_overrides(data, ["training.max_steps=20", "targets.slurm.partition=gpu", "model.path=./n"])
    assert result == {"model": {"path": "./n"}, "training": {"max_steps": 20},
                      "targets": {"slurm": {"partition": "gpu"}}}
    assert data == {"model": {"path": "./m"}, "targets": None}


def test_apply_overrides_into_a_non_mapping_is_a_problem():
    with pytest.raises(SpecError) as caught:
        apply_overrides({"name": "demo"}, ["name.x=1"])
    (problem,) = caught.value.problems
    assert problem.path == "name.x" and problem.line is None
    assert "inside name: it is a string, not a mapping" in problem.message
    assert problem.message.endswith("(from --set)")


def test_overrides_of_int_list_and_null_reach_the_spec():
    text = "name: demo\nmodel: {path: ./m}\ndata: {train: d.jsonl, eval: e.jsonl}\n"
    spec = load_job_text(text, overrides=[
        "training.max_steps=20", "method.lora.target_modules=[q_proj,v_proj]", "data.eval=null"])
    assert spec.training.max_steps == 20
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.data.eval is None


def test_override_replaces_a_bad_file_value():
    spec = load_job_text(MINIMAL + "resources:\n  workers_per_node: 0\n", overrides=["resources.workers_per_node=1"])
    assert spec.resources.workers_per_node == 1


def test_override_unknown_key_suggests_and_says_from_set():
    problems = problems_of(MINIMAL, ["training.micro_batch_siz=4"])
    assert problems == [Problem("training.micro_batch_siz",
                                "unknown key — did you mean 'micro_batch_size'? (from --set)", None)]


def test_override_problems_follow_file_problems():
    problems = problems_of(MINIMAL + "method: {kind: qlra}\n", ["resources.workers_per_node=0", "bogus"])
    assert [(p.path, p.line) for p in problems] == [
        ("method.kind", 4), ("bogus", None), ("resources.workers_per_node", None)]
    assert problems[2].message == "must be ≥ 1 (got 0) (from --set)"


def test_override_of_a_whole_section_takes_the_line_away():
    problems = problems_of(MINIMAL + "training:\n  epochs: 2\n", ["training={micro_batch_size: 0}"])
    assert problems == [Problem("training.micro_batch_size", "must be ≥ 1 (got 0) (from --set)", None)]


def test_override_with_a_newline_is_refused():
    problems = problems_of(MINIMAL, ['data.train="d.jsonl\\nrm -rf /"'])
    assert problems == [Problem("data.train", "must not contain control characters or newlines "
                                              "(they could reach a launch script) (from --set)", None)]


# --- files and boundaries -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as caught:
        load_job(str(missing))
    assert caught.value.source == str(missing)
    assert caught.value.problems == [Problem("", "file does not exist")]


def test_directory_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError) as caught:
        load_job(tmp_path)
    (problem,) = caught.value.problems
    assert problem.path == "" and "directory" in problem.message


def test_file_problems_carry_the_source_and_lines(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(MINIMAL + "resources:\n  workers_per_node: 0\n")
    with pytest.raises(SpecError) as caught:
        load_job(job)
    assert str(caught.value) == (f"{job}: 1 problem\n"
                                 "  line 5     resources.workers_per_node: must be ≥ 1 (got 0)")
