"""Chat templates: sandboxed rendering of a conversation into a prompt, and the check a template
must pass before it is pinned in a bundle (packager) or loaded (agent).

A chat template is Jinja text that arrives with a model (a GGUF's `tokenizer.chat_template`, a
Hugging Face `tokenizer_config.json`) or from a user, so it is untrusted: a template rendered in a
plain Jinja environment can reach Python internals (CVE-2024-34359 in llama-cpp-python). Here it
only ever runs in an `ImmutableSandboxedEnvironment` that also bounds what it may build: ranges,
repeated strings, format widths, values kept in namespaces or passed to macros, and the output.
`check_template` adds a static scan (underscore attributes, imports of other templates), renders
sample conversations, requires every message to reach the prompt, and stops a template that runs
too long. `bos_token` defaults to "": llama.cpp's tokenizer adds BOS itself when it is configured
to, and a second one would change the model's output.

The known templates ("chatml", "gemma") are our own text, written from the published turn formats.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import cache, lru_cache, wraps
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from edge_bundle.errors import TemplateError

MAX_TEMPLATE_BYTES = 64 * 1024
MAX_RENDER_CHARS = 1_000_000  # a prompt longer than any context we run
CHECK_RENDER_CHARS = 64 * 1024  # sample conversations are short; their prompts must be too
MAX_VALUE_CHARS = 256 * 1024  # any one string or list a template builds
MAX_RANGE_ITEMS = 10_000  # all range() items of one render together
CHECK_SECONDS = 2.0
_CHECK_FILENAME = "<chat template>"
# A width or precision of 6+ digits in a format string allocates megabytes before any check could
# see the result: printf style (%, the format filter, strftime) and str.format style.
_HUGE_FORMAT_WIDTH = re.compile(
    r"%[-+ #0_^]*\d{6,}|%[-+ #0_^]*\d*\.\d{6,}|\{[^{}]*:[^{}]*\d{6,}[^{}]*\}"
)
# Filters and tests that take an attribute name: a constant one starting with '_' is refused.
_ATTRIBUTE_FILTERS = frozenset(
    {"attr", "map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max"}
)
_WIDTH_FILTERS = ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice")
# Globals Jinja offers that chat templates have no use for; fewer objects, less to abuse.
_REMOVED_GLOBALS = ("cycler", "joiner", "lipsum")
_LOADS_TEMPLATES = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)
END_OF_TURN_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<end_of_utterance>")

CHATML = """\
{%- for message in messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Gemma's turns: roles `user` and `model`, no system role (a system message is folded into the
# first user turn), each turn closed by <end_of_turn>.
GEMMA = """\
{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{%- set ns.system = ns.system ~ message['content'] ~ '\\n\\n' %}
{%- elif message['role'] in ('user', 'assistant') %}
{%- set role = 'model' if message['role'] == 'assistant' else 'user' %}
<start_of_turn>{{ role }}
{{ ns.system if role == 'user' else '' }}{{ message['content'] | trim }}<end_of_turn>
{% if role == 'user' %}{% set ns.system = '' %}{% endif %}
{%- else %}
{{- raise_exception('role ' ~ message['role'] ~ ' is not supported: use system, user or assistant') }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<start_of_turn>model
{% endif %}"""

KNOWN_TEMPLATES: Mapping[str, str] = {"chatml": CHATML, "gemma": GEMMA}

_SYSTEM = {"role": "system", "content": "You are the assistant of a press line."}
_USER = {"role": "user", "content": "Why do brackets from press 3 show burrs?"}
_ASSISTANT = {"role": "assistant", "content": "A worn die usually leaves burrs on the edges."}
_USER_AGAIN = {"role": "user", "content": "How often is the die changed?"}
# (conversation, whether the template may refuse it with raise_exception)
_SAMPLES: tuple[tuple[list[dict[str, str]], bool], ...] = (
    ([_USER], False),
    ([_USER, _ASSISTANT, _USER_AGAIN], False),
    ([_SYSTEM, _USER], True),
)


class _RefusalError(Exception):
    """raise_exception() called by the template: it refuses this conversation on purpose."""


class _Budget:
    """What one render may still spend on range() items."""

    def __init__(self) -> None:
        self.range_items = MAX_RANGE_ITEMS

    def range(self, *args: int) -> range:
        items = range(*args)
        self.range_items -= len(items)
        if self.range_items < 0:
            raise SecurityError(f"the template asked for over {MAX_RANGE_ITEMS} range() items")
        return items


class _BoundedNamespace(Namespace):
    """`namespace()` whose values stay small: a loop cannot grow one without bound."""

    def __setitem__(self, name: str, value: Any) -> None:
        _check_size(value, f"namespace value {name!r}")
        super().__setitem__(name, value)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The sandbox chat templates run in: immutable, with bounded values and no loader."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        # The same whitespace rules and loop controls as Hugging Face's chat template renderer.
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        for name in _REMOVED_GLOBALS:
            self.globals.pop(name, None)
        self.globals["namespace"] = _BoundedNamespace
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        for name in _WIDTH_FILTERS:
            self.filters[name] = _bounded_filter(self.filters[name], name)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _number(right) and abs(right) > 64:
            raise SecurityError(f"exponent {right} is too large for a chat template")
        if operator == "*" and _number(left) != _number(right):
            count, value = (left, right) if _number(left) else (right, left)
            _check_size_estimate(len(value) * max(count, 0), "a repeated value")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
        result = super().call_binop(context, operator, left, right)
        _check_size(result, f"the result of {operator!r}")
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        for value in (*args, *kwargs.values()):
            _check_size(value, "an argument")
        result = super().call(__context, __obj, *args, **kwargs)
        _check_size(result, "a call's result")
        return result

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox answers an unsafe attribute with an Undefined that renders as "";
        # a template that asks for one is hostile, so it stops here.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed"
        )

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(str(value.__self__))
        return wrapped


