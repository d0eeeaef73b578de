"""The spec's ``data`` section → tokenized training and evaluation examples, with a report of what happened.

Pipeline, in order (each step counted in `DataReport`):

1. **read** ``data.train`` (`read`: JSONL, JSON arrays, Parquet, CSV; ``data.columns`` renames fields).
   A record that is not JSON or has the wrong shape is *malformed*; above ``clean.max_bad_fraction`` of
   them the set is refused. ``data.format: auto`` detects the format per file; one file holds one format.
2. **normalise** every record to a conversation (`formats`) and **clean** it (`clean`): NFKC and
   whitespace (``clean.normalize``), PII masking (``clean.pii``, ``clean.pii_patterns``); records with
   nothing to train on are *empty*.
3. **dedup**: exact copies (``clean.dedup``), copies up to case/punctuation/spacing (*near_duplicates*) and
   MinHash look-alikes at ``clean.near_dedup_threshold`` (*fuzzy_duplicates*), both under
   ``clean.near_dedup``. The first copy is kept.
4. **render and tokenize**, then **length**: longer than ``data.max_seq_len`` is truncated or dropped
   (``data.too_long``); a truncated example left without any trained token is dropped too. What a record
   becomes is the training objective's choice (`tunerun.trainer.objectives`: its `render`, `encode` and `fit`);
   supervised fine-tuning renders and masks with `render`.
5. **split**: ``data.eval`` read and cleaned the same way, or a seeded shuffle that sets aside
   ``max(1, round(n * eval_fraction))`` examples. *contaminated_eval* counts eval examples that are near or
   fuzzy copies of a training example (reported, not removed).
6. **pack** (``data.packing``, where the objective `packs`): training examples share rows of ``max_seq_len``
   tokens, each with position ids from 0, which keeps attention inside each example (see `pack`).

Steps 1–4 run on chunks of records, in worker processes for large inputs (`data_workers`; the first chunks here,
while the workers start): everything per record happens there, MinHash signatures, the length fit and the
example's JSON line included. This process only decides, in input order, which records are copies of earlier
ones, and writes the lines it keeps; so the prepared files and the report do not depend on the number of workers.
Examples stream to disk as they are made: memory holds the dedup keys, not the tokens (measured on 100k chat
records: +60 MB with MinHash off, +170 MB with it, whatever the token count), plus at most two chunks per worker
in flight.

torch is imported only by `collate`: preparing data does not need it.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import random
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from tunerun.cluster.run_folder import EVAL_FILE, TRAIN_FILE
from tunerun.jobs.errors import DataError
from tunerun.jobs.spec import RULE_ENTITIES
from tunerun.trainer.data.clean import (IBAN_CHECKSUM_FAILED, FuzzyIndex, band_keys_of, custom_rules, digest,
                                      exact_key, mask_custom, mask_pii, minhash_signatures, near_key, near_text,
                                      normalize_text)
from tunerun.trainer.data.names import mask_names
from tunerun.trainer.data.formats import (PREFERENCE_FORMATS, Conversation, detect_format, to_conversation,
                                          trainable)
from tunerun.trainer.data.pack import ExampleWriter, Packer, example_line, load_examples
from tunerun.jobs.data_files import resolve_files
from tunerun.trainer.data.read import JsonLine, parse_line, read_records
from tunerun.trainer.data.report import steps
from tunerun.trainer.objectives import DEFAULT, get_objective

if TYPE_CHECKING:
    from tunerun.jobs.spec import CleanSpec, DataSpec
    from tunerun.trainer.objectives import Objective

MAX_MALFORMED_EXAMPLES = 20
CHUNK_RECORDS = 512
PARALLEL_MIN_BYTES = 16 << 20  # below this, starting worker processes costs more than it saves
MAX_DATA_WORKERS = 32  # each holds its own tokenizer (and spaCy pipeline under data.clean.ner)
CLEANED_TEXTS, CLEANED_TEXT_CHARS = 2048, 4096  # `_clean_text`'s memory: ~16 MB per process of ASCII text


@dataclass
class DataReport:
    """What preparing the data did; ``dataclasses.asdict`` of it is written as data_report.json."""

    files: list[str] = field(default_factory=list)  # training files, then evaluation files
    format: str = ""  # of the training set; "chat, alpaca" when its files differ
    records_read: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)  # "file:line: why", the first 20
    empty: int = 0
    equal_answers: int = 0  # preference pairs whose answers are the same after cleaning
    duplicates: int = 0
    near_duplicates: int = 0
    fuzzy_duplicates: int = 0
    too_long_dropped: int = 0  # data.too_long: drop, or truncation left no trained token
    truncated: int = 0  # cut to max_seq_len and kept
    pii_masked: dict[str, int] = field(default_factory=dict)  # counts only, never the values
    train_records: int = 0
    eval_records: int = 0
    contaminated_eval: int = 0
    packed_rows: int = 0  # training rows when data.packing is on
    packing_efficiency: float = 0.0  # real tokens / (rows × max_seq_len)
    token_lengths: dict[str, float] = field(default_factory=dict)  # min, mean, p50, p95, max of kept examples
    length_histogram: dict[str, list] = field(default_factory=dict)  # {"edges": [...], "counts": [...]}

    def steps(self) -> list[tuple[str, int]]:
        """(step, records it removed) in pipeline order; what is left after the last is kept."""
        return steps(dataclasses.asdict(self))


@dataclass
class PreparedData:
    train: list[dict]  # the objective's examples; sft: {"input_ids", "labels"[, "position_ids"]}, -100: no loss
    eval: list[dict]
    report: DataReport


# ---------------------------------------------------------------- one chunk of records (may run in a worker)


@dataclass
class _Context:
    format: str | None  # None: detect per record
    clean: CleanSpec
    tokenizer: object
    pii_rules: list = field(default_factory=list)
    objective: Objective | None = None  # what a record becomes; None only where nothing is tokenized
    max_seq_len: int | None = None  # data.max_seq_len and data.too_long: where examples are fitted to length
    too_long: str = "drop"
    # Texts cleaned lately (`_clean_text`): system prompts and short answers repeat across a set, by design.
    cleaned: dict[str, tuple[str, tuple]] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property  # asked for every text: not worth recomputing
    def rule_kinds(self) -> frozenset[str]:
        """The report kinds (lower case) of data.clean.pii_entities that tunerun's rule-based passes find."""
        return frozenset(e.lower() for e in self.clean.pii_entities if e in RULE_ENTITIES)

    @property
    def ner_entities(self) -> tuple[str, ...]:
        """The Presidio entities the NER pass looks for: what only a model finds, and PERSON (in running text)."""
        if self.clean.pii != "mask" or self.clean.ner is None:
            return ()
        return tuple(e for e in self.clean.pii_entities if e not in RULE_ENTITIES or e == "PERSON")

    @property
    def fuzzy(self) -> bool:
        return self.clean.near_dedup and self.clean.near_dedup_threshold < 1


