"""GGUF export: a moorelm run -> one llama.cpp model file (weights, hyper-parameters, tokenizer).

    moorelm export RUN --format gguf model.gguf [--dtype f32|f16|bf16|q8_0]

The file is written with the ``gguf`` package's ``GGUFWriter`` in the layout llama.cpp's own
converter (``convert_hf_to_gguf.py``) produces, so llama.cpp, Ollama, LM Studio and
transformers' GGUF loader (``from_pretrained(folder, gguf_file=...)``) read it, and ``moorelm
import model.gguf RUN`` reads it back. Three llama.cpp architectures cover what exports
exactly:

- ``llama``: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases (Llama,
  SmolLM; moorelm's ``pos=rope, norm=rmsnorm, mlp=swiglu``). llama.cpp rotates *adjacent*
  pairs of a head for this architecture, so each head's query and key rows are permuted from
  moorelm's "two halves" order into interleaved pairs, as llama.cpp's converter does and as
  ``moorelm.interop.gguf`` undoes on import.
- ``qwen2``: the same with biases on the query/key/value projections only (rotated by halves,
  so no permutation).
- ``qwen3``: the same plus per-head QK-norm (RMS-normalised queries and keys, a gain of
  ``head_dim`` values each; ones unless the model learned its own), rotated by halves. One
  epsilon serves every RMSNorm of a Qwen3 model, so the model's ``norm_eps`` must equal its
  QK-norm epsilon.

Anything else (learned positions, LayerNorm, GELU or ReLU^2 MLPs, logit soft-capping, biases
outside q/k/v, QK-norm with biases) is refused with one line naming the field: export never
approximates. 1-D tensors (norm gains, biases) are always stored as F32; matrices in the
requested type (``q8_0``: rows whose length is not a multiple of 32 stay F16, as llama.cpp's
converter keeps them).

Metadata: the tokenizer (GPT-2-style byte-level BPE as ``tokenizer.ggml.model = "gpt2"`` with
tokens, merges, token types and the pre-tokenizer's name; a SentencePiece-style vocabulary an
import brought as ``"llama"`` with scores), the chat template moorelm renders for the run, the
bos/eos/eot/pad ids, context length, rotary base and norm epsilon. moorelm's character-level
tokenizer has no GGUF counterpart and is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "bf16", "q8_0")
QK_NORM_EPS = 1e-6  # what moorelm.model's QK-norm uses when the config does not say
# the pre-tokenizer regexes moorelm.interop.gguf reads, by the name llama.cpp gives each
_PRE_NAMES = ("llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o")
_CONTROL, _USER_DEFINED, _UNUSED, _NORMAL, _UNKNOWN, _BYTE = 3, 4, 5, 1, 2, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MoorelmError("writing GGUF files needs the 'gguf' package; pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- architecture


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().abs().max() > 0)


def gguf_architecture(cfg: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> str:
    """'llama', 'qwen2' or 'qwen3': the llama.cpp architecture that computes exactly what a
    model of ``cfg`` (with weights ``state``: all-zero biases count as absent) computes.

    Raises MoorelmError naming the first field that has no counterpart.
    """
    if cfg.pos != "rope":
        raise MoorelmError(f"cannot export to GGUF: pos={cfg.pos!r} (learned positions); llama.cpp's "
                           "GPT-2 uses the tanh-approximated GELU, so only rotary models export "
                           "exactly (use --format hf for GPT-2-style models)")
    for name, want in (("norm", "rmsnorm"), ("mlp", "swiglu")):
        if getattr(cfg, name) != want:
            raise MoorelmError(f"cannot export to GGUF: {name}={getattr(cfg, name)!r} has no exact "
                               f"counterpart in llama.cpp's llama/qwen2/qwen3; train with "
                               f"{name}={want!r} to export")
    if cfg.logit_softcap:
        raise MoorelmError(f"cannot export to GGUF: logit_softcap={cfg.logit_softcap} has no "
                           "counterpart in llama.cpp's llama/qwen2/qwen3")
    if getattr(cfg, "rope_scaling", None):
        raise MoorelmError(f"cannot export to GGUF: rope_scaling "
                           f"{cfg.rope_scaling.get('rope_type')!r} (Llama 3.1's scaled rotary "
                           "positions) is not written to GGUF yet; use --format hf")
    sd = state or {}
    qkv_bias = bool(getattr(cfg, "qkv_bias", False)) or any(
        _nonzero(v) for k, v in sd.items() if k.endswith("attn.c_attn.bias"))
    other = [k for k, v in sd.items() if k.endswith(".bias") and not k.endswith("attn.c_attn.bias")
             and _nonzero(v)]
    if other:
        raise MoorelmError(f"cannot export to GGUF: bias=True with a non-zero bias {other[0]!r}; "
                           "llama.cpp's llama/qwen2/qwen3 have biases on q/k/v only")
    if cfg.qk_norm:
        if qkv_bias:
            raise MoorelmError("cannot export to GGUF: qk_norm=True with q/k/v biases has no "
                               "counterpart (Qwen3 has QK-norm without biases, Qwen2 the reverse)")
        eps = float(getattr(cfg, "qk_norm_eps", None) or QK_NORM_EPS)
        if cfg.norm_eps != eps:
            raise MoorelmError(f"cannot export to GGUF: norm_eps={cfg.norm_eps:g} differs from the "
                               f"QK-norm epsilon {eps:g}; Qwen3 uses one epsilon for every RMSNorm "
                               f"(train with norm_eps={eps:g} to export)")
        return "qwen3"
    return "qwen2" if qkv_bias else "llama"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for the llama architecture: per head, (2, half) -> (half, 2)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gain(sd: dict[str, torch.Tensor], key: str, heads: int, D: int) -> np.ndarray:
    """A learned QK-norm gain as Qwen3's ``head_dim`` values (one gain shared by all heads),
    else ones."""
    t = sd.get(key)
    if t is None:
        return np.ones(D, dtype=np.float32)
    g = t.detach().float().reshape(-1, D)
    if g.shape[0] not in (1, heads) or not bool((g == g[:1]).all()):
        raise MoorelmError(f"cannot export to GGUF: {key} has a gain per head ({tuple(t.shape)}); "
                           "Qwen3's QK-norm has one gain of head_dim values shared by all heads")
    return g[0].numpy().astype(np.float32)


def gguf_tensors(model: torch.nn.Module, arch: str | None = None) -> dict[str, np.ndarray]:
    """moorelm weights under llama.cpp's tensor names, float32, in llama.cpp's layout
    (numpy shape (out, in), q/k rows permuted for the llama architecture)."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    arch = arch or gguf_architecture(cfg, sd)
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    np_ = lambda t: np.ascontiguousarray(t.numpy(), dtype=np.float32)  # noqa: E731
    out = {"token_embd.weight": np_(sd["wte.weight"])}
    for i in range(cfg.n_layer):
        m, b = f"blocks.{i}", f"blk.{i}"
        out[f"{b}.attn_norm.weight"] = np_(sd[f"{m}.ln_1.weight"])
        kinds = ("weight", "bias") if arch == "qwen2" else ("weight",)
        for kind in kinds:
            t = sd.get(f"{m}.attn.c_attn.{kind}")
            if t is None:  # qwen2 from a config whose biases were dropped: zeros
                t = torch.zeros((H + 2 * K) * D)
            q, k, v = (np_(x) for x in t.split([H * D, K * D, K * D], dim=0))
            if arch == "llama":
                q, k = _permute(q, H), _permute(k, K)
            out[f"{b}.attn_q.{kind}"], out[f"{b}.attn_k.{kind}"] = q, k
            out[f"{b}.attn_v.{kind}"] = v
        if arch == "qwen3":
            out[f"{b}.attn_q_norm.weight"] = _gain(sd, f"{m}.attn.q_gain", H, D)
            out[f"{b}.attn_k_norm.weight"] = _gain(sd, f"{m}.attn.k_gain", K, D)
        out[f"{b}.attn_output.weight"] = np_(sd[f"{m}.attn.c_proj.weight"])
        out[f"{b}.ffn_norm.weight"] = np_(sd[f"{m}.ln_2.weight"])
        out[f"{b}.ffn_gate.weight"] = np_(sd[f"{m}.mlp.c_gate.weight"])
        out[f"{b}.ffn_up.weight"] = np_(sd[f"{m}.mlp.c_fc.weight"])
        out[f"{b}.ffn_down.weight"] = np_(sd[f"{m}.mlp.c_proj.weight"])
    out["output_norm.weight"] = np_(sd["ln_f.weight"])
    if not cfg.tie_embeddings:
        out["output.weight"] = np_(sd["lm_head.weight"])
    return out


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class GGUFVocab:
    """The tokenizer as GGUF metadata."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str | None = None
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk


def _types(pre: Any) -> list[str]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [t for p in pre.get("pretokenizers") or [] for t in _types(p)]
    return [pre.get("type")]


def _pre_name(pre: dict) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer: 'gpt-2' for ByteLevel's own regex, the
    name of a known regex for Split + ByteLevel, else None (not expressible)."""
    from moorelm.interop.gguf import PRE_SPLITS

    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name in _PRE_NAMES:
            if PRE_SPLITS.get(name) == regex:
                return name
    return None


