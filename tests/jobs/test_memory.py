"""The memory planner against ground truth: the ZeRO paper's worked example, DeepSpeed's own estimators, the
parameters of real (tiny or meta-device) Hugging Face models, the bytes bitsandbytes really stores, the tensors
autograd really saves; then `method: auto` and `tunerun plan` as a user meets them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunerun.jobs import memory
from tunerun.jobs.errors import SpecError
from tunerun.jobs.memory import GiB, ModelShape, activation_bytes, full_states, zero_paper_model_states
from tunerun.jobs.spec import LoraSpec

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)


def hf_config(kind: str, **overrides):
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "gemma": "GemmaConfig"}
    return getattr(transformers, classes[kind])(**overrides)


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# ── the ZeRO paper ───────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("stage,expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_worked_example(stage, expected_gb):
    """ZeRO paper, Figure 1: Ψ = 7.5B parameters, N_d = 64 GPUs, K = 12 (mixed-precision Adam)."""
    assert round(zero_paper_model_states(7.5e9, 64, stage) / 1e9, 1) == expected_gb


# ── exact parameter counts ───────────────────────────────────────────────────────────────────────────────────

def test_tiny_model_parameters_match_the_loaded_model(tiny_model_dir):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = ModelShape.load(tiny_model_dir)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert (shape.total_params, shape.largest_layer_params) == model_to_params(model)


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {k: v for k, v in LLAMA3_8B.items() if k != "model_type"}),
    ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, attention_bias=True,
                   mlp_bias=True)),
    ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=32768)),
    ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064)),
    ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                   intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)),
    ("qwen3", dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True)),
    ("gemma", dict(hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                   head_dim=256, intermediate_size=16384, vocab_size=256000)),
], ids=["llama3-8b", "llama-tied-bias", "mistral-7b", "qwen2-7b", "qwen2-0.5b", "qwen3-4b", "gemma-2b"])
def test_parameter_count_matches_meta_device_models(kind, overrides):
    """The config.json the model's own config class writes, read back, counts what the model instantiates."""
    config = hf_config(kind, **overrides)
    model = meta_model(config)
    shape = ModelShape.from_config(json.loads(config.to_json_string()))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert shape.largest_layer_params == largest


def test_unknown_architecture_and_empty_config_are_explained(tmp_path):
    with pytest.raises(memory.MemoryPlanError, match="model_type 'gpt2'"):
        ModelShape.from_config({"model_type": "gpt2"})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(memory.MemoryPlanError, match="model_type None"):
        ModelShape.load(tmp_path)


# ── DeepSpeed's own estimators ───────────────────────────────────────────────────────────────────────────────

def ours(shape_or_counts, gpus_per_node, nodes, stage, offload_optimizer, offload_params):
    total, largest = shape_or_counts
    states = full_states(total, largest, gpus_per_node * nodes, gpus_per_node, nodes, stage,
                         offload_optimizer, offload_params)
    return int(states.cpu_per_node), int(states.weights + states.gradients + states.optimizer)


DEEPSPEED_OPTIONS = [  # (stage, offload_optimizer, offload_params)
    (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)]


def deepspeed_estimate(counts, gpus_per_node, nodes, stage, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = counts
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload_optimizer)
    # tunerun loads ZeRO-3 models straight into partitions (HfDeepSpeedConfig → zero.Init): zero_init=True.
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                        cpu_offload=offload_optimizer,
                                                        cpu_offload_params=offload_params, zero_init=True)
    return cpu, gpu


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("options", DEEPSPEED_OPTIONS, ids=lambda o: f"z{o[0]}-opt{int(o[1])}-par{int(o[2])}")
def test_model_states_agree_with_deepspeed_on_a_meta_device_llama3_8b(options, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import model_to_params  # noqa: F401 - the counting we mirror

    model = meta_model(hf_config("llama", **{k: v for k, v in LLAMA3_8B.items() if k != "model_type"}))
    # model_to_params deduplicates by data_ptr, which is 0 for every meta tensor: count as it would on a device.
    counts = (sum(p.numel() for p in model.parameters()),
              max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()))
    shape = ModelShape.from_config(LLAMA3_8B)
    assert counts == (shape.total_params, shape.largest_layer_params)
    cpu, gpu = ours(counts, gpus_per_node, nodes, *options)
    ds_cpu, ds_gpu = deepspeed_estimate(counts, gpus_per_node, nodes, *options)
    assert gpu == ds_gpu
    if options[0] == 3 or nodes == 1:
        # DeepSpeed's ZeRO-2 offload formula counts every GPU of the job into one node's RAM; ours counts the
        # node's own (see full_states): the two agree on one node.
        assert cpu == ds_cpu


