"""The GPT: a decoder-only transformer, one class for every variant.

    idx (B, T) -> token embedding (+ learned positions) -> n_layer x Block -> norm -> head -> (B, T, V)
    Block: x + attn(norm(x)), then x + mlp(norm(x))            (pre-norm residual stream)

Variant fields of ``ModelConfig`` (never copied classes):
    pos       learned absolute positions (GPT-2) | rope (rotary, applied to q and k)
    norm      LayerNorm (GPT-2) | RMSNorm
    mlp       gelu (exact, 4x, GPT-2) | swiglu (Llama) | relu2 (squared ReLU)
    n_kv_head grouped-query attention: fewer key/value heads than query heads
    qk_norm   RMS-normalise queries and keys per head (stabilises high learning rates)
    qk_gain   learned per-dimension gains after that norm (Qwen3's q_norm/k_norm)
    qkv_bias  a bias on the query/key/value projection only (Qwen2)
    head_dim  head size D when it is not n_embd / n_head (Qwen3: H x D may differ from C)
    tie_embeddings, zero_init_proj, logit_softcap, bias, dropout

Shape letters: B batch, T time (sequence), C width (n_embd), H heads, K key/value heads,
D head size, V vocabulary, S cached length. Attention always goes through
``F.scaled_dot_product_attention``.

The KV cache is an explicit object passed to ``forward``: every row of the batch has its own
length, so a serving engine can decode requests that started at different times together.
On a CPU a large cache takes memory only as positions are written (``lazy_zeros``), and a
freed row gives its memory back (``KVCache.release``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import sys
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moorelm.config import ModelConfig
from moorelm.decode_plan import _ONEDNN_OFF, DecodePlan, inference_linear
from moorelm.errors import MoorelmError

LAZY_BYTES = 1 << 20  # CPU tensors from this size up are allocated by ``lazy_zeros``
_LAZY_OK = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MADV_DONTNEED")  # POSIX (not Windows)
# addresses only: no swap reserved for pages never written (Linux's flag; Python 3.11 lacks it)
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def lazy_kv(device_type: str) -> bool:
    """Whether a KV cache on this device takes memory only where written (``lazy_zeros``):
    a CPU on a POSIX system. ``inference.limits.plan_kv`` sizes the serving cache by it."""
    return device_type == "cpu" and _LAZY_OK


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A CPU tensor of zeros whose memory becomes resident only where it is written: an
    anonymous private mapping, which the OS hands out zero-filled page by page on first
    write (reading an untouched page costs no memory). -> (tensor, its mapping), for
    ``release_rows``."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    except OSError as e:
        raise MoorelmError(f"could not reserve {nbytes / 2**20:.0f} MiB of addresses for the KV "
                           f"cache ({e.strerror}); lower --max-batch or --max-seq-len") from None
    return torch.frombuffer(buf, dtype=dtype).view(shape), buf


def release_rows(buf: mmap.mmap, row_bytes: int, rows: list[int]) -> None:
    """Give back to the OS the whole pages inside these rows (of ``row_bytes`` each) of a
    ``lazy_zeros`` mapping: they read as zeros again and hold no memory until written."""
    page = mmap.PAGESIZE
    for r in rows:
        start = -(-(r * row_bytes) // page) * page
        end = ((r + 1) * row_bytes // page) * page
        if end > start:
            buf.madvise(mmap.MADV_DONTNEED, start, end - start)


class KVCache:
    """Keys and values of past positions, per layer, with a length per batch row.

    On a CPU a cache of ``LAZY_BYTES`` or more lives in ``lazy_zeros`` memory: ``max_len``
    positions per row are reserved as addresses, but only positions written take memory, so
    a serving engine can give every slot the model's whole window and its resident size
    follows the tokens actually held. ``release`` empties rows and returns their memory."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.seq_len
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)  # (B, K, S, D)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._maps: list[mmap.mmap] = []  # the lazy_zeros mappings of k and v, if any
        self._first = 0  # this cache's row 0 in the mappings (``rows`` views)
        if lazy_kv(torch.device(device).type) and nbytes >= LAZY_BYTES:
            tensors = []
            for _ in range(2 * cfg.n_layer):
                t, buf = lazy_zeros(shape, dtype)
                tensors.append(t)
                self._maps.append(buf)
            self.k, self.v = tensors[: cfg.n_layer], tensors[cfg.n_layer :]
        else:
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self._plan: list[DecodePlan | None] = [None]  # shared with ``rows`` views

    @property
    def plan(self) -> DecodePlan | None:
        """The decode path's bound weights, built by the first one-token step."""
        return self._plan[0]

    @plan.setter
    def plan(self, plan: DecodePlan) -> None:
        self._plan[0] = plan

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget rows (all when None); their slots can take new sequences."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def release(self, rows: list[int] | None = None) -> None:
        """Forget rows (all when None) and, for a lazily allocated cache, give their memory
        back: what a serving engine does when a sequence leaves its slot. Positions a row
        held read as zeros afterwards or keep old values (the part of a page shared with
        the next row); either way they are past the row's length, which attention masks."""
        self.reset(rows)
        if not self._maps:
            return
        rows = list(range(self.batch_size)) if rows is None else rows
        row_bytes = self.k[0][0].numel() * self.k[0].element_size()
        for buf in self._maps:
            release_rows(buf, row_bytes, [self._first + r for r in rows])

    def insert(self, row: int, other: KVCache, other_row: int = 0) -> None:
        """Copy one sequence (e.g. a freshly prefilled request) into slot ``row``."""
        n = int(other.lengths[other_row])
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = other.k[layer][other_row, :, :n]
            self.v[layer][row, :, :n] = other.v[layer][other_row, :, :n]
        self.lengths[row] = n

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own sharing storage with this one: writes
        (and length updates) go through. A serving engine decodes only its active rows so."""
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.lengths = self.lengths[start:stop]
        view._maps, view._first = self._maps, self._first + start
        view._plan = self._plan
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               uniform_start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, K, T, D) at positions ``pos`` (B, T); return all so far."""
        T = k.shape[2]
        if uniform_start is not None:
            end = uniform_start + T
            self.k[layer][:, :, uniform_start:end] = k
            self.v[layer][:, :, uniform_start:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            # advanced indices around a slice put (B, T) first: value shape (B, T, K, D)
            self.k[layer][rows, :, pos] = k.transpose(1, 2)
            self.v[layer][rows, :, pos] = v.transpose(1, 2)
            end = int(pos.max()) + 1
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's rescaled rotary frequencies, as transformers computes them.

    With L = original_max_position_embeddings, a frequency whose wavelength 2 pi / f is
    shorter than L / high_freq_factor is kept, one longer than L / low_freq_factor is divided
    by ``factor``, and those in between are blended: (1 - s) f / factor + s f with
    s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    factor, low = scaling["factor"], scaling["low_freq_factor"]
    high, old_len = scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_len: int, base: float,
                scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (S, D) in the form ``_rotate`` uses: [cos, cos] and [-sin, sin].

    Pairs are (i, i + D/2), the first and second halves of a head (Llama's layout).
    ``scaling``: a ModelConfig ``rope_scaling`` (llama3), rescaling the frequencies per band."""
    # Computed on the CPU whatever the default device (and then moved to it): under
    # ``meta_device()`` real values cost nothing, and a meta arange would import torch._dynamo.
    cpu = torch.device("cpu")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu)
                               / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=cpu), inv_freq)
    cos, sin = angles.cos(), angles.sin()  # (S, D/2)
    device = torch.get_default_device()
    return (torch.cat([cos, cos], dim=-1).float().to(device),
            torch.cat([-sin, sin], dim=-1).float().to(device))


class _SkipMetaInit(TorchFunctionMode):
    """Skips initialisers on meta tensors, which have no values to set. PyTorch runs them there
    through its Python reference ops, whose first use imports ``torch._dynamo`` (and triton
    where it is installed): ~2 s and ~140 MiB resident for every process that loads a run."""

    _INIT = frozenset({
        nn.init.normal_, nn.init.uniform_, nn.init.zeros_, nn.init.ones_, nn.init.constant_,
        nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
        nn.init.xavier_uniform_, nn.init.xavier_normal_,
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        if func in self._INIT and isinstance(t, torch.Tensor) and t.is_meta:
            return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Modules built inside get meta tensors (shapes, no memory) and skip their initialisers:
    for building a model whose weights are loaded next, or only its shapes are wanted."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim: [x1 c - x2 s, x1 s + x2 c].

    With tables from ``rope_tables`` that is x * [c, c] + [x2, x1] * [-s, s]: a roll and a
    fused multiply-add instead of slices, four products, two sums and a concatenation.
    The inverse rotation is the same with ``-sin``.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _norm_rotate_values(x, gain, cos, sin, norm: bool, eps: float):
    """``norm_rotate``'s output, with the normalised input and 1/rms its backward needs."""
    y, r = _upcast(x), None
    if norm:
        r = torch.rsqrt(y.square().mean(-1, keepdim=True).add_(eps))
        y = y * r
    z = y * _upcast(gain) if gain is not None else y
    out = _rotate(z, cos, sin) if cos is not None else z
    return out.to(x.dtype), y, r


class _NormRotate(torch.autograd.Function):
    """Queries and keys together, (B, T, H + K, D): optional per-head RMS norm, optional
    learned gains (H + K, D) on the result, then optional rotary rotation (tables from
    ``rope_tables``, broadcast as (.., T, 1, D)).

    A hand-written backward: the rotation's gradient is the inverse rotation, the gains'
    is the sum over positions of (gradient x normalised input), and the RMS norm's is
    r * (g - y * mean(g * y)), a handful of kernels where autograd's composite graph (pow,
    mean, rsqrt, slices padded back with zeros, ...) runs several times as many.
    fp16/bf16 inputs are computed in fp32.
    """

    @staticmethod
    def forward(ctx, x, gain, cos, sin, norm: bool, eps: float):
        out, y, r = _norm_rotate_values(x, gain, cos, sin, norm, eps)
        ctx.norm = norm
        ctx.save_for_backward(y if norm or gain is not None else None, r, gain, cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, r, gain, cos, sin = ctx.saved_tensors
        g = _upcast(grad)
        if cos is not None:
            g = _rotate(g, cos, -sin)
        grad_gain = None
        if gain is not None:
            if ctx.needs_input_grad[1]:  # summed over every leading (batch, time) dim
                grad_gain = (g * y).reshape(-1, *gain.shape).sum(0).to(gain.dtype)
            g = g * _upcast(gain)
        if ctx.norm:
            g = r * (g - y * (g * y).mean(-1, keepdim=True))
        return g.to(grad.dtype), grad_gain, None, None, None, None


def norm_rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                norm: bool, eps: float = 1e-6, gain: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, N, D) -> RMS-normalised per head when ``norm``, times ``gain`` (N, D) when
    given, rotated when ``rope``."""
    if rope is None and not norm and gain is None:
        return x
    cos, sin = rope if rope is not None else (None, None)
    if torch.is_grad_enabled() and (x.requires_grad or (gain is not None and gain.requires_grad)):
        return _NormRotate.apply(x, gain, cos, sin, norm, eps)
    return _norm_rotate_values(x, gain, cos, sin, norm, eps)[0]  # no graph: skip Function.apply


_call = inference_linear  # how forward applies a projection (decode_plan.inference_linear)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (H + 2 * K) * D, bias=cfg.bias or cfg.qkv_bias)  # fused q, k, v
        self.c_proj = nn.Linear(H * D, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_gain:  # Qwen3's q_norm/k_norm weights: one gain per head dimension
            self.q_gain = nn.Parameter(torch.ones(D))
            self.k_gain = nn.Parameter(torch.ones(D))
        self.qk_eps = cfg.norm_eps if cfg.qk_gain else 1e-6
        self.dropout = cfg.dropout

    def qk_gains(self) -> torch.Tensor | None:
        """The gains of queries and keys as one (H + K, D) tensor, or None without qk_gain."""
        if not self.cfg.qk_gain:
            return None
        H, K, D = self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_dim
        return torch.cat([self.q_gain.expand(H, D), self.k_gain.expand(K, D)])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, pos: torch.Tensor, uniform_start: int | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (B, 1, T, T), without a cache: which keys each query sees (packed rows)."""
        B, T, C = x.shape
        H, K, D = self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_dim
        # split, not slicing: a slice's backward pads its gradient with zeros, split's concatenates
        qk, v = _call(self.c_attn, x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)
        q, k = norm_rotate(qk, rope, self.cfg.qk_norm, self.qk_eps,
                           self.qk_gains()).split([H, K], dim=2)  # one pass for both
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)

        is_causal = mask is None
        if cache is not None:
            k, v = cache.update(self.layer, k.to(cache.k[0].dtype), v.to(cache.v[0].dtype), pos,
                                uniform_start)
            k, v = k.to(q.dtype), v.to(q.dtype)
            S = k.shape[2]
            if uniform_start == 0:
                pass  # fresh prefill: plain causal attention over the new tokens
            elif uniform_start is not None and T == 1:
                is_causal = False  # one new token attends to everything cached: no mask needed
            else:
                # row b, query t sees key j iff j <= pos[b, t]
                keys = torch.arange(S, device=x.device)
                mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, S)
                is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return _call(self.c_proj, y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden_dim
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        if cfg.mlp == "swiglu":
            self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, linear=_call) -> torch.Tensor:
        """``linear(module, x)`` applies each projection (the decode path passes its plan's)."""
        h = linear(self.c_fc, x)
        if self.kind == "gelu":
            h = F.gelu(h)  # exact erf GELU, as GPT-2's paper defines it
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(linear(self.c_gate, x)) * h
        return linear(self.c_proj, h)


