"""The spec's ``data`` section → tokenized training and evaluation examples, with a report of what happened.

Pipeline, in order (each step counted in `DataReport`):

1. **read** ``data.train`` (a path or glob of ``.jsonl``/``.json`` files; ``.json`` holds one JSON array or
   one object per line). A line that is not JSON, or a record of the wrong shape, is *malformed*; if more
   than ``data.clean.max_bad_fraction`` of the records are, the whole set is refused.
2. **normalise** every record to messages ``[{"role": "system"|"user"|"assistant", "content": str}]``:

   - chat: ``{"messages": [{"role", "content"}]}``; an assistant message with ``"weight": 0`` is shown to
     the model but not trained on; a ``"tool"`` message becomes a user turn.
   - sharegpt: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``; human → user,
     gpt/function_call → assistant, observation → user; ``tools`` is appended to the system message.
   - alpaca: ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}``; the user turn is
     instruction and input joined by a blank line.
   - text: ``{"text"}`` becomes one message with role ``"text"``: continued pre-training, loss on every token.

   ``data.format: auto`` takes the format of the first record it recognises; later records must match.
3. **clean**: NFKC + whitespace normalisation, PII masking (``clean.pii``), drop records with no trainable
   text (*empty*), exact and near duplicates (``clean.dedup``, ``clean.near_dedup``); see `cleaning`.
4. **render and tokenize**. With a tokenizer chat template, `apply_chat_template` renders the
   conversation. Without one, this default template is used (``{bos}`` only where the tokenizer adds BOS)::

       {bos}<|system|>
       {system}
       <|user|>
       {user}
       <|assistant|>
       {assistant}{eos}

   i.e. each turn is ``<|role|>\\n{content}\\n`` (absent turns are left out, multi-turn conversations
   repeat user/assistant), and an assistant turn's content is followed by the EOS token before the newline. Loss is on assistant content plus the end-of-turn text that follows it (the
   EOS here; whatever the chat template emits there otherwise, e.g. ``<|eot_id|>``), so the model learns
   to stop. The whole conversation is tokenized once and labels come from character offsets, so token
   boundaries are exactly those the model sees at inference.
5. **truncate** to ``data.max_seq_len`` tokens (*truncated*); a truncated example left without any
   trainable token is dropped (*truncated_dropped*, also counted in *truncated*).
6. **split**: ``data.eval`` read and cleaned the same way, or a seeded shuffle of the training examples
   that sets aside ``max(1, round(n * eval_fraction))`` of them. *contaminated_eval* counts eval examples
   whose text equals a training example's after the near-duplicate normalisation (reported, not removed).

torch is imported only by `collate`: preparing data does not need it.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunerun.jobs.errors import DataError
from tunerun.trainer.cleaning import PII_KINDS, exact_key, mask_pii, near_key, normalize_text

if TYPE_CHECKING:
    from tunerun.jobs.spec import CleanSpec, DataSpec

FORMATS = ("chat", "sharegpt", "alpaca", "text")
IGNORE_INDEX = -100  # what torch's cross-entropy (and so HF causal LMs) skip
MAX_MALFORMED_EXAMPLES = 20
SUFFIXES = (".jsonl", ".json")
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "user"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "assistant",
                  "observation": "user", "system": "system"}
FORMAT_SHAPES = ('chat {"messages": [...]}, sharegpt {"conversations": [...]}, '
                 'alpaca {"instruction", "output"}, text {"text"}')


@dataclass
class DataReport:
    """What preparing the data did; ``dataclasses.asdict`` of it is written as data_report.json."""

    files: list[str] = field(default_factory=list)  # training files, then evaluation files
    format: str = ""  # of the training set
    records_read: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)  # "file:line: why", the first 20
    empty: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    pii_masked: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    train_records: int = 0
    eval_records: int = 0
    contaminated_eval: int = 0
    truncated_dropped: int = 0  # truncated examples with no trainable token left; included in `truncated`


@dataclass
class PreparedData:
    train: list[dict]  # each {"input_ids": list[int], "labels": list[int]}; labels -100 where no loss
    eval: list[dict]
    report: DataReport


@dataclass
class _Record:
    where: str  # "file:line"
    messages: list[dict]
    near: str  # near-duplicate key, also used for eval contamination


# ---------------------------------------------------------------- reading


def resolve_files(pattern: str) -> list[Path]:
    """The ``.jsonl``/``.json`` files a path or glob names, sorted; `DataError` if there are none."""
    if "://" in pattern:
        raise DataError(f"data file {pattern}: only local paths and globs are supported for now; "
                        "copy the files to a local folder and point data.train / data.eval there")
    expanded = os.path.expanduser(pattern)
    where = f"relative paths are read from the current directory, {os.getcwd()}"
    if glob.has_magic(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        if not files:
            raise DataError(f"no data files match {pattern!r}; check the path ({where})")
    elif os.path.isdir(expanded):
        raise DataError(f"data path {pattern!r} is a folder; name the files, e.g. '{pattern.rstrip('/')}/*.jsonl'")
    elif not os.path.isfile(expanded):
        raise DataError(f"data file not found: {pattern!r}; check the path ({where})")
    else:
        files = [Path(expanded)]
    for path in files:
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"data file {path}: unsupported type {path.suffix or '(no suffix)'!r}; "
                            "expected .jsonl (one JSON object per line) or .json")
    return files


def read_records(files: list[Path]) -> Iterator[tuple[str, int, dict | None, str | None]]:
    """Yield ``(file, line, record, error)`` for every record; exactly one of record/error is None."""
    for path in files:
        text = _read_text(Path(path))
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            rows = _array_rows(str(path), text)
        else:
            rows = _line_rows(text)
        for line, value, error in rows:
            if error is None and not isinstance(value, dict):
                value, error = None, f"expected a JSON object, got {type(value).__name__}"
            yield str(path), line, value, error


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


def _line_rows(text: str) -> Iterator[tuple[int, object, str | None]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as e:
            yield number, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _array_rows(name: str, text: str) -> Iterator[tuple[int, object, str | None]]:
    """Elements of a top-level JSON array, each with the line it starts on.

    `json.load` would not say where each record is; decoding element by element gives malformed records a
    line number. A syntax error inside the array cannot be skipped, so it refuses the whole file.
    """
    decoder, blank = json.JSONDecoder(), re.compile(r"\s*")
    pos = blank.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "a .json file must hold one JSON array of records (or one object per line)") from None
        yield line, value, None
        pos = blank.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = blank.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] != "]":
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(f"{name}:{lineno}: not valid JSON (expected ',' or ']' between records)")


# ---------------------------------------------------------------- formats


def detect_format(record: dict) -> str:
    """'chat' | 'sharegpt' | 'alpaca' | 'text' from the record's keys; `DataError` if none fits."""
    if isinstance(record.get("messages"), list):
        return "chat"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if isinstance(record.get("text"), str):
        return "text"
    raise DataError(f"unknown record format: found keys {sorted(record)}; expected one of {FORMAT_SHAPES} "
                    "(or set data.format)")