def test_model_states_agree_with_deepspeed_all_live_on_real_models(tiny_model_dir, capsys):
    """`estimate_zero{2,3}_model_states_mem_needs_all_live` on live models (the tiny one and a ~34M-parameter
    Llama with real storage): the table DeepSpeed prints equals ours at its printed precision."""
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=1536)
    with torch.device("meta"):
        medium = LlamaForCausalLM(config)
    medium = medium.to_empty(device="cpu")  # real storage, no init cost
    for model, shape in ((AutoModelForCausalLM.from_pretrained(tiny_model_dir), ModelShape.load(tiny_model_dir)),
                         (medium, ModelShape.from_config(config.to_dict()))):
        assert model_to_params(model) == (shape.total_params, shape.largest_layer_params)
        counts = (shape.total_params, shape.largest_layer_params)
        capsys.readouterr()
        estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=4)
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=4)
        rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", capsys.readouterr().out, re.MULTILINE)
        # DeepSpeed prints the offload device as "OffloadDeviceEnum.cpu" in some versions and "cpu " in others.
        printed = {re.sub(r"OffloadDeviceEnum\.|\s", "", options): (float(cpu), float(gpu)) for cpu, gpu, options in rows}
        expected = {
            "offload_optimizer=cpu": ours(counts, 4, 1, 2, True, False),
            "offload_optimizer=none": ours(counts, 4, 1, 2, False, False),
            "offload_param=cpu,offload_optimizer=cpu,zero_init=1": ours(counts, 4, 1, 3, True, True),
            "offload_param=none,offload_optimizer=cpu,zero_init=1": ours(counts, 4, 1, 3, True, False),
            "offload_param=none,offload_optimizer=none,zero_init=1": ours(counts, 4, 1, 3, False, False),
        }
        for options, (cpu, gpu) in expected.items():
            assert printed[options] == (round(cpu / GiB, 2), round(gpu / GiB, 2)), options


# ── LoRA and QLoRA bytes ─────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj", "lm_head"]])
def test_lora_parameters_match_peft(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert memory.lora_params(ModelShape.load(tiny_model_dir), LoraSpec(r=8, target_modules=targets)) == trainable


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_base_bytes_match_what_bitsandbytes_stores(tiny_model_dir, double_quant):
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=double_quant,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    stored = 0
    for param in model.parameters():
        stored += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        for owner in (state, getattr(state, "state2", None)):
            for value in vars(owner).values() if owner is not None else ():
                stored += value.numel() * value.element_size() if torch.is_tensor(value) else 0
    assert memory.qlora_base_bytes(ModelShape.load(tiny_model_dir), double_quant) == stored


# ── activations: the formula against the tensors autograd saves ─────────────────────────────────────────────

def saved_tensor_bytes(model, seq: int, batch: int, vocab: int) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward pass (no weights)."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(size for ptr, size in storages.items() if ptr not in weights)


SMALL = dict(vocab_size=3000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1000)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.05)])
def test_activation_formula_matches_saved_tensors(dtype, method, dropout):
    """Korthikanti-style accounting re-derived for HF Llama, within 6% of what autograd keeps on CPU (the
    formula counts layer 0 like the others, though its frozen inputs need less with adapters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    lora = None
    if method == "lora":
        lora = LoraSpec(r=8, alpha=16, dropout=dropout)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    measured = saved_tensor_bytes(model, seq=64, batch=2, vocab=SMALL["vocab_size"])
    estimate = activation_bytes(ModelShape.from_config(config.to_dict()), 64, 2,
                                "full" if method == "full" else "adapters", memory.DTYPE_BYTES[dtype], lora,
                                mask_bytes=4)  # CPU dropout keeps a float mask
    assert estimate.saved == pytest.approx(measured, rel=0.06)
    assert estimate.saved >= measured * 0.98  # and errs on the safe side


def test_activation_formula_matches_qlora_saved_tensors(tiny_model_dir):
    """QLoRA's stream is fp32 (prepare_model_for_kbit_training upcasts the embeddings), whatever compute_dtype."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    shape = ModelShape.load(tiny_model_dir)
    measured = saved_tensor_bytes(model, seq=128, batch=2, vocab=shape.vocab)
    estimate = activation_bytes(shape, 128, 2, "adapters", 4, LoraSpec(r=8, alpha=16, dropout=0.0))
    assert estimate.saved == pytest.approx(measured, rel=0.06)