@dataclass(slots=True)
class _Outcome:
    where: str
    error: str | None = None
    unknown: bool = False  # the record's shape matched no format
    format: str = ""
    empty: bool = False
    equal_answers: bool = False  # a preference pair whose two answers are the same after cleaning
    exact: bytes = b""
    near: bytes = b""
    signature: np.ndarray | None = None
    bands: tuple[int, ...] = ()  # the signature's `band_keys`: the index lookups, computed where the signature is
    pii: dict[str, int] = field(default_factory=dict)
    example: dict | None = None  # as the objective encodes it, before `_fit_length`
    verdict: str = ""  # what `_fit_length` did: kept, truncated, too_long or empty
    line: bytes | None = None  # the fitted example as a line of the prepared file; None when dropped
    length: int = 0  # the fitted example's tokens (the objective's `length`)

    def __reduce__(self):
        """Pickled as the tuple of its fields, the signature as its bytes: what worker processes send back for
        every record, at a third of the cost of pickling the object and its array."""
        fields = [getattr(self, name) for name in self.__slots__]
        if self.signature is not None:
            fields[_SIGNATURE] = self.signature.tobytes()
        return _outcome_from_fields, tuple(fields)


def _outcome_from_fields(*fields) -> _Outcome:
    outcome = _Outcome(*fields)
    if outcome.signature is not None:
        outcome.signature = np.frombuffer(outcome.signature, dtype=np.uint32)
    return outcome


_SIGNATURE = _Outcome.__slots__.index("signature")


