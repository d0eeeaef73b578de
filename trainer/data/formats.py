"""Record formats → one conversation shape: ``Conversation(messages, tools)``.

A message is ``{"role": "system"|"user"|"assistant"|"tool"|"text", "content": str}``; an assistant message
may carry ``"weight": 0`` (shown to the model, not trained on) and ``"tool_calls"`` (OpenAI shape, with
``arguments`` decoded to a dict, which is what Hugging Face chat templates expect). ``tools`` is the list of
function schemas the conversation may call, each ``{"type": "function", "function": {...}}``.

- chat: ``{"messages": [{"role", "content", "weight"?, "tool_calls"?}], "tools"?}`` (OpenAI chat JSONL);
  ``content`` may be a list of ``{"type": "text", "text"}`` parts.
- sharegpt: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``; human → user, gpt → assistant,
  function_call → assistant tool call, observation → tool.
- alpaca: ``{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}``; the user turn is
  instruction and input joined by a blank line.
- text: ``{"text"}`` → one ``"text"`` message: continued pre-training, loss on every token.

Preference pairs (the ``dpo`` objective): a prompt, the answer people preferred and the one they ranked below it.
The conversation's ``messages`` are the prompt followed by the preferred answer (from ``answer_start``), and
``rejected`` is the other answer, said after the same prompt.

- openai_preference: ``{"input": {"messages", "tools"?}, "preferred_output": [...], "non_preferred_output":
  [...]}`` (OpenAI's DPO fine-tuning JSONL; the outputs are assistant messages).
- trl_preference: ``{"prompt", "chosen", "rejected"}`` (TRL), each a string or a list of messages.
- sharegpt_ranking: ``{"conversations": [...], "chosen": {"from", "value"}, "rejected": {...}}`` (LLaMA-Factory).
- alpaca_ranking: ``{"instruction", "input"?, "chosen", "rejected"}`` (LLaMA-Factory).

Conversations must read in order: an optional system message first, then a user turn, then replies that
alternate (tool results follow an assistant turn), and at least one assistant turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from tunerun.jobs.errors import DataError

FORMATS = ("chat", "sharegpt", "alpaca", "text")
PREFERENCE_FORMATS = ("openai_preference", "trl_preference", "sharegpt_ranking", "alpaca_ranking")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "assistant",
                  "observation": "tool", "system": "system"}
FORMAT_SHAPES = ('chat {"messages": [...]}, sharegpt {"conversations": [...]}, '
                 'alpaca {"instruction", "output"}, text {"text"}')
PREFERENCE_SHAPES = ('openai_preference {"input", "preferred_output", "non_preferred_output"}, trl_preference '
                     '{"prompt", "chosen", "rejected"}, sharegpt_ranking {"conversations", "chosen", "rejected"}, '
                     'alpaca_ranking {"instruction", "chosen", "rejected"}')
_KEY_FIELD = {"chat": "messages", "sharegpt": "conversations", "alpaca": "instruction", "text": "text",
              "openai_preference": "preferred_output", "trl_preference": "prompt", "sharegpt_ranking": "chosen",
              "alpaca_ranking": "chosen"}
# What may follow each role; "start" is before the first non-system message.
_NEXT = {"start": {"user"}, "user": {"assistant"}, "assistant": {"user", "tool"}, "tool": {"tool", "assistant"}}


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    # A preference pair: ``messages[answer_start:]`` is the preferred answer, ``rejected`` the other one.
    rejected: list[dict] | None = None
    answer_start: int = 0

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    def rejected_conversation(self) -> "Conversation":
        """The prompt followed by the rejected answer."""
        return Conversation(self.messages[:self.answer_start] + self.rejected, self.tools)

    def all_messages(self) -> list[dict]:
        """Every message whose text cleaning visits: the rejected answer's too."""
        return self.messages + (self.rejected or [])


def detect_format(record: dict) -> str:
    """The record's format from its keys (`FORMATS`, `PREFERENCE_FORMATS`); `DataError` naming the keys if none
    fits."""
    if "preferred_output" in record and "non_preferred_output" in record:
        return "openai_preference"
    if "chosen" in record and "rejected" in record:
        if "prompt" in record:
            return "trl_preference"
        if "conversations" in record:
            return "sharegpt_ranking"
        if "instruction" in record:
            return "alpaca_ranking"
    if isinstance(record.get("messages"), list):
        return "chat"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if isinstance(record.get("text"), str):
        return "text"
    raise DataError(f"unknown record format: found keys {sorted(record)}; expected one of {FORMAT_SHAPES}; or "
                    f"for preference tuning one of {PREFERENCE_SHAPES}. Set data.format, or map your field names "
                    "with data.columns (e.g. columns: {instruction: question, output: answer})")


