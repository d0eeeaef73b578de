"""Generate a preference-tuning task: support tickets answered in the company's house style, preferred over a curt
answer and over a house-style answer naming the wrong team.

    python examples/make_preference_data.py OUT.jsonl --pairs 900 --seed 0

Each line is one pair in OpenAI's preference fine-tuning format (what `method: dpo` jobs upload there)::

    {"input": {"messages": [{"role": "system", "content": "Answer the support ticket."},
                            {"role": "user", "content": "<ticket text>"}]},
     "preferred_output": [{"role": "assistant", "content": "Thank you for writing. Our billing team ..."}],
     "non_preferred_output": [{"role": "assistant", "content": "billing."}]}

The tickets are make_support_data.py's (unique, with its fake contact details for PII masking). Half the rejected
answers are curt (what the support history also holds, so supervised tuning alone writes either style), half are
in house style but name another category's team. The output is byte-identical for the same seed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

SYSTEM_PROMPT = "Answer the support ticket."


def house_style(label: str) -> str:
    return f"Thank you for writing. Our {label} team will answer you today."


def curt(label: str) -> str:
    return f"{label}."


def _support_data():
    """make_support_data.py beside this file (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("make_support_data", Path(__file__).with_name("make_support_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_pairs(n: int = 900, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tickets = _support_data().generate_records(n + 8, seed)[:n]  # the few exact copies make_support_data adds stay copies here
    labels = sorted({t["messages"][2]["content"].removeprefix("category: ") for t in tickets})
    pairs = []
    for ticket in tickets:
        label = ticket["messages"][2]["content"].removeprefix("category: ")
        wrong = rng.choice([other for other in labels if other != label])
        rejected = curt(label) if rng.random() < 0.5 else house_style(wrong)
        pairs.append({"input": {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": ticket["messages"][1]["content"]}]},
                      "preferred_output": [{"role": "assistant", "content": house_style(label)}],
                      "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return pairs


def make_preference_data(out_path: Path, n: int = 900, seed: int = 0) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in generate_pairs(n, seed)),
                        encoding="utf-8", newline="\n")
    return out_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_preference_data(args.out, args.pairs, args.seed))


if __name__ == "__main__":
    main()
