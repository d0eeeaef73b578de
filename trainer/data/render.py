"""A conversation → the exact text the model sees, the character spans that carry loss, and token ids + labels.

With a tokenizer chat template, `apply_chat_template` renders the conversation (``tools=`` passed through).
Without one, this default template is used (``{bos}`` only where the tokenizer adds BOS)::

    {bos}<|system|>
    {system}

    Available tools:
    [{"type": "function", "function": {...}}]
    <|user|>
    {user}
    <|assistant|>
    {assistant}
    {"name": "get_weather", "arguments": {"city": "Paris"}}{eos}
    <|tool|>
    {tool result}

i.e. each turn is ``<|role|>\\n{content}\\n`` (absent turns left out, the tools block only when the record
has tools, tool calls as one JSON line each after the assistant's text). Loss is on assistant content plus
the end-of-turn text that follows it (the EOS here; whatever the chat template emits otherwise, e.g.
``<|eot_id|>``), so the model learns to stop. The whole conversation is tokenized once and labels come from
character offsets, so token boundaries are exactly those the model sees at inference.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

from tunerun.cluster.run_folder import CHAT_TEMPLATE
from tunerun.jobs.errors import DataError
from tunerun.trainer.data.formats import Conversation, trainable

IGNORE_INDEX = -100  # what torch's cross-entropy (and so HF causal LMs) skip
# `render_default` as a Jinja chat template: saved beside the weights of a run whose tokenizer has none
DEFAULT_CHAT_TEMPLATE = Path(__file__).resolve().parent / CHAT_TEMPLATE
Spans = list[tuple[int, int]]


def render(conversation: Conversation, tokenizer) -> tuple[str, Spans]:
    """The text of one record and the character spans [start, end) that carry loss."""
    messages = conversation.messages
    if messages[0]["role"] == "text":
        text = messages[0]["content"] + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    if getattr(tokenizer, "chat_template", None):
        try:
            return _render_chat_template(conversation, tokenizer)
        except DataError:
            raise
        except Exception as e:  # jinja errors raised by a template, e.g. "roles must alternate"
            raise DataError(f"the tokenizer's chat template failed: {e}") from None
    return render_default(conversation, tokenizer.eos_token or "")


def render_default(conversation: Conversation, eos: str) -> tuple[str, Spans]:
    messages = list(conversation.messages)
    if conversation.tools:
        block = "Available tools:\n" + json.dumps(conversation.tools, ensure_ascii=False)
        if messages[0]["role"] == "system":
            messages[0] = messages[0] | {"content": f"{messages[0]['content']}\n\n{block}".lstrip()}
        else:
            messages.insert(0, {"role": "system", "content": block})
    text, spans = "", []
    for m in messages:
        text += f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            start, text = len(text), text + _assistant_text(m) + eos
            if trainable(m):
                spans.append((start, len(text)))
            text += "\n"
        else:
            text += m["content"] + "\n"
    return text, spans


def _assistant_text(message: dict) -> str:
    calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
             for c in message.get("tool_calls", [])]
    return "\n".join(part for part in (message["content"], *calls) if part)


def _render_chat_template(conversation: Conversation, tokenizer) -> tuple[str, Spans]:
    """Spans from rendering prefixes: an assistant turn is what ``messages[:i+1]`` adds to
    ``messages[:i]`` + generation prompt, i.e. its content and end-of-turn marker, whatever the template."""
    messages = conversation.messages
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    tools = conversation.tools or None

    def upto(n: int, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(plain[:n], tools=tools, tokenize=False, add_generation_prompt=prompt)

    full, spans = upto(len(plain)), []
    for i, m in enumerate(messages):
        if not trainable(m):
            continue
        before, through = upto(i, prompt=True), upto(i + 1)
        if not (through.startswith(before) and full.startswith(through)):
            # Templates that rewrite earlier turns (e.g. drop reasoning) break prefixes: find the text.
            return full, _spans_by_search(full, messages, tokenizer.eos_token or "")
        spans.append((len(before), len(through)))
    return full, spans


def _spans_by_search(full: str, messages: list[dict], eos: str) -> Spans:
    spans, cursor = [], 0
    for m in messages:
        start = full.find(m["content"], cursor)
        if start < 0:
            raise DataError("the tokenizer's chat template does not reproduce the message text; "
                            "remove the chat template to use tunerun's default one")
        cursor = start + len(m["content"])
        if trainable(m):
            end = cursor + len(eos) if eos and full.startswith(eos, cursor) else cursor
            spans.append((start, end))
    return spans


def encode(rendered: list[tuple[str, Spans]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 outside the spans) for each rendered text, BOS added where the tokenizer
    adds one and the template did not."""
    if getattr(tokenizer, "is_fast", False):
        encodings = _encode_fast(tokenizer, [text for text, _ in rendered])
        out = [_labels_of(e, spans) for e, (_, spans) in zip(encodings, rendered)]
    else:
        out = [_encode_segments(text, spans, tokenizer) for text, spans in rendered]
    if adds_bos(tokenizer):
        bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
        for (text, _), (ids, labels) in zip(rendered, out):
            if not text.startswith(bos):
                ids.insert(0, bos_id)
                labels.insert(0, IGNORE_INDEX)
    return out


