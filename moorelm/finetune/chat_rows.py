"""Chat rows for fine-tuning: OpenAI-format conversations checked, rendered by a run's chat
template, and tokenized with the assistant's tokens marked as the only targets.

``check_conversation`` checks one row's ``messages``; ``assistant_spans`` finds the text of
each learned assistant reply by rendering prefixes of the conversation; ``encode_conversation``
turns the whole into tokens and a target mask (each reply up to and including its end-of-turn
token); ``last_reply`` gives the prompt and expected answer that exact match scores.
``moorelm.finetune.sft`` reads files of such rows and trains on them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorelm.chat import ChatTemplate
from moorelm.errors import MoorelmError
from moorelm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Conversation:
    """A chat row: checked messages (``role``, ``content``, optional ``name``) and, per
    message, whether its tokens are learned (assistant messages whose ``weight`` is not 0)."""

    messages: tuple[dict[str, Any], ...]
    learn: tuple[bool, ...]
    line: int
    path: str = ""

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


CHAT_ROLES = ("system", "user", "assistant")


def check_conversation(value: Any, path: str | Path, line: int) -> Conversation:
    """One row's ``messages`` checked (OpenAI's fine-tuning format): a non-empty list of
    system/user/assistant messages with string content, at least one assistant message to
    learn, not starting with the assistant."""
    where = f"{path}, line {line}"
    if not isinstance(value, list) or not value:
        raise MoorelmError(f"{where}: 'messages' must be a non-empty list of "
                           '{"role": ..., "content": ...} objects')
    messages, learn = [], []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise MoorelmError(f"{where}: message {i} must be an object with 'role' and "
                               f"'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            shown = json.dumps(role)[:40] if role is not None else "none"
            raise MoorelmError(f"{where}: message {i} has an unknown role {shown}; use one of "
                               f"{', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise MoorelmError(f"{where}: message {i} ({role}) must have string content, got "
                               f"{type(content).__name__} {json.dumps(content)[:40]}")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise MoorelmError(f"{where}: message {i} has a 'name' that is not a string")
        weight = m.get("weight", 1)
        if role == "assistant":
            if weight not in (0, 1) or isinstance(weight, bool):
                raise MoorelmError(f"{where}: message {i} has weight {json.dumps(weight)[:20]}; "
                                   "an assistant message's weight is 0 (not learned) or 1")
        elif "weight" in m:
            raise MoorelmError(f"{where}: message {i} ({role}) has a weight; only assistant "
                               "messages take one")
        messages.append({"role": role, "content": content, **({"name": name} if name else {})})
        learn.append(role == "assistant" and weight == 1)
    if not any(m["role"] == "assistant" for m in messages):
        raise MoorelmError(f"{where}: the conversation has no assistant message, so nothing "
                           "to learn; add the reply or remove the row")
    if not any(learn):
        raise MoorelmError(f"{where}: every assistant message has weight 0, so nothing to learn")
    if messages[0]["role"] == "assistant":
        raise MoorelmError(f"{where}: the conversation starts with an assistant message; begin "
                           "it with a system or user message")
    return Conversation(tuple(messages), tuple(learn), line, str(path))


def _render(template: ChatTemplate, messages: Sequence[dict], generation: bool, where: str) -> str:
    try:
        return template.render(list(messages), add_generation_prompt=generation)
    except MoorelmError as e:
        raise MoorelmError(f"{where}: {e}") from None


def assistant_spans(conv: Conversation, template: ChatTemplate) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text and the character spans of its learned assistant messages.

    The span of assistant message i runs from the end of the first i messages rendered with
    the generation prompt (where a reply starts at inference) to the end of the first i + 1
    messages rendered without it (the reply and the template's closing of it). Both texts
    must be prefixes of the whole conversation's text; a template that renders earlier turns
    differently once later ones follow is refused, since no span could be trusted."""
    full = _render(template, conv.messages, False, conv.where)
    spans: list[tuple[int, int]] = []
    for i, learn in enumerate(conv.learn):
        if not learn:
            continue
        before = _render(template, conv.messages[:i], True, conv.where)
        upto = _render(template, conv.messages[: i + 1], False, conv.where)
        if not (full.startswith(upto) and upto.startswith(before)) or \
                (spans and len(before) < spans[-1][1]):
            raise MoorelmError(
                f"{conv.where}: the {template.name} does not render the conversation turn by "
                f"turn (its first {i + 1} messages are not a prefix of the whole), so the "
                "assistant's tokens cannot be told apart; use prompt/completion rows instead")
        if len(upto) == len(before):
            raise MoorelmError(f"{conv.where}: the {template.name} renders assistant message "
                               f"{i} as no text")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_conversation(conv: Conversation, template: ChatTemplate, tok: Tokenizer,
                        stop_ids: frozenset[int] | set[int]) -> tuple[list[int], list[bool], bool]:
    """(tokens, is-target mask, exact) of a chat row.

    The whole rendered conversation is tokenized once; each span boundary must be a token
    boundary, checked by the prefix property (the text before the boundary, tokenized on its
    own, gives a prefix of the whole's tokens: the prompt the model reads at inference). When
    a boundary breaks it (a token straddles it), the row is tokenized piece by piece between
    boundaries instead (``exact`` False). Targets: every token of each learned assistant span
    up to and including the last stop token in it (the end-of-turn token that closes the
    message, so the model learns to stop), none of what the template adds after that (e.g.
    ChatML's line break after ``<|im_end|>``). A span without a stop token is learned whole
    (the default template's closing blank line is its stop text)."""
    full, spans = assistant_spans(conv, template)
    bounds = sorted({b for span in spans for b in span} - {0, len(full)})
    ids = tok.encode(full)
    at = {0: 0, len(full): len(ids)}
    exact = True
    for b, prefix in zip(bounds, tok.encode_batch([full[:b] for b in bounds])):
        if ids[: len(prefix)] != prefix:
            exact = False
            break
        at[b] = len(prefix)
    if not exact:
        cuts = [0, *bounds, len(full)]
        ids = []
        for b, piece in zip(cuts[1:], tok.encode_batch([full[a:z] for a, z in zip(cuts, cuts[1:])])):
            ids += piece
            at[b] = len(ids)
    mask = [False] * len(ids)
    for start, end in spans:
        a, z = at[start], at[end]
        last = max((j for j in range(a, z) if ids[j] in stop_ids), default=None)
        if last is not None:
            z = last + 1
        if z <= a:
            raise MoorelmError(f"{conv.where}: an assistant message has no tokens")
        mask[a:z] = [True] * (z - a)
    return ids, mask, exact


def last_reply(conv: Conversation, template: ChatTemplate) -> tuple[str, str, str]:
    """(rendered prompt, expected reply, last user text) for a conversation's last learned
    assistant message: what the model is asked at inference, and what it should answer."""
    i = max(j for j, learn in enumerate(conv.learn) if learn)
    prompt = _render(template, conv.messages[:i], True, conv.where)
    user = next((m["content"] for m in reversed(conv.messages[:i]) if m["role"] == "user"), "")
    return prompt, conv.messages[i]["content"], user
