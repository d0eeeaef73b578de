"""Data preparation throughput: tunerun's pipeline against a plain `datasets.map` tokenization on every core.

    python bench/bench_data_prep.py                       # 100k synthetic chat records
    python bench/bench_data_prep.py --quick               # 3,000 records: a smoke run of a few seconds
    python bench/bench_data_prep.py --records 20000 --workers 2
    python bench/bench_data_prep.py --records 20000 --ner  # also with the NER pass (data.clean.ner) on

Both sides read the same JSONL file and turn every record into token ids with the same tokenizer (the tiny
SentencePiece model `examples/make_tiny_model.py` builds, nothing from a hub). The baseline only renders
and tokenizes: ``datasets.load_dataset("json")`` + ``Dataset.map(batched=True, num_proc=<cores>)``, which is
the least any preparation has to do, on all cores; the same map in one process is printed too. tunerun also
validates, normalises, masks PII, deduplicates (exact, normalised, MinHash), computes loss masks, splits and
writes train/eval files, so the ratio is the price of that work. Each side's peak memory is the largest sum of
the resident memory of this process and its children while it ran, above what this process held before.

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
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("order invoice refund login password account delivery courier tracking package printer update crash "
         "screen battery charge subscription plan upgrade cancel renew payment card declined billed twice "
         "weekend morning yesterday urgent please thanks hello team support manager replacement warranty").split()
LABELS = ["billing", "login", "shipping", "bug", "account", "refund"]
QUICK_RECORDS = 3_000


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


def baseline(path: Path, tokenizer, cache: Path, num_proc: int | None) -> int:
    """Render with the same default template and tokenize: datasets' JSON loader + a batched map over
    ``num_proc`` processes (None: this one). A cache folder of its own per call: a second load of the same
    file from a warm cache would skip the JSON parsing."""
    import datasets

    datasets.disable_progress_bars()
    eos = tokenizer.eos_token

    def tokenize(batch):
        texts = ["".join(f"<|{m['role']}|>\n{m['content']}" + (eos if m["role"] == "assistant" else "") + "\n"
                         for m in messages) for messages in batch["messages"]]
        return tokenizer(texts)

    data = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names, num_proc=num_proc)
    return len(tokenized)


def tunerun_prepare(path: Path, tokenizer, out: Path, ner: dict | None = None) -> int:
    from tunerun.jobs.spec import DataSpec
    from tunerun.trainer.data.pipeline import prepare_files

    spec = DataSpec(train=str(path), max_seq_len=512, clean={"ner": ner})
    report = prepare_files(spec, tokenizer, seed=0, out_dir=out)
    return report.records_read


class NerClock:
    """Wall seconds spent inside `EntityMasker.mask` (the NER pass: spaCy via Presidio, then the anonymizer) in this
    process, i.e. when tunerun prepares without worker processes."""

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


class Usage:
    """CPU seconds and peak memory of this process and every process below it (datasets' map workers, tunerun's
    data workers, which a fork server starts and so are not this process's children), while the block runs.
    Descendants are sampled every 0.2 s: their last CPU reading counts, and memory is their proportional set size
    (shared pages split between the processes sharing them, where fork children would each count them whole),
    summed, above what all of them held when the block began."""

    def __init__(self):
        import psutil  # comes with ray[default]

        self.me, self.done = psutil.Process(), threading.Event()
        self.cpu_seen: dict[int, float] = {}
        self.peak = 0

    def _descendants(self) -> list:
        return [self.me, *self.me.children(recursive=True)]

    def _sample(self) -> int:
        memory = 0
        for process in self._descendants():
            try:
                times = process.cpu_times()
                info = process.memory_full_info()
            except Exception:  # noqa: BLE001 - a worker that just ended
                continue
            if process.pid != self.me.pid:
                self.cpu_seen[process.pid] = times.user + times.system
            memory += getattr(info, "pss", info.rss)
        return memory

    def __enter__(self):
        self.memory_before = self._sample()
        self.cpu_before, self.own_before = dict(self.cpu_seen), time.process_time()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, self._sample() - self.memory_before)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._sample() - self.memory_before)
        self.cpu = time.process_time() - self.own_before + sum(
            seconds - self.cpu_before.get(pid, 0.0) for pid, seconds in self.cpu_seen.items())


def timed(label: str, fn, *args) -> tuple[float, float]:
    """records/s over wall time, and over CPU time: on a shared machine the second one is the steadier."""
    started = time.perf_counter()
    with Usage() as usage:
        n = fn(*args)
    seconds, cpu = time.perf_counter() - started, usage.cpu
    print(f"{label:<44} {n:>7} records  {seconds:6.1f} s wall {n / seconds:8,.0f} records/s  "
          f"{cpu:6.1f} s CPU {n / cpu:8,.0f} records/CPU-s  peak +{usage.peak / 2**20:,.0f} MB", flush=True)
    return n / seconds, n / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="3,000 records: a smoke run (CI), not a measurement")
    parser.add_argument("--ner", action="store_true", help="also run with data.clean.ner on (tiny spaCy pipeline)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tunerun's data worker processes (default: TUNERUN_DATA_WORKERS or automatic)")
    args = parser.parse_args()
    records = QUICK_RECORDS if args.quick else args.records
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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
        data = make_records(tmp / "chat.jsonl", records)
        print(f"{records:,} chat records ({data.stat().st_size / 1e6:.1f} MB), {cores} cores, "
              f"TUNERUN_DATA_WORKERS={os.environ.get('TUNERUN_DATA_WORKERS', 'auto')}, load {os.getloadavg()[0]:.1f}")
        base = timed(f"datasets.map(num_proc={cores}) (baseline)", baseline, data, tokenizer, tmp / "hf-n", cores)
        one = timed("datasets.map, one process", baseline, data, tokenizer, tmp / "hf-1", None)
        ours = timed("tunerun prepare (full pipeline)", tunerun_prepare, data, tokenizer, tmp / "out")
        print(f"ratio tunerun / datasets.map(num_proc={cores}): {ours[0] / base[0]:.2f} (wall), "
              f"{ours[1] / base[1]:.2f} (CPU); / one process: {ours[0] / one[0]:.2f} (wall), "
              f"{ours[1] / one[1]:.2f} (CPU); load {os.getloadavg()[0]:.1f}")
        if args.ner:
            package, clock = install_tiny_ner(tmp / "tiny-ner"), NerClock()
            started = time.perf_counter()
            with_ner = timed("tunerun prepare, NER on (tiny spaCy)", tunerun_prepare, data, tokenizer, tmp / "ner",
                             {"model": package})
            share = clock.seconds / (time.perf_counter() - started)
            # The clock only sees this process: with worker processes, NER runs where it cannot look.
            share = f"{share:.0%}" if clock.seconds else "measured with --workers 0 only"
            print(f"ratio NER on / datasets.map(num_proc={cores}): {with_ner[0] / base[0]:.2f} (wall), "
                  f"{with_ner[1] / base[1]:.2f} (CPU); NER on / off: {with_ner[0] / ours[0]:.2f}; "
                  f"share of the NER run's wall time in NER: {share}")


if __name__ == "__main__":
    main()
