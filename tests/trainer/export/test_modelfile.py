"""The Ollama Modelfile: its Go TEMPLATE must build the prompt text the model was trained on.

No Go toolchain or Ollama runs here, so `render_go` below evaluates the subset of Go's text/template the
Modelfile uses — text, ``{{ range .Messages }}``, ``{{ if eq .Role "x" }}`` / ``else if`` / ``else`` /
``{{ end }}``, field access (``.Content``, ``.Role``), string constants and the ``{{-``/``-}}`` trim markers —
following the Go semantics (https://pkg.go.dev/text/template): a trim marker removes all adjacent white space.
The comparison is then real: the Go template, rendered, against the training-side renderer (tunerun's default
template, or the tokenizer's Jinja chat template through `apply_chat_template`), for a system message and two
user turns.
"""
from __future__ import annotations

import json
import re

import pytest

from tunerun.jobs.errors import ExportError
from tunerun.trainer.export.modelfile import measure_chat_format, render_modelfile, training_renderer

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def parse_go(template: str) -> list:
    """[text | ("field", name) | ("const", str) | ("range", field, body) | ("if", [(cond, body)], else)]."""
    tokens, pos = [], 0
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if tokens and tokens[-1][0] == "trim_after":
            tokens.pop()
            text = text.lstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", m.group(2).strip()))
        if m.group(3):
            tokens.append(("trim_after", None))
        pos = m.end()
    tail = template[pos:]
    if tokens and tokens[-1][0] == "trim_after":
        tokens.pop()
        tail = tail.lstrip(" \t\r\n")
    tokens.append(("text", tail))
    body, rest = _parse_body(tokens, 0)
    assert rest == len(tokens), "unbalanced {{ end }}"
    return body


def _parse_body(tokens, i):
    out = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            out.append(value)
            i += 1
            continue
        if value == "end" or value == "else" or value.startswith("else if "):
            return out, i
        if value.startswith("range "):
            inner, i = _parse_body(tokens, i + 1)
            assert tokens[i][1] == "end"
            out.append(("range", value.split(None, 1)[1], inner))
            i += 1
        elif value.startswith("if "):
            branches, otherwise, cond = [], None, value[3:]
            while True:
                inner, i = _parse_body(tokens, i + 1)
                branches.append((cond, inner))
                action = tokens[i][1]
                if action == "end":
                    break
                if action == "else":
                    otherwise, i = _parse_body(tokens, i + 1)
                    assert tokens[i][1] == "end"
                    break
                cond = action[len("else if "):]
            out.append(("if", branches, otherwise))
            i += 1
        elif value.startswith('"'):
            out.append(("const", json.loads(value)))
            i += 1
        elif re.fullmatch(r"\.[A-Za-z]+", value):
            out.append(("field", value[1:]))
            i += 1
        else:
            raise AssertionError(f"action outside the supported subset: {{{{ {value} }}}}")
    return out, i


def _value(expr: str, dot):
    expr = expr.strip()
    if expr.startswith('"'):
        return json.loads(expr)
    assert re.fullmatch(r"\.[A-Za-z]+", expr), expr
    return dot[expr[1:]]


def _truth(cond: str, dot) -> bool:
    m = re.fullmatch(r'eq (\.[A-Za-z]+) ("(?:[^"\\]|\\.)*")', cond.strip())
    if m:
        return _value(m.group(1), dot) == _value(m.group(2), dot)
    return bool(_value(cond, dot))


def render_go(nodes, dot) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "const":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(dot[node[1]]))
        elif node[0] == "range":
            for item in _value(node[1], dot):
                out.append(render_go(node[2], item))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(cond, dot):
                    out.append(render_go(body, dot))
                    break
            else:
                if node[2] is not None:
                    out.append(render_go(node[2], dot))
    return "".join(out)


