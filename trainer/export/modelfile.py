"""The Ollama ``Modelfile`` written beside a GGUF export: ``FROM``, ``TEMPLATE``, ``SYSTEM``, ``PARAMETER``.

``TEMPLATE`` must make Ollama build the same prompt text the model was trained on: the tokenizer's chat
template when it has one, else tunerun's default template (`tunerun.trainer.data.render.render_default`). A Jinja chat template
cannot be translated to Go template syntax in general, so instead the conversation format is *measured*: the
training-side renderer is run on a few probe conversations made of sentinel words, and the text around each
sentinel gives, per role, what comes before and after a message's content (plus the generation prompt and any
default system message the template injects). That per-message form is what Ollama's Go template expresses::

    {{ range .Messages }}{{ if eq .Role "system" }}<|system|>
    {{ .Content }}
    {{ else if eq .Role "user" }}<|user|>
    ...{{ end }}{{ end }}<|assistant|>

A candidate form is accepted only when it reproduces every probe exactly; templates that are not per-message
(e.g. ones folding the system message into the first user turn) are refused with a clear `ExportError` rather
than shipped with a TEMPLATE that silently differs from training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunerun.jobs.errors import ExportError

MODELFILE_TEMPLATE = Path(__file__).with_name("Modelfile.j2")
ROLES = ("system", "user", "assistant")
# Sentinel contents: plain words, so templates that trim or escape content leave them as they are.
S, U1, A1, U2, A2, CUT = "SYSTEMqz7", "USERqz1", "REPLYqz1", "USERqz2", "REPLYqz2", "CUTqz0"


@dataclass(frozen=True)
class ChatFormat:
    """Each message renders as ``prefix[role] + content + suffix[role]``; ``generation`` follows the last one."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None = None  # what the template inserts when the conversation has no system message

    def render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return text + (self.generation if generation_prompt else "")

    def go_template(self) -> str:
        """The same form in Go template syntax over Ollama's ``.Messages`` (each with ``.Role``, ``.Content``)."""
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
            f"{_go_literal(self.prefix[role])}{{{{ .Content }}}}{_go_literal(self.suffix[role])}"
            for i, role in enumerate(ROLES))
        return f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(self.generation)}"

    def stop_strings(self, eos: str | None) -> list[str]:
        """Where a reply ends: the assistant's end-of-turn text and the start of the next user turn."""
        stops = [self.suffix["assistant"].strip(), self.prefix["user"].strip(), (eos or "").strip()]
        return list(dict.fromkeys(s for s in stops if s))


def _go_literal(text: str) -> str:
    # Go templates treat "{{" as an action even in plain text; emit it as a string constant instead.
    return text.replace("{{", '{{ "{{" }}')


# ── measuring the format ────────────────────────────────────────────────────────────────────────────────────


def training_renderer(tokenizer):
    """``render(messages, generation_prompt) -> text`` exactly as training builds prompts (`tunerun.trainer.data.render`)."""
    from tunerun.trainer.data.formats import Conversation
    from tunerun.trainer.data.render import render_default

    bos = tokenizer.bos_token or ""
    if getattr(tokenizer, "chat_template", None):
        def render(messages: list[dict], generation_prompt: bool) -> str:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            # llama.cpp (and so Ollama) adds BOS itself when it tokenizes; a template's own would double it.
            return text[len(bos):] if bos and text.startswith(bos) else text
        return render

    eos = tokenizer.eos_token or ""

    def render_fallback(messages: list[dict], generation_prompt: bool) -> str:
        if not generation_prompt:
            return render_default(Conversation(messages=messages), eos)[0]
        # The default template's generation prompt is what precedes an assistant message's content.
        text = render_default(Conversation(messages=[*messages, {"role": "assistant", "content": CUT}]), eos)[0]
        return text[:text.index(CUT)]
    return render_fallback


PROBES: list[tuple[list[tuple[str, str]], bool]] = [
    ([("user", U1)], False), ([("user", U1)], True), ([("system", S), ("user", U1)], True),
    ([("user", U1), ("assistant", A1)], False), ([("system", S), ("user", U1), ("assistant", A1), ("user", U2)], True),
    ([("user", U1), ("assistant", A1), ("user", U2), ("assistant", A2)], False),
]


