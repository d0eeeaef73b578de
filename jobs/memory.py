"""Memory planner: per-GPU (or per CPU worker) memory for every way tunerun can train a model, from its config.json.

Everything here is arithmetic on the model's real shape (hidden size, layers, heads, vocabulary…) read from the
model folder's ``config.json``; no torch, no Ray, so ``tunerun plan`` answers in about a second.

Sources, term by term:

* **Model states, full fine-tuning** follow the ZeRO paper (Rajbhandari et al. 2020, §3.1 and Figure 1):
  mixed-precision Adam holds 2Ψ 16-bit parameters, 2Ψ 16-bit gradients and KΨ optimizer states (K = 12: fp32
  master weights, momentum, variance); stage 1 divides the optimizer states by the data-parallel degree N_d,
  stage 2 also the gradients, stage 3 also the parameters (`zero_paper_model_states`). The candidates charge
  what DeepSpeed's runtime adds to that, exactly as DeepSpeed's own estimators do
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``): the fp32 gradient
  partition the optimizer steps on (4 bytes per partitioned parameter), ZeRO-3's working copy of the largest
  layer (4 bytes per parameter) and, for CPU memory, a 1.5× buffer factor (`full_states`).
* **LoRA/QLoRA**: the frozen base in ``model.dtype`` (LoRA) or bitsandbytes 4-bit blocks with their quantization
  constants (QLoRA, `nf4_bytes`); PEFT keeps adapters in fp32 (``autocast_adapter_dtype``) and AdamW keeps two
  fp32 states per adapter parameter; ``prepare_model_for_kbit_training`` upcasts the embeddings, the LM head
  and the norms of a 4-bit model to fp32.
* **QLoRA under ZeRO-3** (`sharded_qlora_states`): the packed 4-bit weights (stored in the compute dtype) and the
  unquantised weights are partitioned over N_d like any ZeRO-3 parameter; the quantization constants are not
  parameters and stay whole on every GPU; no fp32 upcast (``prepare_model_for_kbit_training`` is not used: it
  would replace partitioned parameters with whole ones). The adapters are ordinary ZeRO-3 parameters in the
  compute dtype: DeepSpeed's 18 bytes per parameter over N_d (16-bit weights, fp32 gradients, fp32 master weights
  and Adam states), plus the largest module gathered whole while it computes.
* **Activations** follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", §4.1: 34·sbh + 5·as²b bytes per GPT layer), re-derived tensor by tensor for Hugging Face Llama-style
  decoders (fp32 RMSNorm, SwiGLU MLP, grouped-query attention, SDPA/flash attention that keeps no s² scores)
  and checked against the tensors autograd really saves (tests/jobs/test_memory.py). With gradient
  checkpointing only each layer's input stays, plus one layer recomputed during the backward pass
  (Chen et al. 2016; Korthikanti et al. §4.2 "full recomputation"). A micro-batch holds micro_batch_size ×
  the training objective's sequences per example (`sequences_per_example`: 1 for supervised fine-tuning).

Not counted: the CUDA context, allocator fragmentation and DeepSpeed's communication buckets. That is what
`HEADROOM` leaves free when the planner decides whether a candidate fits.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunerun.jobs.errors import TunerunError

if TYPE_CHECKING:
    from tunerun.jobs.spec import JobSpec, LoraSpec

GiB = 2**30
GB = 10**9
ADAM_K = 12  # bytes of optimizer state per parameter: fp32 master copy + momentum + variance (ZeRO paper, K = 12)
DS_CPU_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators multiply CPU memory by this ``additional_buffer_factor``
HEADROOM = 0.15  # share of a device left free for the CUDA context, fragmentation and communication buckets
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax constant per 64 weights
NF4_NESTED_BLOCK = 256  # double quantization: the 8-bit absmax constants are themselves quantized in blocks of 256
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Architectures whose decoder layer is attention + gated MLP + two RMSNorms, with these config defaults.
TIED_BY_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True}


class MemoryPlanError(TunerunError):
    """The model's config cannot be read or describes an architecture the planner does not know."""