def test_gradient_checkpointing_keeps_only_what_lies_outside_the_layers():
    """Under non-reentrant checkpointing the layers' internals go to the checkpoint's own hooks: autograd keeps
    each layer's input, the final norm, the LM head input and the loss, the formula's saved part."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMALL, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shape = ModelShape.from_config(config.to_dict())
    measured = saved_tensor_bytes(model, seq=64, batch=2, vocab=SMALL["vocab_size"])
    estimate = activation_bytes(shape, 64, 2, "full", 2, checkpointing=True)
    assert estimate.saved == pytest.approx(measured, rel=0.03)
    plain = activation_bytes(shape, 64, 2, "full", 2, checkpointing=False)
    assert estimate.total < plain.total


# ── candidates and method: auto ──────────────────────────────────────────────────────────────────────────────

def write_job(tmp_path: Path, config: dict, extra: str = "") -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"r {i}"}) + "\n" for i in range(64)))
    job = tmp_path / "job.yaml"
    job.write_text(f"name: demo\nmodel: {{path: {model}}}\ndata: {{train: {tmp_path / 'train.jsonl'}, "
                   f"max_seq_len: 2048}}\n{extra}")
    return job


def resolve_file(path: Path, *overrides: str):
    from tunerun.jobs.loader import load_job
    from tunerun.jobs.plan import resolve

    return resolve(load_job(path, list(overrides)), source=str(path))


GPUS = ("resources:\n  nodes: 1\n  workers_per_node: 8\n  gpus_per_worker: 1\n  gpu_memory_gb: {gb}\n"
        "  cpu_memory_gb: 1000\ntraining: {{micro_batch_size: 1, global_batch_size: 8}}\n")


@pytest.mark.parametrize("gb,kind,zero", [
    # Llama-3-8B, 8 GPUs, micro-batch 1 × 2048 tokens, checkpointing: ZeRO-1 ~48 GiB, ZeRO-2 ~35, ZeRO-3 ~22,
    # ZeRO-3 with optimizer offload ~7 GiB per GPU (and ~180 GiB of node RAM).
    (80, "full", {"stage": 1, "offload_optimizer": False, "offload_params": False}),
    (48, "full", {"stage": 2, "offload_optimizer": False, "offload_params": False}),
    (32, "full", {"stage": 3, "offload_optimizer": False, "offload_params": False}),
    (16, "full", {"stage": 3, "offload_optimizer": True, "offload_params": False}),
])
def test_auto_prefers_full_zero_at_the_lowest_stage_that_fits(tmp_path, gb, kind, zero):
    job = resolve_file(write_job(tmp_path, LLAMA3_8B, "method: {kind: auto}\n" + GPUS.format(gb=gb)))
    assert job.spec.method.kind == kind and job.spec.method.zero.model_dump() == zero
    assert job.spec.method.lora is None and job.spec.method.quantization is None
    assert job.deepspeed["zero_optimization"]["stage"] == zero["stage"]
    assert job.method_choice.startswith("auto chose ZeRO-") and "per GPU" in job.method_choice


def test_activations_scale_with_the_objectives_sequences_per_example(tmp_path, monkeypatch):
    """An objective that runs three sequences per example through the model with gradients (a preference pair
    runs two) is charged the activations of a micro-batch three times as large; model states do not change."""
    from tunerun.trainer import objectives
    from tunerun.trainer.objectives.sft import SupervisedFineTuning

    def plan(micro_batch: int, objective: str = "sft") -> dict:
        resources = GPUS.format(gb=80).replace("micro_batch_size: 1, global_batch_size: 8",
                                               f"micro_batch_size: {micro_batch}, global_batch_size: {8 * micro_batch}")
        spec = resolve_file(write_job(tmp_path, LLAMA3_8B, "method: {kind: lora}\n" + resources)).spec
        # training.objective admits only shipped objectives: model_copy names the one registered here.
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"objective": objective})})
        shape, hw = ModelShape.from_config(LLAMA3_8B), memory.hardware_for(spec)
        return {c.name: c.to_json() for c in memory.candidates(spec, shape, hw)}

    sft_triple = plan(3)
    monkeypatch.setitem(objectives.OBJECTIVES, "triple", type("Triple", (SupervisedFineTuning,),
                                                              {"activation_sequences": 3}))
    triple = plan(1, "triple")
    for name, candidate in triple.items():
        for term in ("activations", "activations_checkpointing", "activations_no_checkpointing", "weights",
                     "optimizer", "gradients"):
            assert candidate[term] == sft_triple[name][term], (name, term)
    assert all(plan(1)[name]["activations"] < c["activations"] for name, c in triple.items())


def test_auto_falls_back_to_lora_then_qlora_and_keeps_the_adapter_settings(tmp_path):
    # 64 GB of node RAM rules out offloading (~180 GiB); LoRA needs ~19.4 GiB, QLoRA ~11.9 GiB per GPU.
    small_ram = GPUS.format(gb=26).replace("cpu_memory_gb: 1000", "cpu_memory_gb: 64")
    path = write_job(tmp_path, LLAMA3_8B, "method:\n  kind: auto\n  lora: {r: 8}\n" + small_ram)
    job = resolve_file(path)
    assert job.spec.method.kind == "lora" and job.spec.method.lora.r == 8 and job.spec.method.zero is None
    assert "passed over: ZeRO-1 needs" in job.method_choice
    job = resolve_file(path, "resources.gpu_memory_gb=16")
    assert job.spec.method.kind == "qlora" and job.spec.method.quantization is not None
    assert "LoRA needs" in job.method_choice


def test_auto_refuses_a_job_that_fits_nowhere_with_the_numbers(tmp_path):
    path = write_job(tmp_path, LLAMA3_8B, "method: {kind: auto}\n"
                     + GPUS.format(gb=2).replace("cpu_memory_gb: 1000", "cpu_memory_gb: 32"))
    with pytest.raises(SpecError) as caught:
        resolve_file(path)
    (problem,) = caught.value.problems
    assert problem.path == "method.kind"
    assert "no method fits" in problem.message and "QLoRA (4-bit) needs" in problem.message
    assert "QLoRA + ZeRO-3 needs" in problem.message
    assert re.search(r"\d+\.\d GiB per GPU", problem.message)


def test_auto_on_gpus_needs_the_gpu_memory(tmp_path):
    path = write_job(tmp_path, LLAMA3_8B, "method: {kind: auto}\nresources: {gpus_per_worker: 1}\n")
    with pytest.raises(SpecError, match="resources.gpu_memory_gb"):
        resolve_file(path)


def test_resolved_auto_job_round_trips(tmp_path):
    import yaml

    from tunerun.jobs.plan import ResolvedJob

    job = resolve_file(write_job(tmp_path, LLAMA3_8B, "method: {kind: auto}\n" + GPUS.format(gb=40)))
    again = ResolvedJob.model_validate(yaml.safe_load(yaml.safe_dump(job.model_dump(mode="json"))))
    assert again == job


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("80GB", 80e9), ("80", 80e9), ("1.5TiB", 1.5 * 2**40),
                                           ("512 MiB", 512 * 2**20)])
def test_sizes(text, expected):
    assert memory.parse_size(text) == expected


# ── the CLI ──────────────────────────────────────────────────────────────────────────────────────────────────

def test_plan_prints_every_candidate_for_the_gpus_asked_for(tunerun, tmp_path):
    write_job(tmp_path, LLAMA3_8B, "method: {kind: qlora}\nresources: {gpus_per_worker: 1}\n")
    result = tunerun("plan", "job.yaml", "--gpu-memory", "80GiB", "--gpus", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8,030,261,248 parameters" in out and "8 GPUs" in out and "80.0 GiB each" in out
    for name in ("ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 + optimizer & param offload", "LoRA", "QLoRA (4-bit)"):
        assert name in out
    assert "▶ QLoRA (4-bit)" in out


def test_plan_json_has_a_memory_section(tunerun, tmp_path):
    write_job(tmp_path, LLAMA3_8B, "method: {kind: auto}\n" + GPUS.format(gb=80))
    result = tunerun("plan", "job.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["spec"]["method"]["kind"] == "full" and plan["method_choice"].startswith("auto chose")
    mem = plan["memory"]
    assert mem["model"]["total_params"] == 8_030_261_248 and mem["hardware"]["gpus"] == 8
    by_name = {c["name"]: c for c in mem["candidates"]}
    zero1 = by_name["ZeRO-1"]
    assert zero1["total"] == pytest.approx(zero1["weights"] + zero1["gradients"] + zero1["optimizer"]
                                           + zero1["activations"])
    assert by_name["ZeRO-2"]["fits"] is True and by_name["QLoRA (4-bit)"]["weights"] < 8 * GiB


def test_plan_on_a_cpu_spec_speaks_of_ram_and_validate_explains_auto(tunerun, tmp_path):
    write_job(tmp_path, LLAMA3_8B | {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000},
              "method: {kind: auto}\ntraining: {micro_batch_size: 2, global_batch_size: 4}\n")
    result = tunerun("plan", "job.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "per worker (CPU RAM)" in result.stdout and "2 CPU workers" in result.stdout
    validated = tunerun("validate", "job.yaml", cwd=tmp_path)
    assert validated.returncode == 0 and "auto chose ZeRO-1" in validated.stdout


def test_plan_without_a_readable_config_still_plans(tunerun, tmp_path):
    write_job(tmp_path, {})
    result = tunerun("plan", "job.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model_type" in json.loads(result.stdout)["memory"]["error"]


# ── QLoRA under ZeRO-3 ───────────────────────────────────────────────────────────────────────────────────────

LLAMA3_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False)
ZERO3_QLORA = "method:\n  kind: qlora\n  zero: {stage: 3}\ntraining: {micro_batch_size: 1, global_batch_size: 8, " \
              "gradient_checkpointing: true}\n"


def test_sharded_qlora_70b_on_8_gpus_of_24gb_matches_a_hand_accounting(tmp_path):
    """Llama-3-70B, 8 × 24 GB, micro-batch 1 × 2048 tokens, checkpointing, LoRA r 16 on every linear (dropout
    0.05), NF4 with double quantization, bf16 compute: every term counted here by hand from the model's shape."""
    job = resolve_file(write_job(tmp_path, LLAMA3_70B, ZERO3_QLORA + GPUS.format(gb=24).split("training")[0]))
    shape = memory.ModelShape.load(job.spec.model.path)
    hw = memory.hardware_for(job.spec)
    plan = {c.name: c for c in memory.candidates(job.spec, shape, hw)}
    mine = memory.estimate_for_spec(job.spec, hw)
    assert mine.name == "QLoRA + ZeRO-3" and mine.to_json() == plan["QLoRA + ZeRO-3"].to_json()

    n, layers, h, kv, inter, vocab, r, s = 8, 80, 8192, 1024, 28672, 128256, 16, 2048
    matrices = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, inter), "up": (h, inter),
                "down": (inter, h)}
    weights_4bit = layers * sum(a * b for a, b in matrices.values())
    assert weights_4bit == 68_451_041_280  # the quantized share of Llama-3-70B's 70.6 B parameters
    packed = weights_4bit / 2  # two 4-bit weights per byte, stored in bf16 elements and partitioned
    # per matrix: one 8-bit absmax per 64 weights, those quantized again in blocks of 256 (fp32 absmax each),
    # the 256-entry fp32 nested code book + its offset, and the 16-entry fp32 NF4 code book; all kept whole
    constants = layers * sum(a * b // 64 + 4 * -(-(a * b // 64) // 256) + 1024 + 4 + 64 for a, b in matrices.values())
    unquantized = 2 * vocab * h + layers * 2 * h + h  # embeddings, LM head, the norms: bf16, partitioned
    adapters = layers * sum(r * (a + b) for a, b in matrices.values())
    assert adapters == 207_093_760
    lm_head_gathered = 2 * vocab * h  # the largest module, whole while it computes
    weights = constants + lm_head_gathered + (packed + 2 * unquantized + 2 * adapters) / n
    assert mine.weights == pytest.approx(weights, rel=1e-12)
    assert mine.gradients == pytest.approx(4 * adapters / n) and mine.optimizer == pytest.approx(12 * adapters / n)

    # activations, checkpointed: each layer's bf16 input, the final norm's fp32 input, the fp32 log-softmax, the
    # bf16 4-D mask; at the peak the logits with their fp32 copy, and one layer recomputed in the backward pass
    sb = s * 1
    saved = layers * 2 * sb * h + 4 * sb * h + 4 * sb * vocab + 2 * s * s
    one_layer = (2 * 4 * sb * h  # the two RMSNorms' fp32 inputs
                 + 2 * sb * (2 * h + 2 * kv) + 4 * 64 * s  # q, k, v, the SDPA output; its log-sum-exp
                 + 3 * 2 * sb * inter  # SiLU input and output, the up projection
                 + (2 + 1) * sb * (6 * h + inter)  # each adapter's dropout output (bf16) and bool mask
                 + 2 * sb * r * 7)  # the r-wide inputs of the seven B matrices
    assert mine.activations == pytest.approx(saved + sb * vocab * (2 + 4) + one_layer, rel=1e-12)

    total = weights + 16 * adapters / n + mine.activations
    assert mine.total == pytest.approx(total) and 13.5 * GiB < total < 14.5 * GiB and mine.fits
    # DDP QLoRA holds the whole 4-bit base on each GPU: ~44 GB, more than the card
    assert plan["QLoRA (4-bit)"].weights > 40e9 and not plan["QLoRA (4-bit)"].fits


def test_auto_picks_sharded_qlora_when_ddp_qlora_does_not_fit(tmp_path):
    job = resolve_file(write_job(tmp_path, LLAMA3_70B, "method: {kind: auto}\n" + GPUS.format(gb=24)))
    method = job.spec.method
    assert method.kind == "qlora" and method.sharded_qlora and method.zero.stage == 3
    assert not (method.zero.offload_params or method.zero.offload_optimizer)
    assert job.method_choice.startswith("auto chose QLoRA + ZeRO-3") and "QLoRA (4-bit) needs" in job.method_choice
    assert job.deepspeed["zero_optimization"]["stage"] == 3 and job.deepspeed["bf16"]["enabled"]
    # with 80 GB cards DDP QLoRA fits: it is preferred (no gathering in every step)
    roomy = resolve_file(write_job(tmp_path, LLAMA3_70B, "method: {kind: auto}\n" + GPUS.format(gb=80)),
                         "training.gradient_checkpointing=true")
    assert roomy.spec.method.kind == "qlora" and not roomy.spec.method.sharded_qlora and roomy.deepspeed is None


@pytest.mark.parametrize("zero,storage", [(None, None), ("{stage: 3}", None), ("{}", "float16")])
def test_sharded_qlora_is_what_the_spec_says_and_survives_the_round_trip(tmp_path, zero, storage):
    import yaml

    from tunerun.jobs.plan import ResolvedJob

    quant = "float16" if storage else "bfloat16"
    text = (f"method:\n  kind: qlora\n  quantization: {{compute_dtype: {quant}"
            + (f", quant_storage: {storage}" if storage else "") + "}\n" + (f"  zero: {zero}\n" if zero else ""))
    job = resolve_file(write_job(tmp_path, LLAMA3_8B, text))
    again = ResolvedJob.model_validate(yaml.safe_load(yaml.safe_dump(job.model_dump(mode="json"))))
    assert again == job and again.spec.method.sharded_qlora == (zero is not None)
    if zero is None:  # QLoRA without a zero block stays DDP, as before
        assert job.spec.method.zero is None and job.deepspeed is None
        return
    ds = job.deepspeed
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] == (quant == "bfloat16")
    assert ds["fp16"]["enabled"] == (quant == "float16")
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 4096 // 4
    assert job.spec.method.quantization.storage_dtype(sharded=True) == quant


