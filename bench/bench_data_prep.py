"""Data preparation throughput: tunerun's pipeline against a plain `datasets.map` tokenization, same process.

    python bench/bench_data_prep.py                       # 100k synthetic chat records
    python bench/bench_data_prep.py --records 20000 --workers 2
    python bench/bench_data_prep.py --records 20000 --ner  # also with the NER pass (data.clean.ner) on

Both sides read the same JSONL file and turn every record into token ids with the same tokenizer (the tiny
SentencePiece model `examples/make_tiny_model.py` builds, nothing from a hub). The baseline only renders
and tokenizes: ``datasets.load_dataset("json")`` + ``Dataset.map(batched=True)``, which is the least any
preparation has to do. tunerun also validates, normalises, masks PII, deduplicates (exact, normalised,
MinHash), computes loss masks, splits and writes train/eval files, so the ratio is the price of that work.

``--ner`` adds a third run with ``data.clean.ner`` on: Presidio over the tiny spaCy pipeline that
`examples/make_tiny_ner.py` trains here (no model download), and reports the share of that run's wall time
spent inside the NER pass. The tiny pipeline (a blank English tokenizer and a small NER model) is far cheaper
per text than ``en_core_web_lg`` (word vectors, tagger, parser): the figure is a lower bound of NER's cost.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("order invoice refund login password account delivery courier tracking package printer update crash "
         "screen battery charge subscription plan upgrade cancel renew payment card declined billed twice "
         "weekend morning yesterday urgent please thanks hello team support manager replacement warranty").split()
LABELS = ["billing", "login", "shipping", "bug", "account", "refund"]


def make_records(path: Path, n: int, seed: int = 0) -> Path:
    """Chat records of 20–80 words with a system prompt; 2% exact copies and some contact details."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        previous = []
        for i in range(n):
            if previous and rng.random() < 0.02:
                handle.write(rng.choice(previous))
                continue
            words = [rng.choice(WORDS) for _ in range(rng.randint(20, 80))]
            if rng.random() < 0.1:
                phone = f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
                words.append(f"mail me at user{i}@example.com or call {phone}")
            record = {"messages": [{"role": "system", "content": "Classify the support ticket."},
                                   {"role": "user", "content": f"Ticket {i}: " + " ".join(words)},
                                   {"role": "assistant", "content": f"category: {rng.choice(LABELS)}"}]}
            line = json.dumps(record) + "\n"
            previous = (previous + [line])[-100:]
            handle.write(line)
    return path


def baseline(path: Path, tokenizer, cache: Path) -> int:
    """Render with the same default template and tokenize: datasets' JSON loader + a batched map."""
    import datasets

    datasets.disable_progress_bars()
    eos = tokenizer.eos_token

    def tokenize(batch):
        texts = ["".join(f"<|{m['role']}|>\n{m['content']}" + (eos if m["role"] == "assistant" else "") + "\n"
                         for m in messages) for messages in batch["messages"]]
        return tokenizer(texts)

    data = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names)
    return len(tokenized)


def tunerun_prepare(path: Path, tokenizer, out: Path, ner: dict | None = None) -> int:
    from tunerun.jobs.spec import DataSpec
    from tunerun.trainer.data.pipeline import prepare_files

    spec = DataSpec(train=str(path), max_seq_len=512, clean={"ner": ner})
    report = prepare_files(spec, tokenizer, seed=0, out_dir=out)
    return report.records_read


class NerClock:
    """Wall seconds spent inside `EntityMasker.mask` (the NER pass: spaCy via Presidio, then the anonymizer)."""

    def __init__(self):
        from tunerun.trainer.data.ner import EntityMasker

        self.seconds, original = 0.0, EntityMasker.mask

        def mask(masker, texts, counts):
            started = time.perf_counter()
            try:
                return original(masker, texts, counts)
            finally:
                self.seconds += time.perf_counter() - started

        EntityMasker.mask = mask


def install_tiny_ner(root: Path) -> str:
    """Train and install the tiny pipeline; its folder goes on sys.path (and PYTHONPATH, for worker processes)."""
    from make_tiny_ner import PACKAGE, make_tiny_ner

    site = str(make_tiny_ner(root))
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    return PACKAGE


def cpu_seconds() -> float:
    """CPU time of this process (tokenizer threads included) and of finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(label: str, fn, *args) -> tuple[float, float]:
    """records/s over wall time, and over CPU time: on a shared machine the second one is the steadier."""
    started, cpu = time.perf_counter(), cpu_seconds()
    n = fn(*args)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    print(f"{label:<38} {n:>7} records  {seconds:6.1f} s wall {n / seconds:8,.0f} records/s  "
          f"{cpu:6.1f} s CPU {n / cpu:8,.0f} records/CPU-s", flush=True)
    return n / seconds, n / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--ner", action="store_true", help="also run with data.clean.ner on (tiny spaCy pipeline)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tunerun's data worker processes (default: TUNERUN_DATA_WORKERS or automatic)")
    args = parser.parse_args()
    if args.workers is not None:
        os.environ["TUNERUN_DATA_WORKERS"] = str(args.workers)
    sys.path.insert(0, str(REPO / "examples"))
    from make_tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        model = REPO / "models" / "tiny-llama"
        if not (model / "tokenizer.json").is_file() and not (model / "tokenizer.model").is_file():
            model = make_tiny_model(tmp / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(model)
        data = make_records(tmp / "chat.jsonl", args.records)
        print(f"{args.records:,} chat records ({data.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} cores, "
              f"TUNERUN_DATA_WORKERS={os.environ.get('TUNERUN_DATA_WORKERS', 'auto')}")
        base = timed("datasets.map tokenization (baseline)", baseline, data, tokenizer, tmp / "hf-cache")
        ours = timed("tunerun prepare (full pipeline)", tunerun_prepare, data, tokenizer, tmp / "out")
        print(f"ratio tunerun / baseline: {ours[0] / base[0]:.2f} (wall), {ours[1] / base[1]:.2f} (CPU)")
        if args.ner:
            package, clock = install_tiny_ner(tmp / "tiny-ner"), NerClock()
            started = time.perf_counter()
            with_ner = timed("tunerun prepare, NER on (tiny spaCy)", tunerun_prepare, data, tokenizer, tmp / "ner",
                             {"model": package})
            share = clock.seconds / (time.perf_counter() - started)
            print(f"ratio NER on / baseline: {with_ner[0] / base[0]:.2f} (wall), {with_ner[1] / base[1]:.2f} (CPU); "
                  f"NER on / off: {with_ner[0] / ours[0]:.2f}; share of the NER run's wall time in NER: {share:.0%}")


if __name__ == "__main__":
    main()