# ── the model's shape ───────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 normalises queries and keys per head

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        kind = config.get("model_type")
        if kind not in TIED_BY_DEFAULT:
            raise MemoryPlanError(f"model_type {kind!r}: the memory planner knows {', '.join(TIED_BY_DEFAULT)}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if not config.get(k)]
        if missing:
            raise MemoryPlanError(f"config.json lacks {', '.join(missing)}")
        heads = config["num_attention_heads"]
        attention_bias = bool(config.get("attention_bias") or False)
        return cls(
            model_type=kind,
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", TIED_BY_DEFAULT[kind])),
            # Qwen2 hard-codes biases on q/k/v (not o); Llama-family configs say so with attention_bias.
            qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias") or False),
            qk_norm=kind == "qwen3",
        )

    @classmethod
    def load(cls, model_path: str | os.PathLike) -> "ModelShape":
        path = Path(model_path) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise MemoryPlanError(f"cannot read {path}: {exc}") from None
        return cls.from_config(config.get("text_config", config) if isinstance(config, dict) else {})

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """(in_features, out_features, bias) of each linear layer in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias), "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias), "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias), "down_proj": (i, h, self.mlp_bias),
        }

    @property
    def linear_params_per_layer(self) -> int:
        return sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in self.linears().values())

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head when it is a separate matrix."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        """Exactly ``sum(p.numel() for p in model.parameters())`` of the Hugging Face model."""
        per_layer = self.linear_params_per_layer + self.norm_params_per_layer
        return self.embedding_params + self.layers * per_layer + self.hidden  # + the final norm

    @property
    def largest_layer_params(self) -> int:
        """Parameters of the largest single module, as DeepSpeed's ``model_to_params`` counts them."""
        linear = max(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in self.linears().values())
        return max(self.vocab * self.hidden, linear)


def lora_targets(shape: ModelShape, lora: "LoraSpec") -> dict[str, tuple[int, int]]:
    """(in, out) of every module PEFT puts an adapter on, keyed by ``layer.name``; 'all-linear' skips lm_head."""
    names = LINEAR_NAMES if lora.target_modules == "all-linear" else tuple(lora.target_modules)
    targets = {f"{n}.{name}": shape.linears()[name][:2] for n in range(shape.layers) for name in names
               if name in shape.linears()}
    if "lm_head" in names:
        targets["lm_head"] = (shape.hidden, shape.vocab)
    return targets


def lora_params(shape: ModelShape, lora: "LoraSpec") -> int:
    """Trainable adapter parameters: r·(in + out) per targeted module (A is r×in, B is out×r)."""
    return sum(lora.r * (n_in + n_out) for n_in, n_out in lora_targets(shape, lora).values())


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes 4-bit storage of one weight: packed nibbles + absmax constants (+ their nested quantization)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if not double_quant:
        return numel // 2 + 4 * blocks + 16 * 4  # fp32 absmax per block + the 16-entry code book
    nested = math.ceil(blocks / NF4_NESTED_BLOCK)
    # 8-bit absmax per block, fp32 absmax per nested block, the 256-entry fp32 nested code and its offset.
    return numel // 2 + blocks + 4 * nested + 256 * 4 + 4 + 16 * 4


def quantized_linear_numel(shape: ModelShape) -> int:
    """Weights of all decoder linears: what bitsandbytes quantizes to 4 bits (their biases stay unquantised)."""
    return sum(n_in * n_out for n_in, n_out, _ in shape.linears().values()) * shape.layers


def unquantized_params(shape: ModelShape) -> int:
    """Embeddings, the LM head, the norms and the linears' biases: what a 4-bit model keeps in floating point."""
    biases = sum(n_out for _, n_out, bias in shape.linears().values() if bias) * shape.layers
    return shape.embedding_params + shape.layers * shape.norm_params_per_layer + shape.hidden + biases


def qlora_base_bytes(shape: ModelShape, double_quant: bool) -> int:
    """4-bit decoder linears; embeddings, LM head and norms upcast to fp32 by prepare_model_for_kbit_training."""
    quantized = sum(nf4_bytes(n_in * n_out, double_quant) for n_in, n_out, _ in shape.linears().values())
    return quantized * shape.layers + 4 * unquantized_params(shape)


# ── model states: the ZeRO paper and what DeepSpeed's runtime holds ─────────────────────────────────────────

def zero_paper_model_states(psi: float, dp: int, stage: int, k: int = ADAM_K, bytes_16bit: int = 2) -> float:
    """Per-GPU bytes of parameters + gradients + optimizer states, ZeRO paper Figure 1 (stage 0 = plain DP)."""
    params = bytes_16bit * psi / (dp if stage >= 3 else 1)
    grads = bytes_16bit * psi / (dp if stage >= 2 else 1)
    optimizer = k * psi / (dp if stage >= 1 else 1)
    return params + grads + optimizer


@dataclass(frozen=True)
class States:
    weights: float
    gradients: float
    optimizer: float
    cpu_per_node: float | None  # host RAM per node: offloaded states, or the model while it loads


def full_states(psi: int, largest: int, dp: int, gpus_per_node: int, nodes: int, stage: int,
                offload_optimizer: bool, offload_params: bool, weight_bytes: int = 2, load_bytes: int = 4) -> States:
    """What DeepSpeed ZeRO holds per GPU, term by term as its estimators count it (bytes).

    ZeRO-1/2: 16-bit weights replicated; 16-bit gradients replicated (1) or partitioned (2); a partitioned fp32
    gradient copy (4) and K = 12 of optimizer states: 2Ψ + 18Ψ/N_d for ZeRO-2, DeepSpeed's figure.
    ZeRO-3: 16-bit weights (2), fp32 gradients (4) and optimizer (12) partitioned — DeepSpeed's 18Ψ/N_d —
    plus 4 bytes per parameter of the largest layer, gathered whole while it computes.
    CPU memory per node: with ZeRO-1/2 every process first loads the whole model (``load_bytes`` per parameter:
    DeepSpeed's estimator assumes fp32, tunerun loads in model.dtype); ZeRO-3 loads straight into partitions
    (zero.Init via HfDeepSpeedConfig). Offloaded states are spread over the nodes. DeepSpeed's ZeRO-2 offload
    formula multiplies by every GPU of the job (``max(4·total_gpus, 16)``); the model copies that fill a node
    are its own processes', so this uses GPUs per node (the same figure on one node) and divides the 16 bytes
    of offloaded states over the nodes as its ZeRO-3 formula does.
    """
    buffer, w = DS_CPU_BUFFER_FACTOR, weight_bytes
    if stage in (1, 2):
        grads_16bit = w * psi / (dp if stage == 2 else 1)
        if offload_optimizer:
            # The fp32 gradients, master weights and Adam states live in CPU memory; gradients stream there.
            gpu_grads = 0.0 if stage == 2 else grads_16bit
            cpu = psi * max(load_bytes * gpus_per_node, 16 / nodes) * buffer
            return States(w * psi, gpu_grads, 0.0, cpu)
        return States(w * psi, grads_16bit + 4 * psi / dp, ADAM_K * psi / dp, psi * load_bytes * gpus_per_node * buffer)
    if stage != 3:
        raise ValueError(f"ZeRO stage {stage}")
    gathered = 4 * largest
    if offload_optimizer and offload_params:
        return States(gathered, 0.0, 0.0, psi * (16 + w) / nodes * buffer)
    if offload_optimizer:
        return States(w * psi / dp + gathered, 0.0, 0.0, psi * 16 / nodes * buffer)
    if offload_params:
        return States(gathered, 4 * psi / dp, ADAM_K * psi / dp, psi * w / nodes * buffer)
    return States(w * psi / dp + gathered, 4 * psi / dp, ADAM_K * psi / dp,
                  largest * load_bytes * gpus_per_node * buffer)


def sharded_qlora_states(shape: ModelShape, adapters: int, dp: int, gpus_per_node: int, nodes: int,
                         double_quant: bool, compute_bytes: int, offload_optimizer: bool,
                         offload_params: bool) -> States:
    """QLoRA under ZeRO-3, per GPU (bytes): see the module docstring.

    weights: packed 4-bit weights (numel/2 bytes) and unquantised weights (compute dtype) over N_d, the
    quantization constants whole, 16-bit adapter partitions, and the largest module gathered whole (the
    embedding or LM head in the compute dtype, or the largest packed linear). gradients: 4 bytes per adapter
    parameter over N_d; optimizer: 12. With offload_params the partitions live in CPU memory (the gathered module
    stays on the GPU); with offload_optimizer the gradients and optimizer states do. CPU memory per node, for each
    GPU of the node times DeepSpeed's buffer factor: what is offloaded, or while the model loads the largest
    tensor whole before it is quantized and partitioned (as for full ZeRO-3), whichever is more.
    """
    numel = quantized_linear_numel(shape)
    packed = numel / 2
    constants = sum(nf4_bytes(n_in * n_out, double_quant) - (n_in * n_out) // 2
                    for n_in, n_out, _ in shape.linears().values()) * shape.layers
    unquantized = compute_bytes * unquantized_params(shape)
    largest_linear = max(n_in * n_out for n_in, n_out, _ in shape.linears().values()) / 2
    gathered = max(compute_bytes * shape.vocab * shape.hidden, largest_linear)
    partitioned = (packed + unquantized + compute_bytes * adapters) / dp
    gpu_weights = constants + gathered + (0.0 if offload_params else partitioned)
    grads, optimizer = 4 * adapters / dp, ADAM_K * adapters / dp
    offloaded = (partitioned if offload_params else 0.0) + (grads + optimizer if offload_optimizer else 0.0)
    if offload_optimizer:
        grads, optimizer = 0.0, 0.0
    loading = shape.largest_layer_params * compute_bytes
    return States(gpu_weights, grads, optimizer, max(offloaded, loading) * gpus_per_node * DS_CPU_BUFFER_FACTOR)


def adapter_states(base_bytes: float, adapters: int, dp: int) -> States:
    """LoRA/QLoRA under DDP: frozen base + fp32 adapters, fp32 gradients (DDP keeps a bucket copy of them when
    there is more than one worker), and AdamW's two fp32 states (no master copy: the adapters are fp32)."""
    grads = 4 * adapters * (2 if dp > 1 else 1)
    return States(base_bytes + 4 * adapters, grads, 8 * adapters, None)


# ── activations ─────────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Activations:
    saved: float  # tensors autograd keeps between forward and backward
    transient: float  # the largest extra working set at the peak: logits and their fp32 copy, a recomputed layer

    @property
    def total(self) -> float:
        return self.saved + self.transient


def activation_bytes(shape: ModelShape, seq: int, micro_batch: int, kind: str, stream_bytes: int,
                     lora: "LoraSpec | None" = None, checkpointing: bool = False, mask_bytes: int = 1,
                     adapter_bytes: int = 4) -> Activations:
    """Activation memory of one micro-batch (bytes); ``kind`` is 'full' or 'adapters' (LoRA/QLoRA).

    ``stream_bytes`` is the dtype of the hidden states: model.dtype for full and LoRA, fp32 for QLoRA under DDP
    (its embeddings were upcast), the compute dtype for QLoRA under ZeRO-3. ``adapter_bytes``: fp32 adapters
    (PEFT's default), or the compute dtype under ZeRO-3. ``mask_bytes`` is a dropout mask element: bool (1) on
    CUDA, the input dtype on CPU.
    """
    s, b, h, p = seq, micro_batch, shape.hidden, stream_bytes
    sb = s * b
    # SDPA keeps q, k, v (after RoPE), its output and an fp32 log-sum-exp per head and position.
    attention = p * sb * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * b * shape.heads * s
    gated_mlp = 3 * p * sb * shape.intermediate  # SiLU input, SiLU output and the up projection
    if kind == "full":
        # Each RMSNorm keeps its fp32 input and its output (needed for the weight's gradient); the q/k/v and the
        # gate/up projections share one saved input, down_proj keeps its own, o_proj reuses the SDPA output.
        norms = 2 * (4 + p) * sb * h
        linear_inputs = p * sb * (2 * h + shape.intermediate)
        per_layer = norms + attention + gated_mlp + linear_inputs
        outside = (4 + p) * sb * h + p * sb * h  # final norm, LM head input
    else:
        norms = 2 * 4 * sb * h  # frozen norm weights: only the fp32 input is kept
        per_layer = norms + attention + gated_mlp + _adapter_inputs(shape, sb, p, lora, mask_bytes, adapter_bytes)
        outside = 4 * sb * h
    logits_saved = 4 * sb * shape.vocab  # the fp32 log-softmax output of the loss
    # At the end of the forward pass the logits, their fp32 upcast and the log-softmax output coexist.
    logits_peak = sb * shape.vocab * (p + (4 if p < 4 else 0))
    mask = p * b * s * s  # the 4-D causal/padding mask SDPA receives
    if checkpointing:
        saved = shape.layers * p * sb * h + outside + logits_saved + mask
        return Activations(saved, logits_peak + per_layer)
    return Activations(shape.layers * per_layer + outside + logits_saved + mask, logits_peak)


def _adapter_inputs(shape: ModelShape, sb: int, p: int, lora: "LoraSpec | None", mask_bytes: int,
                    a: int = 4) -> float:
    """What one layer's adapters add: their inputs (in the adapter dtype, ``a`` bytes) and the r-wide inputs of
    the B matrices."""
    if lora is None:
        return 0.0
    names = [name for name in (LINEAR_NAMES if lora.target_modules == "all-linear" else lora.target_modules)
             if name in LINEAR_NAMES]
    width = {name: shape.linears()[name][0] for name in names}
    b_inputs = a * sb * lora.r * len(names)
    if lora.dropout > 0:
        # Each adapter keeps its own dropout output and mask.
        return sum((a + mask_bytes) * sb * w for w in width.values()) + b_inputs
    if p != a:
        # PEFT casts each adapter's input to the adapter dtype: one saved copy per adapter.
        return sum(a * sb * w for w in width.values()) + b_inputs
    # Same dtype: adapters share the tensors the layer already has (q/k/v one input, gate/up another, o_proj
    # reads the SDPA output); only down_proj's input is new, since the frozen base does not keep it.
    shared = 0
    if {"q_proj", "k_proj", "v_proj"} & set(names):
        shared += p * sb * shape.hidden
    if {"gate_proj", "up_proj"} & set(names):
        shared += p * sb * shape.hidden
    if "down_proj" in names:
        shared += p * sb * shape.intermediate
    return shared + b_inputs


# ── candidates ──────────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Hardware:
    gpus: int  # data-parallel degree: one process per GPU (or per CPU worker)
    nodes: int
    on_gpu: bool
    device_bytes: float | None = None  # memory of one GPU, or RAM per CPU worker
    cpu_bytes_per_node: float | None = None

    @property
    def gpus_per_node(self) -> int:
        return max(1, math.ceil(self.gpus / self.nodes))


@dataclass
class Candidate:
    name: str
    kind: str  # full | lora | qlora
    zero: dict | None
    weights: float
    gradients: float
    optimizer: float
    activations: float  # with the spec's gradient_checkpointing setting
    activations_no_checkpointing: float
    activations_checkpointing: float
    cpu_per_node: float | None
    fits: bool | None = None
    why_not: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total}


