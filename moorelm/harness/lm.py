"""``MoorelmLM``: lm-evaluation-harness' model interface over a loaded moorelm run.

lm-eval asks a model three things, in batches of ``Instance`` requests:

- ``loglikelihood``: ``log p(continuation | context)`` and whether greedy decoding would have
  produced the continuation (multiple choice). Contexts and continuations are tokenised
  the way lm-eval's own Hugging Face backend does it (``TemplateLM._encode_pair``: the whole
  text, then the context's share; trailing spaces move to the continuation; an empty context
  becomes the prefix token), truncated on the left to the model's context, and scored by
  ``moorelm.scoring.score_sequences``, the one likelihood path of moorelm.
- ``loglikelihood_rolling``: a whole text's log-likelihood (perplexity), in disjoint
  windows of the model's context cut by lm-eval's own ``get_rolling_token_windows``.
- ``generate_until``: greedy (or sampled, when a task asks) continuations ending at a stop
  string, end of text or ``max_gen_toks``, decoded together by the inference engine
  (``moorelm.inference.engine.Engine``), each request joining and leaving the batch on its own.

Which token begins an empty context (``prefix_token_id``) and whether the tokenizer adds
special tokens follow what transformers' tokenizer of the same run would do, so the numbers
match ``lm_eval --model hf`` on the exported folder. The run's chat template serves
``--apply-chat-template``.

This module imports ``lm_eval`` at its top; ``moorelm.harness.evaluate`` imports it only
after checking the package is there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from moorelm.errors import MoorelmError
from moorelm.generate import LanguageModel, SamplingParams
from moorelm.scoring import score_sequences

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's Hugging Face backend
KV_MEMORY_CAP = 4 << 30  # bytes of KV cache generation may take; fewer rows beyond it


class MoorelmLM(TemplateLM):
    """lm-eval's ``LM`` over a ``LanguageModel`` (``moorelm.load(run)``).

    ``batch_size``: sequences scored, or decoded, together. ``max_gen_toks``: the generation
    length of requests that name none. ``seed``: the first seed of sampled generations
    (request i samples with seed + i); greedy ones do not use it.
    """

    backend = "causal"

    def __init__(self, lm: LanguageModel, batch_size: int = 16,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MoorelmError(f"batch size must be an integer >= 1, got {batch_size}")
        self.lm = lm
        self.model = lm.model
        self.tok = lm.tokenizer
        self.batch_size = batch_size
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self._device = lm.device
        chat = (lm.meta.get("config") or {}).get("chat")
        chat = chat if isinstance(chat, dict) else {}
        self._bos = self._token_id(chat.get("bos_token"))
        eos = self._token_id(chat.get("eos_token"))
        self._eos = self.tok.eot_id if eos is None else eos
        # whether the tokenizer adds special tokens (a BOS) by default, as transformers'
        # AutoTokenizer of the exported folder would
        hf = self.tok.hf
        self._adds_specials = len(hf.encode("a", add_special_tokens=True).ids) > \
            len(hf.encode("a", add_special_tokens=False).ids)
        self._prefix_text = self.tok.decode([self.prefix_token_id])

    def _token_id(self, text: Any) -> int | None:
        if not isinstance(text, str):
            return None
        return self.tok.hf.token_to_id(text)

    # -- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is: BOS when the model has one, else end of text."""
        return self._eos if self._bos is None else self._bos

    @property
    def max_length(self) -> int:
        return self.model.config.seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The source of the run's chat template (its own, or moorelm's default)."""
        return self.lm.template().source

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the run's chat template. Without a generation prompt
        the last message is left open (transformers' ``continue_final_message``): the text
        ends where its content ends, so a model continues it."""
        text = self.lm.template().render(chat_history, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history:
            last = str(chat_history[-1].get("content") or "")
            cut = text.rfind(last) if last else -1
            if cut >= 0:
                text = text[:cut + len(last)]
        return text

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.wte.weight.dtype),
                "run": str(self.lm.run_dir) if self.lm.run_dir is not None else None}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        add = self._adds_specials if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self._prefix_text):
            add = False  # the text already begins with the prefix token, as lm-eval's HF model checks
        if add and self._adds_specials:
            return self.tok.hf.encode(string, add_special_tokens=True).ids
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # -- log-likelihoods

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False,
                              desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (log-likelihood, is greedy) each."""
        limit = self.max_length + 1
        seqs, conts = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise MoorelmError("lm-eval sent an empty continuation to score")
            if len(continuation) > self.max_length:
                raise MoorelmError(f"a continuation of {len(continuation)} tokens does not fit "
                                   f"the model's context of {self.max_length}")
            seqs.append((context + continuation)[-limit:])  # left-truncated, as lm-eval's HF model
            conts.append(len(continuation))
        out: list[tuple[float, bool] | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        with tqdm(total=len(seqs), desc=desc, disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                longest = len(seqs[chunk[0]])
                scored = score_sequences(self.model, [seqs[i] for i in chunk],
                                         batch_tokens=longest * len(chunk))
                for i, s in zip(chunk, scored):
                    first = len(s.ids) - conts[i]
                    answer = (s.total(first), bool(s.all_greedy(first)))
                    out[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of the model's context, the
        first one conditioned on the prefix token."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for n, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, list(ctx), list(cont)))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, desc="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop string (``until``, plus the end-of-text text),
        greedy unless a request asks for sampling (``do_sample`` with a temperature)."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        from moorelm.inference.engine import Engine
        from moorelm.inference.limits import kv_bytes_per_token
        from moorelm.inference.sequence import Request

        if not requests:
            return []
        eos_text = self.tok_decode([self.eot_token_id])
        jobs: list[tuple[Request, list[str]]] = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if not 1 <= max_gen < self.max_length:
                raise MoorelmError(f"a task asks for {max_gen} generated tokens; this model's "
                                   f"context ({self.max_length}) allows 1..{self.max_length - 1}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.prefix_token_id]
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            params = SamplingParams(
                temperature=float(kwargs.get("temperature") or 0) if sample else 0.0,
                top_k=int(kwargs["top_k"]) if sample and kwargs.get("top_k") else None,
                top_p=float(kwargs["top_p"]) if sample and kwargs.get("top_p") else None,
                max_new_tokens=max_gen, seed=self.seed + n if sample else None)
            jobs.append((Request(prompts=(tuple(ids),), params=params,
                                 stop=tuple(s for s in until if s)), until))
        need = max(len(r.prompts[0]) + r.params.max_new_tokens for r, _ in jobs)
        value_bytes = self.model.wte.weight.element_size()
        per_row = need * kv_bytes_per_token(self.model.config, value_bytes)
        rows = max(1, min(self.batch_size, len(jobs), KV_MEMORY_CAP // per_row))
        engine = Engine(self.model, self.tok, max_batch=rows, max_queue=len(jobs),
                        max_seq_len=max(2, need), kv_memory=max(rows * per_row, 2 * per_row),
                        stop_ids=self.lm.stop_ids).start()
        out: list[str] = []
        try:
            handles = [engine.submit(r) for r, _ in jobs]
            with tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm) as bar:
                for handle, (req, (_, until)) in zip(handles, zip(requests, jobs)):
                    pieces, error = [], None
                    for events in handle:
                        for e in events:
                            pieces.append(e.text)
                            error = error or e.error
                    if error:
                        raise MoorelmError(f"generation failed: {error}")
                    text = postprocess_generated_text("".join(pieces), until, None)
                    out.append(text)
                    self.cache_hook.add_partial("generate_until", req.args, text)
                    bar.update(1)
        finally:
            engine.stop()
        return out
