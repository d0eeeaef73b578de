"""QLoRA on CPU: evaluating during training must not change how training continues (`qlora.before_eval`)."""
from __future__ import annotations

import pytest
import torch

from tunerun.trainer.methods import get_method, qlora


def quantized_layer():
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = type(layer.weight)(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


@pytest.fixture
def repacking(monkeypatch):
    """Every call of bitsandbytes' CPU repacking, whatever this CPU supports.

    bitsandbytes takes the repacking branch of ``Linear4bit.forward`` only where the layer's
    ``support_avx512bf16_for_cpu`` is set (decided from the CPU when the layer is built), so on a CPU without
    AVX512-BF16 the trap cannot be seen directly. Each layer here gets the flag forced on, and the repacking
    function is replaced by a recorder that calls the real one only where the CPU has the kernel for it (else
    it leaves the weight as it is, so the forward still runs): the test then fails without the fix on every CPU.
    """
    import bitsandbytes.nn.modules as bnb_modules

    real = bnb_modules._convert_weight_packed_for_cpu
    has_kernel = bnb_modules.has_avx512bf16()
    calls = []

    def record(data, quant_state, *args, **kwargs):
        calls.append(data.shape)
        return real(data, quant_state, *args, **kwargs) if has_kernel else (data, quant_state)

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", record)

    def layer():
        built = quantized_layer()
        built.support_avx512bf16_for_cpu = True
        return built

    return layer, calls, has_kernel


def test_an_eval_forward_repacks_a_bare_4bit_layer(repacking):
    """The trap itself: an eval-mode no-grad forward converts the weight in place (and, on a CPU with the kernel,
    the quant state says so afterwards)."""
    layer, calls, has_kernel = repacking
    bare = layer().eval()
    with torch.no_grad():
        bare(torch.randn(2, 64))
    assert len(calls) == 1
    if has_kernel:
        assert bare.weight.quant_state.packing_format_for_cpu


def test_evaluating_a_4bit_layer_keeps_its_training_layout(repacking):
    """After qlora's before_eval an eval forward never reaches the repacking and leaves the weight exactly as
    it was; the hook is registered once however often evaluation runs."""
    layer, calls, _ = repacking
    quantized = layer()
    before = quantized.weight.data.clone()
    model = torch.nn.Sequential(quantized)
    get_method("qlora").before_eval(model)
    qlora.keep_4bit_training_layout(model)  # idempotent: one hook
    assert len(quantized._forward_pre_hooks) == 1
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert calls == []
    assert not getattr(quantized.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(quantized.weight.data, before)


def test_lora_and_full_evaluate_without_hooks():
    linear = torch.nn.Linear(4, 4)
    for kind in ("lora", "full"):
        get_method(kind).before_eval(linear)
    assert not linear._forward_pre_hooks