def _process_chunk(rows: list, ctx: _Context) -> list[_Outcome]:
    """Parse, clean, key and tokenize a chunk; everything per record that needs no global state."""
    outcomes, cleaned, rendered = [], [], []
    for where, record, error in rows:
        if type(record) is JsonLine:
            record, error = parse_line(record)
        outcome = _Outcome(where, error)
        outcomes.append(outcome)
        if error is not None:
            continue
        try:
            outcome.format = ctx.format or detect_format(record)
        except DataError as e:
            outcome.error, outcome.unknown = str(e), True
            continue
        if ctx.objective is not None and outcome.format not in ctx.objective.formats:
            continue  # the whole file is refused by name (`_check_objective_reads`)
        try:
            conversation = to_conversation(record, outcome.format)
            _visit_texts(conversation, lambda text, counts=outcome.pii: _clean_text(text, ctx, counts))
            cleaned.append((outcome, conversation))
        except DataError as e:
            outcome.error = str(e)
    if ctx.ner_entities and cleaned:
        _mask_entities(cleaned, ctx)
    shingled = []  # (outcome, the text its MinHash signature is of)
    for outcome, conversation in cleaned:
        try:
            said = _key(conversation, ctx, outcome)
            if not (outcome.empty or outcome.equal_answers):
                rendered.append((outcome, ctx.objective.render(conversation, ctx.tokenizer)))
                if said is not None:
                    shingled.append((outcome, said))
        except DataError as e:
            outcome.error = str(e)
    _sign(shingled, ctx)
    for (outcome, _), example in zip(rendered, ctx.objective.encode([r for _, r in rendered], ctx.tokenizer)):
        outcome.example = example
    return outcomes


def _prepare_chunk(rows: list, ctx: _Context) -> list[_Outcome]:
    """`_process_chunk`, then each example fitted to data.max_seq_len and serialised: what crosses back from a
    worker is a line of text per record, not lists of token ids for this process to pickle and encode again."""
    outcomes = _process_chunk(rows, ctx)
    for o in outcomes:
        if o.example is not None:
            _fit_length(o, ctx)
    return outcomes


def _fit_length(o: _Outcome, ctx: _Context) -> None:
    """The example within data.max_seq_len as the objective fits it, as a line; the verdict is counted later,
    and only if the record is no copy of an earlier one."""
    example, o.verdict = ctx.objective.fit(o.example, ctx.max_seq_len, ctx.too_long)
    if example is not None:
        o.line, o.length = example_line(example), ctx.objective.length(example)
    o.example = None


def _visit_texts(conversation: Conversation, change) -> None:
    """Replace every text of ``conversation`` that PII can hide in by ``change(text)``: message contents and
    tool-call arguments (text the model learns to write, PII included)."""
    for m in conversation.all_messages():
        m["content"] = change(m["content"])
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = _visit_value(call["function"]["arguments"], change)