def test_offload_beyond_the_nodes_ram_is_refused_before_training(tmp_path):
    job = write_job(tmp_path, LLAMA3_70B, ZERO3_QLORA.replace("{stage: 3}", "{stage: 3, offload_params: true, "
                    "offload_optimizer: true}") + GPUS.format(gb=24).split("training")[0].replace("1000", "64"))
    with pytest.raises(SpecError) as caught:
        resolve_file(job)
    (problem,) = caught.value.problems
    assert problem.path == "method.zero"
    assert "puts the parameters and the optimizer states in CPU memory" in problem.message
    assert re.search(r"~[\d.]+ GiB of RAM per node, but a node has 59.6 GiB", problem.message)
    assert "Turn offload off" in problem.message
    assert resolve_file(job, "resources.cpu_memory_gb=1000").spec.method.zero.offload_params  # with the RAM: fine


def test_the_driver_checks_offload_against_its_own_nodes_ram(tmp_path, monkeypatch):
    """Without resources.cpu_memory_gb the submitter cannot know a node's RAM; the run's driver checks it against
    the node it runs on, before any model loads."""
    from tunerun.jobs.errors import TargetError
    from tunerun.trainer import entrypoint

    job = resolve_file(write_job(tmp_path, LLAMA3_70B, ZERO3_QLORA.replace("{stage: 3}", "{stage: 3, "
                       "offload_params: true}") + GPUS.format(gb=24).split("training")[0].replace(
                       "  cpu_memory_gb: 1000\n", "")))
    monkeypatch.setattr(memory, "machine_ram", lambda: 48 * 2**30)
    with pytest.raises(TargetError, match=r"method.zero: QLoRA \+ ZeRO-3 \+ param offload puts the parameters in "
                                          r"CPU memory: ~[\d.]+ GiB of RAM per node, but a node has 48.0 GiB"):
        entrypoint.check_offload_ram(job)
    monkeypatch.setattr(memory, "machine_ram", lambda: 2**40)
    entrypoint.check_offload_ram(job)  # a node with 1 TiB holds it


def test_auto_may_choose_full_fine_tuning_for_dpo(tmp_path):
    """80 GB GPUs fit full ZeRO-1 for Llama-3-8B (above); DPO's reference costs a full fine-tune no second model
    (its log-probabilities are computed once before training), so `auto` chooses as it does for SFT."""
    training = "training: {micro_batch_size: 1, global_batch_size: 8, objective: dpo}\n"
    job = resolve_file(write_job(tmp_path, LLAMA3_8B, "method: {kind: auto}\n"
                                 + GPUS.format(gb=80).replace("training: {micro_batch_size: 1, global_batch_size: 8}\n",
                                                              training)))
    assert job.spec.training.objective == "dpo" and job.spec.method.kind == "full"