# Full candidates in order of preference: lower stage first, offload last (offload costs step time).
ZERO_CHOICES = (
    ("ZeRO-1", 1, False, False), ("ZeRO-2", 2, False, False), ("ZeRO-3", 3, False, False),
    ("ZeRO-2 + optimizer offload", 2, True, False), ("ZeRO-3 + optimizer offload", 3, True, False),
    ("ZeRO-3 + optimizer & param offload", 3, True, True),
)


# QLoRA with its 4-bit base partitioned, after DDP QLoRA (whose steps need no gathering): no offload first.
SHARDED_QLORA_CHOICES = (
    ("QLoRA + ZeRO-3", False, False), ("QLoRA + ZeRO-3 + optimizer offload", True, False),
    ("QLoRA + ZeRO-3 + optimizer & param offload", True, True),
)


def candidates(spec: "JobSpec", shape: ModelShape, hw: Hardware) -> list[Candidate]:
    """Every way to train this job's model on ``hw``, in the order `choose` prefers them."""
    out = [full_candidate(spec, shape, hw, stage, opt, par, name) for name, stage, opt, par in ZERO_CHOICES
           if hw.on_gpu or not (opt or par)]  # offloading to the RAM a CPU worker already uses gains nothing
    out += [adapter_candidate(spec, shape, hw, "lora"), adapter_candidate(spec, shape, hw, "qlora")]
    out += [sharded_qlora_candidate(spec, shape, hw, opt, par, name) for name, opt, par in SHARDED_QLORA_CHOICES
            if hw.on_gpu or not (opt or par)]
    for candidate in out:
        _judge(candidate, hw)
    return out