def to_conversation(record: dict, fmt: str) -> Conversation:
    """Normalise a record of format ``fmt``; `DataError` when it does not have that format's shape or its
    turns are out of order."""
    if fmt not in FORMATS + PREFERENCE_FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS + PREFERENCE_FORMATS)}")
    if _KEY_FIELD[fmt] not in record:
        raise DataError(f"expected {fmt} format but found keys {sorted(record)}")
    if fmt in PREFERENCE_FORMATS:
        return _preference_pair(record, fmt)
    if fmt == "text":
        return Conversation([_message("text", record["text"], "text")])
    parse = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca}[fmt]
    conversation = parse(record)
    check_order(conversation.messages, "messages" if fmt == "chat" else "conversations")
    return conversation


def to_messages(record: dict, fmt: str) -> list[dict]:
    return to_conversation(record, fmt).messages


def trainable(message: dict) -> bool:
    return message["role"] in ("assistant", "text") and message.get("weight", 1) != 0


def check_order(messages: list[dict], where: str) -> None:
    """Refuse conversations a chat template cannot render faithfully (or that teach nothing)."""
    state = "start"
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i:
                raise DataError(f"{where}[{i}]: a system message is only allowed first (found after "
                                f"{messages[i - 1]['role']}); merge it into the first system message")
            continue
        if role not in _NEXT[state]:
            after = "at the start" if state == "start" else f"right after a {state} turn"
            expected = " or ".join(sorted(_NEXT[state]))
            raise DataError(f"{where}[{i}]: roles out of order: {role} {after}, expected {expected} "
                            f"(roles: {', '.join(x['role'] for x in messages)}); turns must alternate user → "
                            "assistant (→ tool → assistant), so merge or drop the extra turn")
        state = role
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"conversation has no assistant turn (roles: {', '.join(m['role'] for m in messages)}); "
                        "each record needs at least one assistant reply to train on")


def _message(role: str, content, where: str, weight=1) -> dict:
    if not isinstance(content, str):
        raise DataError(f"{where} must be a string, got {type(content).__name__}")
    if weight not in (0, 1):  # True/False and 0.0/1.0 compare equal and pass
        raise DataError(f"{where}: weight must be 0 or 1, got {weight!r}")
    return {"role": role, "content": content} | ({"weight": 0} if weight == 0 else {})


def _chat(record: dict) -> Conversation:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError(f"messages must be a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if type(m) is dict and len(m) == 2 and type(m.get("content")) is str and m.get("role") in CHAT_ROLES:
            out.append({"role": m["role"], "content": m["content"]})  # most messages: what the checks below give
            continue
        if not isinstance(m, dict):
            raise DataError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise DataError(f"messages[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        calls = _tool_calls(m.get("tool_calls"), f"messages[{i}].tool_calls") if role == "assistant" else []
        content = _text_content(m.get("content"), f"messages[{i}].content", allow_none=bool(calls))
        message = _message(role, content, f"messages[{i}].content", m.get("weight", 1) if role == "assistant" else 1)
        out.append(message | ({"tool_calls": calls} if calls else {}))
    return Conversation(out, _tools(record.get("tools")))


def _text_content(content, where: str, allow_none: bool):
    """OpenAI content: a string, a list of text parts, or null beside tool calls."""
    if content is None and allow_none:
        return ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise DataError(f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported")
        return "".join(p["text"] for p in content)
    return content


def _tool_calls(calls, where: str) -> list[dict]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise DataError(f"{where} must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        out.append({"type": "function",
                    "function": {"name": function["name"], "arguments": _arguments(function.get("arguments"))}})
    return out


def _arguments(arguments):
    # OpenAI sends arguments as a JSON string; templates (and the default rendering) want the object.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def _tools(tools) -> list[dict]:
    """Tool schemas from a list or a JSON string (sharegpt files store them as a string)."""
    if tools is None or tools == "":
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"tools is a string but not JSON ({e.msg}); expected a list of function schemas") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError("tools must be a list of function schemas ({'type': 'function', 'function': {...}})")
    # glaive-style files list bare {"name", "description", "parameters"}; wrap them the way OpenAI does.
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _sharegpt(record: dict) -> Conversation:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"conversations must be a list, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(f"conversations[{i}] needs 'from' as one of {', '.join(SHAREGPT_ROLES)} and a 'value'")
        message = _message(role, turn.get("value"), f"conversations[{i}].value")
        if turn["from"] == "function_call":
            message = _function_call(message)
        out.append(message)
    if system := _optional_str(record, "system"):
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{system}\n\n{out[0]['content']}"
        else:
            out.insert(0, {"role": "system", "content": system})
    return Conversation(out, _tools(record.get("tools")))


def _function_call(message: dict) -> dict:
    """A sharegpt function_call value is ``{"name", "arguments"}`` as JSON; anything else stays plain text."""
    try:
        call = json.loads(message["content"])
    except json.JSONDecodeError:
        return message
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return message
    function = {"name": call["name"], "arguments": _arguments(call.get("arguments"))}
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}


