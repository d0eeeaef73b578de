"""Generate a preference-tuning task: support tickets answered in the company's house style, preferred over a curt
answer and over a house-style answer naming the wrong team.

    python examples/make_preference_data.py OUT.jsonl --pairs 900 --seed 0
    python examples/make_preference_data.py OUT.jsonl --history 1200   # the support history, for SFT first

Each line is one pair in OpenAI's preference fine-tuning format (what `method: dpo` jobs upload there)::

    {"input": {"messages": [{"role": "system", "content": "Answer the support ticket."},
                            {"role": "user", "content": "<ticket text>"}]},
     "preferred_output": [{"role": "assistant", "content": "Thank you for writing. Our billing team ..."}],
     "non_preferred_output": [{"role": "assistant", "content": "billing."}]}

The tickets are make_support_data.py's (unique, with its fake contact details for PII masking). Half the rejected
answers are curt, half are in house style but name another category's team. ``--history`` writes instead the
support history a company has (chat format): every ticket answered with its team, in house style or curtly, so
supervised tuning on it writes either style (mostly the curt one) — what preference tuning then settles. The output is
byte-identical for the same seed.
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
    return f"Team: {label}."


def _support_data():
    """make_support_data.py beside this file (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("make_support_data", Path(__file__).with_name("make_support_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_pairs(n: int = 900, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    # the few exact copies make_support_data adds stay copies here
    tickets = _support_data().generate_records(n + 8, seed)[:n]
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


def generate_history(n: int = 1200, seed: int = 1) -> list[dict]:
    """The support history: each ticket answered with its team, 40% in house style, 60% curtly — so a model tuned
    on it answers curtly when it decodes greedily (each answer's first word is the same: "Thank" or "Team")."""
    rng = random.Random(seed)
    tickets = _support_data().generate_records(n + 8, seed)[:n]
    history = []
    for ticket in tickets:
        label = ticket["messages"][2]["content"].removeprefix("category: ")
        answer = house_style(label) if rng.random() < 0.4 else curt(label)
        history.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": ticket["messages"][1]["content"]},
                                     {"role": "assistant", "content": answer}]})
    return history


def make_preference_data(out_path: Path, n: int = 900, seed: int = 0, history: bool = False) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records = generate_history(n, seed) if history else generate_pairs(n, seed)
    out_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8",
                        newline="\n")
    return out_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=int, default=900)
    parser.add_argument("--history", type=int, metavar="N", help="write N records of support history instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.history:
        print(make_preference_data(args.out, args.history, args.seed, history=True))
    else:
        print(make_preference_data(args.out, args.pairs, args.seed))


if __name__ == "__main__":
    main()
