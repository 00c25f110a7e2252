"""Chat templates rendered in jinja2's immutable sandbox, against transformers' apply_chat_template."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from attnkit.loading import ModelLoadError, defaults  # noqa: E402
from attnkit.loading.gguf_file import GGUFFile  # noqa: E402
from attnkit.text.chat_template import ChatTemplateError, render_chat  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Und auf Deutsch? 😀"}],
]

# a Llama-3-style template: bos_token variable, loop controls, tojson, raise_exception
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role: ' + m['role']) }}{% endif %}{% if m['content'] == 'skip' %}{% continue %}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol():
    try:
        path = defaults.default_chat_model()
    except ModelLoadError as e:  # pragma: no cover
        pytest.skip(str(e))
    return GGUFFile(path).metadata["tokenizer.chat_template"], transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smollm2_template_matches_transformers(smol, conv, gen):
    template, ref = smol
    msgs = CONVERSATIONS[conv]
    want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_chat(template, msgs, add_generation_prompt=gen) == want
    if conv == 0:
        assert "You are a helpful AI assistant named SmolLM" in want  # the template's default system turn


def test_llama3_like_template_matches_transformers(smol):
    _, ref = smol
    msgs = CONVERSATIONS[1] + [{"role": "user", "content": "skip"}]
    tools = [{"name": "calc", "parameters": {"x": "int"}}]
    want = ref.apply_chat_template(msgs, chat_template=LLAMA3_LIKE, tokenize=False, add_generation_prompt=True, tools=tools)
    got = render_chat(LLAMA3_LIKE, msgs, bos_token=ref.bos_token, tools=tools)
    assert got == want and "skip" not in got and got.startswith(ref.bos_token)


def test_template_raise_exception():
    with pytest.raises(ChatTemplateError, match="bad role: robot"):
        render_chat(LLAMA3_LIKE, [{"role": "robot", "content": "x"}])


def test_sandbox_blocks_unsafe_templates():
    with pytest.raises(ChatTemplateError):  # no reaching Python internals
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError):  # no mutating the inputs
        render_chat("{{ messages.append({'role': 'user'}) }}", CONVERSATIONS[0])


def test_missing_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="has no chat template.*attnkit generate"):
        render_chat(None, CONVERSATIONS[0], source="tiny.gguf")
