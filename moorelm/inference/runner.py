"""The model over the batched KV cache: where the KV cache lives.

``Runner`` owns one ``KVCache`` of ``max_batch`` slots. ``prefill`` runs prompts of equal
length in one forward pass straight into consecutive slots; ``decode`` runs one new token
for each of the first B slots (the active ones, which always fill the front); ``copy`` and
``free`` move and clear slots for the scheduler's compaction (a freed slot's memory goes
back to the OS: on a CPU the cache takes memory only for the positions it holds). Both passes return float32
logits (rows, V) with the ids the tokenizer lacks (vocabulary padding) at -inf, so they are
never sampled. The decode plan and packed projections of ``moorelm.model`` do the work.
"""

from __future__ import annotations

import torch

from moorelm.model import GPT


class Runner:
    """Prefill and decode for the engine's thread (``start`` before use)."""

    def __init__(self, model: GPT, max_batch: int, token_vocab: int, max_len: int | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.kv_dtype = kv_dtype  # None: the model's
        self.max_batch = max_batch
        self.max_len = max_len or model.config.seq_len  # positions per slot
        self.token_vocab = token_vocab
        self.device = model.wte.weight.device
        self.cache = None

    def start(self) -> None:
        """Allocate the KV cache (all slots empty, ``max_len`` positions each)."""
        self.cache = self.model.new_cache(self.max_batch, self.max_len, self.kv_dtype)

    def reset(self) -> None:
        """Empty every slot (and give the cache's memory back)."""
        self.cache.release()

    def prefill(self, first: int, prompts: list[tuple[int, ...]]) -> torch.Tensor:
        """Prompts of one length into slots first, first + 1, ... -> logits (k, V) of what
        follows each."""
        slots = self.cache.rows(first, first + len(prompts))
        slots.reset()
        idx = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (k, T)
        logits, _ = self.model(idx, kv_cache=slots, last_only=True)  # (k, 1, V)
        return self._clean(logits[:, -1, :])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One new token for each of slots 0..B-1 -> logits (B, V) of what follows."""
        idx = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        logits, _ = self.model(idx, kv_cache=self.cache.rows(0, len(tokens)), last_only=True)
        return self._clean(logits[:, -1, :])

    def copy(self, dst: int, src: int) -> None:
        """Slot dst gets a copy of slot src's keys and values (dst's old ones given back
        first, so that a slot holds memory only for its own sequence)."""
        self.cache.release([dst])
        self.cache.insert(dst, self.cache, src)

    def free(self, slot: int) -> None:
        """Empty a slot and give its memory back."""
        self.cache.release([slot])

    def _clean(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.token_vocab < logits.shape[-1]:
            logits[:, self.token_vocab:] = float("-inf")
        return logits