def full_candidate(spec, shape, hw, stage, offload_optimizer, offload_params, name=None) -> Candidate:
    weight_bytes = DTYPE_BYTES[spec.model.dtype]
    states = full_states(shape.total_params, shape.largest_layer_params, hw.gpus, hw.gpus_per_node, hw.nodes,
                         stage, offload_optimizer, offload_params, weight_bytes, load_bytes=weight_bytes)
    acts = _activations(spec, shape, hw, "full", weight_bytes, None)
    name = name or offload_name(f"ZeRO-{stage}", offload_optimizer, offload_params)
    zero = {"stage": stage, "offload_optimizer": offload_optimizer, "offload_params": offload_params}
    return _candidate(name, "full", zero, states, acts, spec, hw)


def adapter_candidate(spec, shape, hw, kind: str) -> Candidate:
    from tunerun.jobs.spec import LoraSpec, QuantizationSpec

    lora = spec.method.lora or LoraSpec()
    adapters = lora_params(shape, lora)
    if kind == "qlora":
        quant = spec.method.quantization or QuantizationSpec()
        base, stream = qlora_base_bytes(shape, quant.double_quant), 4
    else:
        base, stream = DTYPE_BYTES[spec.model.dtype] * shape.total_params, DTYPE_BYTES[spec.model.dtype]
    states = adapter_states(base, adapters, hw.gpus)
    if kind == "lora" and not hw.on_gpu:
        states = States(states.weights, states.gradients, states.optimizer, None)
    acts = _activations(spec, shape, hw, "adapters", stream, lora)
    name = "LoRA" if kind == "lora" else "QLoRA (4-bit)"
    return _candidate(name, kind, None, states, acts, spec, hw)