def to_messages(record: dict, fmt: str) -> list[dict]:
    """Normalise a record of format ``fmt`` to ``[{"role", "content"}]`` (assistant turns may carry
    ``"weight": 0``). A text record becomes ``[{"role": "text", "content": ...}]``: trained on entirely.
    `DataError` when the record does not have that format's shape."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    keys = {"chat": "messages", "sharegpt": "conversations", "alpaca": "instruction", "text": "text"}
    if keys[fmt] not in record:
        raise DataError(f"expected {fmt} format but found keys {sorted(record)}")
    if fmt == "chat":
        return _chat_messages(record)
    if fmt == "sharegpt":
        return _sharegpt_messages(record)
    if fmt == "alpaca":
        return _alpaca_messages(record)
    return [_message("text", record["text"], "text")]


def _message(role: str, content, where: str, weight=1) -> dict:
    if not isinstance(content, str):
        raise DataError(f"{where} must be a string, got {type(content).__name__}")
    if weight not in (0, 1):  # True/False and 0.0/1.0 compare equal and pass
        raise DataError(f"{where}: weight must be 0 or 1, got {weight!r}")
    return {"role": role, "content": content} | ({"weight": 0} if weight == 0 else {})


def _chat_messages(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}] must be an object with role and content")
        role = CHAT_ROLES.get(m.get("role"))
        if role is None:
            raise DataError(f"messages[{i}].role {m.get('role')!r} is not one of system, user, assistant, tool")
        weight = m.get("weight", 1) if role == "assistant" else 1
        out.append(_message(role, m.get("content"), f"messages[{i}].content", weight))
    return out


def _sharegpt_messages(record: dict) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"conversations must be a list, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"conversations[{i}] needs 'from' as one of {', '.join(SHAREGPT_ROLES)} and a 'value'")
        out.append(_message(role, turn.get("value"), f"conversations[{i}].value"))
    tools = record.get("tools") or ""
    if not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    tools = "" if tools.strip() in ("", "[]") else tools
    head = "\n\n".join(p for p in (_optional_str(record, "system"), tools and f"Available tools:\n{tools}") if p)
    if head and out and out[0]["role"] == "system":
        out[0]["content"] = f"{head}\n\n{out[0]['content']}"
    elif head:
        out.insert(0, {"role": "system", "content": head})
    return out


def _alpaca_messages(record: dict) -> list[dict]:
    out = []
    if system := _optional_str(record, "system"):
        out.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise DataError("history must be a list of [question, answer] pairs")
    for i, (question, answer) in enumerate(history):
        out += [_message("user", question, f"history[{i}][0]"), _message("assistant", answer, f"history[{i}][1]")]
    prompt = _message("user", record["instruction"], "instruction")
    if extra := _optional_str(record, "input"):
        prompt["content"] = f"{prompt['content']}\n\n{extra}"
    return out + [prompt, _message("assistant", record.get("output"), "output")]


def _optional_str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{key} must be a string, got {type(value).__name__}")
    return value or ""


def _trainable(message: dict) -> bool:
    return message["role"] in ("assistant", "text") and message.get("weight", 1) != 0


# ---------------------------------------------------------------- read + clean one set


def _load_set(pattern: str, spec: DataSpec, report: DataReport) -> tuple[list[_Record], str]:
    """Read, parse and clean the files ``pattern`` names; adds its counts to ``report``."""
    files = resolve_files(pattern)
    report.files += [str(f) for f in files]
    rows = list(read_records(files))
    fmt = spec.format if spec.format != "auto" else _detect_first(rows)
    parsed, bad = [], []
    for file, line, record, error in rows:
        if error is None:
            try:
                parsed.append((f"{file}:{line}", to_messages(record, fmt)))
                continue
            except DataError as e:
                error = str(e)
        bad.append(f"{file}:{line}: {error}")
    report.records_read += len(rows)
    report.malformed += len(bad)
    report.malformed_examples += bad[: MAX_MALFORMED_EXAMPLES - len(report.malformed_examples)]
    _check_bad_fraction(pattern, bad, len(rows), spec.clean.max_bad_fraction)
    return _clean(parsed, spec.clean, report), fmt


def _detect_first(rows: list) -> str:
    """Format of the first record whose shape is recognised (earlier unrecognised ones count as malformed)."""
    first_error = None
    for file, line, record, _ in rows:
        if record is None:
            continue
        try:
            return detect_format(record)
        except DataError as e:
            first_error = first_error or f"{file}:{line}: {e}"
    if first_error:
        raise DataError(first_error)
    return "chat"  # no row parsed at all: every one is already malformed, the format is moot


def _check_bad_fraction(pattern: str, bad: list[str], total: int, limit: float) -> None:
    if not total or len(bad) / total <= limit:
        return
    shown = "\n".join(f"  {b}" for b in bad[:5]) + (f"\n  … and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise DataError(
        f"{len(bad)} of {total} records in {pattern} are malformed ({len(bad) / total:.1%}, "
        f"more than data.clean.max_bad_fraction = {limit:.1%}):\n{shown}\n"
        "Fix these records, or raise data.clean.max_bad_fraction to skip them."
    )


def _clean(parsed: list[tuple[str, list[dict]]], clean: CleanSpec, report: DataReport) -> list[_Record]:
    """Normalise and mask every message, then drop empty records and duplicates (first one kept)."""
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    kept: list[_Record] = []
    for where, messages in parsed:
        masked: dict[str, int] = {}
        for m in messages:
            m["content"] = normalize_text(m["content"])
            if clean.pii == "mask":
                m["content"] = mask_pii(m["content"], masked)
        if not any(_trainable(m) and m["content"] for m in messages):
            report.empty += 1
            continue
        parts = [f"{m['role']}: {m['content']}" for m in messages]
        exact, near = exact_key(parts), near_key(parts)
        if clean.dedup and exact in seen_exact:
            report.duplicates += 1
            continue
        if clean.near_dedup and near in seen_near:
            report.near_duplicates += 1
            continue
        seen_exact.add(exact)
        seen_near.add(near)
        for kind, n in masked.items():  # counted for kept records only: the report describes what trains
            report.pii_masked[kind] = report.pii_masked.get(kind, 0) + n
        kept.append(_Record(where, messages, near))
    return kept


# ---------------------------------------------------------------- rendering and tokenizing


def _render(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The text of one record and the character spans [start, end) that carry loss."""
    if messages[0]["role"] == "text":
        text = messages[0]["content"] + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    if getattr(tokenizer, "chat_template", None):
        return _render_chat_template(messages, tokenizer)
    return _render_default(messages, tokenizer.eos_token or "")