def _merge_strings(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int, chat: dict | None = None) -> GGUFVocab:
    """The run's tokenizer as GGUF metadata, padded to ``vocab_size`` tokens (llama.cpp wants
    one token per embedding row); special ids from the run's chat settings (an import's
    bos/eos/pad tokens and stop ids), else moorelm's ``<|endoftext|>`` for bos and eos."""
    if tokenizer.kind == "char":
        raise MoorelmError("cannot export to GGUF: the run has moorelm's character-level "
                           "tokenizer, which GGUF cannot express (llama.cpp knows BPE and "
                           "SentencePiece vocabularies); train with --tokenizer bpe to export")
    data = json.loads(tokenizer.to_json())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise MoorelmError(f"cannot export to GGUF: a {model.get('type')} tokenizer has no GGUF form")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in data.get("added_tokens") or []}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = []
    for i in range(n):
        if i in added:
            types.append(_CONTROL if added[i].get("special") else _USER_DEFINED)
        elif i not in by_id:
            types.append(_UNUSED)
        else:
            types.append(_NORMAL)
    merges = _merge_strings(model.get("merges") or [])
    pre = data.get("pre_tokenizer") or {}
    if "ByteLevel" in _types(pre):
        name = _pre_name(pre)
        if name is None:
            raise MoorelmError("cannot export to GGUF: the tokenizer's pre-tokenizer "
                               f"({', '.join(map(str, _types(pre)))}) matches no regex llama.cpp "
                               "names; GGUF cannot express it")
        out = GGUFVocab("gpt2", tokens, types, merges, pre=name)
    elif "Metaspace" in _types(pre) and model.get("byte_fallback"):
        for i, t in enumerate(tokens):
            if types[i] == _NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = _BYTE
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        scores = [-float(rank[t]) - 1.0 if t in rank else 0.0 for t in tokens]
        out = GGUFVocab("llama", tokens, types, merges, scores=scores)
    else:
        raise MoorelmError("cannot export to GGUF: the tokenizer is neither byte-level BPE nor "
                           "SentencePiece-style BPE, the two vocabularies GGUF expresses")
    chat = chat or {}
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = chat.get(f"{key}_token")
        if isinstance(text, str) and tokenizer.hf.token_to_id(text) is not None:
            ids[key] = tokenizer.hf.token_to_id(text)
    ids.setdefault("bos", tokenizer.eot_id)
    ids.setdefault("eos", tokenizer.eot_id)
    stops = [i for i in chat.get("stop_ids") or [] if isinstance(i, int) and i < n]
    others = [i for i in stops if i != ids["eos"]]
    ids["eot"] = others[0] if others else ids["eos"]
    if ids.get("unk") is not None and out.model == "llama":
        types[ids["unk"]] = _UNKNOWN
    out.special = ids
    return out