def sharded_qlora_candidate(spec, shape, hw, offload_optimizer: bool, offload_params: bool,
                            name: str | None = None) -> Candidate:
    from tunerun.jobs.spec import LoraSpec, QuantizationSpec

    lora = spec.method.lora or LoraSpec()
    quant = spec.method.quantization or QuantizationSpec()
    compute = DTYPE_BYTES[quant.compute_dtype]
    states = sharded_qlora_states(shape, lora_params(shape, lora), hw.gpus, hw.gpus_per_node, hw.nodes,
                                  quant.double_quant, compute, offload_optimizer, offload_params)
    acts = _activations(spec, shape, hw, "adapters", compute, lora, adapter_bytes=compute)
    name = name or offload_name("QLoRA + ZeRO-3", offload_optimizer, offload_params)
    zero = {"stage": 3, "offload_optimizer": offload_optimizer, "offload_params": offload_params}
    return _candidate(name, "qlora", zero, states, acts, spec, hw)


def offload_name(base: str, offload_optimizer: bool, offload_params: bool) -> str:
    """A ZeRO candidate's name as the choice tables spell it: 'ZeRO-3 + optimizer & param offload'."""
    offloaded = " & ".join(what for what, on in (("optimizer", offload_optimizer), ("param", offload_params)) if on)
    return f"{base} + {offloaded} offload" if offloaded else base