@cache
def _environment() -> _ChatSandbox:
    return _ChatSandbox()


def known_template(name: str) -> str | None:
    """The text of a known template by name ("chatml", "gemma"), or None."""
    return KNOWN_TEMPLATES.get(name.strip().lower())


def end_of_turn_markers(template: str) -> tuple[str, ...]:
    """The end-of-turn markers the template writes, in a fixed order: the stop strings."""
    return tuple(marker for marker in END_OF_TURN_MARKERS if marker in template)


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    max_chars: int = MAX_RENDER_CHARS,
) -> str:
    """The prompt for `messages` (each with `role` and `content`), rendered in the sandbox.

    Raises `TemplateError` when the template does not compile, refuses the conversation
    (raise_exception), reaches for something the sandbox forbids, or writes over `max_chars`.
    """
    try:
        return _render(template, messages, add_generation_prompt, bos_token, eos_token, max_chars)
    except _RefusalError as exc:
        raise TemplateError(f"the chat template refused the conversation: {exc}") from exc


def as_parts(messages: list[dict[str, Any]], marker: str) -> list[dict[str, Any]]:
    """The conversation as a vision-language template reads it: every content a list of parts,
    `{"type": "text", "text": ...}`, with an image part written as its text `marker` (what
    llama-cpp-python's `MTMDChatHandler` does). A string content becomes one text part."""
    shaped = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts: Any = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [
                {"type": "text", "text": marker}
                if isinstance(part, dict) and part.get("type") in ("image", "image_url")
                else part
                for part in content
            ]
        else:
            parts = content
        shaped.append({**message, "content": parts})
    return shaped


def check_template(template: str, *, image_marker: str | None = None) -> None:
    """Refuse (`TemplateError`) a template that is too large, unsafe, broken or unbounded.

    With `image_marker` (a vision-language bundle) the samples are given as lists of parts
    (`as_parts`), and a user turn holding an image must reach the prompt as the marker."""
    size = len(template.encode("utf-8"))
    if size > MAX_TEMPLATE_BYTES:
        raise TemplateError(
            f"the chat template is {size} bytes, over the {MAX_TEMPLATE_BYTES}-byte limit; "
            "a chat template needs a few kilobytes: supply a smaller one"
        )
    _check_static(template)
    for messages, may_refuse in _SAMPLES:
        for add_generation_prompt in (True, False):
            try:
                shaped: list[dict[str, Any]] = (
                    messages if image_marker is None else as_parts(messages, image_marker)
                )
                prompt = _timed_render(template, shaped, add_generation_prompt)
            except _RefusalError as exc:
                if may_refuse:
                    continue
                roles = "/".join(m["role"] for m in messages)
                raise TemplateError(
                    f"the chat template refuses a plain {roles} conversation ({exc}); "
                    "supply a template that renders user and assistant turns"
                ) from exc
            _check_contents(prompt, messages)
    if image_marker is not None:
        _check_image_marker(template, image_marker)


def _check_image_marker(template: str, marker: str) -> None:
    photo = [{"type": "image"}, {"type": "text", "text": _USER["content"]}]
    prompt = _timed_render(template, as_parts([{"role": "user", "content": photo}], marker), True)
    if prompt.count(marker) != 1:
        raise TemplateError(
            "the chat template does not write an image part of a user turn as one image "
            f"marker ({marker}); supply a template that renders parts of type 'image'"
        )