def test_the_go_evaluator_follows_go_semantics():
    # Outputs as Go's text/template gives them for these inputs (trim markers eat all adjacent white space).
    messages = {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    template = ('{{- range .Messages }}\n  {{- if eq .Role "user" }}U:{{ .Content }}\n{{ else }}A:{{ .Content }}'
                '{{ end -}}\n\n{{ end }}{{ "{{" }}')
    assert render_go(parse_go(template), messages) == "U:hi\nA:yo{{"


# ── the template against the training renderer ─────────────────────────────────────────────────────────────

CONVERSATION = [
    {"role": "system", "content": "You label support tickets. Answer with the category only."},
    {"role": "user", "content": "My invoice for March is wrong, I was charged twice."},
    {"role": "assistant", "content": "category: billing"},
    {"role": "user", "content": "And I can't log in to the portal since yesterday."},
]

CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama-3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
                "\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "chatml-with-default-system": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


def go_render(modelfile: str, messages: list[dict]) -> str:
    """What Ollama renders for a chat: the Modelfile's TEMPLATE over .Messages; SYSTEM comes first when the
    chat has no system message of its own (as Ollama's chat handler inserts it)."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    return render_go(parse_go(template), {"Messages": [{"Role": m["role"], "Content": m["content"]}
                                                       for m in messages]})


@pytest.fixture
def tokenizer(tokenizer):
    """The shared tiny tokenizer (tests/conftest.py); tests here set its chat_template, put back afterwards."""
    saved = tokenizer.chat_template
    yield tokenizer
    tokenizer.chat_template = saved


def test_default_template_modelfile_renders_what_training_renders(tokenizer):
    """The tiny model has no chat template: training uses tunerun's default one, and so must Ollama."""
    from tunerun.trainer.data.formats import Conversation
    from tunerun.trainer.data.render import render_default

    assert not tokenizer.chat_template
    modelfile = render_modelfile("m.gguf", measure_chat_format(training_renderer(tokenizer)), tokenizer.eos_token,
                                 num_ctx=256)
    # Training's text for the conversation followed by the assistant's reply: the prompt is everything before it.
    trained, _ = render_default(Conversation(messages=[*CONVERSATION, {"role": "assistant", "content": "X"}]),
                                tokenizer.eos_token)
    prompt = trained[:trained.rindex("X")]
    assert go_render(modelfile, CONVERSATION) == prompt
    assert prompt.endswith("<|user|>\nAnd I can't log in to the portal since yesterday.\n<|assistant|>\n")
    lines = modelfile.splitlines()
    assert "FROM ./m.gguf" in lines and "PARAMETER num_ctx 256" in lines
    assert 'PARAMETER stop "</s>"' in lines and 'PARAMETER stop "<|user|>"' in lines
    assert not any(line.startswith("SYSTEM") for line in lines)  # nothing the training data did not have


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_chat_template_modelfile_renders_what_apply_chat_template_renders(tokenizer, name):
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    fmt = measure_chat_format(training_renderer(tokenizer))
    modelfile = render_modelfile("m.gguf", fmt, tokenizer.eos_token, num_ctx=1024)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    expected = expected.removeprefix(tokenizer.bos_token)  # llama.cpp adds BOS when it tokenizes
    assert go_render(modelfile, CONVERSATION) == expected
    # Without a system message the template's own default comes back through the Modelfile's SYSTEM line.
    no_system = CONVERSATION[1:]
    expected = tokenizer.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True)
    assert go_render(modelfile, no_system) == expected.removeprefix(tokenizer.bos_token)
    assert ('SYSTEM """You are a helpful assistant."""' in modelfile) == (name == "chatml-with-default-system")


def test_a_system_line_given_by_the_user_and_braces_in_the_template(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"].replace("<|im_start|>", "{{<|im_start|>")
    fmt = measure_chat_format(training_renderer(tokenizer))
    modelfile = render_modelfile("m.gguf", fmt, tokenizer.eos_token, 512, system="Be brief.")
    assert 'SYSTEM """Be brief."""' in modelfile
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert "{{" in expected and go_render(modelfile, CONVERSATION) == expected


def test_a_template_that_is_not_per_message_is_refused_with_one_message(tokenizer):
    # Llama-2 style: the system message is folded into the first user turn.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}{% elif m['role'] == 'user' %}"
        "{{ '[INST] ' + ((ns + '\\n\\n') if loop.index0 == 1 else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    with pytest.raises(ExportError, match="cannot be written as an Ollama TEMPLATE"):
        measure_chat_format(training_renderer(tokenizer))
    tokenizer.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ExportError, match="System role not supported"):
        measure_chat_format(training_renderer(tokenizer))

