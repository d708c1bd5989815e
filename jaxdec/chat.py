"""Chat templates: a conversation -> the prompt text an instruction-tuned checkpoint expects.

Instruct checkpoints ship a Jinja template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) that lays out the turns with the model's own markers (Llama 3's
`<|start_header_id|>`, Qwen's `<|im_start|>`): a prompt sent without it gets continued as
plain text, not answered. `load_pretrained` reads it into `model.chat_template`:

    text = model.chat_template.render([{"role": "user", "content": "Hi!"}])
    ids = jaxdec.chat.encode_chat(model, [{"role": "user", "content": "Hi!"}])

Rendered as transformers' `apply_chat_template` renders it: a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the tokenizer's special tokens (`bos_token`,
`eos_token`, ...) as variables, `raise_exception(message)`, `strftime_now(format)` and a
`tojson` filter that keeps non-ASCII text. The rendered text already holds the template's
special tokens, so `encode_chat` encodes it without adding the tokenizer's own (a second
BOS would change the model's input).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdec.config import read_json_object

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON = "chat_template.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                   "mask_token")


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or compiled, or that refused a conversation (its
    `raise_exception`)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template.

    Attributes:
      source: the Jinja template text.
      special_tokens: the variables the template may use for special tokens
        (bos_token, eos_token, ...), from tokenizer_config.json.
      origin: the file it came from (for messages; not compared).
    """

    source: str
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    origin: str = dataclasses.field(default="<string>", compare=False)

    def render(self, messages: Sequence[Mapping[str, Any]], *,
               add_generation_prompt: bool | None = None,
               continue_final_message: bool | str = False, **variables) -> str:
        """The prompt text for `messages` (dicts with "role" and "content"), ending with the
        opening of the assistant's turn when `add_generation_prompt` (by default, unless
        `continue_final_message`). With `continue_final_message` the text ends with the last
        message's content (or the field it names, e.g. "reasoning_content"), its turn left
        open for the model to continue (a reply's start given in an assistant message), as
        transformers' option of that name does. `variables` reach the template as they are
        (tools=..., documents=..., a template's own switches)."""
        messages = _check_messages(messages)
        if not isinstance(continue_final_message, (bool, str)):
            raise TypeError(f"continue_final_message must be a bool or a message field's name, "
                            f"got {continue_final_message!r}")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if not isinstance(add_generation_prompt, bool):
            raise TypeError(f"add_generation_prompt must be a bool, got {add_generation_prompt!r}")
        if not continue_final_message:
            return self._render(messages, add_generation_prompt, variables)
        if add_generation_prompt:
            raise ValueError("add_generation_prompt and continue_final_message exclude each "
                             "other: one opens a new assistant turn, the other continues the "
                             "last message")
        messages[-1] = _marked(messages[-1], "content" if continue_final_message is True
                               else continue_final_message, self.source)
        text = self._render(messages, add_generation_prompt, variables)
        at = text.rfind(_CONTINUE_MARK.strip())
        if at < 0:
            raise ChatTemplateError(
                f"continue_final_message: the chat template of {self.origin} does not write "
                "the last message's text as given, so it cannot be left open")
        # The template kept the mark's trailing space: the text before it is the message's
        # as given (trailing whitespace too); else it trimmed the message, and so do we.
        return text[:at] if text.startswith(_CONTINUE_MARK, at) else text[:at].rstrip()

    def _render(self, messages, add_generation_prompt: bool, variables) -> str:
        import jinja2

        template = _compile(self.source, self.origin)
        # `tools` and `documents` are None unless given, as transformers passes them (a
        # template may test `tools is not none`).
        context = dict(self.special_tokens, tools=None, documents=None)
        context.update(variables, messages=messages, add_generation_prompt=add_generation_prompt)
        try:
            return template.render(**context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template of {self.origin} refused the "
                                    f"conversation: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # The template's own code failed on this conversation (say, `length` of a field
            # it expected to be a list).
            raise ChatTemplateError(f"the chat template of {self.origin} failed on the "
                                    f"conversation: {type(e).__name__}: {e}") from None


# Appended to the text a continued message ends with, to find where the template wrote its
# end (its trailing space tells whether the template trimmed the message).
_CONTINUE_MARK = "<|jaxdec-continue-here|> "


def _marked(message: dict, field: str, source: str) -> dict:
    """`message` with `_CONTINUE_MARK` after the text of `field` (in its last text block,
    where the field holds a list of blocks; in every name of the reasoning where `field` is
    one of them)."""
    value = message.get(field)
    if value is None:
        raise ValueError(f"continue_final_message: the last message has no {field!r} to continue")
    fields = [f for f in _REASONING_FIELDS if message.get(f) == value] if (
        field in _REASONING_FIELDS) else [field]
    if not any(f in source for f in fields):
        raise ValueError(f"continue_final_message: the chat template never reads {field!r}")
    message = dict(message)
    if isinstance(value, (list, tuple)):
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in value]
        last = next((b for b in reversed(blocks) if isinstance(b, dict) and "text" in b), None)
        if last is None:
            raise ValueError(f"continue_final_message: the last message's {field!r} has no text "
                             "block to continue")
        last["text"] = str(last["text"]) + _CONTINUE_MARK
        message[field] = blocks
    elif isinstance(value, str):
        for f in fields:
            message[f] = value + _CONTINUE_MARK
    else:
        raise ValueError(f"continue_final_message: the last message's {field!r} is no text")
    return message


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} "
                        f"dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if callable(getattr(message, "model_dump", None)):  # a pydantic message (OpenAI SDK)
            message = message.model_dump()
        elif dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = dataclasses.asdict(message)
        if not isinstance(message, Mapping) or message.get("role") is None:
            raise TypeError(f"messages[{i}] must be a dict with a 'role' (and usually "
                            f"'content'), got {message!r}")
        # Fields set to None are left out, as transformers does: APIs send `tool_calls=None`
        # or `content=None`, and templates test whether a field is there.
        message = {k: v for k, v in message.items() if v is not None}
        # A model's reasoning under any of its names reaches the template under all the
        # names templates read (`reasoning_content`; gpt-oss's `thinking`), as transformers
        # passes it.
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _raise(message):
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _generation_tag():
    """A Jinja extension for transformers' `{% generation %}...{% endgeneration %}` (it marks
    the assistant's text for training masks): rendered as its body."""
    import jinja2.ext

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationTag


@functools.lru_cache(maxsize=16)
def _compile(source: str, origin: str):
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template of {origin} does not compile: {e}") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        return read_json_object(path)
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from None


def _pick(template, origin: str) -> str:
    """A `chat_template` value: the text, or from a list of named templates the "default"."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{origin} lists chat templates {sorted(map(str, named))} but "
                                "none named 'default'")
    raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of named "
                            f"templates, got {type(template).__name__}")


def load_chat_template(directory: str | os.PathLike) -> ChatTemplate | None:
    """The chat template of a checkpoint directory, or None when it has none: from
    `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (where
    transformers' tokenizer looks, in that order), else `chat_template.json` (a processor's
    file, which the tokenizer never reads: only for checkpoints with no other), with the
    special tokens of
    `tokenizer_config.json` and `special_tokens_map.json` (the map's first, as transformers
    takes them)."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    # Older checkpoints name some special tokens in special_tokens_map.json only; where both
    # files name one, transformers takes the map's (a null there too: no such token).
    map_path = os.path.join(directory, SPECIAL_TOKENS_MAP)
    tokens_map = _read_json(map_path) if os.path.isfile(map_path) else {}
    special = {name: text for name in _SPECIAL_TOKENS
               if (text := _token_text((tokens_map if name in tokens_map else config)
                                       .get(name))) is not None}
    jinja_path = os.path.join(directory, TEMPLATE_FILE)
    json_path = os.path.join(directory, TEMPLATE_JSON)
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                source, origin = f.read(), jinja_path
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read {jinja_path}: {e}") from None
    elif config.get("chat_template") is not None:
        source, origin = _pick(config["chat_template"], config_path), config_path
    elif os.path.isfile(json_path):
        source, origin = _pick(_read_json(json_path).get("chat_template"), json_path), json_path
    else:
        return None
    _compile(source, origin)  # a broken template fails here, not at the first conversation
    return ChatTemplate(source=source, special_tokens=special, origin=origin)


def encode_chat(model, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool | None = None,
                continue_final_message: bool | str = False, **variables) -> list[int]:
    """The token ids of `messages` laid out by the model's chat template (see
    `ChatTemplate.render`: by default ending with the assistant turn's opening, or with
    `continue_final_message` the last message left open), encoded without the tokenizer's
    own special tokens (the template writes them)."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer (tokenizer.json) to encode the chat with")
    if getattr(model, "chat_template", None) is None:
        raise ValueError("the model has no chat template (chat_template.jinja, or "
                         "chat_template in tokenizer_config.json): it is not a chat model, "
                         "or its checkpoint lacks the file")
    text = model.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message, **variables)
    return model.tokenizer.encode(text, add_special_tokens=False).ids