def _activations(spec, shape, hw, kind, stream, lora, adapter_bytes: int = 4) -> tuple[Activations, Activations]:
    mask = 1 if hw.on_gpu else 4  # CPU dropout keeps a float mask
    args = (shape, spec.data.max_seq_len, spec.training.micro_batch_size * sequences_per_example(spec), kind,
            stream, lora)
    return (activation_bytes(*args, checkpointing=False, mask_bytes=mask, adapter_bytes=adapter_bytes),
            activation_bytes(*args, checkpointing=True, mask_bytes=mask, adapter_bytes=adapter_bytes))


def sequences_per_example(spec: "JobSpec") -> int:
    """Sequences of one example whose activations autograd keeps, as the job's training objective says
    (`tunerun.trainer.objectives`, torch-free to import): 1 for supervised fine-tuning."""
    from tunerun.trainer.objectives import objective_for

    return objective_for(spec).activation_sequences


def _candidate(name, kind, zero, states: States, acts, spec, hw: Hardware) -> Candidate:
    plain, checkpointed = acts
    chosen = checkpointed if spec.training.gradient_checkpointing else plain
    candidate = Candidate(name, kind, zero, states.weights, states.gradients, states.optimizer, chosen.total,
                          plain.total, checkpointed.total, states.cpu_per_node)
    if not hw.on_gpu:
        # A CPU worker's "device" is the node's RAM: what each node needs is every worker's share.
        candidate.cpu_per_node = candidate.total * hw.gpus_per_node + (states.cpu_per_node or 0)
    return candidate


