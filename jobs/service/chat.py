"""Chat messages → the prompt text a fine-tuned model saw in training, rendered by the service.

The template is the one saved beside the run's weights (``chat_template.jinja``, written by the trainer: the
tokenizer's own, or tunerun's default format). The gateway renders it here and sends the text to the engine's
``/v1/completions``, which tokenizes a prompt as one string, as training did; the engine's own chat path would
tokenize a template's BOS apart from the text after it and start the prompt with other token ids (DESIGN.md).
Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with trimmed blocks, its
``tojson`` and ``raise_exception``, and the tokenizer's special tokens as variables.
"""
from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunerun.trainer.data.render import DEFAULT_CHAT_TEMPLATE  # torch-free: the default format's owner

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TemplateRefused(ValueError):
    """The template refused the conversation (e.g. "roles must alternate"): the request's fault, a 400."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: Jinja's own sorts keys and escapes HTML, which no training template expects
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateRefused(message)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def source_of_weights(template: str | None, tokenizer_config: dict) -> str:
    """The template a model's weights carry: the one saved beside them, else its tokenizer config's, else tunerun's
    default (what training rendered with when the tokenizer had none). The gateway renders with it, and an engine
    pod starts vLLM with it (`tunerun.jobs.service.engine_files`)."""
    return template or tokenizer_config.get("chat_template") or DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")


class ChatTemplate:
    def __init__(self, source: str, tokenizer_config: dict):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = environment.from_string(source)
        self.special = {name: _token_text(tokenizer_config.get(name)) or "" for name in SPECIAL_TOKENS}
        # Llama-style tokenizers add BOS themselves (add_bos_token defaults to true): one in the text would double it
        self.engine_adds_bos = tokenizer_config.get("add_bos_token", True) is not False

    @classmethod
    def of_weights(cls, template: str | None, tokenizer_config: dict) -> ChatTemplate:
        return cls(source_of_weights(template, tokenizer_config), tokenizer_config)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt for the assistant's next turn; `TemplateRefused` when the template will not render it."""
        try:
            text = self.template.render(messages=messages, tools=tools or None, add_generation_prompt=True,
                                        **self.special)
        except TemplateRefused:
            raise
        except (TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise TemplateRefused(f"the model's chat template cannot render these messages ({exc})") from None
        bos = self.special["bos_token"]
        if self.engine_adds_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text
