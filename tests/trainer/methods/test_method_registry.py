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