def _judge(candidate: Candidate, hw: Hardware) -> None:
    if hw.device_bytes is None:
        return
    reasons = []
    if candidate.total > hw.device_bytes * (1 - HEADROOM):
        reasons.append(f"{gib(candidate.total)} per {'GPU' if hw.on_gpu else 'worker'}")
    if hw.on_gpu and hw.cpu_bytes_per_node is not None and candidate.cpu_per_node:
        if candidate.cpu_per_node > hw.cpu_bytes_per_node * (1 - HEADROOM):
            reasons.append(f"{gib(candidate.cpu_per_node)} RAM per node")
    candidate.fits = not reasons
    candidate.why_not = "needs " + " and ".join(reasons) if reasons else ""


def choose(options: list[Candidate]) -> Candidate | None:
    """The cheapest candidate that fits with headroom: full ZeRO (lowest stage, no offload first), else LoRA,
    else QLoRA under DDP, else QLoRA under ZeRO-3. `candidates` already lists them in that order."""
    return next((c for c in options if c.fits), None)


# ── the job's view ──────────────────────────────────────────────────────────────────────────────────────────

def hardware_for(spec: "JobSpec", gpus: int | None = None, gpu_memory: float | None = None,
                 cpu_memory: float | None = None) -> Hardware:
    """The spec's resources (overridable): GPUs = nodes × workers_per_node × gpus_per_worker; a CPU spec's
    workers share the node's RAM (``resources.cpu_memory_gb``, else this machine's)."""
    r = spec.resources
    on_gpu = r.gpus_per_worker > 0
    count = gpus or (r.num_workers * r.gpus_per_worker if on_gpu else r.num_workers)
    node_ram = cpu_memory or (r.cpu_memory_gb * GB if r.cpu_memory_gb else None)
    if on_gpu:
        device = gpu_memory or (r.gpu_memory_gb * GB if r.gpu_memory_gb else None)
    else:
        node_ram = node_ram or machine_ram()
        device = node_ram / max(1, math.ceil(count / r.nodes)) if node_ram else None
    return Hardware(gpus=count, nodes=min(r.nodes, count), on_gpu=on_gpu, device_bytes=device,
                    cpu_bytes_per_node=node_ram)


def machine_ram() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class MemoryPlan:
    shape: ModelShape
    hardware: Hardware
    candidates: list[Candidate] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "model": {**asdict(self.shape), "total_params": self.shape.total_params,
                      "largest_layer_params": self.shape.largest_layer_params},
            "hardware": {**asdict(self.hardware), "gpus_per_node": self.hardware.gpus_per_node},
            "headroom": HEADROOM,
            "units": "bytes",
            "candidates": [c.to_json() for c in self.candidates],
        }


def plan_memory(spec: "JobSpec", hw: Hardware | None = None) -> MemoryPlan:
    shape = ModelShape.load(spec.model.path)
    hw = hw or hardware_for(spec)
    return MemoryPlan(shape, hw, candidates(spec, shape, hw))


