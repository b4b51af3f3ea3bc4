"""A chat template as transformers finds, compiles and renders it, and the assistant's spans in what it renders.

`ChatTemplate.of_tokenizer(dir)` reads the template (chat_template.jinja, else tokenizer_config.json's
`chat_template`) and the named special tokens transformers passes to it; `render` equals
`apply_chat_template(messages, tokenize=False)`: the same sandboxed Jinja2 environment, options, filters and
globals (transformers/utils/chat_template_utils.py). `assistant_spans` finds the characters of what the
assistant says: the spans the template marks with `{% generation %}` when it has them (transformers'
`return_assistant_tokens_mask`), else, for each assistant message k, the text from the end of the render of
messages[:k] with the generation prompt to the end of the render of messages[:k+1] without trailing whitespace:
the message and its end-of-turn marker, what the model must generate after the generation prompt.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

from .config import DataError

TEMPLATE_FILE = "chat_template.jinja"
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, the first is read


def find_chat_template(tokenizer: str | Path) -> str | None:
    """The chat template of a tokenizer directory (or of the directory of a tokenizer file), as transformers
    finds it: chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or a list of named
    templates: the "default" one)."""
    d = Path(tokenizer).expanduser()
    d = d if d.is_dir() else d.parent
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = _read_json(d / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def special_tokens(tokenizer: str | Path) -> dict[str, str]:
    """The named special tokens transformers passes to a chat template (`special_tokens_map`):
    tokenizer_config.json's, completed by special_tokens_map.json's."""
    d = Path(tokenizer).expanduser()
    d = d if d.is_dir() else d.parent
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _read_json(d / name)
        for key in NAMED_TOKENS:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and key not in out:
                out[key] = value
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e}): fix or remove it") from None
    return config if isinstance(config, dict) else {}


class ChatTemplate:
    """A chat template compiled in transformers' sandboxed Jinja environment."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None):
        self.source, self.tokens = source, dict(tokens or {})
        self.has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    @classmethod
    def of_tokenizer(cls, tokenizer: str | Path) -> "ChatTemplate":
        source = find_chat_template(tokenizer)
        if source is None:
            raise DataError(f"data.format=chat renders conversations with the model's chat template, but "
                            f"data.tokenizer={tokenizer} has none (no {TEMPLATE_FILE}, no chat_template in "
                            f"tokenizer_config.json): give the tokenizer of a chat model, or add a {TEMPLATE_FILE}")
        return cls(source, special_tokens(tokenizer))

    @cached_property
    def compiled(self):
        import jinja2
        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"the chat template does not compile (line {e.lineno}: {e.message}): fix the "
                            f"template") from None

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=...)`."""
        return self.compiled.render(messages=_template_messages(messages), tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.tokens)

    def assistant_spans(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the [start, end) character spans of what the assistant says)."""
        if self.has_generation:
            blocks: list[str] = []
            spans: list[tuple[int, int]] = []
            token = _TRACKING.set((blocks, spans))
            try:
                for block in self.compiled.generate(messages=_template_messages(messages), tools=tools,
                                                    documents=None, add_generation_prompt=False, **self.tokens):
                    blocks.append(block)
            finally:
                _TRACKING.reset(token)
            return "".join(blocks), spans
        text = self.render(messages, tools=tools)
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True, tools=tools)
            through = self.render(messages[:k + 1], tools=tools)
            if not (text.startswith(before) and text.startswith(through) and len(through) >= len(before)):
                raise DataError(f"the chat template does not render the first {k + 1} messages of a conversation as "
                                f"the start of the whole conversation (it rewrites earlier turns), so the assistant's "
                                f"tokens cannot be told apart: mark the assistant's text with {{% generation %}} ... "
                                f"{{% endgeneration %}} in the template (transformers' convention)")
            spans.append((len(before), max(len(before), len(through.rstrip()))))
        return text, spans


_GENERATION_TAG = "generation"
_TRACKING: ContextVar = ContextVar("chat_generation_spans", default=None)


@lru_cache(maxsize=1)
def _environment():
    """transformers' chat template environment (utils/chat_template_utils.py, `_cached_compile_jinja_template`):
    ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks, loopcontrols, the generation tag), its `tojson`
    (no HTML escaping), `raise_exception`, `strftime_now`, and its restricted `dict` and `namespace`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """{% generation %} ... {% endgeneration %}: records the [start, end) of its output in the rendered text."""
        tags = {_GENERATION_TAG}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes "
                                                      f"on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _template_messages(messages: list[dict]) -> list[dict]:
    """What transformers hands the template: keys whose value is None dropped (a Parquet struct column has every
    field in every row), and a message's reasoning under each name templates read."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out