def _render(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    max_chars: int,
) -> str:
    compiled = _compile(template)
    budget = _Budget()
    pieces: list[str] = []
    written = 0
    try:
        stream: Iterator[str] = compiled.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            range=budget.range,
        )
        for piece in stream:
            written += len(piece)
            if written > max_chars:
                raise TemplateError(
                    f"the chat template wrote over {max_chars} characters; it renders without "
                    "bound or the conversation is far too long"
                )
            pieces.append(piece)
    except SecurityError as exc:
        raise TemplateError(
            f"the chat template was stopped by the sandbox: {exc}", unsafe=True
        ) from exc
    except (TemplateError, _RefusalError):
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template failed to render: {exc}") from exc
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:
        raise TemplateError(
            f"the chat template failed to render: {type(exc).__name__}: {exc}"
        ) from exc
    return "".join(pieces)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"the chat template does not parse (line {exc.lineno}: {exc.message})"
        ) from exc


def _check_static(template: str) -> None:
    """Refuse what is visible without running it, in every branch, not only the ones sampled."""
    try:
        tree = _environment().parse(template, filename=_CHECK_FILENAME)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"the chat template does not parse (line {exc.lineno}: {exc.message})"
        ) from exc
    for node in tree.find_all(nodes.Node):
        name = _underscore_name(node)
        if name is not None:
            raise TemplateError(
                f"the chat template reaches for {name!r} (line {node.lineno}): attributes "
                "starting with '_' lead to Python internals; this template is hostile or broken",
                unsafe=True,
            )
        if isinstance(node, _LOADS_TEMPLATES):
            raise TemplateError(
                f"the chat template loads another template (line {node.lineno}); "
                "a chat template must be one self-contained file"
            )
        if isinstance(node, nodes.Name) and node.name in _REMOVED_GLOBALS:
            raise TemplateError(
                f"the chat template uses {node.name!r} (line {node.lineno}), which chat "
                "templates are not given; remove it"
            )


def _underscore_name(node: nodes.Node) -> str | None:
    """The '_'-prefixed attribute name a node reaches for with a constant, if any."""
    constants: list[nodes.Node] = []
    if isinstance(node, nodes.Getattr):
        return node.attr if node.attr.startswith("_") else None
    if isinstance(node, nodes.Getitem):
        constants = [node.arg]
    elif isinstance(node, nodes.Filter | nodes.Test) and node.name in _ATTRIBUTE_FILTERS:
        constants = [*node.args, *(keyword.value for keyword in node.kwargs)]
    for constant in constants:
        value = constant.value if isinstance(constant, nodes.Const) else None
        if isinstance(value, str) and value.startswith("_"):
            return value
    return None


def _timed_render(template: str, messages: list[dict[str, Any]], generation: bool) -> str:
    """Render with a CPU deadline: a template looping without output is stopped too."""
    deadline = time.monotonic() + CHECK_SECONDS

    def on_line(frame: FrameType, event: str, arg: object) -> Any:
        if time.monotonic() > deadline:
            raise TemplateError(
                f"the chat template ran over {CHECK_SECONDS:.0f} s on a short sample "
                "conversation; it loops without bound"
            )
        return on_line

    def on_call(frame: FrameType, event: str, arg: object) -> Any:
        # Compiled templates carry Jinja's filename "<template>"; only their lines are timed.
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return _render(template, messages, generation, "", "", CHECK_RENDER_CHARS)
    finally:
        sys.settrace(previous)


def _check_contents(prompt: str, messages: list[dict[str, str]]) -> None:
    for message in messages:
        if message["content"] not in prompt:
            raise TemplateError(
                f"the chat template dropped the {message['role']} message's content; it "
                "expects messages in another shape (each message needs 'role' and 'content')"
            )


def _raise_exception(message: str) -> None:
    raise _RefusalError(str(message))


def _strftime_now(format_string: str) -> str:
    _check_format(format_string)
    return datetime.now(UTC).strftime(format_string)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    if indent is not None and (not _number(indent) or not 0 <= indent <= 16):
        raise SecurityError(f"tojson indent {indent!r} is not between 0 and 16")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, default=str)
    _check_size(text, "tojson output")
    return text


def _bounded_filter(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    @wraps(function)  # keeps Jinja's pass_environment / pass_eval_context markers
    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if _number(value) and abs(value) > MAX_VALUE_CHARS:
                raise SecurityError(f"{name} with {value} is over the limit of a chat template")
        if name == "format" and args and isinstance(args[0], str):
            _check_format(args[0])
        result = function(*args, **kwargs)
        _check_size(result, f"the {name} filter's result")
        return result

    return bounded


def _check_format(text: str) -> None:
    if _HUGE_FORMAT_WIDTH.search(text):
        raise SecurityError("a format width of six digits or more is over the limit")


def _check_size(value: Any, what: str) -> None:
    if isinstance(value, str | bytes | list | tuple | dict):
        _check_size_estimate(len(value), what)


def _check_size_estimate(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        raise SecurityError(f"{what} would hold {size} items, over {MAX_VALUE_CHARS}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
