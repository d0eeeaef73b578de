"""One registry of methods; each module answers the whole `Method` contract, so nothing outside it compares
``method.kind`` with a name."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunerun.trainer.methods import METHODS, Method, get_method


@pytest.mark.parametrize("kind", METHODS)
def test_every_method_answers_the_contract(kind):
    method = get_method(kind)
    assert isinstance(method, Method)
    assert method.ADAPTER == (kind != "full")
    assert method.FINAL_DIR == ("adapter" if method.ADAPTER else "model")


def test_names_people_read_and_an_unknown_kind():
    assert [get_method(k).NAME for k in ("full", "lora", "qlora")] == ["full fine-tuning", "LoRA", "QLoRA"]
    with pytest.raises(ValueError, match="unknown method 'auto'"):
        get_method("auto")  # the planner resolves auto before anything trains


@pytest.mark.parametrize("method,module,sharded", [
    ({"kind": "qlora"}, "qlora", False),
    ({"kind": "qlora", "zero": {"stage": 3}}, "qlora_zero3", True),
    ({"kind": "full", "zero": {"stage": 2}}, "full", True),
    ({"kind": "lora"}, "lora", False),
])
def test_the_resolved_method_picks_its_module(tmp_path, method, module, sharded):
    """A qlora spec with a zero block trains under ZeRO-3; without one, under DDP: what method_for decides and what
    entrypoint's world-size check (SHARDED_STATE) reads."""
    from tunerun.jobs.plan import resolve
    from tunerun.jobs.spec import JobSpec
    from tunerun.trainer.methods import method_for

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    spec = JobSpec.model_validate({"model": {"path": str(tmp_path / "m")}, "method": method,
                                   "data": {"train": str(tmp_path / "train.jsonl")}})
    chosen = method_for(resolve(spec).spec.method)
    assert chosen.__name__ == f"tunerun.trainer.methods.{module}" and isinstance(chosen, Method)
    assert chosen.SHARDED_STATE == sharded and chosen.ADAPTER == (method["kind"] != "full")


@pytest.mark.parametrize("kind,loaded", [("lora", False), ("full", False), ("qlora", True)])
def test_a_worker_imports_bitsandbytes_only_for_a_method_that_quantizes(kind, loaded):
    """What a Ray Train worker does before it loads its method (a fresh process: sys.modules is changed)."""
    script = ("import sys; from tunerun.jobs.spec import MethodSpec\n"
              "from tunerun.trainer.methods import get_method, skip_quantization_imports\n"
              f"skip_quantization_imports(MethodSpec(kind={kind!r})); get_method({kind!r}); import peft\n"
              "from transformers.utils.import_utils import is_bitsandbytes_available\n"
              "print(sys.modules.get('bitsandbytes') is not None, is_bitsandbytes_available())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}).stdout.split()
    assert out == [str(loaded), str(loaded)]
