"""Chat templates: a conversation (a list of messages) becomes the text a model reads.

One renderer shared by the CLI (``moorelm chat``), the Python API (``LanguageModel.chat``) and
the server's ``/v1/chat/completions``. Templates are Jinja2, rendered the way transformers'
``apply_chat_template`` renders them: a sandboxed environment (``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension), the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` (and the other special
tokens' text), and the functions ``raise_exception`` and ``strftime_now``.

An imported model brings its own template (config.json ``chat.template``). A run trained here
has none and gets ``DEFAULT_TEMPLATE``: each message becomes a speech, ``ROLE:\\n{content}\\n\\n``
(the message's ``name``, upper-cased, in place of the role when given), and ``ASSISTANT:\\n``
asks for the reply, which ends at the first blank line (``DEFAULT_STOP``) or end of text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moorelm.errors import MoorelmError, first_line

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ (message['name'] or message['role']) | upper }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)
DEFAULT_STOP = ("\n\n",)  # a speech of the default template ends at a blank line
ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts ``{"role", "content"[, "name"]}``, checked: a non-empty list,
    each with a known role and string content (OpenAI's list of text parts is joined)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MoorelmError("a conversation must be a non-empty list of messages "
                           "({'role': ..., 'content': ...})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MoorelmError(f"message {i} must be an object with 'role' and 'content', "
                               f"got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise MoorelmError(f"message {i} has an unknown role {role!r}; use one of "
                               f"{', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                             for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise MoorelmError(f"message {i} ({role}) must have string content, got "
                               f"{type(content).__name__}")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise MoorelmError(f"message {i} has a name that is not a string")
        out.append({"role": role, "content": content, "name": name or None})
    return out


def _raise(message: str) -> None:
    raise _TemplateRaised(message)


class _TemplateRaised(Exception):
    """The template called ``raise_exception``."""


def _strftime_now(fmt: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(fmt)


_ENV = None


def _environment():
    global _ENV
    if _ENV is None:
        import json

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        _ENV = env
    return _ENV


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to.

    ``stop``: text that ends a reply besides the model's stop ids (the default template's
    blank line; none for a model's own template, whose end-of-turn token stops it).
    """

    source: str = DEFAULT_TEMPLATE
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, pad_token ...
    stop: tuple[str, ...] = ()
    name: str = "chat template"

    def __post_init__(self) -> None:
        from jinja2 import TemplateError

        if not isinstance(self.source, str) or not self.source.strip():
            raise MoorelmError(f"the {self.name} must be non-empty text")
        try:
            object.__setattr__(self, "_compiled", _environment().from_string(self.source))
        except TemplateError as e:
            raise MoorelmError(f"the {self.name} is not valid Jinja: "
                               f"{first_line(e)}") from None

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_TEMPLATE, {}, DEFAULT_STOP, "default chat template")

    @classmethod
    def from_config(cls, config: dict | None) -> ChatTemplate:
        """The run's template (config.json ``chat``), else the default one."""
        chat = (config or {}).get("chat") if isinstance(config, dict) else None
        if isinstance(chat, dict) and isinstance(chat.get("template"), str):
            special = {k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                       if isinstance(v := chat.get(k), str)}
            return cls(chat["template"], special, (), "model's chat template")
        return cls.default()

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The conversation as model input text (``MoorelmError`` saying why when the template
        fails on it)."""
        from jinja2 import TemplateError

        msgs = check_messages(messages)
        if self.source != DEFAULT_TEMPLATE:  # models' templates test ``'name' in message``
            msgs = [{k: v for k, v in m.items() if v is not None} for m in msgs]
        variables = {"bos_token": "", "eos_token": "", **self.special}
        try:
            return self._compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except _TemplateRaised as e:
            raise MoorelmError(f"the {self.name} refused the conversation: {e}") from None
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise MoorelmError(f"the {self.name} failed to render: {first_line(e)}") from None


def fit_history(messages: Sequence[dict], encode: Callable[[list[dict]], int],
                budget: int) -> tuple[list[dict], int]:
    """The most recent turns of ``messages`` whose rendered prompt (``encode`` gives its length
    in tokens) fits in ``budget``: leading system messages are kept, the oldest other turns are
    dropped first. -> (messages kept, how many were dropped). ``MoorelmError`` when even the
    last message alone does not fit."""
    msgs = list(messages)
    system = [m for m in msgs[: next((i for i, m in enumerate(msgs) if m.get("role") != "system"),
                                     len(msgs))]]
    rest = msgs[len(system):]
    dropped = 0
    while rest:
        kept = system + rest
        if encode(kept) <= budget:
            return kept, dropped
        rest = rest[1:]
        dropped += 1
        while rest and rest[0].get("role") == "assistant":  # a reply without its question
            rest = rest[1:]
            dropped += 1
    raise MoorelmError(f"the conversation is longer than the context window allows "
                       f"({budget} tokens for the prompt), even with only its last message")


__all__ = ["DEFAULT_STOP", "DEFAULT_TEMPLATE", "ROLES", "ChatTemplate", "check_messages",
           "fit_history"]
