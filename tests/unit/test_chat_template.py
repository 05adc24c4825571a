"""Chat templates: sandboxed rendering, the check that refuses hostile, broken and unbounded
templates, and which template the packager pins for a language model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_bundle.chat_template import (
    CHATML,
    GEMMA,
    KNOWN_TEMPLATES,
    MAX_TEMPLATE_BYTES,
    check_template,
    end_of_turn_markers,
    known_template,
    render_chat,
)
from edge_bundle.errors import BundleError, TemplateError
from model_packager.errors import SourceError
from model_packager.llm.template import choose_template
from model_packager.sources import LlmSource

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why burrs?"},
    {"role": "assistant", "content": "A worn die."},
    {"role": "user", "content": "And scratches?"},
]
ECHO = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

# A Hugging Face style template using what real ones use: namespace, loop controls, tojson,
# strftime_now, raise_exception, bos_token.
HF_STYLE = """\
{{- bos_token }}
{%- set ns = namespace(system=none) %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% continue %}{% endif %}
{%- if message['role'] not in ('user', 'assistant') %}{{ raise_exception('bad role') }}{% endif %}
[{{ message['role'] | upper }}] {{ message['content'] }}
{%- if loop.last and ns.system %} (system: {{ ns.system | tojson }}){% endif %}
{% endfor %}
{%- if add_generation_prompt %}[ASSISTANT] ({{ strftime_now('%Y') }}){% endif %}"""


def test_chatml_renders_every_turn_and_the_generation_prompt() -> None:
    prompt = render_chat(CHATML, CONVERSATION)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhy burrs?<|im_end|>\n"
        "<|im_start|>assistant\nA worn die.<|im_end|>\n"
        "<|im_start|>user\nAnd scratches?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not render_chat(CHATML, CONVERSATION[1:2], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n"
    )


def test_gemma_folds_system_into_the_first_user_turn_and_names_the_model_role() -> None:
    prompt = render_chat(GEMMA, CONVERSATION, bos_token="<bos>")
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhy burrs?<end_of_turn>\n"
        "<start_of_turn>model\nA worn die.<end_of_turn>\n"
        "<start_of_turn>user\nAnd scratches?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    with pytest.raises(TemplateError, match="role tool is not supported"):
        render_chat(GEMMA, [{"role": "tool", "content": "x"}])


def test_known_templates_pass_their_own_check_and_name_their_stop_strings() -> None:
    for text in KNOWN_TEMPLATES.values():
        check_template(text)
    assert known_template(" ChatML ") == CHATML and known_template("llama9") is None
    assert end_of_turn_markers(CHATML) == ("<|im_end|>",)
    assert end_of_turn_markers(GEMMA) == ("<end_of_turn>",)
    assert end_of_turn_markers(ECHO) == ()


def test_a_hugging_face_style_template_is_accepted() -> None:
    check_template(HF_STYLE)
    prompt = render_chat(HF_STYLE, CONVERSATION, bos_token="<s>")
    assert prompt.startswith("<s>[USER] Why burrs?")
    assert '(system: "Be brief.")' in prompt
    assert prompt.endswith(f"[ASSISTANT] ({time.gmtime().tm_year})")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os.system('id') }}",
        "{{ messages|attr('__class__') }}",
        "{% if messages|length > 99 %}{{ self._TemplateReference__context }}{% endif %}",
        "{{ messages['__class__'] }}",
        # Built at run time, so only the sandbox can see it.
        ECHO + "{% set a = '_' ~ '_class__' %}{{ ''|attr(a) }}",
        ECHO + "{% set a = '_' ~ '_class__' %}{{ ''[a] }}",
        ECHO + "{{ 'x' * 100000000 }}",
        ECHO + "{{ 9 ** 99999999 }}",
        ECHO + "{{ '%0999999999d' % 1 }}",
        ECHO + "{{ '{:>999999999}'.format(1) }}",
        ECHO + "{{ 'a'|center(999999999) }}",
        ECHO + "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ECHO + "{% set ns = namespace(x='ab') %}{% for i in range(40) %}"
        "{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
        "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}" + ECHO + "{{ f('ab') }}",
    ],
)
def test_hostile_templates_are_refused_as_unsafe(template: str) -> None:
    with pytest.raises(TemplateError) as refused:
        check_template(template)
    assert refused.value.unsafe, str(refused.value)
    assert isinstance(refused.value, BundleError)


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{% for m in messages %}{{ m.content }}", "does not parse"),
        ("{% for m in messages %}{{ m.text }}{% endfor %}", "dropped the user message"),
        ("{% include 'other.jinja' %}", "loads another template"),
        (ECHO + "{{ lipsum(100000) }}", "'lipsum'"),
        ("{{ raise_exception('no chat here') }}", "refuses a plain user conversation"),
        (ECHO + "{% for i in range(99) %}{{ 'x' * 99999 }}{% endfor %}", "wrote over"),
        ("{{ messages[0]['content'] / 2 }}", "failed to render"),
        ("x" * (MAX_TEMPLATE_BYTES + 1), "bytes, over"),
    ],
)
def test_broken_templates_are_refused_with_the_reason(template: str, reason: str) -> None:
    with pytest.raises(TemplateError, match=reason) as refused:
        check_template(template)
    assert not refused.value.unsafe


def test_a_template_that_loops_without_output_is_stopped_by_the_deadline() -> None:
    # 4e10 iterations of string characters: no range() budget and no output cap applies.
    looping = (
        ECHO + "{% for c in 'x' * 200000 %}{% for d in 'y' * 200000 %}{% endfor %}{% endfor %}"
    )
    started = time.monotonic()
    with pytest.raises(TemplateError, match="loops without bound"):
        check_template(looping)
    assert time.monotonic() - started < 10


def test_a_template_may_refuse_system_messages_on_purpose() -> None:
    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    check_template(no_system)
    with pytest.raises(TemplateError, match="refused the conversation: system messages"):
        render_chat(no_system, CONVERSATION)


def test_render_output_is_capped() -> None:
    with pytest.raises(TemplateError, match="over 100 characters"):
        render_chat(ECHO, [{"role": "user", "content": "x" * 200}], max_chars=100)


# ----------------------------------------------------------------- pinning at packaging


def _source(template: str | None, kind: str = "gguf") -> LlmSource:
    path = Path("model.gguf") if kind == "gguf" else Path("model-dir")
    return LlmSource(
        kind="gguf" if kind == "gguf" else "hf",
        path=path,
        architecture="llama",
        weights=path,
        adapter=None,
        adapter_weights=None,
        uses_pickle=False,
        context_length=2048,
        chat_template=template,
    )


def test_the_models_own_template_is_pinned_unless_one_is_given(tmp_path: Path) -> None:
    pinned, notes = choose_template(_source(CHATML), None)
    assert pinned is not None and pinned.text == CHATML and pinned.stop == ("<|im_end|>",)
    assert pinned.origin == "embedded in model.gguf" and notes == []
    pinned, _ = choose_template(_source(CHATML), "gemma")
    assert pinned is not None and pinned.text == GEMMA and pinned.origin == "built-in gemma"
    given = tmp_path / "mine.jinja"
    given.write_text(ECHO)
    pinned, _ = choose_template(_source(None), str(given))
    assert pinned is not None and pinned.origin == "file mine.jinja" and pinned.stop == ()


def test_no_template_means_plain_completion_only() -> None:
    pinned, notes = choose_template(_source(None), None)
    assert pinned is None
    assert any("plain completion only" in note for note in notes)


def test_a_broken_own_template_can_be_replaced_but_an_unsafe_one_cannot() -> None:
    broken = "{% for m in messages %}{{ m.text }}{% endfor %}"
    with pytest.raises(SourceError, match="--chat-template"):
        choose_template(_source(broken), None)
    pinned, notes = choose_template(_source(broken), "chatml")
    assert pinned is not None and pinned.text == CHATML
    assert any("replaced" in note for note in notes)
    hostile = "{{ cycler.__init__.__globals__ }}"
    for kind, advice in (("gguf", "--remove-metadata"), ("hf", "tokenizer_config.json")):
        with pytest.raises(SourceError, match="travel inside the model file") as refused:
            choose_template(_source(hostile, kind), "chatml")
        assert advice in str(refused.value)


def test_a_given_template_that_is_missing_or_hostile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="neither a file nor a known template"):
        choose_template(_source(None), str(tmp_path / "missing.jinja"))
    hostile = tmp_path / "hostile.jinja"
    hostile.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SourceError, match="__subclasses__"):
        choose_template(_source(None), str(hostile))