def _visit_value(value, change):
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {k: _visit_value(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_visit_value(v, change) for v in value]
    return value


def _mask_entities(cleaned: list[tuple[_Outcome, Conversation]], ctx: _Context) -> None:
    """The NER pass over all texts of the chunk at once: spaCy is fast per batch, slow per call."""
    from tunerun.trainer.data.ner import masker_for

    texts, owners = [], []
    for outcome, conversation in cleaned:
        def collect(text: str, owner=outcome) -> str:
            texts.append(text)
            owners.append(owner)
            return text

        _visit_texts(conversation, collect)
    masked = iter(masker_for(ctx.clean.ner, ctx.ner_entities).mask(texts, [o.pii for o in owners]))
    for _, conversation in cleaned:
        _visit_texts(conversation, lambda _: next(masked))


def _key(conversation: Conversation, ctx: _Context, outcome: _Outcome) -> str | None:
    """Empty or not, and the keys that recognise copies; from the cleaned text, so masked values don't count.
    Returns the text to take the MinHash signature of (None: no fuzzy dedup), which `_sign` does for a chunk."""
    messages = conversation.messages
    if not any(trainable(m) and (m["content"] or m.get("tool_calls")) for m in messages):
        outcome.empty = True
        return None
    if conversation.is_pair and _said(messages[conversation.answer_start:]) == _said(conversation.rejected):
        outcome.equal_answers = True  # nothing to prefer (often two answers that differed only in masked PII)
        return None
    # A pair is a copy of another when prompt and both answers are: the rejected answer is part of its key.
    messages = conversation.all_messages()
    parts = [f"{m['role']}: {m['content']}" + _json_key(m.get("tool_calls", "")) for m in messages]
    near = [near_text(p) for p in parts]
    outcome.exact = digest(exact_key(parts) + _json_key(conversation.tools))
    outcome.near = digest(near_key(near))
    if not ctx.fuzzy:
        return None
    # System prompts repeat by design (often longer than the reply): they would make every record alike.
    return " ".join(n for m, n in zip(messages, near) if m["role"] != "system")


def _json_key(value) -> str:
    """``json.dumps(value, sort_keys=True)``, without the call for the values most messages hold."""
    return '""' if value == "" else "[]" if value == [] else json.dumps(value, sort_keys=True)


def _sign(shingled: list[tuple[_Outcome, str]], ctx: _Context) -> None:
    """MinHash signatures and their band keys for a chunk's records, in one numpy pass."""
    if not shingled:
        return
    signatures = minhash_signatures([text for _, text in shingled])
    for (outcome, _), signature, bands in zip(shingled, signatures,
                                              band_keys_of(signatures, ctx.clean.near_dedup_threshold)):
        outcome.signature, outcome.bands = signature, bands


def _said(answer: list[dict]) -> list:
    return [(m["content"], m.get("tool_calls")) for m in answer]


def _clean_text(text: str, ctx: _Context, counts: dict[str, int]) -> str:
    """The text cleaned, its PII counted into ``counts``; a text met lately is looked up (a few thousand texts
    of up to 4,096 characters are kept): 2,000 characters of prose take ~0.5 ms to clean (the c4 demo texts),
    which a system prompt shared by every record then costs once per process, not once per record."""
    done = ctx.cleaned.get(text)
    if done is None:
        found: dict[str, int] = {}
        done = _clean_new_text(text, ctx, found), tuple(found.items())
        if len(text) <= CLEANED_TEXT_CHARS:
            if len(ctx.cleaned) >= CLEANED_TEXTS:
                ctx.cleaned.clear()
            ctx.cleaned[text] = done
    cleaned, found = done
    for kind, n in found:
        counts[kind] = counts.get(kind, 0) + n
    return cleaned


def _clean_new_text(text: str, ctx: _Context, counts: dict[str, int]) -> str:
    if ctx.clean.normalize:
        text = normalize_text(text)
    if ctx.clean.pii == "mask":
        text = mask_pii(mask_custom(text, ctx.pii_rules, counts), counts, ctx.rule_kinds)
        if "person" in ctx.rule_kinds:
            text = mask_names(text, counts)
    return text


# ---------------------------------------------------------------- running chunks, here or in workers


def data_workers(files: list[Path]) -> int:
    """Worker processes for cleaning, keying and tokenizing: one per core from 16 MB of input, in this
    process below (starting workers costs a few CPU-seconds each). This process keeps a small share (dedup
    decisions and writing lines), so it needs no core of its own. ``TUNERUN_DATA_WORKERS`` overrides (0 or 1:
    in this process)."""
    if "TUNERUN_DATA_WORKERS" in os.environ:
        return int(os.environ["TUNERUN_DATA_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2 or sum(f.stat().st_size for f in files) < PARALLEL_MIN_BYTES:
        return 0
    return min(cores, MAX_DATA_WORKERS)


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_CONTEXT: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = ctx
    # The workers are the parallelism: the Rust tokenizer's own threads in each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # What is here now (transformers, the tokenizer: ~200k objects) lives as long as the worker; left in the
    # collector's oldest generation, each full collection walks it (~0.2 s, every ~15k records: ~6 % of a record).
    gc.freeze()


def _process_in_worker(rows: list) -> list[_Outcome]:
    return _prepare_chunk(rows, _WORKER_CONTEXT)


def _worker_processes(tokenizer):
    """How workers start: from a fork server that imported this module and the tokenizer's once (transformers,
    datasketch with scipy: seconds of CPU that a spawned worker would pay each), where the platform has one.
    Never a plain fork: this process may already run tokenizer threads, which a fork would copy mid-work."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__] + ([type(tokenizer).__module__] if tokenizer is not None else []))
    return context


class _ChunkRunner:
    """Maps `_prepare_chunk` over chunks in order; with workers, at most 2 chunks per worker are in flight
    so a large file is never read ahead into memory. Workers take about a second to start (the fork server
    imports transformers before it forks them): until they are up, chunks are prepared in this process."""

    def __init__(self, ctx: _Context, workers: int):
        self.ctx, self.pool, self.window = ctx, None, 2 * workers
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=_worker_processes(ctx.tokenizer),
                                            initializer=_init_worker, initargs=(ctx,))
            self.started = Future()
            threading.Thread(target=self._start_workers, args=(workers,), name="tunerun-data-workers",
                             daemon=True).start()

    def _start_workers(self, workers: int) -> None:
        """Start the workers (the pool starts one per task submitted, up to ``workers``) and wait until their tasks
        have run; in a thread, because starting the first one blocks until the fork server has imported its modules."""
        try:
            for started in [self.pool.submit(os.getpid) for _ in range(workers)]:
                started.result()
            self.started.set_result(None)
        except BaseException as e:  # noqa: BLE001 - raised where the next chunk is submitted
            self.started.set_exception(e)

    def map(self, rows: Iterator) -> Iterator[list[_Outcome]]:
        if self.pool is None:
            for chunk in _chunks(rows, CHUNK_RECORDS):
                yield _prepare_chunk(chunk, self.ctx)
            return
        pending: deque = deque()
        for chunk in _chunks(rows, CHUNK_RECORDS):
            if self.started.done():
                self.started.result()  # a pool that could not start raises here
                pending.append(self.pool.submit(_process_in_worker, chunk))
            else:
                pending.append(_done(_prepare_chunk(chunk, self.ctx)))
            if len(pending) >= self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _done(outcomes: list[_Outcome]) -> Future:
    future = Future()
    future.set_result(outcomes)
    return future


# ---------------------------------------------------------------- one set: read → clean → dedup → length


@dataclass(slots=True)
class _Kept:
    line: bytes  # of train.jsonl or eval.jsonl, its newline included
    length: int  # tokens
    near: bytes
    key: int  # in the set's `_Dedup`


class _Dedup:
    """What one set has kept so far, to recognise copies."""

    def __init__(self, clean: CleanSpec):
        self.clean = clean
        self.exact: set[bytes] = set()
        self.near: set[bytes] = set()
        self.fuzzy = FuzzyIndex(clean.near_dedup_threshold) if clean.near_dedup and clean.near_dedup_threshold < 1 \
            else None
        self.count = 0

    def keep(self, o: _Outcome, report: DataReport) -> int | None:
        """A new key when ``o`` is no copy of a kept record; None (and counted) when it is."""
        if self.clean.dedup and o.exact in self.exact:
            report.duplicates += 1
        elif self.clean.near_dedup and o.near in self.near:
            report.near_duplicates += 1
        elif self.fuzzy is not None and not self.fuzzy.add_unless_similar(o.signature, o.bands):
            report.fuzzy_duplicates += 1
        else:  # the fuzzy index has just added it, under this key: both count the records kept
            self.exact.add(o.exact)
            self.near.add(o.near)
            self.count += 1
            return self.count - 1
        return None

    def signature(self, key: int) -> np.ndarray | None:
        return self.fuzzy.signature(key) if self.fuzzy is not None else None

    def copies(self, records: list[tuple[bytes, np.ndarray | None]], near_keys: set[bytes], keys: set[int]) -> int:
        """How many ``records`` (near key, signature) are near or fuzzy copies of one of ``keys`` kept here; the
        band keys of the signatures in one numpy pass."""
        found, signatures = 0, []
        for near, signature in records:
            if near in near_keys:
                found += 1
            elif self.fuzzy is not None and signature is not None:
                signatures.append(signature)
        if not signatures:
            return found
        bands = band_keys_of(np.stack(signatures), self.clean.near_dedup_threshold)
        return found + sum(any(k in keys for k in self.fuzzy.matches(signature, b))
                           for signature, b in zip(signatures, bands))


def _stream_set(pattern: str, spec: DataSpec, ctx: _Context, runner: _ChunkRunner, report: DataReport,
                dedup: _Dedup, formats: list[str]) -> Iterator[list[_Kept]]:
    """Kept examples of the files ``pattern`` names, in input order, a chunk's at a time; counts go into
    ``report``."""
    files = resolve_files(pattern)
    report.files += [str(f) for f in files]
    read_before, bad = report.records_read, []
    for path in files:
        file_format, first_where, unknown = None, "", None
        for outcomes in runner.map(read_records([path], spec.columns, parse=False)):
            report.records_read += len(outcomes)
            kept = []
            for o in outcomes:
                if o.error is None and file_format is None:
                    file_format, first_where = o.format, o.where
                    _check_objective_reads(ctx.objective, path, o)
                elif o.error is None and o.format != file_format:
                    raise DataError(_mixed_formats(o, file_format, first_where))
                if o.error is not None:
                    unknown = unknown or (f"{o.where}: {o.error}" if o.unknown else None)
                    bad.append(f"{o.where}: {o.error}")
                elif o.empty:
                    report.empty += 1
                elif o.equal_answers:
                    report.equal_answers += 1
                elif (key := dedup.keep(o, report)) is not None:
                    if (fitted := _fitted(o, key, report)) is not None:
                        for kind, n in o.pii.items():  # kept records only: the report describes what trains
                            report.pii_masked[kind] = report.pii_masked.get(kind, 0) + n
                        kept.append(fitted)
            yield kept
        if file_format is None and unknown:
            raise DataError(unknown)  # no record of the file has a known shape: say which keys it saw
        if file_format and file_format not in formats:
            formats.append(file_format)
    report.malformed += len(bad)
    report.malformed_examples += bad[: MAX_MALFORMED_EXAMPLES - len(report.malformed_examples)]
    _check_bad_fraction(pattern, bad, report.records_read - read_before, spec.clean.max_bad_fraction)


def _check_objective_reads(objective: Objective | None, path: Path, o: _Outcome) -> None:
    """A preference file given to a supervised job, or the reverse, is refused by name, not read as malformed."""
    if objective is None or o.format in objective.formats:
        return
    pairs = o.format in PREFERENCE_FORMATS
    raise DataError(f"{path} holds {o.format} records ({o.where}): "
                    + ("preference pairs train with training.objective: dpo" if pairs else
                       f"training.objective {objective.KEY} reads preference pairs ({', '.join(objective.formats)})")
                    + ("" if pairs else "; give a preference file, or set training.objective: sft"))


def _fitted(o: _Outcome, key: int, report: DataReport) -> _Kept | None:
    """The record as `_fit_length` left it; None (and counted) when it was dropped."""
    report.truncated += o.verdict == "truncated"
    report.too_long_dropped += o.verdict == "too_long"
    report.empty += o.verdict == "empty"
    return _Kept(o.line, o.length, o.near, key) if o.line is not None else None


def _mixed_formats(o: _Outcome, file_format: str, first_where: str) -> str:
    return (f"{o.where}: this record is {o.format} but the file's first record ({first_where}) is {file_format}; "
            "one file must hold one format: split it into one file per format (data.train may be a glob)")


def _check_bad_fraction(pattern: str, bad: list[str], total: int, limit: float) -> None:
    if not total or len(bad) / total <= limit:
        return
    shown = "\n".join(f"  {b}" for b in bad[:5]) + (f"\n  … and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise DataError(
        f"{len(bad)} of {total} records in {pattern} are malformed ({len(bad) / total:.1%}, "
        f"more than data.clean.max_bad_fraction = {limit:.1%}):\n{shown}\n"
        "Fix these records, or raise data.clean.max_bad_fraction to skip them."
    )


def _nothing_left(files: list[str], spec: DataSpec, r: DataReport) -> str:
    """Which step removed the last records, and what to change."""
    counts = f"read {r.records_read}" + "".join(f", {step} {n}" for step, n in r.steps() if n)
    left, culprit = r.records_read, None
    for step, removed in r.steps():
        left -= removed
        if removed and left <= 0:
            culprit = step
            break
    advice = {
        None: "the files hold no records",
        "malformed": "every record is malformed: " + "; ".join(r.malformed_examples[:3]),
        "empty": "no record has text to train on (an assistant reply, an alpaca output or a text)",
        "too long": (f"every example is longer than data.max_seq_len = {spec.max_seq_len} tokens"
                     + (" (data.too_long: drop); raise data.max_seq_len or set data.too_long: truncate"
                        if spec.too_long == "drop" else
                        " before its first trained token; raise data.max_seq_len or shorten the prompts")),
    }.get(culprit, f"the {culprit} step removed them")
    step = f"the {culprit} step removed everything: " if culprit else ""
    return f"no training records left in {', '.join(files)} ({counts}); {step}{advice}"


# ---------------------------------------------------------------- the whole preparation


def prepare_files(spec: DataSpec, tokenizer, seed: int, out_dir: Path, objective: Objective | None = None
                  ) -> DataReport:
    """Prepare the data the spec names into ``out_dir``/train.jsonl and eval.jsonl, as ``objective`` (the job's:
    `tunerun.trainer.objectives.objective_for`; default supervised fine-tuning) makes examples; `DataError` for
    unusable data. Examples stream through a scratch file in ``out_dir``; nothing holds all tokens at once."""
    preparation = _Preparation(spec, tokenizer, Path(out_dir), objective or get_objective(DEFAULT))
    try:
        return preparation.run(seed)
    except BaseException:
        preparation.discard()
        raise
    finally:
        preparation.close()


class _Preparation:
    """One `prepare_files` call: kept training examples go to a scratch file, then the split writes
    eval.jsonl and train.jsonl (packed or not) from it."""

    def __init__(self, spec: DataSpec, tokenizer, out_dir: Path, objective: Objective):
        self.spec, self.out_dir, self.objective = spec, out_dir, objective
        self.report = DataReport(pii_masked=_pii_kinds(spec.clean))
        self.ctx = _Context(None if spec.format == "auto" else spec.format, spec.clean, tokenizer,
                            custom_rules(spec.clean.pii_patterns) if spec.clean.pii == "mask" else [], objective,
                            spec.max_seq_len, spec.too_long)
        files = resolve_files(spec.train) + (resolve_files(spec.eval) if spec.eval else [])
        self.runner = _ChunkRunner(self.ctx, data_workers(files))
        self.writers: list[ExampleWriter] = []
        self.lengths: list[int] = []  # of every kept example, train and eval, before packing
        self.scratch = out_dir / ".kept.jsonl"

    def run(self, seed: int) -> DataReport:
        dedup, kept = self._keep_training_examples()
        if self.spec.eval:
            train = range(len(kept))
            self.report.eval_records = self._write_eval_file(dedup, kept)
        else:
            held_out = _held_out(len(kept), self.spec.eval_fraction, seed)
            train = [i for i in range(len(kept)) if i not in held_out]
            self.report.eval_records = self._write_held_out(dedup, kept, held_out, train)
        self._write_train(train)
        self.report.train_records = len(train)
        self.report.token_lengths, self.report.length_histogram = _length_stats(self.lengths)
        return self.report

    def _writer(self, name: str) -> ExampleWriter:
        writer = ExampleWriter(self.out_dir / name)
        self.writers.append(writer)
        return writer

    def _keep_training_examples(self) -> tuple[_Dedup, list[tuple[bytes, int]]]:
        """Write the kept training examples to the scratch file; (near key, dedup key) of each."""
        dedup, kept, formats, writer = _Dedup(self.spec.clean), [], [], self._writer(self.scratch.name)
        for chunk in _stream_set(self.spec.train, self.spec, self.ctx, self.runner, self.report, dedup, formats):
            writer.write_lines([ex.line for ex in chunk])
            kept += [(ex.near, ex.key) for ex in chunk]
            self.lengths += [ex.length for ex in chunk]
        self.report.format = ", ".join(formats)
        if not kept:
            raise DataError(_nothing_left(self.report.files, self.spec, self.report))
        writer.commit()
        return dedup, kept

    def _write_eval_file(self, train_dedup: _Dedup, kept: list) -> int:
        """data.eval, read and cleaned like the training data; contamination checked against all of train."""
        writer, eval_dedup = self._writer(EVAL_FILE), _Dedup(self.spec.clean)
        train_near, train_keys = {near for near, _ in kept}, {key for _, key in kept}
        for chunk in _stream_set(self.spec.eval, self.spec, self.ctx, self.runner, self.report, eval_dedup, []):
            writer.write_lines([ex.line for ex in chunk])
            self.lengths += [ex.length for ex in chunk]
            self.report.contaminated_eval += train_dedup.copies(
                [(ex.near, eval_dedup.signature(ex.key)) for ex in chunk], train_near, train_keys)
        if not writer.count:
            raise DataError(f"no evaluation records in {self.spec.eval}; fix data.eval, or leave it unset to split "
                            "data.eval_fraction off the training data")
        writer.commit()
        return writer.count

    def _write_held_out(self, dedup: _Dedup, kept: list, held_out: set[int], train: list[int]) -> int:
        writer = self._writer(EVAL_FILE)
        train_near, train_keys = {kept[i][0] for i in train}, {kept[i][1] for i in train}
        for chunk in _chunks(_lines(self.scratch, held_out), CHUNK_RECORDS):
            writer.write_lines([line for _, line in chunk])
            records = [(kept[i][0], dedup.signature(kept[i][1])) for i, _ in chunk]
            self.report.contaminated_eval += dedup.copies(records, train_near, train_keys)
        writer.commit()
        return writer.count

    def _write_train(self, train) -> None:
        writer = self._writer(TRAIN_FILE)
        packer = Packer(self.spec.max_seq_len, writer) if self.spec.packing and self.objective.packs else None
        lines = (line for _, line in _lines(self.scratch, train))
        if packer is None:
            for batch in _chunks(lines, CHUNK_RECORDS):
                writer.write_lines(batch)
        else:
            for line in lines:
                example = orjson.loads(line)
                packer.add(example["input_ids"], example["labels"])
            packer.close()
            self.report.packed_rows, self.report.packing_efficiency = packer.rows, round(packer.efficiency, 4)
        writer.commit()

    def discard(self) -> None:
        for writer in self.writers:
            writer.discard()

    def close(self) -> None:
        self.runner.close()
        self.scratch.unlink(missing_ok=True)


def _pii_kinds(clean: CleanSpec) -> dict[str, int]:
    """The report's PII counters, each at 0: every kind the spec looks for (a 0 says it was looked for)."""
    if clean.pii != "mask":
        return {}
    kinds = [e.lower() for e in clean.pii_entities if e in RULE_ENTITIES or clean.ner is not None]
    if "iban" in kinds:
        kinds.insert(kinds.index("iban") + 1, IBAN_CHECKSUM_FAILED)
    return dict.fromkeys(kinds, 0)


def _held_out(n: int, fraction: float, seed: int) -> set[int]:
    k = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:k])


def _lines(path: Path, wanted) -> Iterator[tuple[int, bytes]]:
    wanted = set(wanted)
    with path.open("rb") as handle:
        for i, line in enumerate(handle):
            if i in wanted:
                yield i, line


def _length_stats(lengths: list[int]) -> tuple[dict, dict]:
    values = np.asarray(lengths)
    stats = {"min": int(values.min()), "mean": round(float(values.mean()), 1),
             "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
             "max": int(values.max())}
    counts, edges = np.histogram(values, bins=min(30, max(1, int(values.max() - values.min()) + 1)))
    return stats, {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def prepare_data(spec: DataSpec, tokenizer, seed: int, objective: Objective | None = None) -> PreparedData:
    """`prepare_files` into a scratch folder, read back: the whole prepared set in memory."""
    with tempfile.TemporaryDirectory(prefix="tunerun-data-") as tmp:
        report = prepare_files(spec, tokenizer, seed, Path(tmp), objective)
        return PreparedData(load_examples(Path(tmp) / TRAIN_FILE), load_examples(Path(tmp) / EVAL_FILE), report)


# ---------------------------------------------------------------- before a model is chosen


def count_cleaning(path: Path, clean: CleanSpec) -> DataReport:
    """What cleaning does to one file before a model (and its tokenizer) is chosen: records read, malformed,
    empty, duplicates and PII hits of the records kept. Length limits need the tokenizer, so `tunerun serve`
    shows these counts for an upload and the job's own data report adds the rest once it trains."""
    ctx = _Context(None, clean, None, custom_rules(clean.pii_patterns) if clean.pii == "mask" else [])
    report = DataReport(files=[str(path)], pii_masked=_pii_kinds(clean))
    dedup = _Dedup(clean)
    for where, record, error in read_records([path]):
        report.records_read += 1
        outcome = _Outcome(where, error)
        if error is None:
            try:
                outcome.format = detect_format(record)
                conversation = to_conversation(record, outcome.format)
                _visit_texts(conversation, lambda text, counts=outcome.pii: _clean_text(text, ctx, counts))
                if ctx.ner_entities:
                    _mask_entities([(outcome, conversation)], ctx)
                said = _key(conversation, ctx, outcome)
                _sign([(outcome, said)] if said is not None else [], ctx)
            except DataError as exc:
                outcome.error = str(exc)
        if outcome.error is not None:
            report.malformed += 1
        elif outcome.empty:
            report.empty += 1
        elif outcome.equal_answers:
            report.equal_answers += 1
        elif dedup.keep(outcome, report) is not None:
            report.train_records += 1
            for kind, n in outcome.pii.items():
                report.pii_masked[kind] = report.pii_masked.get(kind, 0) + n
    return report
