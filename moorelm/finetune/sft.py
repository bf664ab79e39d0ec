"""Supervised fine-tuning (SFT) of moorelm GPTs on prompt -> completion pairs or chat rows,
full or with LoRA adapters, for runs trained here and imported ones alike.

    moorelm finetune RUN --data pairs.jsonl --out DIR [--lora-rank 8] [--max-steps 600]
    moorelm finetune RUN --data chats.jsonl --out DIR [--lora-rank 8] [--no-packing]

Data. ``{"prompt": ..., "completion": ...}`` rows in JSON Lines (or CSV/TSV with those two
columns), read and checked by ``read_pairs``: a missing file, bytes that are not UTF-8, a line
that is not a JSON object, a row without one of the fields or with a non-string one, and an
empty completion each stop with one line naming the file and line. A held-out slice (the
``--eval-data`` file, or ``eval_rows`` rows drawn with a seeded shuffle) gives the validation
loss during training and the exact-match score at the end.

The prompt template. A prompt reaches the model as ``template`` with ``{prompt}`` replaced by
the prompt text; the default ``config.SFT_TEMPLATE`` is ``"{prompt}\\n=> "`` (the prompt, a line
break, an arrow and a space), so the completion starts on a line of its own after a clear cue.
The template is stored in the run folder's config.json as ``prompt_template``;
``LanguageModel.format_prompt`` (what ``moorelm generate`` and the server use) applies it, so
a fine-tuned run is prompted exactly as it was trained.

Examples and the loss. Each example is ``tokens(template(prompt)) + tokens(completion) +
<|endoftext|>``: the formatted prompt is tokenized on its own, as it will be at inference, and
the completion after it. Targets are -1 (ignored by the loss) on every prompt token, so only
completion tokens and the closing end-of-text token are learned; generation then knows when to
stop. An empty prompt becomes a single end-of-text token (what ``LanguageModel`` feeds for an
empty prompt). An example longer than the context window (``seq_len + 1`` tokens) is cut:
the prompt loses tokens from its start (down to half the window when the completion is long),
then the completion from its end; the count is reported in one warning.

Packing. Whole examples are packed, in a seeded random order, into rows of ``seq_len + 1``
tokens; an example never straddles two rows and the tail of a row is padded with end-of-text
tokens whose targets are -1. Batches carry each token's example number in the row
(``segments``), and the model restarts positions at 0 for every example and lets a token
attend only within its own example: a packed row computes exactly what its examples would
alone, as a prompt starts at inference. (Before, packed examples saw the ones before them at
shifted positions, which cost the dates demo a quarter of its exact matches.)

Chat rows. ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
(OpenAI's fine-tuning format; an assistant message may carry ``"weight": 0`` to be context
only), read by ``read_rows`` and checked by ``moorelm.finetune.chat_rows``; a file holds one
kind of row. The conversation is rendered by the run's chat template (``moorelm.chat.ChatTemplate``:
an imported model's own, else the default one), and only assistant tokens are targets: for
each learned reply, from where the conversation before it ends with the generation prompt up
to and including the end-of-turn token that closes it (``chat_rows.encode_conversation``:
prefix renders checked for the text prefix property, boundaries for
the token prefix property). Chat rows are never cut: one longer than the context window is
refused, naming its line and token count.

Training reuses ``moorelm.training.loop.train``: ``SFTData`` is a ``moorelm.data.DataSource``
(its batches carry the segments, which the loop hands to the model; rows of an epoch come in a
permutation keyed by (seed, epoch), so the batch of a step is a pure function of the step and
``--resume`` is exact), the base run's weights are the initial weights, and for LoRA a model
hook wraps the target layers and freezes the rest.
The run folder is an ordinary moorelm run (config.json with a ``finetune`` section,
``prompt_template`` and, for LoRA, ``lora``; tokenizer.json; checkpoints/) plus
``finetune.json`` with the final metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moorelm.atomic import atomic_write_json
from moorelm.chat import ChatTemplate
from moorelm.classify.data import Table, read_table
from moorelm.classify.metrics import TruncationWarning
from moorelm.codecs import model_tensors
from moorelm.config import (
    LORA_LR,
    SFT_EPOCHS,
    SFT_EVAL_ROWS,
    SFT_TEMPLATE,
    SFT_TRAIN,
    ModelConfig,
    TrainConfig,
)
from moorelm.data import Batch
from moorelm.device import resolve_device
from moorelm.errors import MoorelmError
from moorelm.finetune.chat_rows import (
    Conversation,
    check_conversation,
    encode_conversation,
    last_reply,
)
from moorelm.finetune.lora import LoRAConfig, apply_lora
from moorelm.generate import LanguageModel, apply_template, check_template
from moorelm.interop.sources import require_run
from moorelm.run import TOKENIZER_FILE, RunFolder
from moorelm.tokenizer import Tokenizer
from moorelm.training.loop import train
from moorelm.training.metrics import MetricsLogger
from moorelm.training.state import TrainResult

RESULT_FILE = "finetune.json"
FIELDS = ("prompt", "completion")


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    line: int  # where the row starts in its file (1-based)


def read_pairs(path: str | Path) -> list[Pair]:
    """Read and check prompt/completion rows from a .jsonl (or .csv/.tsv) file."""
    return _pairs_of(read_table(path))  # missing file, folder, non-UTF-8, bad JSON, no rows


def _pairs_of(table: Table) -> list[Pair]:
    missing = [f for f in FIELDS if f not in table.columns]
    if missing:
        found = ", ".join(repr(c) for c in table.columns) or "none"
        raise MoorelmError(
            f"{table.path} has no {' or '.join(repr(m) for m in missing)} field (found: {found}); "
            'every row needs {"prompt": ..., "completion": ...}'
        )
    pairs = []
    for row, line in zip(table.rows, table.lines):
        values = []
        for f in FIELDS:
            v = row.get(f)
            if v is None:
                raise MoorelmError(f"{table.path}, line {line}: the row has no {f!r}; every row "
                                   'needs both "prompt" and "completion"')
            if not isinstance(v, str):
                raise MoorelmError(f"{table.path}, line {line}: {f!r} must be a string, got "
                                   f"{type(v).__name__} {json.dumps(v)[:40]}")
            values.append(v)
        if not values[1].strip():
            raise MoorelmError(f"{table.path}, line {line}: the completion is empty; fill it in "
                               "or remove the row")
        pairs.append(Pair(values[0], values[1], line))
    return pairs


def read_rows(path: str | Path) -> list[Pair] | list[Conversation]:
    """Training rows of a file: chat rows (``{"messages": [...]}``, JSON Lines) or
    prompt/completion rows (``read_pairs``), never both in one file."""
    table = read_table(path)
    if "messages" not in table.columns:
        return _pairs_of(table)
    first_chat = next(line for row, line in zip(table.rows, table.lines) if "messages" in row)
    rows = []
    for row, line in zip(table.rows, table.lines):
        other = [f for f in FIELDS if f in row]
        if "messages" not in row or other:
            raise MoorelmError(
                f"{table.path}, line {line}: a prompt/completion row in a file of chat rows "
                f"(line {first_chat} has \"messages\"); use one format per file")
        rows.append(check_conversation(row["messages"], table.path, line))
    return rows


def split_pairs(pairs: list, eval_rows: int, seed: int = 0) -> tuple[list, list]:
    """Hold out ``eval_rows`` rows (pairs or conversations) chosen with a seeded shuffle; both
    parts keep file order."""
    if not 1 <= eval_rows < len(pairs):
        raise MoorelmError(
            f"cannot hold out {eval_rows} of {len(pairs)} rows for evaluation; pass a smaller "
            "--eval-rows or an --eval-data file"
        )
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:eval_rows].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


# ----------------------------------------------------------------------------- the dataset


def _example(prompt: list[int], completion: list[int], eot: int,
             cap: int) -> tuple[list[int], list[bool], bool]:
    """(tokens, is-target mask, was cut) of one example fitted into ``cap`` tokens."""
    body = completion + [eot]
    cut = len(prompt) + len(body) > cap
    if cut:
        keep = min(len(prompt), max(cap // 2, cap - len(body)))
        prompt = prompt[len(prompt) - keep:]
        body = body[: cap - len(prompt)]
    return prompt + body, [False] * len(prompt) + [True] * len(body), cut


@dataclass(frozen=True)
class ChatExample:
    """A tokenized chat row: its tokens and which of them are targets."""

    tokens: list[int]
    mask: list[bool]
    where: str  # file and line, for errors


class SFTData:
    """Packed fine-tuning examples: a ``moorelm.data.DataSource`` for ``train()``.

    Rows are prompt/completion ``Pair``s (the prompt ``template`` applied) or chat
    ``Conversation``s (``chat_template`` applied; ``stop_ids`` are the tokens that end a turn).
    ``train_batch``/``val_batch`` return a ``Batch`` (B, T) whose targets are -1 on prompt
    tokens (everything but assistant replies, for chat rows) and padding, with the segments
    when examples are packed. Rows are packed lazily per context length.
    """

    def __init__(self, train_pairs: list[Pair] | list[Conversation],
                 val_pairs: list[Pair] | list[Conversation], tokenizer_path: Path,
                 template: str | None, source: Path, fingerprint: str, pack_seed: int = 0,
                 pack: bool = True, chat_template: ChatTemplate | None = None,
                 stop_ids: frozenset[int] | set[int] = frozenset()):
        tok = Tokenizer.load(tokenizer_path)
        self.tokenizer_path = Path(tokenizer_path)
        self.vocab_size = tok.vocab_size
        self.eot_id = tok.eot_id
        self.pack_seed = pack_seed
        self.pack = pack
        self.fingerprint = fingerprint  # the rows', template's and tokenizer's digest
        self.chat = bool(train_pairs) and isinstance(train_pairs[0], Conversation)
        kind = "chat conversations" if self.chat else "prompt/completion pairs"
        self._provenance = {"dir": str(Path(source).resolve()), "fingerprint": fingerprint,
                            "corpus": f"{kind} from {source}", "tokenizer": tok.kind}
        self.piecewise = 0  # chat rows whose span boundaries split a token (tokenized in pieces)
        if self.chat:
            tpl = chat_template or ChatTemplate.default()
            stops = frozenset(stop_ids) | {tok.eot_id}
            self._examples = {s: self._encode_chat(tok, p, tpl, stops)
                              for s, p in (("train", train_pairs), ("val", val_pairs))}
            self._bytes = {s: sum(len(m["content"].encode("utf-8")) for c in p
                                  for m, learn in zip(c.messages, c.learn) if learn)
                           for s, p in (("train", train_pairs), ("val", val_pairs))}
        else:
            self._examples = {s: self._encode(tok, p, template)
                              for s, p in (("train", train_pairs), ("val", val_pairs))}
            self._bytes = {s: sum(len(x.completion.encode("utf-8")) for x in p)
                           for s, p in (("train", train_pairs), ("val", val_pairs))}
        self._rows: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}
        self._perm: tuple[tuple[int, int, int], np.ndarray] | None = None
        self.truncated: dict[str, int] = {}

    def _encode(self, tok: Tokenizer, pairs: list[Pair], template: str | None) -> list[tuple[list[int], list[int]]]:
        prompts = tok.encode_batch([apply_template(template, p.prompt) for p in pairs])
        completions = tok.encode_batch([p.completion for p in pairs])
        return [(p or [self.eot_id], c) for p, c in zip(prompts, completions)]

    def _encode_chat(self, tok: Tokenizer, convs: list[Conversation], template: ChatTemplate,
                     stops: frozenset[int]) -> list[ChatExample]:
        out = []
        for c in convs:
            ids, mask, exact = encode_conversation(c, template, tok, stops)
            self.piecewise += not exact
            out.append(ChatExample(ids, mask, c.where))
        return out

    def _fit(self, example: tuple[list[int], list[int]] | ChatExample,
             cap: int) -> tuple[list[int], list[bool], bool]:
        if isinstance(example, ChatExample):
            if len(example.tokens) > cap:
                raise MoorelmError(
                    f"{example.where}: the conversation is {len(example.tokens):,} tokens with "
                    f"the chat template, longer than the context window ({cap - 1:,} tokens); "
                    "shorten or split it")
            return example.tokens, example.mask, False
        return _example(*example, self.eot_id, cap)

    def rows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Packed (tokens, is-target) arrays (N, seq_len + 1) of a split (unpacked: as wide as
        the longest example)."""
        return self._packed(split, seq_len)[:2]

    def _packed(self, split: str, seq_len: int) -> tuple[np.ndarray, ...]:
        """(tokens, is-target, used length, example-of-row) of a split's rows (N, seq_len + 1)."""
        key = (split, seq_len)
        if key not in self._rows:
            examples = self._examples[split]
            order = (np.random.default_rng([self.pack_seed, 7]).permutation(len(examples))
                     if split == "train" else range(len(examples)))
            cap = seq_len + 1
            rows: list[tuple[list[int], list[bool], list[int]]] = []
            cur_t: list[int] = []
            cur_m: list[bool] = []
            cur_s: list[int] = []  # which example of the row (1, 2, ...) each token is
            n_cut = 0
            for i in order:
                t, m, cut = self._fit(examples[i], cap)
                n_cut += cut
                if cur_t and (not self.pack or len(cur_t) + len(t) > cap):
                    rows.append((cur_t, cur_m, cur_s))
                    cur_t, cur_m, cur_s = [], [], []
                cur_s += [(cur_s[-1] if cur_s else 0) + 1] * len(t)
                cur_t += t
                cur_m += m
            if cur_t:
                rows.append((cur_t, cur_m, cur_s))
            # unpacked rows are only as wide as the longest example (an 8k-context model's
            # short rows would otherwise hold mostly padding)
            width = cap if self.pack else max(2, max((len(t) for t, _, _ in rows), default=2))
            tokens = np.full((len(rows), width), self.eot_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=bool)
            segments = np.zeros((len(rows), width), dtype=np.int64)  # 0: padding
            for r, (t, m, s) in enumerate(rows):
                tokens[r, : len(t)] = t
                mask[r, : len(m)] = m
                segments[r, : len(s)] = s
            lengths = np.array([len(t) for t, _, _ in rows], dtype=np.int64)
            self._rows[key] = (tokens, mask, lengths, segments)
            self.truncated[split] = n_cut
            if n_cut:
                warnings.warn(
                    f"{n_cut} of {len(examples)} {split} examples were longer than the context "
                    f"window ({cap} tokens with the completion's end-of-text) and were truncated",
                    TruncationWarning, stacklevel=2,
                )
        return self._rows[key]

    def provenance(self) -> dict[str, str]:
        return dict(self._provenance)

    def examples(self, split: str) -> int:
        return len(self._examples[split])

    def tokens(self, split: str) -> int:
        """Target tokens of a split (completion + end-of-text; for chat rows the learned
        assistant tokens), before any truncation."""
        if self.chat:
            return sum(sum(x.mask) for x in self._examples[split])
        return sum(len(c) + 1 for _, c in self._examples[split])

    def bytes_per_token(self, split: str = "val") -> float:
        return self._bytes[split] / max(1, self.tokens(split))

    def check_fits(self, seq_len: int) -> None:
        for split in ("train", "val"):
            if not self._examples[split]:
                raise MoorelmError(f"the {split} split has no examples")
            self.rows(split, seq_len)

    def _xy(self, tokens: np.ndarray, mask: np.ndarray, segments: np.ndarray, n: int) -> Batch:
        """Inputs and targets (B, n - 1), with packing also the segments that keep the
        examples of a row apart (``GPT.forward``)."""
        tokens, mask = tokens[:, :n], mask[:, :n]
        targets = np.where(mask[:, 1:], tokens[:, 1:], -1)
        seg = torch.from_numpy(segments[:, : n - 1].copy()) if self.pack else None
        return Batch(torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(targets), seg)

    def _epoch_perm(self, seed: int, epoch: int, n: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != (seed, epoch, n):
            self._perm = ((seed, epoch, n), np.random.default_rng([seed, epoch, 11]).permutation(n))
        return self._perm[1]

    def train_batch(self, step: int, seed: int, global_batch: int, seq_len: int,
                    part: int = 0, parts: int = 1) -> Batch:
        """Part ``part`` of ``parts`` of the global batch of ``step``: rows ``step * B ...``
        of the stream of epochs, each epoch a fresh permutation of the packed rows."""
        tokens, mask, lengths, segments = self._packed("train", seq_len)
        n = len(tokens)
        r = step * global_batch + np.arange(global_batch)
        epoch, within = r // n, r % n
        idx = np.empty(global_batch, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            idx[sel] = self._epoch_perm(seed, int(e), n)[within[sel]]
        # drop the columns that are padding in every row of the global batch (unpacked rows
        # are short); every part of the step gets the same width
        width = max(2, int(lengths[idx].max()))
        per = global_batch // parts
        idx = idx[part * per: (part + 1) * per]
        return self._xy(tokens[idx], mask[idx], segments[idx], width)

    def val_batch(self, i: int, batch_size: int, seq_len: int) -> Batch:
        tokens, mask, lengths, segments = self._packed("val", seq_len)
        idx = (i * batch_size + np.arange(batch_size)) % len(tokens)
        return self._xy(tokens[idx], mask[idx], segments[idx], max(2, int(lengths[idx].max())))


# ----------------------------------------------------------------------------- exact match


def complete_batch(lm: LanguageModel, prompts: list[str], *, batch_size: int = 64,
                   max_new_tokens: int = 64, stop: tuple[str, ...] = (),
                   templated: bool = True) -> list[str]:
    """Greedy completions of user prompts (the run's template applied unless ``templated`` is
    False: prompts already formatted, e.g. rendered conversations), each ending at
    end-of-text or another of the model's stop ids, a ``stop`` string, ``max_new_tokens`` or
    the context window.

    Decoded by the inference engine (``moorelm.inference.engine``): prompts of any lengths share
    the batch, each joining and leaving as it starts and finishes.
    """
    from moorelm.generate import SamplingParams
    from moorelm.inference.engine import Engine
    from moorelm.inference.sequence import Request

    texts = [lm.format_prompt(p) for p in prompts] if templated else list(prompts)
    engine = Engine(lm.model, lm.tokenizer, max_batch=batch_size, max_queue=len(texts),
                    stop_ids=lm.stop_ids)
    window = engine.seq_len  # the model's context, or less when the KV-cache budget says so
    ids = [x[-(window - 1):] or [lm.tokenizer.eot_id] for x in lm.tokenizer.encode_batch(texts)]
    engine.start()
    try:
        handles = [engine.submit(Request(
            prompts=(tuple(x),), stop=stop,
            params=SamplingParams(temperature=0.0,
                                  max_new_tokens=max(1, min(max_new_tokens, window - len(x))))))
            for x in ids]
        return ["".join(e.text for events in h for e in events) for h in handles]
    finally:
        engine.stop()


def exact_match(lm: LanguageModel, pairs: list[Pair] | list[Conversation], *,
                batch_size: int = 64, max_new_tokens: int | None = None,
                show: int = 5) -> dict[str, Any]:
    """Greedy completions (``complete_batch``) compared with the expected completions after
    stripping surrounding whitespace. For chat rows: the reply to each conversation up to its
    last learned assistant message (rendered with the run's chat template, cut at its stop
    text) against that message. ``max_new_tokens`` defaults to the longest expected
    completion + 8 tokens."""
    if not pairs:
        raise MoorelmError("no rows to evaluate")
    if isinstance(pairs[0], Conversation):
        tpl = lm.template()
        cases = [last_reply(c, tpl) for c in pairs]  # type: ignore[arg-type]
        prompts, expected, shown_prompts = ([c[k] for c in cases] for k in range(3))
        stop, templated = tpl.stop, False
    else:
        prompts = shown_prompts = [p.prompt for p in pairs]  # type: ignore[union-attr]
        expected = [p.completion for p in pairs]  # type: ignore[union-attr]
        stop, templated = (), True
    if max_new_tokens is None:
        longest = max(len(c) for c in lm.tokenizer.encode_batch(expected))
        max_new_tokens = min(lm.config.seq_len, longest + 8)
    got = complete_batch(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         stop=stop, templated=templated)
    ok = [g.strip() == e.strip() for g, e in zip(got, expected)]
    wrong = [i for i, o in enumerate(ok) if not o]
    shown = sorted(set(range(min(show, len(pairs)))) | set(wrong[:show]))
    return {
        "rows": len(pairs), "correct": sum(ok), "exact_match": sum(ok) / len(pairs),
        "examples": [{"prompt": shown_prompts[i], "expected": expected[i],
                      "got": got[i], "ok": ok[i]} for i in shown],
    }


# ----------------------------------------------------------------------------- the job


@dataclass
class SFTResult:
    run_dir: Path
    method: str  # "full" | "lora"
    train: TrainResult
    trainable_params: int
    total_params: int
    exact_match: dict[str, Any] | None
    rows: dict[str, int]
    wall_s: float
    chat: bool = False  # trained on chat rows


def _fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


BUDGETS = ("max_steps", "max_tokens", "max_time")


def _train_config(saved: dict[str, Any] | None, overrides: dict[str, Any], lora: bool,
                  epoch_steps: int, epochs: float | None) -> TrainConfig:
    """SFT defaults (or a resumed run's saved config) < flags; the budget is the flags'
    max_steps/max_tokens/max_time, else ``epochs`` x ``epoch_steps``, else (resume) the saved
    one, else SFT_EPOCHS."""
    over = {k: v for k, v in overrides.items() if v is not None}
    if saved is not None:
        t = dict(saved)
    else:
        t = {**SFT_TRAIN, "lr": LORA_LR if lora else SFT_TRAIN["lr"]}
        t["min_lr"] = over.get("lr", t["lr"]) / 10
    t.update(over)
    if any(k in over for k in BUDGETS):
        for k in BUDGETS:
            t[k] = over.get(k)
    elif epochs is not None or saved is None:
        t.update(max_steps=max(1, math.ceil((epochs or SFT_EPOCHS) * epoch_steps)),
                 max_tokens=None, max_time=None)
    return TrainConfig.from_dict(t)


def _resumed_settings(out: Path, lora: LoRAConfig | None, template: str | None,
                      data: str | Path | None, eval_data: str | Path | None):
    """The settings a fine-tuned run in ``out`` was started with, for resuming it: (saved
    config, LoRA, template, base run, data, eval data, eval rows, seed, packing). ``data`` and
    ``eval_data`` may point elsewhere (the fingerprint checks their bytes); LoRA settings and
    the template may not change."""
    saved_cfg = RunFolder(out).read_config()
    ft = saved_cfg.get("finetune")
    if not ft:
        raise MoorelmError(f"{out} is not a fine-tuned run (config.json has no 'finetune' "
                           "section); resume it with 'moorelm train --resume'")
    RunFolder(out).latest()  # fail early when there is nothing to resume
    saved_lora = LoRAConfig.from_dict(saved_cfg["lora"]) if saved_cfg.get("lora") else None
    if lora is not None and lora != saved_lora:
        raise MoorelmError(f"{out} was trained with LoRA settings {saved_cfg.get('lora')}; "
                           "resume without changing --lora-* flags")
    if template is not None and template != saved_cfg.get("prompt_template"):
        raise MoorelmError(f"{out} was trained with the template "
                           f"{saved_cfg.get('prompt_template')!r}; resume without --template")
    data = Path(data) if data else Path(ft["data"])
    eval_data = Path(eval_data) if eval_data else (Path(ft["eval_data"]) if ft.get("eval_data") else None)
    return (saved_cfg, saved_lora, saved_cfg.get("prompt_template"), Path(ft["base_run"]), data,
            eval_data, ft.get("eval_rows"), ft["seed"], ft.get("packing", True))


def _read_pairs(data: Path, eval_data: Path | None, eval_rows: int | None,
                template: str | None, seed: int, resume: bool):
    """Read and check the rows: (chat rows?, the prompt template to use, training rows,
    held-out rows, how many were held out of ``data``, None with ``eval_data``)."""
    pairs = read_rows(data)
    chat = isinstance(pairs[0], Conversation)
    if chat and template is not None and not resume:
        raise MoorelmError(f"{data} holds chat rows, which go through the run's chat template; "
                           "--template is the prompt template of prompt/completion rows")
    if not resume:
        template = None if chat else check_template(SFT_TEMPLATE if template is None else template)
    if eval_data is not None:
        eval_pairs = read_rows(eval_data)
        if isinstance(eval_pairs[0], Conversation) != chat:
            raise MoorelmError(f"{eval_data} and {data} hold different kinds of rows (chat and "
                               "prompt/completion); use one format for both")
        return chat, template, pairs, eval_pairs, None
    eval_rows = eval_rows if eval_rows is not None else min(SFT_EVAL_ROWS, max(1, len(pairs) // 10))
    train_pairs, eval_pairs = split_pairs(pairs, eval_rows, seed)
    return chat, template, train_pairs, eval_pairs, eval_rows


def _sft_data(base_run: Path, saved_cfg: dict[str, Any] | None, out: Path, data: Path,
              eval_data: Path | None, eval_rows: int | None, seed: int, template: str | None,
              chat: bool, pack: bool, train_pairs: list, eval_pairs: list):
    """(the base's ModelConfig, its chat settings, the checked ``SFTData``): the base run's
    settings (a resumed run's saved ones), and the rows tokenized with its tokenizer; a
    resumed run must see the very data, template and tokenizer it started with."""
    base_cfg = RunFolder(base_run).read_config()
    if "classifier" in base_cfg:
        raise MoorelmError(f"{base_run} is a text classifier; fine-tune a language model run")
    tok_path = base_run / TOKENIZER_FILE
    if not tok_path.exists():
        raise MoorelmError(f"{base_run} has no {TOKENIZER_FILE}")
    model_cfg = ModelConfig.from_dict((saved_cfg or base_cfg)["model"])
    # the base's chat settings (an imported model's template, special tokens and stop ids)
    # travel with the fine-tuned run, so it chats as the base did
    chat_settings = RunFolder(base_run).chat_settings(saved_cfg or base_cfg)
    chat_template = ChatTemplate.from_config(saved_cfg or base_cfg)
    fingerprint = _fingerprint(data.read_bytes(), eval_data.read_bytes() if eval_data else b"",
                               str(eval_rows), str(seed),
                               chat_template.source if chat else (template or ""),
                               tok_path.read_bytes())
    if saved_cfg is not None and fingerprint != saved_cfg["finetune"]["fingerprint"]:
        raise MoorelmError(f"the data, template or tokenizer differ from what {out} was "
                           "trained on; resume with the same files")
    sft = SFTData(train_pairs, eval_pairs, tok_path, template, data.resolve(), fingerprint, seed,
                  pack=pack, chat_template=chat_template,
                  stop_ids=frozenset(chat_settings.get("stop_ids") or ()))
    sft.check_fits(model_cfg.seq_len)
    if sft.piecewise:
        warnings.warn(f"{sft.piecewise} chat rows were tokenized turn by turn: tokenizing the "
                      "whole conversation merged characters across a turn boundary",
                      TruncationWarning, stacklevel=3)  # finetune's caller
    return model_cfg, chat_settings, sft


def _budgeted_config(sft: SFTData, model_cfg: ModelConfig, saved_cfg: dict[str, Any] | None,
                     overrides: dict[str, Any], lora: bool, epochs: float | None) -> TrainConfig:
    """The training config, its budget counted in steps over ``sft``'s packed rows, and (new
    runs without ``eval_iters``) validation sized to the held-out rows, at most 20 batches."""
    n_rows = len(sft.rows("train", model_cfg.seq_len)[0])
    batch = {**SFT_TRAIN, **(saved_cfg["train"] if saved_cfg else {}),
             **{k: v for k, v in overrides.items() if v is not None}}
    cfg = _train_config(saved_cfg["train"] if saved_cfg else None, overrides, lora,
                        n_rows / (batch["batch_size"] * batch.get("grad_accum", 1)), epochs)
    if saved_cfg is None and overrides.get("eval_iters") is None:
        n_val = len(sft.rows("val", model_cfg.seq_len)[0])
        cfg = TrainConfig.from_dict({**cfg.to_dict(),
                                     "eval_iters": max(1, min(20, math.ceil(n_val / cfg.batch_size)))})
    return cfg


def _run_meta(method: str, base_run: Path, base_step: int | None, data: Path,
              eval_data: Path | None, eval_rows: int | None, seed: int, sft: SFTData,
              rows: dict[str, int], template: str | None, chat_settings: dict[str, Any],
              lora: LoRAConfig | None) -> dict[str, Any]:
    """What the fine-tuned run's config.json records beside the model and training sections:
    how it was made (``finetune``, read back by ``--resume``), its template and chat settings,
    its LoRA settings."""
    meta: dict[str, Any] = {
        "finetune": {
            "method": method, "base_run": str(base_run.resolve()), "base_step": base_step,
            "data": str(data.resolve()), "eval_data": str(eval_data.resolve()) if eval_data else None,
            "eval_rows": eval_rows, "seed": seed, "packing": sft.pack,
            "fingerprint": sft.fingerprint, "rows": rows, "format": "chat" if sft.chat else "pairs",
        },
    }
    if template is not None:
        meta["prompt_template"] = template
    if chat_settings:
        meta["chat"] = chat_settings
    if lora is not None:
        meta["lora"] = lora.to_dict()
    return meta


def finetune(
    base_run: str | Path | None,
    data: str | Path | None,
    out_dir: str | Path,
    *,
    eval_data: str | Path | None = None,
    eval_rows: int | None = None,
    template: str | None = None,
    lora: LoRAConfig | None = None,
    train_overrides: dict[str, Any] | None = None,
    epochs: float | None = None,
    seed: int = 0,
    pack: bool = True,
    resume: bool = False,
    exact_match_rows: int = SFT_EVAL_ROWS,
    progress: bool = True,
    loggers: Sequence[MetricsLogger] = (),
) -> SFTResult:
    """Fine-tune the newest checkpoint of ``base_run`` on prompt/completion pairs or chat rows.

    ``data`` holds one kind of row (``read_rows``). Chat rows go through the base's chat
    template (``ChatTemplate.from_config``) and learn the assistant's tokens only; the base's
    ``chat`` section (template, special tokens, stop ids) is kept in the new run either way.

    Full fine-tuning unless ``lora`` is given. ``pack=False`` puts one example per row
    instead of packing them (packed examples are kept apart, so both learn the same thing;
    unpacked batches are smaller and more). Budget: ``train_overrides`` max_steps /
    max_tokens / max_time, else ``epochs`` passes over the packed training rows (default 3).
    Without ``eval_data``, ``eval_rows`` rows (default min(200, 10%)) are held out. With
    ``resume``, the run in ``out_dir`` continues with its saved settings (base, data, template,
    LoRA); only budgets and training flags may change. Returns the metrics also written to
    ``out_dir/finetune.json``; ``exact_match_rows`` held-out rows are scored (0: skip).
    ``loggers``: experiment trackers beside metrics.csv (``moorelm.training.trackers``).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if epochs is not None and not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
        raise MoorelmError(f"--epochs must be a finite number > 0, got {epochs}")  # NaN too
    overrides = dict(train_overrides or {})
    saved_cfg: dict[str, Any] | None = None
    if resume:
        saved_cfg, lora, template, base_run, data, eval_data, eval_rows, seed, pack = \
            _resumed_settings(out, lora, template, data, eval_data)
    else:
        if base_run is None or data is None:
            raise MoorelmError("fine-tuning needs a base run and --data")
        if RunFolder(out).checkpoints():
            raise MoorelmError(f"{out} already holds a trained run; pass --resume to continue "
                               "it or choose another --out")
    base_run, data = Path(base_run), Path(data)
    require_run(base_run)  # a GGUF file or HF model: name the import before reading anything
    eval_data = Path(eval_data) if eval_data is not None else None

    # ---- data: check everything before loading any weights
    chat, template, train_pairs, eval_pairs, eval_rows = _read_pairs(
        data, eval_data, eval_rows, template, seed, resume)

    # ---- the base's settings, the tokenized rows, the budget
    model_cfg, chat_settings, sft = _sft_data(base_run, saved_cfg, out, data, eval_data,
                                              eval_rows, seed, template, chat, pack,
                                              train_pairs, eval_pairs)
    cfg = _budgeted_config(sft, model_cfg, saved_cfg, overrides, lora is not None, epochs)
    if resume:
        init, base_step = None, saved_cfg["finetune"].get("base_step")
    else:
        base = RunFolder(base_run).load()
        init, base_step = model_tensors(base.model), base.state["step"]
        del base

    wrapped: list[tuple[int, int]] = []  # (trainable, adapter) parameter counts

    def hook(model) -> None:
        apply_lora(model, lora)
        wrapped.append((sum(p.numel() for p in model.parameters() if p.requires_grad),
                        sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)))

    method = "lora" if lora is not None else "full"
    rows = {"train": len(train_pairs), "eval": len(eval_pairs)}
    run_meta = _run_meta(method, base_run, base_step, data, eval_data, eval_rows, seed, sft,
                         rows, template, chat_settings, lora)
    result = train(model_cfg, cfg, sft, out, resume=resume, run_meta=run_meta, init_weights=init,
                   progress=progress, model_hook=hook if lora is not None else None,
                   codec=lora.codec() if lora is not None else None, loggers=loggers)
    trainable = wrapped[0][0] if wrapped else result.params["total"]
    total = result.params["total"] - (wrapped[0][1] if wrapped else 0)  # the base model's

    em = None
    if exact_match_rows:
        loaded = RunFolder(out).load(device=resolve_device(cfg.device))
        lm = LanguageModel(loaded.model, loaded.tokenizer, out,
                           meta={"config": loaded.config, "state": loaded.state})
        em = exact_match(lm, eval_pairs[:exact_match_rows])
    res = SFTResult(out, method, result, trainable, total, em, rows, time.perf_counter() - started,
                    chat)
    atomic_write_json(out / RESULT_FILE, result_dict(res))
    return res


def result_dict(r: SFTResult) -> dict[str, Any]:
    t = r.train
    return {
        "method": r.method, "steps": t.step, "tokens": t.tokens, "train_time_s": round(t.elapsed, 2),
        "wall_s": round(r.wall_s, 2), "train_loss": t.train_loss, "val_loss": t.val_loss,
        "trainable_params": r.trainable_params, "total_params": r.total_params,
        "rows": r.rows, "exact_match": r.exact_match,
    }


def describe(r: SFTResult) -> str:
    """A few lines for the CLI."""
    t = r.train
    lines = [
        f"{r.method} fine-tuning: {t.step} steps in {t.elapsed:.1f}s; val loss "
        f"{t.val_loss:.4f} ({'assistant' if r.chat else 'completion'} tokens); "
        f"{r.trainable_params:,} trainable of "
        f"{r.total_params:,} parameters; {r.rows['train']} train / {r.rows['eval']} eval rows",
    ]
    if r.exact_match:
        em = r.exact_match
        lines.append(f"exact match {em['exact_match']:.3f} ({em['correct']}/{em['rows']} held-out rows)")
        for ex in em["examples"][:6]:
            mark = "ok " if ex["ok"] else "BAD"
            lines.append(f"  {mark} {ex['prompt']!r} -> {ex['got']!r}"
                         + ("" if ex["ok"] else f" (expected {ex['expected']!r})"))
    lines.append(f"run folder: {r.run_dir}")
    return "\n".join(lines)