def _encode_fast(tokenizer, texts: list[str]) -> list:
    """The Rust tokenizer's encodings (ids and offsets) without transformers' per-token Python conversion,
    which costs more than the tokenizing itself. Truncation and padding left on the backend by an earlier
    call are switched off, as transformers does before each call."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return backend.encode_batch(texts, add_special_tokens=False)


def _labels_of(encoding, spans: Spans) -> tuple[list[int], list[int]]:
    """Token ids, and labels from the tokens that overlap a span: e.g. "▁Sure" begins on the space before the reply.

    Each span's first and last token are asked of the encoding (`char_to_token`, then a step over neighbours where
    needed), which spares turning every token's offsets into Python tuples, the costliest part of labelling. Where
    a span edge is a character no token covers, every offset is read (`_labels_from_offsets`).
    """
    ids, chars = encoding.ids, encoding.token_to_chars
    labels, text_end = [IGNORE_INDEX] * len(ids), chars(len(ids) - 1)[1] if ids else 0
    for start, end in spans:
        first, last = encoding.char_to_token(start), len(ids) if end >= text_end else encoding.char_to_token(end)
        if first is None or last is None:
            return _labels_from_offsets(ids, encoding.offsets, spans)
        while first and _right_edge(chars(first - 1)) > start:  # a zero-width token right at the start trains
            first -= 1
        while last > first and chars(last - 1)[0] >= end:
            last -= 1
        while last < len(ids) and chars(last)[0] < end:
            last += 1
        labels[first:last] = ids[first:last]
    return ids, labels


def _right_edge(offsets: tuple[int, int]) -> int:
    """Where a token ends, a zero-width one counted one character wide: it still sits somewhere."""
    return max(offsets[1], offsets[0] + 1)


def _labels_from_offsets(ids: list[int], offsets: list, spans: Spans) -> tuple[list[int], list[int]]:
    """`_labels_of` from every token's offsets: a token trains when it overlaps a span.

    Offsets of one encoding only grow, so each span covers one run of tokens, found by bisection rather than
    a Python loop over every token.
    """
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first = bisect.bisect_right(offsets, start, key=_right_edge)
        last = bisect.bisect_left(offsets, end, lo=first, key=lambda o: o[0])
        labels[first:last] = ids[first:last]
    return list(ids), labels


def _encode_segments(text: str, spans: Spans, tokenizer) -> tuple[list[int], list[int]]:
    """Fallback for tokenizers without offsets: tokenize the pieces between span edges separately."""
    edges = sorted({0, len(text), *(e for span in spans for e in span)})
    ids, labels = [], []
    for a, b in zip(edges, edges[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        trains = any(s <= a and b <= e for s, e in spans)
        ids += piece
        labels += piece if trains else [IGNORE_INDEX] * len(piece)
    return ids, labels


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def decode_segments(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """``[(text, trained)]``: an example as the model sees it, split where training switches on or off.

    Each piece is cut out of the decoding of the whole prefix, not decoded on its own, because SentencePiece
    drops the leading space of a piece decoded alone and the result would no longer be what the model sees.
    """
    out, start, previous = [], 0, ""
    for end in range(1, len(ids) + 1):
        if end < len(ids) and (labels[end] != IGNORE_INDEX) == (labels[start] != IGNORE_INDEX):
            continue
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append((text[len(previous):], labels[start] != IGNORE_INDEX))
        start, previous = end, text
    return out