def _segment_positions(segments: torch.Tensor, idx: torch.Tensor,
                       kv_cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at 0 at every change of ``segments`` along a row, and the
    attention mask (B, 1, T, T): causal, and only within a query's own run."""
    if kv_cache is not None:
        raise ValueError("segments (packed rows) do not combine with a KV cache")
    if segments.shape != idx.shape:
        raise ValueError(f"segments must have idx's shape {tuple(idx.shape)}, "
                         f"got {tuple(segments.shape)}")
    T = idx.shape[1]
    t = torch.arange(T, device=idx.device)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T): a run starts here
    start = torch.where(new, t, 0).cummax(dim=1).values  # (B, T): where my run started
    run = new.cumsum(dim=1)  # (B, T): runs numbered along the row
    mask = (run[:, :, None] == run[:, None, :]) & (t[:, None] >= t[None, :])  # (B, T, T)
    return t - start, mask[:, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache, pos, uniform_start, mask=None):
        x = x + self.drop(self.attn(self.ln_1(x), rope, cache, pos, uniform_start, mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_base, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)  # (S, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every initialisation in one place.

        Linear and embedding weights ~ N(0, init_std); residual output projections are scaled
        by 1/sqrt(2 n_layer) (GPT-2: keeps the residual stream's variance flat with depth), or
        zero when ``zero_init_proj`` (each block starts as the identity; an untied head then
        starts at zero too). Norm weights 1, biases 0.
        """
        cfg = self.config
        std = cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # norm gains
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                if cfg.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init_proj and not cfg.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @torch.no_grad()
    def shorten(self, seq_len: int) -> GPT:
        """Keep the first ``seq_len`` positions of the context window, in place (the learned
        position table and the rotary tables cut to them): what ``moorelm.load(run,
        seq_len=...)`` and ``moorelm import --seq-len`` give, a model whose caches hold at
        most ``seq_len`` positions. Positions it keeps compute exactly as before."""
        current = self.config.seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= current:
            raise MoorelmError(f"seq_len must be an integer in [1, {current}] (the model's "
                               f"context window), got {seq_len!r}")
        if seq_len == current:
            return self
        self.config = dataclasses.replace(self.config, seq_len=seq_len)
        if self.wpe is not None:
            table = nn.Embedding(seq_len, self.config.n_embd, device=self.wpe.weight.device,
                                 dtype=self.wpe.weight.dtype)
            table.weight.copy_(self.wpe.weight[:seq_len])
            table.weight.requires_grad_(self.wpe.weight.requires_grad)
            self.wpe = table
        if self.config.pos == "rope":
            self.rope_cos = self.rope_cos[:seq_len].contiguous()
            self.rope_sin = self.rope_sin[:seq_len].contiguous()
        return self

    # -- accounting

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by convention (papers differ: Kaplan et al. exclude embeddings)."""
        total = sum(p.numel() for p in self.parameters())  # tied weights counted once
        embedding = self.wte.weight.numel()
        if self.wpe is not None:
            embedding += self.wpe.weight.numel()
        if not self.config.tie_embeddings:
            embedding += self.lm_head.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Model FLOPs per token: forward = 2 x matmul params + 4 x n_layer x T x H x D
        (attention scores and weighted values, full T x T as PaLM counts it; H x D is the width
        C unless head_dim says otherwise); training = 3 x forward."""
        cfg = self.config
        T = seq_len or cfg.seq_len
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        forward = 2 * matmul + 4 * cfg.n_layer * T * cfg.n_head * cfg.head_dim
        return 3 * forward if training else forward

    # -- forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        last_only: bool = False,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V) or (B, 1, V) with last_only, loss or None).

        With targets, returns the cross-entropy (targets < 0 are ignored) and logits None to
        save memory; ``loss_reduction="none"`` gives per-token losses (B, T).
        With a cache, positions continue from each row's cached length.
        ``segments`` (B, T), without a cache: packed rows, a new sequence wherever the value
        changes along a row; each starts at position 0 and attends only within itself, so
        the row computes what its sequences would alone.
        """
        B, T = idx.shape
        if kv_cache is not None and T == 1 and targets is None and not self.training \
                and not torch.is_grad_enabled():
            return self._decode_one(idx[:, 0], kv_cache)[:, None], None
        x = self.hidden_states(idx, kv_cache, segments)  # (B, T, C)
        if targets is not None:
            logits = self._logits(x).float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=loss_reduction)
            if loss_reduction == "none":
                loss = loss.view(B, T)
            return None, loss
        if last_only:
            x = x[:, -1:, :]
        return self._logits(x), None

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> the final norm's output (B, T, C): the trunk without the LM head.

        What ``forward`` computes before its head (same positions, cache and ``segments``
        rules); heads of other tasks, such as a classifier's, read it.
        """
        T = idx.shape[1]
        cfg = self.config
        uniform_start: int | None = 0
        if kv_cache is not None:
            lengths = kv_cache.lengths
            first = int(lengths[0])
            uniform_start = first if bool((lengths == first).all()) else None
            pos = lengths[:, None] + torch.arange(T, device=idx.device)[None, :]  # (B, T)
            last = first + T - 1 if uniform_start is not None else int(pos.max())
            limit = min(kv_cache.max_len, cfg.seq_len)
        else:
            pos = torch.arange(T, device=idx.device)[None, :]  # (1, T)
            last, limit = T - 1, cfg.seq_len
        mask = None
        if segments is not None:
            pos, mask = _segment_positions(segments, idx, kv_cache)
            uniform_start = None
        self._check_window(last, limit)

        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = None
        if cfg.pos == "rope":
            if uniform_start is not None:
                start = uniform_start  # every row at the same positions: a slice
                rope = (self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None])
            else:
                rope = (self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, pos, uniform_start, mask)
        if kv_cache is not None:
            kv_cache.lengths += T
        x = self.ln_f(x)
        return x

    def _check_window(self, last: int, limit: int) -> None:
        if last >= limit:
            raise ValueError(f"positions up to {last} exceed the context window "
                             f"{self.config.seq_len}")

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._softcap(_call(self.lm_head, x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (and soft cap) on ``hidden_states``' output: (..., C) -> (..., V)."""
        return self._logits(hidden)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # -- one-token decoding

    def _decode_one(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) for one new token per row after its cached prefix (``_decode_step``).

        On CPU in fp32 the step runs with oneDNN switched off: its per-call set-up (GELU
        goes through it) costs ~10-50 us a call at decode sizes, more than the arithmetic,
        where ATen's own kernels compute the same formulas without it (a measured 7-12% of a
        batch-1 step; results agree to ~1e-6). bf16 keeps oneDNN, whose matmuls it wants.
        The switch is process-wide for the step's duration: another thread computing at the
        same moment only takes ATen's kernels too.
        """
        if tok.device.type != "cpu" or self.wte.weight.dtype != torch.float32:
            return self._decode_step(tok, cache)
        with _ONEDNN_OFF:
            return self._decode_step(tok, cache)

    def _decode_step(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """``forward``'s computation for T = 1 in inference, written flat on (B, C) tensors.

        Generation spends its life here, and at batch 1 on a CPU a step is a dozen small
        matmuls: module calls, the (B, T, ...) reshapes, position tensors and cache
        bookkeeping cost as much again as the arithmetic. Same weights and kernels as
        ``forward`` (tests compare the two for every variant), through the cache's
        ``DecodePlan``; Linear subclasses such as LoRA's are called as modules.
        """
        plan = cache.plan
        if plan is None or plan.model is not self:
            plan = cache.plan = DecodePlan(self)
        cfg = self.config
        H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        B = tok.shape[0]
        lengths = cache.lengths
        first = int(lengths[0])
        uniform = bool((lengths == first).all())
        last = first if uniform else int(lengths.max())
        self._check_window(last, min(cache.max_len, cfg.seq_len))
        x = self.wte.weight[tok]  # (B, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[lengths]
        rope = None
        if cfg.pos == "rope":
            rope = (self.rope_cos[lengths][:, None], self.rope_sin[lengths][:, None])  # (B, 1, D)
        mask = None
        if not uniform:  # row b sees keys 0..lengths[b] (its new one included)
            mask = (torch.arange(last + 1, device=tok.device)[None, :] <= lengths[:, None])
            mask = mask[:, None, None, :]  # (B, 1, 1, S)
            rows = torch.arange(B, device=tok.device)
        for i, (norm_1, qkv_proj, out_proj, norm_2, mlp, gain) in enumerate(plan.layers):
            qkv = qkv_proj(norm_1(x)).view(B, H + 2 * K, D)
            if rope is None and not cfg.qk_norm:  # split_with_sizes: no Python wrapper
                q, k, v = qkv.split_with_sizes([H, K, K], dim=1)  # (B, H|K, D)
            else:
                qk, v = qkv.split_with_sizes([H + K, K], dim=1)
                gain = gain() if gain is not None else None  # (H + K, D), current values
                q, k = norm_rotate(qk, rope, cfg.qk_norm, plan.qk_eps,
                                   gain).split_with_sizes([H, K], dim=1)
            ck, cv = cache.k[i], cache.v[i]
            if uniform:
                ck[:, :, first] = k
                cv[:, :, first] = v
            else:  # index_put does not convert: a bf16 cache under fp32 weights takes bf16
                ck[rows, :, lengths] = k.to(ck.dtype)
                cv[rows, :, lengths] = v.to(cv.dtype)
            # in the model's dtype: a bf16 cache under fp32 weights is read into fp32 copies.
            # PyTorch's CPU attention kernel ran 3-5x slower in bf16 than in fp32 at batch 8-32
            # (SmolLM2's heads, 300 positions, batch 32: 7.4 against 1.7 ms), and two batched
            # bf16 products through oneDNN, fast, left ~1.3 MB resident for every new shape.
            y = F.scaled_dot_product_attention(
                q[:, :, None], ck[:, :, :last + 1].to(q.dtype), cv[:, :, :last + 1].to(q.dtype),
                attn_mask=mask, enable_gqa=K != H)  # (B, H, 1, D)
            x = x + out_proj(y.view(B, H * D))
            x = x + mlp.forward(norm_2(x), plan.apply)  # no module call
        cache.lengths += 1
        norm_f, head = plan.head
        return self._softcap(head(norm_f(x)))

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache; ``dtype`` of its keys and values defaults to the model's. A bf16
        cache under an fp32 model halves its bytes: keys and values are rounded to bf16 as
        they are written and read back into fp32 for attention."""
        p = self.wte.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=dtype or p.dtype)