def estimate_for_spec(spec: "JobSpec", hw: Hardware | None = None) -> Candidate:
    """The planner's figure for the method the (resolved) spec actually runs."""
    shape = ModelShape.load(spec.model.path)
    hw = hw or hardware_for(spec)
    kind = spec.method.kind
    if kind == "full":
        zero = spec.method.zero
        candidate = full_candidate(spec, shape, hw, zero.stage, zero.offload_optimizer, zero.offload_params)
    elif spec.method.sharded_qlora:
        zero = spec.method.zero
        candidate = sharded_qlora_candidate(spec, shape, hw, zero.offload_optimizer, zero.offload_params)
    elif kind in ("lora", "qlora"):
        candidate = adapter_candidate(spec, shape, hw, kind)
    else:
        raise MemoryPlanError(f"method {kind!r} has no single estimate; resolve the job first")
    _judge(candidate, hw)
    return candidate


def offload_ram_problem(spec: "JobSpec", node_ram: float | None) -> str | None:
    """Why a node with ``node_ram`` bytes cannot hold what the (resolved) spec offloads to CPU memory; None when
    it can, when nothing is offloaded, or when the model cannot be sized (the planner says why elsewhere)."""
    zero = spec.method.zero
    if zero is None or not (zero.offload_optimizer or zero.offload_params) or not node_ram:
        return None
    try:
        candidate = estimate_for_spec(spec, hardware_for(spec, cpu_memory=node_ram))
    except (MemoryPlanError, OSError, ValueError):
        return None
    usable = node_ram * (1 - HEADROOM)
    if not candidate.cpu_per_node or candidate.cpu_per_node <= usable:
        return None
    offloaded = " and ".join(name for name, on in (("the parameters", zero.offload_params),
                                                    ("the optimizer states", zero.offload_optimizer)) if on)
    return (f"{candidate.name} puts {offloaded} in CPU memory: ~{gib(candidate.cpu_per_node)} of RAM per node, "
            f"but a node has {gib(node_ram)} ({gib(usable)} less {HEADROOM:.0%} headroom). Turn offload off, "
            "spread the job over more nodes, or run on nodes with more RAM (see `tunerun plan`)")


def budget(hw: Hardware) -> str:
    """What a candidate must fit in, e.g. '68.0 GiB per GPU (80.0 GiB less 15% headroom) on 8 GPUs'."""
    unit = "GPU" if hw.on_gpu else "CPU worker"
    text = (f"{gib(hw.device_bytes * (1 - HEADROOM))} per {unit} ({gib(hw.device_bytes)} less {HEADROOM:.0%} "
            f"headroom) on {hw.gpus} {unit}{'s' if hw.gpus != 1 else ''}")
    if hw.on_gpu and hw.cpu_bytes_per_node:
        text += f", {gib(hw.cpu_bytes_per_node * (1 - HEADROOM))} RAM per node"
    return text


def explain_choice(chosen: Candidate, options: list[Candidate], hw: Hardware) -> str:
    """One line a user reads: what was picked, its numbers, and why the cheaper ones were passed over."""
    passed = [f"{c.name} {c.why_not}" for c in options[:options.index(chosen)]]
    text = f"auto chose {chosen.name}: ~{gib(chosen.total)} of {budget(hw)}"
    return text + (f"; passed over: {'; '.join(passed)}" if passed else "")


def explain_refusal(options: list[Candidate], hw: Hardware) -> str:
    needs = "; ".join(f"{c.name} {c.why_not}" for c in options)
    return (f"auto: no method fits {budget(hw)} — {needs}. Add GPUs, lower data.max_seq_len or "
            "training.micro_batch_size, or turn on training.gradient_checkpointing")


def gib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / GiB:,.1f} GiB" if value >= 0.1 * GiB else f"{value / 2**20:,.1f} MiB"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> float:
    """'80GiB' → bytes; 'GB'/'G' are powers of ten, 'GiB' powers of two; a bare number means GB."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GiB or 80GB")
    number, unit = float(match.group(1)), (match.group(2) or "gb").lower()
    if unit == "b":
        return number
    power = "kmgt".index(unit[0]) + 1
    return number * ((1024 if "i" in unit else 1000) ** power)
