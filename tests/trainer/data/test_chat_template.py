"""tunerun's default chat format travels with the weights as a chat template that renders exactly like training.

Three renderers must agree on every conversation: `render_default` (what training tokenizes), transformers'
`apply_chat_template` with the saved template (what vLLM, llama.cpp's converters and users' code run) and the
service's `ChatTemplate` (what the gateway sends to the engine).
"""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tunerun.cluster.run_folder import CHAT_TEMPLATE as CHAT_TEMPLATE_FILE
from tunerun.jobs.service.chat import ChatTemplate, TemplateRefused
from tunerun.trainer.data.formats import Conversation
from tunerun.trainer.data.render import DEFAULT_CHAT_TEMPLATE, render_default
from tunerun.trainer.tokenizer import save_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für eine Stadt",
                                            "parameters": {"type": "object", "properties": {"city": {}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CONVERSATIONS = {
    "one turn": ([{"role": "user", "content": "Where is my refund?"}], []),
    "system and two turns": ([{"role": "system", "content": "You are Acme's support desk."},
                              {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "My order #123 is late."}], []),
    "tools without a system turn": ([{"role": "user", "content": "Weather in Zürich?"}], TOOLS),
    "tools joining the system turn": ([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Weather?"}], TOOLS),
    "a tool call and its result": ([{"role": "user", "content": "Weather in Zürich?"},
                                    {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                    {"role": "tool", "content": "{\"temp\": 21}"}], TOOLS),
    "text beside a tool call": ([{"role": "user", "content": "Weather?"},
                                 {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, CALL]},
                                 {"role": "tool", "content": "sunny"}], TOOLS),
}


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer (it has no chat template) saved as the trainer saves it beside weights."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not tokenizer.chat_template
    folder = tmp_path_factory.mktemp("adapter")
    save_tokenizer(tokenizer, folder)
    return folder


def training_prompt(messages: list[dict], tools: list[dict], eos: str) -> str:
    """What training renders before an assistant's answer: the conversation with an empty last turn, cut there."""
    cut = {"role": "assistant", "content": "\x00"}
    text, _ = render_default(Conversation(messages=[*messages, cut], tools=tools), eos)
    return text[:text.index("\x00")]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_saved_template_renders_prompts_as_training_did(saved, name):
    messages, tools = CONVERSATIONS[name]
    reloaded = AutoTokenizer.from_pretrained(saved)  # what vLLM and users load
    assert (saved / CHAT_TEMPLATE_FILE).read_text() == DEFAULT_CHAT_TEMPLATE.read_text()
    expected = training_prompt(messages, tools, reloaded.eos_token)
    by_transformers = reloaded.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                   add_generation_prompt=True)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    by_service = ChatTemplate((saved / CHAT_TEMPLATE_FILE).read_text(), config).render(messages, tools)
    assert by_transformers == expected and by_service == expected


def test_a_whole_conversation_renders_as_training_text(saved):
    messages, tools = CONVERSATIONS["a tool call and its result"]
    messages = [*messages, {"role": "assistant", "content": "21 °C and sunny."}]
    reloaded = AutoTokenizer.from_pretrained(saved)
    assert reloaded.apply_chat_template(messages, tools=tools, tokenize=False) == \
        render_default(Conversation(messages=messages, tools=tools), reloaded.eos_token)[0]


def test_a_template_that_refuses_a_conversation_is_the_requests_fault():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}"
                            "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}", {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "hi"}]) == "hi"  # the engine adds BOS itself
    with pytest.raises(TemplateRefused, match="start with a user turn"):
        template.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TemplateRefused, match="cannot render"):
        ChatTemplate("{{ messages[0].content.nope() }}", {}).render([{"role": "user", "content": "x"}])