def _alpaca(record: dict) -> Conversation:
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
    return Conversation(out + [prompt, _message("assistant", record.get("output"), "output")])


def _optional_str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{key} must be a string, got {type(value).__name__}")
    return value or ""


# ── preference pairs ────────────────────────────────────────────────────────────────────────────────────────


def _preference_pair(record: dict, fmt: str) -> Conversation:
    """A pair as one conversation (prompt + preferred answer) and the rejected answer; both answers must be
    assistant turns that may follow the prompt."""
    prompt, chosen, rejected = {"openai_preference": _openai_pair, "trl_preference": _trl_pair,
                                "sharegpt_ranking": _sharegpt_pair, "alpaca_ranking": _alpaca_pair}[fmt](record)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or any(m["role"] != "assistant" for m in answer):
            raise DataError(f"the {name} answer must be one or more assistant messages")
    if not any(m["role"] == "user" for m in prompt.messages):
        raise DataError("the prompt of a preference pair needs a user turn")
    # Earlier assistant turns of the prompt are context: only the two answers are compared.
    context = [m | {"weight": 0} if m["role"] == "assistant" else m for m in prompt.messages]
    pair = Conversation(context + chosen, prompt.tools, rejected=rejected, answer_start=len(context))
    check_order(pair.messages, "prompt and chosen answer")
    check_order(pair.rejected_conversation().messages, "prompt and rejected answer")
    return pair


def _openai_pair(record: dict) -> tuple[Conversation, list[dict], list[dict]]:
    source = record.get("input")
    if not isinstance(source, dict) or not isinstance(source.get("messages"), list):
        raise DataError('input must be an object with messages: {"input": {"messages": [...]}, ...}')
    prompt = _chat(source)
    return prompt, _answer(record["preferred_output"], "preferred_output"), \
        _answer(record["non_preferred_output"], "non_preferred_output")


def _answer(value, where: str) -> list[dict]:
    """An answer given as a string or as a list of messages (OpenAI chat shape)."""
    if isinstance(value, str):
        return [_message("assistant", value, where)]
    if isinstance(value, dict):  # one message, not in a list
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where} must be a string or a list of assistant messages, got {type(value).__name__}")
    return _chat({"messages": value}).messages


def _trl_pair(record: dict) -> tuple[Conversation, list[dict], list[dict]]:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        conversation = Conversation([_message("user", prompt, "prompt")], _tools(record.get("tools")))
    elif isinstance(prompt, list):
        conversation = _chat({"messages": prompt, "tools": record.get("tools")})
    else:
        raise DataError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    return conversation, _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")


def _sharegpt_pair(record: dict) -> tuple[Conversation, list[dict], list[dict]]:
    prompt = _sharegpt(record)

    def turn(value, where: str) -> list[dict]:
        if not isinstance(value, dict) or value.get("from") not in ("gpt", "function_call"):
            raise DataError(f'{where} must be one turn {{"from": "gpt", "value": ...}}')
        return _sharegpt({"conversations": [value]}).messages

    return prompt, turn(record["chosen"], "chosen"), turn(record["rejected"], "rejected")


def _alpaca_pair(record: dict) -> tuple[Conversation, list[dict], list[dict]]:
    prompt = _alpaca(record | {"output": ""})
    prompt.messages.pop()  # the empty output stood in for the answers
    return prompt, _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