def measure_chat_format(render) -> ChatFormat:
    """The per-message form that reproduces ``render`` on every probe; ExportError when none does."""
    probes = [([{"role": r, "content": c} for r, c in turns], prompt) for turns, prompt in PROBES]
    try:
        expected = [render(messages, prompt) for messages, prompt in probes]
    except Exception as exc:  # a template that refuses a probe, e.g. "System role not supported"
        raise ExportError(f"the tokenizer's chat template cannot be written as an Ollama TEMPLATE: it refused a "
                          f"system + two-turn conversation ({exc})") from None
    for candidate in _candidates(expected[4], expected[0]):
        if all(candidate.render(m, p) == text for (m, p), text in zip(probes, expected)):
            return candidate
    raise ExportError("the tokenizer's chat template cannot be written as an Ollama TEMPLATE: it does not render "
                      "each message as prefix + content + suffix (for example it folds the system message into the "
                      f"first user turn). It renders a system + two-turn conversation as {json.dumps(expected[4])}")


def _candidates(full: str, user_only: str):
    """Every split of the full probe's separators into role suffixes and prefixes, shortest user prefix first."""
    try:
        positions = [full.index(s) for s in (S, U1, A1, U2)]
    except ValueError:
        return  # the template drops or rewrites content: no per-message form
    ends = [p + len(s) for p, s in zip(positions, (S, U1, A1, U2))]
    if positions != sorted(positions):
        return
    system_prefix = full[:positions[0]]
    after_system, after_user, after_reply, tail = (full[e:p] for e, p in zip(ends, [*positions[1:], len(full)]))
    for n in range(len(after_reply) + 1):  # after_reply = suffix[assistant] + prefix[user]
        user_prefix = after_reply[len(after_reply) - n:]
        if not after_system.endswith(user_prefix):
            continue
        for m in range(len(after_user) + 1):  # after_user = suffix[user] + prefix[assistant]
            user_suffix = after_user[:m]
            if not tail.startswith(user_suffix):
                continue
            fmt = ChatFormat(
                prefix={"system": system_prefix, "user": user_prefix, "assistant": after_user[m:]},
                suffix={"system": after_system[:len(after_system) - n], "user": user_suffix,
                        "assistant": after_reply[:len(after_reply) - n]},
                generation=tail[m:])
            yield fmt
            default = _default_system(fmt, user_only)
            if default is not None:
                yield ChatFormat(fmt.prefix, fmt.suffix, fmt.generation, default)


def _default_system(fmt: ChatFormat, user_only: str) -> str | None:
    """The system text a template inserts on its own, when ``user_only`` is a system block + the user turn."""
    plain = fmt.render([{"role": "user", "content": U1}], generation_prompt=False)
    head = user_only[:len(user_only) - len(plain)] if user_only.endswith(plain) else ""
    start, end = fmt.prefix["system"], fmt.suffix["system"]
    if head and head.startswith(start) and head.endswith(end) and len(head) >= len(start) + len(end):
        return head[len(start):len(head) - len(end)]
    return None


# ── the Modelfile ───────────────────────────────────────────────────────────────────────────────────────────


def render_modelfile(gguf_name: str, fmt: ChatFormat, eos: str | None, num_ctx: int,
                     system: str | None = None) -> str:
    """The Modelfile text; ``system`` (else the template's own default) becomes the SYSTEM line."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    template = fmt.go_template()
    system = system if system is not None else fmt.default_system
    for what, text in (("TEMPLATE", template), ("SYSTEM", system or "")):
        if '"""' in text:
            raise ExportError(f'the Modelfile {what} would contain """, which ends a Modelfile value early')
    env = Environment(loader=FileSystemLoader(MODELFILE_TEMPLATE.parent), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template(MODELFILE_TEMPLATE.name).render(
        gguf=f"./{gguf_name}", template=template, system=system,
        stops=[json.dumps(s, ensure_ascii=False) for s in fmt.stop_strings(eos)], num_ctx=num_ctx)
