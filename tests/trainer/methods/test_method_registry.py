"""One registry of methods; each module answers the whole `Method` contract, so nothing outside it compares
``method.kind`` with a name."""
from __future__ import annotations

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