# ----------------------------------------------------------------------------- writing


def _encode(gguf, name: str, w: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw dtype or None) of one tensor in the file's storage type."""
    Q = gguf.GGMLQuantizationType
    if w.ndim == 1 or dtype == "f32":
        return w.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and w.shape[-1] % 32):
        return w.astype(np.float16), None
    qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(w, qtype), qtype


def _file_type(gguf, dtype: str) -> int:
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def check_out(out: Path, force: bool) -> None:
    """Refuse an output path that exists, unless ``force`` and it is a GGUF file (moorelm never
    replaces a folder or a file it could not have written)."""
    if out.is_dir():
        raise MoorelmError(f"{out} is a folder; name the .gguf file to write")
    if out.exists() or out.is_symlink():
        if not force:
            raise MoorelmError(f"{out} already exists; choose another file or pass --force")
        if out.is_symlink() or not out.is_file() or not _is_gguf(out):
            raise MoorelmError(f"{out} exists and is not a GGUF file; moorelm replaces only "
                               "GGUF files, even with --force")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def write_gguf(model: torch.nn.Module, tokenizer: Tokenizer, out: str | Path, *,
               dtype: str = "f32", name: str = "moorelm", chat: dict | None = None,
               chat_template: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file at ``out`` (atomically: a temporary
    file beside it, renamed into place)."""
    from moorelm.atomic import fsync_dir, fsync_file

    gguf = _gguf()
    if dtype not in DTYPES:
        raise MoorelmError(f"--dtype {dtype!r} is not valid for GGUF; choose one of: {', '.join(DTYPES)}")
    cfg = model.config
    tensors = gguf_tensors(model)
    arch = gguf_architecture(cfg, {k: v for k, v in model.state_dict().items() if k.endswith(".bias")})
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, chat)
    if len(vocab.tokens) != cfg.vocab_size:
        raise MoorelmError(f"the tokenizer has ids up to {len(vocab.tokens) - 1} but the model only "
                           f"{cfg.vocab_size} embeddings")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type(_file_type(gguf, dtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.seq_len)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_base))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_tokenizer_model(vocab.model)
        if vocab.pre is not None:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        if vocab.scores is not None:
            w.add_token_scores(vocab.scores)
            w.add_add_space_prefix(True)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        s = vocab.special
        w.add_bos_token_id(s["bos"])
        w.add_eos_token_id(s["eos"])
        w.add_eot_token_id(s["eot"])
        if s.get("pad") is not None:
            w.add_pad_token_id(s["pad"])
        if s.get("unk") is not None:
            w.add_unk_token_id(s["unk"])
        w.add_add_bos_token(False)  # moorelm encodes without adding special tokens
        w.add_add_eos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
        for tname, t in tensors.items():
            data, raw = _encode(gguf, tname, t, dtype)
            w.add_tensor(tname, data, raw_dtype=raw)
        tensors.clear()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        fsync_file(Path(tmp))
        os.replace(tmp, out)
    except OSError as e:
        from moorelm.errors import from_os_error

        raise from_os_error(e, f"write {out}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(out.parent)
    return out


def export_gguf(run: str | Path, out: str | Path, *, dtype: str = "f32",
                force: bool = False) -> dict[str, Any]:
    """Write the newest checkpoint of ``run`` as a GGUF file at ``out``; returns what was
    written (path, architecture, dtype, bytes, seconds). A LoRA run exports the adapted model.

    ``out`` must not exist, unless ``force`` and it is a GGUF file (which is replaced).
    """
    from moorelm.chat import ChatTemplate
    from moorelm.run import RunFolder

    if dtype not in DTYPES:
        raise MoorelmError(f"--dtype {dtype!r} is not valid for GGUF; choose one of: {', '.join(DTYPES)}")
    out = Path(out)
    check_out(out, force)
    start = time.perf_counter()
    folder = RunFolder(run)
    config = folder.read_config()
    cfg = folder.model_config(config)
    gguf_architecture(cfg)  # refuse before loading the weights
    if folder.tokenizer(cfg, config).kind == "char":
        gguf_vocab(folder.tokenizer(cfg, config), cfg.vocab_size)  # the one-line refusal
    loaded = folder.load(device="cpu")
    template = ChatTemplate.from_config(config).source
    write_gguf(loaded.model, loaded.tokenizer, out, dtype=dtype, name=folder.name(config),
               chat=folder.chat_settings(config), chat_template=template)
    return {"path": str(out), "architecture": gguf_architecture(loaded.model.config, {
        k: v for k, v in loaded.model.state_dict().items() if k.endswith(".bias")}),
            "dtype": dtype, "bytes": out.stat().st_size, "seconds": time.perf_counter() - start}


__all__ = ["DTYPES", "GGUFVocab", "check_out", "export_gguf", "gguf_architecture", "gguf_tensors",
           "gguf_vocab", "write_gguf"]