def _render_default(messages: list[dict], eos: str) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for m in messages:
        text += f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            start, text = len(text), text + m["content"] + eos
            if _trainable(m):
                spans.append((start, len(text)))
            text += "\n"
        else:
            text += m["content"] + "\n"
    return text, spans


def _render_chat_template(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Spans from rendering prefixes: an assistant turn is what ``messages[:i+1]`` adds to
    ``messages[:i]`` + generation prompt, i.e. its content and end-of-turn marker, whatever the template."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(upto: int, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(plain[:upto], tokenize=False, add_generation_prompt=prompt)

    full, spans = render(len(plain)), []
    for i, m in enumerate(messages):
        if not _trainable(m):
            continue
        before, through = render(i, prompt=True), render(i + 1)
        if not (through.startswith(before) and full.startswith(through)):
            # Templates that rewrite earlier turns (e.g. drop reasoning) break prefixes: find the text.
            return full, _spans_by_search(full, messages, tokenizer.eos_token or "")
        spans.append((len(before), len(through)))
    return full, spans


def _spans_by_search(full: str, messages: list[dict], eos: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for m in messages:
        start = full.find(m["content"], cursor)
        if start < 0:
            raise DataError("the tokenizer's chat template does not reproduce the message text; "
                            "remove the chat template to use tunerun's default one")
        cursor = start + len(m["content"])
        if _trainable(m):
            end = cursor + len(eos) if eos and full.startswith(eos, cursor) else cursor
            spans.append((start, end))
    return spans


def _tokenize(records: list[_Record], tokenizer, max_len: int, report: DataReport) -> list[tuple[dict, str]]:
    """Token ids and labels for each record, truncated to ``max_len``; returns (example, near key) pairs."""
    if not records:
        return []
    rendered = []
    for record in records:
        try:
            rendered.append(_render(record.messages, tokenizer))
        except DataError:
            raise
        except Exception as e:  # jinja errors from a chat template, e.g. "roles must alternate"
            raise DataError(f"{record.where}: the tokenizer's chat template failed: {e}") from None
    encoded = _encode_with_labels(rendered, tokenizer)
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    out = []
    for record, (text, _), (ids, labels) in zip(records, rendered, encoded):
        if bos is not None and not text.startswith(tokenizer.bos_token):
            ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
        if len(ids) > max_len:
            report.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
            if all(label == IGNORE_INDEX for label in labels):
                report.truncated_dropped += 1
                continue
        if any(label != IGNORE_INDEX for label in labels):
            out.append(({"input_ids": ids, "labels": labels}, record.near))
        else:  # trainable text that rendered to no tokens: as good as empty
            report.empty += 1
    return out


def _encode_with_labels(rendered: list[tuple[str, list]], tokenizer) -> list[tuple[list[int], list[int]]]:
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_segments(text, spans, tokenizer) for text, spans in rendered]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        labels, s = [], 0
        for token, (start, end) in zip(ids, offsets):
            while s < len(spans) and spans[s][1] <= start:
                s += 1
            # A token overlapping a span trains: e.g. "▁Sure" begins on the space before the reply.
            inside = s < len(spans) and spans[s][0] < max(end, start + 1)
            labels.append(token if inside else IGNORE_INDEX)
        out.append((list(ids), labels))
    return out


def _encode_segments(text: str, spans: list, tokenizer) -> tuple[list[int], list[int]]:
    """Fallback for tokenizers without offsets: tokenize the pieces between span edges separately."""
    edges = sorted({0, len(text), *(e for span in spans for e in span)})
    ids, labels = [], []
    for a, b in zip(edges, edges[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        trains = any(s <= a and b <= e for s, e in spans)
        ids += piece
        labels += piece if trains else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


# ---------------------------------------------------------------- split and entry points


def _split(examples: list[tuple[dict, str]], fraction: float, seed: int) -> tuple[list, list]:
    n = len(examples)
    k = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:k])
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    return train, [examples[i] for i in sorted(held_out)]


def prepare_data(spec: DataSpec, tokenizer, seed: int) -> PreparedData:
    """Read, clean, tokenize and split the data the spec names; raises `DataError` for unusable data."""
    if spec.packing:
        raise DataError("data.packing is not supported yet; set data.packing: false")
    report = DataReport(pii_masked=dict.fromkeys(PII_KINDS, 0) if spec.clean.pii == "mask" else {})
    records, report.format = _load_set(spec.train, spec, report)
    train_files = list(report.files)
    train = _tokenize(records, tokenizer, spec.max_seq_len, report)
    if not train:
        raise DataError(_no_records_message(train_files, report))
    if spec.eval:
        held_out = _tokenize(_load_set(spec.eval, spec, report)[0], tokenizer, spec.max_seq_len, report)
        if not held_out:
            raise DataError(f"no evaluation records in {', '.join(report.files[len(train_files):])}; fix data.eval, "
                            "or leave it unset to split data.eval_fraction off the training data")
    else:
        train, held_out = _split(train, spec.eval_fraction, seed)
    train_keys = {key for _, key in train}
    report.contaminated_eval = sum(key in train_keys for _, key in held_out)
    report.train_records, report.eval_records = len(train), len(held_out)
    return PreparedData([ex for ex, _ in train], [ex for ex, _ in held_out], report)


def _no_records_message(files: list[str], r: DataReport) -> str:
    return (f"no training records in {', '.join(files)} (read {r.records_read}: malformed {r.malformed}, "
            f"empty {r.empty}, duplicates {r.duplicates}, near-duplicates {r.near_duplicates}, "
            f"too long {r.truncated_dropped})")


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch to its longest example: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 1 on real tokens; all ``torch.long``."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
