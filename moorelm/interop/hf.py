"""Hugging Face interop: moorelm runs <-> ``transformers`` model folders.

    moorelm export RUN --format hf OUT      # AutoModelForCausalLM / AutoTokenizer load OUT
    moorelm import HF_DIR RUN               # a GPT-2, Llama, Mistral, Qwen2 or Qwen3 folder

Export writes three architecture families, each computing exactly what moorelm's one ``GPT``
class computes for the configs it accepts:

- **GPT-2** (``GPT2LMHeadModel``): learned positions, LayerNorm, exact-GELU MLP, plain
  multi-head attention. GPT-2 stores its projections as ``Conv1D`` (weights transposed
  relative to ``nn.Linear``) and always has biases, so a moorelm model without biases is
  written with zero biases, and an import whose biases are all zero comes back bias-free.
- **Llama** (``LlamaForCausalLM``): rotary positions, RMSNorm, SwiGLU, grouped-query
  attention. Llama's rotary convention (rotate the two halves of each head) is moorelm's, so
  q/k weights copy over without permuting; moorelm's fused ``c_attn`` splits into q, k, v.
- **Qwen3** (``Qwen3ForCausalLM``): Llama's layout plus a per-head RMS norm of q and k before
  the rotation, which is moorelm's QK-norm (the default recipe's). Its gains are moorelm's
  learned ``q_gain``/``k_gain`` when the model has them, else ones; Qwen3 has one epsilon for
  all its norms, so ``norm_eps`` must equal the QK-norm's 1e-6. ``attention_bias`` covers q, k,
  v and o: q/k/v-only biases export with a zero o_proj bias.

Any other combination (ReLU^2 MLP, logit soft-capping, LayerNorm with rotary, MLP biases with
QK-norm, ...) has no exact counterpart, and export refuses it naming the field: export never
approximates. The exported folder carries the run's chat template, special tokens and every
end-of-sequence id, so ``apply_chat_template`` renders what moorelm renders; config.json's
``moorelm`` section keeps the moorelm config and a fine-tuned run's prompt template for a
later import. An existing folder is replaced only when it is an earlier export and
``overwrite`` is set; a folder with any other file is never touched.

Export needs no ``transformers`` (it writes safetensors + JSON); ``to_transformers`` builds
the equivalent ``transformers`` model in memory (benchmarks and tests compare against it).
Import reads safetensors only and never unpickles ``.bin`` files. It covers more families than
export: Mistral (a Llama with a sliding window, imported with a context no longer than the
window), Qwen2 (``qkv_bias``: biases on q/k/v only) and Qwen3 (``qk_norm`` + ``qk_gain``: a
per-head RMS norm of queries and keys with learned gains, and its own ``head_dim``). Importing
is two steps, ``read_hf`` (files -> ``ImportedModel``, also from memory: GGUF and
``moorelm.load`` use it) and ``write_run`` (``ImportedModel`` -> run folder).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moorelm.atomic import replace_dir
from moorelm.codecs import LMCodec, build_gpt, check_gpt_header, read_tensors
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError, first_line
from moorelm.hub import hub_cache_name
from moorelm.jsonfile import read_json
from moorelm.model import GPT
from moorelm.run import RunFolder
from moorelm.tokenizer import EOT, Tokenizer

ARCHITECTURES = ("gpt2", "llama")  # families import reads
EXPORT_ARCHITECTURES = ("gpt2", "llama", "qwen3")  # families export writes
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# model.Attention calls norm_rotate with its default eps: the QK-norm's epsilon. Qwen3 uses one
# rms_norm_eps for its layer norms and its q/k norms, so a model exports only when they agree.
QK_NORM_EPS = 1e-6
# what export_hf writes; an existing folder holding anything else is never replaced
EXPORT_FILES = ("config.json", "generation_config.json", HF_WEIGHTS, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_FAMILY_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


# ----------------------------------------------------------------------------- which family


def _refuse(field: str, value: Any, why: str) -> MoorelmError:
    return MoorelmError(f"cannot export: {field}={value!r} {why}; export never approximates")


def hf_architecture(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3': the transformers family that computes exactly what ``cfg``
    does (learned positions -> GPT-2; rotary without QK-norm -> Llama; rotary with QK-norm ->
    Qwen3, whose q/k norms take moorelm's gains, or ones when the QK-norm has none).

    Raises MoorelmError naming the first field that rules out every family.
    """
    qkv_bias = bool(getattr(cfg, "qkv_bias", False))
    qk_gain = bool(getattr(cfg, "qk_gain", False))
    if cfg.logit_softcap:
        raise _refuse("logit_softcap", cfg.logit_softcap,
                      "has no counterpart in transformers' GPT-2, Llama or Qwen3; train without it")
    if cfg.pos == "learned":
        for name, value in (("norm", "layernorm"), ("mlp", "gelu")):
            if getattr(cfg, name) != value:
                raise _refuse(name, getattr(cfg, name), f"with pos='learned' matches no family "
                              f"(GPT-2 is learned, layernorm, gelu); train with {name}={value!r}")
        if cfg.qk_norm or qk_gain:
            raise _refuse("qk_norm", True, "with learned positions matches no family (GPT-2 has "
                          "no QK-norm; Qwen3 has rotary positions)")
        if cfg.kv_heads != cfg.n_head:
            raise _refuse("n_kv_head", cfg.n_kv_head, "(grouped-query attention) does not exist "
                          "in GPT-2; use pos=rope, norm=rmsnorm, mlp=swiglu for GQA")
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise _refuse("head_dim", cfg.head_dim, "x n_head != n_embd does not exist in GPT-2")
        return "gpt2"
    for name, value in (("norm", "rmsnorm"), ("mlp", "swiglu")):
        if getattr(cfg, name) != value:
            raise _refuse(name, getattr(cfg, name), f"with pos='rope' matches neither Llama nor "
                          f"Qwen3 (rope, rmsnorm, swiglu); train with {name}={value!r}")
    if not cfg.qk_norm:
        if qk_gain:
            raise _refuse("qk_gain", True, "without qk_norm matches no family")
        return "llama"
    if cfg.bias:
        raise _refuse("bias", True, "with qk_norm needs MLP biases, which Qwen3 does not have "
                      "(qkv_bias=True is what Qwen3's attention_bias expresses)")
    if not math.isclose(cfg.norm_eps, QK_NORM_EPS, rel_tol=0, abs_tol=0):
        raise _refuse("norm_eps", cfg.norm_eps, f"differs from the QK-norm's {QK_NORM_EPS}: "
                      "Qwen3 has one rms_norm_eps for both; train with norm_eps=1e-6")
    del qkv_bias  # any value maps: attention_bias (o_proj's bias written as zeros)
    return "qwen3"


def _attention_bias(cfg: ModelConfig) -> bool:
    return bool(cfg.bias or getattr(cfg, "qkv_bias", False))


def hf_config(cfg: ModelConfig, eot_id: int = 0, eos_ids: list[int] | None = None,
              pad_id: int | None = None) -> dict[str, Any]:
    """The transformers ``config.json`` for a moorelm model config (``eos_ids``: every id that
    ends generation, default ``[eot_id]``)."""
    family = hf_architecture(cfg)
    eos = list(eos_ids or [eot_id])
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": eot_id,
              "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad_id,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "torch_dtype": "float32", "use_cache": True}
    if family == "gpt2":
        return {
            "architectures": [_FAMILY_CLASS[family]], "model_type": "gpt2",
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_positions": cfg.seq_len, "n_ctx": cfg.seq_len, "n_inner": cfg.hidden_dim,
            "activation_function": "gelu",  # exact erf GELU, as moorelm computes it
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, **common,
        }
    conf = {
        "architectures": [_FAMILY_CLASS[family]], "model_type": family,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.n_embd,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": _attention_bias(cfg), "attention_dropout": cfg.dropout,
        **common,
    }
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling is not None:  # Llama 3.1's llama3 rotary scaling, under both names
        conf["rope_scaling"] = dict(scaling)
        conf["rope_parameters"] = {**scaling, "rope_theta": cfg.rope_base}
    if family == "llama":
        conf["mlp_bias"] = cfg.bias
    else:  # every layer full attention: Qwen3's sliding window stays off
        conf.update(use_sliding_window=False, sliding_window=None,
                    max_window_layers=cfg.n_layer, layer_types=["full_attention"] * cfg.n_layer)
    return conf


# ----------------------------------------------------------------------------- weights out


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """moorelm weights renamed (and reshaped) into transformers' names for the family.

    Tied heads are omitted (transformers ties ``lm_head`` to the embedding on load). Biases a
    family has but the model does not (GPT-2's, o_proj's under attention_bias) are zeros; a
    QK-norm without learned gains gets gains of ones.
    """
    cfg = model.config
    family = hf_architecture(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = sd["wte.weight"].dtype
    out: dict[str, torch.Tensor] = {}
    C = cfg.n_embd
    if family == "gpt2":
        def with_bias(prefix: str, src: str, n: int) -> None:
            out[prefix + ".bias"] = sd.get(src + ".bias", torch.zeros(n, dtype=dtype))

        out["transformer.wte.weight"] = sd["wte.weight"]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(cfg.n_layer):
            m, h = f"blocks.{i}", f"transformer.h.{i}"
            for ln in ("ln_1", "ln_2"):
                out[f"{h}.{ln}.weight"] = sd[f"{m}.{ln}.weight"]
                with_bias(f"{h}.{ln}", f"{m}.{ln}", C)
            for src, dst in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                             ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
                w = sd[f"{m}.{src}.weight"]  # Linear (out, in); Conv1D stores (in, out)
                out[f"{h}.{dst}.weight"] = w.t()
                with_bias(f"{h}.{dst}", f"{m}.{src}", w.shape[0])
        out["transformer.ln_f.weight"] = sd["ln_f.weight"]
        with_bias("transformer.ln_f", "ln_f", C)
    else:
        H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        out["model.embed_tokens.weight"] = sd["wte.weight"]
        for i in range(cfg.n_layer):
            m, h = f"blocks.{i}", f"model.layers.{i}"
            out[f"{h}.input_layernorm.weight"] = sd[f"{m}.ln_1.weight"]
            out[f"{h}.post_attention_layernorm.weight"] = sd[f"{m}.ln_2.weight"]
            for kind in ("weight", "bias"):
                key = f"{m}.attn.c_attn.{kind}"
                if key not in sd:
                    continue
                q, k, v = sd[key].split([H * D, K * D, K * D], dim=0)
                out[f"{h}.self_attn.q_proj.{kind}"] = q
                out[f"{h}.self_attn.k_proj.{kind}"] = k
                out[f"{h}.self_attn.v_proj.{kind}"] = v
            names = {"attn.c_proj": "self_attn.o_proj", "mlp.c_gate": "mlp.gate_proj",
                     "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
            for src, dst in names.items():
                for kind in ("weight", "bias"):
                    if f"{m}.{src}.{kind}" in sd:
                        out[f"{h}.{dst}.{kind}"] = sd[f"{m}.{src}.{kind}"]
            if _attention_bias(cfg):  # attention_bias covers o_proj too; q/k/v-only bias: zeros
                for p, n in (("q", H * D), ("k", K * D), ("v", K * D), ("o", C)):
                    out.setdefault(f"{h}.self_attn.{p}_proj.bias", torch.zeros(n, dtype=dtype))
            if family == "qwen3":
                for p in ("q", "k"):
                    gain = sd.get(f"{m}.attn.{p}_gain")
                    out[f"{h}.self_attn.{p}_norm.weight"] = (
                        gain.reshape(D) if gain is not None else torch.ones(D, dtype=dtype))
        out["model.norm.weight"] = sd["ln_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def to_transformers(model: GPT) -> Any:
    """The equivalent ``transformers`` model (GPT2LMHeadModel, LlamaForCausalLM or
    Qwen3ForCausalLM), in eval mode, on the same device and dtype as ``model``; weights are
    copied."""
    try:
        import transformers
    except ImportError:
        raise MoorelmError("to_transformers needs 'transformers'; pip install 'moorelm[hf]'") from None
    conf = hf_config(model.config)
    family = conf["model_type"]
    conf = {k: v for k, v in conf.items() if k not in ("architectures", "model_type", "torch_dtype")}
    if family != "gpt2":  # transformers 5 takes rope_parameters (rope_scaling would win)
        conf.pop("rope_theta")
        conf.pop("rope_scaling", None)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**conf))
    elif family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf))
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**conf))
    p = model.wte.weight
    hf.to(dtype=p.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a mapping bug, not a user error
        raise RuntimeError(f"weight mapping mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.to(p.device).eval()


# ----------------------------------------------------------------------------- export


def _chat_export(config: dict, tokenizer: Tokenizer) -> dict[str, Any]:
    """What the exported folder says about chatting: the run's chat template (an import's own,
    else moorelm's default), the special tokens' text as the run has them, and every id that
    ends a reply (an import's stop ids, then end-of-text)."""
    from moorelm.chat import DEFAULT_TEMPLATE

    chat = config.get("chat") if isinstance(config.get("chat"), dict) else {}
    template = chat.get("template") if isinstance(chat.get("template"), str) else None
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": None, "unk_token": None}
    if chat:  # an import keeps its own special tokens (None where the model had none)
        special = {k: chat.get(k) if isinstance(chat.get(k), str) else None for k in special}
        special = {k: v if v is None or tokenizer.hf.token_to_id(v) is not None else None
                   for k, v in special.items()}
    ids = [i for i in chat.get("stop_ids") or () if isinstance(i, int) and
           not isinstance(i, bool) and 0 <= i < tokenizer.vocab_size]
    if tokenizer.eot_id not in ids:
        ids.append(tokenizer.eot_id)
    return {"template": template or DEFAULT_TEMPLATE, "default": template is None,
            "special": special, "eos_ids": ids}


def _tokenizer_files(tokenizer: Tokenizer, seq_len: int,
                     chat: dict[str, Any] | None = None) -> dict[str, str]:
    """tokenizer.json as moorelm keeps it, plus what AutoTokenizer reads: tokenizer_config.json
    (special tokens, chat template), special_tokens_map.json and chat_template.jinja.

    ``chat``: ``_chat_export``'s dict (default: a run trained here)."""
    from moorelm.chat import DEFAULT_TEMPLATE

    chat = chat or {"template": DEFAULT_TEMPLATE,
                    "special": {"bos_token": EOT, "eos_token": EOT, "pad_token": None,
                                "unk_token": None}}
    special = dict(chat["special"])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": chat["template"],
    }
    return {
        "tokenizer.json": tokenizer.to_json(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(
            {k: v for k, v in special.items() if v is not None}, indent=2) + "\n",
        "chat_template.jinja": chat["template"],
    }


def _check_export_target(out: Path, overwrite: bool) -> None:
    """An export writes into a new or empty folder; with ``overwrite`` it may replace a folder
    that an earlier export wrote (config.json with a ``moorelm`` section, nothing but the files
    an export writes). Anything else is refused even with ``overwrite``: never delete what is
    not ours."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise MoorelmError(f"{out} exists and is not a folder; export writes a folder, choose "
                           "another path")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if not overwrite:
        raise MoorelmError(f"{out} already exists and is not empty; choose another folder or "
                           "pass --force to replace an earlier export")
    foreign = [n for n in names if n not in EXPORT_FILES]
    ours = False
    if not foreign and (out / "config.json").is_file():
        try:
            ours = isinstance(read_json(out / "config.json").get("moorelm"), dict)
        except (MoorelmError, AttributeError):
            ours = False
    if foreign or not ours:
        what = f"holds {foreign[0]!r}, which" if foreign else "has no config.json of ours, so it"
        raise MoorelmError(f"{out} {what} an export does not write; not replacing a folder that "
                           "is not a moorelm export, even with --force")


def export_hf(run: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the newest checkpoint of ``run`` as a transformers model folder at ``out``.

    The folder holds config.json, generation_config.json (every end-of-sequence id),
    model.safetensors and the tokenizer (tokenizer.json, tokenizer_config.json with the
    special tokens and the chat template, special_tokens_map.json, chat_template.jinja);
    ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)``
    load it and ``apply_chat_template`` renders what moorelm renders. config.json's ``moorelm``
    section keeps what transformers cannot say (the moorelm model config, a fine-tuned run's
    prompt template), which ``import_hf`` reads back. A LoRA run exports the adapted model (its
    adapters merged in).

    ``out`` must be new or empty; ``overwrite`` replaces an earlier export (nothing else: a
    folder holding other files is refused). Written to a temporary folder and renamed into
    place, so a killed export leaves nothing that looks complete.
    """
    out = Path(out)
    _check_export_target(out, overwrite)
    loaded = RunFolder(run).load(device="cpu")
    model, tokenizer, state, config = loaded.model, loaded.tokenizer, loaded.state, loaded.config
    chat = _chat_export(config, tokenizer)
    pad = chat["special"]["pad_token"]
    pad_id = tokenizer.hf.token_to_id(pad) if pad is not None else None
    # raises for configs outside every family
    conf = hf_config(model.config, tokenizer.eot_id, chat["eos_ids"], pad_id)
    tensors = hf_state_dict(model)
    # what transformers' config cannot say (initialisation choices, the prompt template) rides
    # along, so an import of this folder restores the run's config exactly
    conf["moorelm"] = {"step": state.get("step"), "source": str(Path(run).resolve()),
                       "model": model.config.to_dict(),
                       "prompt_template": config.get("prompt_template"),
                       "chat_template": "default" if chat["default"] else "model"}
    gen = {"bos_token_id": tokenizer.eot_id,
           "eos_token_id": chat["eos_ids"][0] if len(chat["eos_ids"]) == 1 else chat["eos_ids"]}
    if pad_id is not None:
        gen["pad_token_id"] = pad_id
    with replace_dir(out, f"export to {out}") as tmp:
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        for name, text in _tokenizer_files(tokenizer, model.config.seq_len, chat).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def exported_settings(conf: dict, chat: dict[str, Any]) -> dict[str, Any]:
    """Entries for the imported run's config.json from what an ``export_hf`` folder's
    config.json carries (its ``moorelm`` section): the fine-tuned run's ``prompt_template``, and
    ``chat`` (the folder's chat settings, with no template when the export wrote moorelm's
    default one, so the run chats through the default as before, its blank-line stop included).
    Other folders: just ``chat``."""
    section = conf.get("moorelm")
    if not isinstance(section, dict):
        return {"chat": chat}
    out: dict[str, Any] = {}
    if section.get("chat_template") == "default":
        chat = {**chat, "template": None}
    out["chat"] = chat
    template = section.get("prompt_template")
    if template is not None:
        from moorelm.run import check_prompt_template

        out["prompt_template"] = check_prompt_template(
            template, f"{_where(conf)}: moorelm.prompt_template")
    return out


# ----------------------------------------------------------------------------- import
#
# Two halves, shared by every way in (``moorelm import``, ``moorelm.load`` on the fly, GGUF):
# ``read_hf`` turns a folder's files (``HFSource``: on disk, or in memory as GGUF's reader
# makes them) into an ``ImportedModel`` (config, weights, tokenizer, name, chat settings), and
# ``write_run`` writes one as a run folder.

IMPORTABLE = ("gpt2", "llama", "mistral", "qwen2", "qwen3")  # config.json model_type values
_FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                 "qwen3": "Qwen3"}


class HFSource:
    """The files of a Hugging Face model folder: read from ``path`` on disk, or given in memory
    (``files``: name -> text, with ``config`` and ``tensors``), as GGUF's reader produces them.
    ``path`` names the source in messages either way."""

    def __init__(self, path: str | Path, files: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        self.path = Path(path)
        self.files, self.config, self.tensors = files, config, tensors

    @property
    def on_disk(self) -> bool:
        return self.files is None

    def has(self, name: str) -> bool:
        if self.files is not None:
            return name in self.files
        p = self.path / name
        return p.exists() or p.is_symlink()

    def json(self, name: str) -> Any:
        """A JSON file's contents, None when absent; a damaged file is one line."""
        if not self.has(name):
            return None
        if self.files is None:
            return read_json(self.path / name)  # a folder, a device, deep nesting: one line
        try:
            return json.loads(self.files[name])
        except (ValueError, RecursionError) as e:
            raise MoorelmError(f"{self.path}: {name} is not valid JSON ({str(e)[:80]})") from None

    def text(self, name: str) -> str | None:
        if self.files is not None:
            return self.files.get(name)
        p = self.path / name
        return p.read_text(encoding="utf-8") if p.is_file() else None

    def weights(self) -> dict[str, torch.Tensor]:
        return self.tensors if self.tensors is not None else _read_hf_weights(self.path)


def _as_source(source: str | Path | HFSource) -> HFSource:
    if isinstance(source, HFSource):
        return source
    path = Path(source)
    if not path.is_dir():
        raise MoorelmError(f"{path} is not a folder; pass a Hugging Face model folder")
    return HFSource(path)


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder whose config.json is a Hugging Face model config (it names a
    ``model_type``), not a moorelm run's (which has a "model" section)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        conf = read_json(path / "config.json")
    except MoorelmError:
        return False
    return isinstance(conf, dict) and "model_type" in conf and "model" not in conf


def _read_hf_config(src: HFSource) -> dict[str, Any]:
    path = src.path / "config.json"
    if src.config is not None:
        conf = dict(src.config)
    elif not src.has("config.json"):
        raise MoorelmError(f"{src.path} has no config.json; pass a Hugging Face model folder")
    else:
        conf = src.json("config.json")
    if not isinstance(conf, dict):
        raise MoorelmError(f"{path} holds a JSON {type(conf).__name__}, not an object; it is not "
                           "a Hugging Face model config")
    if conf.get("auto_map") is not None or conf.get("trust_remote_code"):
        what = "auto_map" if conf.get("auto_map") is not None else "trust_remote_code"
        raise MoorelmError(f"{path} asks to run the model's own Python code ({what}); moorelm "
                           f"never runs remote code; it imports {', '.join(IMPORTABLE)} models")
    family = conf.get("model_type")
    if family not in IMPORTABLE:
        raise MoorelmError(
            f"{path}: model_type {family!r} cannot be imported; moorelm imports "
            f"{', '.join(IMPORTABLE)} models"
        )
    conf["_path"] = str(path)  # for the field checks' messages; never written out
    for name in ("rope_parameters", "rope_scaling", "moorelm"):
        if conf.get(name) is not None and not isinstance(conf[name], dict):
            raise MoorelmError(f"{path}: {name} must be an object, got "
                               f"{type(conf[name]).__name__} {_show(conf[name])}")
    exported = (conf.get("moorelm") or {}).get("model")
    if exported is not None and not isinstance(exported, dict):
        raise MoorelmError(f"{path}: moorelm.model must be an object, got "
                           f"{type(exported).__name__} {_show(exported)}")
    return conf


_MISSING = object()


def _where(conf: dict) -> str:
    return conf.get("_path", "config.json")


def _show(value: Any) -> str:
    return json.dumps(value)[:40] if not isinstance(value, str) else repr(value[:40])


def _value(conf: dict, names: tuple[str, ...], default: Any) -> tuple[str, Any]:
    """(the name found, its value) for the first of ``names`` the config has; a field that is
    absent with no default is one line naming it."""
    for name in names:
        if conf.get(name) is not None:
            return name, conf[name]
    if default is _MISSING:
        also = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
        raise MoorelmError(f"{_where(conf)} has no {names[0]}{also}; it is not a complete "
                           f"{conf['model_type']} config")
    return names[0], default


def _int_field(conf: dict, *names: str, default: Any = _MISSING) -> int:
    """A positive integer field of an HF config (JSON ``true``, ``32.0``, lists refused)."""
    name, v = _value(conf, names, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise MoorelmError(f"{_where(conf)}: {name} must be a positive integer, got "
                           f"{type(v).__name__} {_show(v)}")
    return v


def _float_field(conf: dict, *names: str, default: Any = _MISSING) -> float:
    """A positive, finite number field of an HF config."""
    name, v = _value(conf, names, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
        raise MoorelmError(f"{_where(conf)}: {name} must be a positive number, got "
                           f"{type(v).__name__} {_show(v)}")
    return float(v)


def _bool_field(conf: dict, name: str, default: bool) -> bool:
    v = conf.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise MoorelmError(f"{_where(conf)}: {name} must be true or false, got "
                           f"{type(v).__name__} {_show(v)}")
    return v


def _shard_files(hf_dir: Path, index: Path) -> list[Path]:
    """The files a sharded checkpoint's index names, each confined to ``hf_dir``."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise MoorelmError(f"{index} is not a safetensors index (it needs a 'weight_map' object "
                           "from tensor names to file names)")
    files, root = [], hf_dir.resolve()
    for name in sorted(set(weight_map.values())):
        rel = Path(name)
        path = hf_dir / rel
        # the file itself may be a link (a Hugging Face cache snapshot links each file to its
        # blob); the name may not climb out, be absolute, or pass through a linked folder
        if not name or rel.is_absolute() or ".." in rel.parts \
                or not path.parent.resolve().is_relative_to(root):
            raise MoorelmError(f"{index} names the weight file {name!r}, outside {hf_dir}; "
                               "an index may only name files in its own folder")
        if not (path.exists() or path.is_symlink()):
            raise MoorelmError(f"{path} is listed in {HF_INDEX} but missing")
        if not path.is_file():
            raise MoorelmError(f"{path} (listed in {HF_INDEX}) is not a regular file")
        files.append(path)
    return files


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single or sharded safetensors checkpoint; refuses pickled .bin files."""
    single, index = hf_dir / HF_WEIGHTS, hf_dir / HF_INDEX
    if single.exists():
        files = [single]
    elif index.exists():
        files = _shard_files(hf_dir, index)
    else:
        bins = sorted(p.name for p in hf_dir.glob("*.bin"))
        if bins:
            raise MoorelmError(
                f"{hf_dir} holds only pickled weights ({bins[0]}), which moorelm never loads "
                "(unpickling can run arbitrary code); convert them to safetensors first, e.g. "
                "model.save_pretrained(DIR, safe_serialization=True) in a trusted environment"
            )
        raise MoorelmError(f"{hf_dir} has no {HF_WEIGHTS} or {HF_INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise MoorelmError(f"{f} is not a regular file")
        tensors.update(read_tensors(f))
    return tensors


class _Weights:
    """Takes tensors by name (with or without the model-class prefix), tracking what's used."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], source: Path):
        self.t, self.prefixes, self.source = tensors, prefixes, source
        self.used: set[str] = set()

    def find(self, name: str) -> str | None:
        for p in self.prefixes:
            if p + name in self.t:
                return p + name
        return None

    def get(self, name: str, required: bool = True) -> torch.Tensor | None:
        key = self.find(name)
        if key is None:
            if required:
                raise MoorelmError(f"{self.source} has no tensor {name!r}; the weights do not "
                                   "match config.json")
            return None
        self.used.add(key)
        t = self.t[key]
        if not t.is_floating_point():
            raise MoorelmError(f"{self.source}: tensor {key!r} has dtype {t.dtype}; model weights "
                               "are floating point")
        if not 1 <= t.dim() <= 2:
            raise MoorelmError(f"{self.source}: tensor {key!r} has shape {tuple(t.shape)}; the "
                               "weights of these models are vectors or matrices")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise MoorelmError(f"{self.source}: tensor {key!r} holds NaN or infinite values")
        return t


def _gpt2_import(conf: dict, w: _Weights) -> tuple[dict, dict[str, torch.Tensor]]:
    act = conf.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise MoorelmError(f"GPT-2 activation_function {act!r} cannot be imported; moorelm's MLP uses GELU")
    if act != "gelu":
        warnings.warn(f"the model uses {act!r} (tanh-approximated GELU); moorelm computes exact "
                      "GELU, so logits will differ slightly from the original", stacklevel=3)
    if conf.get("scale_attn_by_inverse_layer_idx") or conf.get("scale_attn_weights") is False:
        raise MoorelmError("GPT-2 attention scaling options other than 1/sqrt(head size) cannot be imported")
    if conf.get("add_cross_attention"):
        raise MoorelmError("GPT-2 with cross-attention cannot be imported (moorelm is decoder-only)")
    n_layer = _int_field(conf, "n_layer", "num_hidden_layers")
    C = _int_field(conf, "n_embd", "hidden_size")
    n_head = _int_field(conf, "n_head", "num_attention_heads")
    norm_eps = _float_field(conf, "layer_norm_epsilon", default=1e-5)
    tie = _bool_field(conf, "tie_word_embeddings", True)
    sd: dict[str, torch.Tensor] = {"wte.weight": w.get("wte.weight"), "wpe.weight": w.get("wpe.weight")}
    biases: dict[str, torch.Tensor] = {}
    for i in range(n_layer):
        h, m = f"h.{i}", f"blocks.{i}"
        for ln in ("ln_1", "ln_2"):
            sd[f"{m}.{ln}.weight"] = w.get(f"{h}.{ln}.weight")
            biases[f"{m}.{ln}.bias"] = w.get(f"{h}.{ln}.bias")
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            sd[f"{m}.{part}.weight"] = w.get(f"{h}.{part}.weight").t().contiguous()
            biases[f"{m}.{part}.bias"] = w.get(f"{h}.{part}.bias")
    sd["ln_f.weight"] = w.get("ln_f.weight")
    biases["ln_f.bias"] = w.get("ln_f.bias")
    bias = any(bool(b.any()) for b in biases.values())
    if bias:
        sd.update(biases)
    hidden = sd["blocks.0.mlp.c_fc.weight"].shape[0]
    model = dict(
        vocab_size=sd["wte.weight"].shape[0], seq_len=sd["wpe.weight"].shape[0], n_layer=n_layer,
        n_head=n_head, n_embd=C, pos="learned", norm="layernorm", mlp="gelu",
        mlp_hidden=None if hidden == 4 * C else hidden, bias=bias, norm_eps=norm_eps,
        tie_embeddings=tie,
    )
    return model, sd



def _rope(conf: dict) -> tuple[float, dict[str, Any] | None]:
    """The rotary base and the llama3 scaling (None for plain rotary positions); any other
    scaled or partial rotary positions are refused naming the field.

    As transformers 5 reads them: ``rope_scaling`` (transformers 4's name) when set, else
    ``rope_parameters``; ``rope_theta`` from that object, else the top level; a top-level
    ``original_max_position_embeddings`` over the object's, else max_position_embeddings."""
    field_name = "rope_scaling" if conf.get("rope_scaling") else "rope_parameters"
    rope = conf.get(field_name) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise MoorelmError(f"{_where(conf)}: {field_name} has rope_type {kind!r} (scaled rotary "
                           "positions), which moorelm cannot import; it implements plain "
                           "rotary positions and Llama 3.1's 'llama3' scaling")
    partial = rope.get("partial_rotary_factor", conf.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise MoorelmError(f"{_where(conf)}: partial_rotary_factor={_show(partial)} (rotary "
                           "positions on part of each head) cannot be imported; moorelm rotates "
                           "whole heads")
    base = _float_field({**conf, **rope}, "rope_theta", default=10000.0)
    if kind == "default":
        return base, None
    sub = {**rope, "_path": f"{_where(conf)}: {field_name}", "model_type": conf["model_type"]}
    if conf.get("original_max_position_embeddings") is not None:
        sub["original_max_position_embeddings"] = conf["original_max_position_embeddings"]
    scaling: dict[str, Any] = {"rope_type": "llama3"}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        scaling[key] = _float_field(sub, key)
    scaling["original_max_position_embeddings"] = _int_field(
        sub, "original_max_position_embeddings",
        default=_int_field(conf, "max_position_embeddings", default=2048))
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise MoorelmError(f"{sub['_path']}: high_freq_factor ({scaling['high_freq_factor']}) "
                           f"must be greater than low_freq_factor ({scaling['low_freq_factor']})")
    return base, scaling


def _sliding_window(conf: dict) -> int | None:
    """The attention window, when the config turns one on (Mistral's ``sliding_window``; Qwen's
    with ``use_sliding_window``), else None."""
    family = conf["model_type"]
    if family == "mistral" or (family in ("qwen2", "qwen3")
                               and _bool_field(conf, "use_sliding_window", False)):
        if conf.get("sliding_window") is None:
            return None
        return _int_field(conf, "sliding_window")
    return None


def _llama_import(conf: dict, w: _Weights) -> tuple[dict, dict[str, torch.Tensor]]:
    """Llama, Mistral, Qwen2 and Qwen3: one shape (rotary, RMSNorm, SwiGLU, GQA) with their
    differences as fields: q/k/v biases (Qwen2), per-head QK-norm with gains (Qwen3), a head
    size other than width / heads (Qwen3, Mistral-Nemo)."""
    family = conf["model_type"]
    name = _FAMILY_NAMES[family]
    if conf.get("hidden_act", "silu") != "silu":
        raise MoorelmError(f"{name} hidden_act {conf['hidden_act']!r} cannot be imported; "
                           "moorelm's SwiGLU uses SiLU")
    base, rope_scaling = _rope(conf)
    n_layer = _int_field(conf, "num_hidden_layers", "n_layer")
    C = _int_field(conf, "hidden_size", "n_embd")
    H = _int_field(conf, "num_attention_heads", "n_head")
    K = _int_field(conf, "num_key_value_heads", default=H)
    # Qwen3Config's own default when config.json leaves it out; the others derive it
    D = _int_field(conf, "head_dim", default=128 if family == "qwen3" else max(C // H, 1))
    seq_len = _int_field(conf, "max_position_embeddings", default=2048)
    norm_eps = _float_field(conf, "rms_norm_eps", default=1e-6)
    tie = _bool_field(conf, "tie_word_embeddings", False)
    if H % K:
        raise MoorelmError(f"{_where(conf)}: num_attention_heads={H} is not a multiple of "
                           f"num_key_value_heads={K}")
    # which projections carry biases: Llama's attention_bias covers q, k, v and o (mlp_bias
    # the MLP), Qwen3's attention_bias q, k, v and o, Qwen2 always has them on q, k, v only
    attn_bias = family in ("llama", "qwen3") and _bool_field(conf, "attention_bias", False)
    mlp_bias = family == "llama" and _bool_field(conf, "mlp_bias", False)
    bias = attn_bias or mlp_bias  # moorelm's bias: every linear (missing ones are zeros)
    qkv_bias = family == "qwen2" and not bias
    qk_gain = family == "qwen3"
    sd: dict[str, torch.Tensor] = {"wte.weight": w.get("embed_tokens.weight")}
    names = {"attn.c_proj": "self_attn.o_proj", "mlp.c_gate": "mlp.gate_proj",
             "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    for i in range(n_layer):
        h, m = f"layers.{i}", f"blocks.{i}"
        sd[f"{m}.ln_1.weight"] = w.get(f"{h}.input_layernorm.weight")
        sd[f"{m}.ln_2.weight"] = w.get(f"{h}.post_attention_layernorm.weight")
        for kind in ("weight", "bias") if bias or qkv_bias else ("weight",):
            qkv = [w.get(f"{h}.self_attn.{p}_proj.{kind}", required=kind == "weight" or qkv_bias)
                   for p in ("q", "k", "v")]
            if kind == "bias":  # attention_bias without mlp_bias (or the reverse): zeros
                qkv = [t if t is not None else torch.zeros(n) for t, n in zip(qkv, (H * D, K * D, K * D))]
            sd[f"{m}.attn.c_attn.{kind}"] = torch.cat(qkv, dim=0)
            if qkv_bias and kind == "bias":
                continue  # Qwen2: no bias on the output projection or the MLP
            for dst, src in names.items():
                t = w.get(f"{h}.{src}.{kind}", required=kind == "weight")
                if t is None:
                    t = torch.zeros(sd[f"{m}.{dst}.weight"].shape[0])
                sd[f"{m}.{dst}.{kind}"] = t
        if qk_gain:
            sd[f"{m}.attn.q_gain"] = w.get(f"{h}.self_attn.q_norm.weight")
            sd[f"{m}.attn.k_gain"] = w.get(f"{h}.self_attn.k_norm.weight")
    sd["ln_f.weight"] = w.get("norm.weight")
    hidden = sd["blocks.0.mlp.c_fc.weight"].shape[0] if n_layer else 4 * C
    model = dict(
        vocab_size=sd["wte.weight"].shape[0], seq_len=seq_len,
        n_layer=n_layer, n_head=H, n_kv_head=None if K == H else K, n_embd=C, pos="rope",
        norm="rmsnorm", mlp="swiglu", mlp_hidden=hidden, bias=bias, rope_base=base,
        rope_scaling=rope_scaling, norm_eps=norm_eps, tie_embeddings=tie, qkv_bias=qkv_bias,
        qk_norm=qk_gain, qk_gain=qk_gain, head_dim=D,
    )
    return model, sd


def _head(conf_model: dict, w: _Weights, sd: dict[str, torch.Tensor]) -> None:
    """Untied head: take lm_head.weight; a missing one means the file relies on tying."""
    head = w.get("lm_head.weight", required=False)
    if conf_model["tie_embeddings"] or head is None:
        conf_model["tie_embeddings"] = True
        return
    sd["lm_head.weight"] = head


def _settle_config(model_conf: dict, exported: dict | None) -> ModelConfig:
    """The ModelConfig of imported weights: defaults where they give the same shapes, and the
    initialisation fields of the original moorelm run when the folder came from ``export_hf``."""
    if model_conf.get("mlp_hidden") is not None:
        default = ModelConfig.from_dict({**model_conf, "mlp_hidden": None})
        if default.hidden_dim == model_conf["mlp_hidden"]:
            model_conf["mlp_hidden"] = None
    if isinstance(exported, dict):
        for name in ("zero_init_proj", "init_std", "dropout"):
            if name in exported:
                model_conf[name] = exported[name]
    return ModelConfig.from_dict(model_conf)


def convert_tokenizer(hf_dir: str | Path | HFSource, eos_token: str | None = None) -> Tokenizer:
    """The folder's tokenizer as a moorelm Tokenizer (which needs an ``<|endoftext|>`` token).

    A tokenizer.json with ``<|endoftext|>`` is used as is; one whose end-of-sequence token is
    another special token (Llama's ``</s>``) has that token renamed; vocab.json + merges.txt
    (GPT-2's original files) become a byte-level BPE tokenizer.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    src = hf_dir if isinstance(hf_dir, HFSource) else HFSource(hf_dir)
    hf_dir = src.path
    tj, vocab, merges = hf_dir / "tokenizer.json", hf_dir / "vocab.json", hf_dir / "merges.txt"
    if src.has("tokenizer.json"):
        data = src.json("tokenizer.json")
    elif src.on_disk and vocab.is_file() and merges.is_file():  # not a pipe or a device
        hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        if hf.token_to_id(EOT) is not None:
            hf.add_special_tokens([EOT])
        data = json.loads(hf.to_str())
    else:
        extra = " (it has a SentencePiece tokenizer.model: save it once with transformers' " \
                "AutoTokenizer.save_pretrained to get tokenizer.json)" \
            if src.has("tokenizer.model") else ""
        raise MoorelmError(f"{hf_dir} has no tokenizer.json (nor vocab.json + merges.txt){extra}")
    added = (data.get("added_tokens") or []) if isinstance(data, dict) else None
    if not isinstance(added, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) for t in added):
        raise MoorelmError(f"{tj} is not a tokenizers file (it needs an object whose "
                           "'added_tokens' is a list of tokens)")
    specials = {t["content"] for t in added if t.get("special")}
    if EOT not in specials and eos_token is not None:
        if eos_token not in specials:
            raise MoorelmError(
                f"the tokenizer's end-of-sequence token {eos_token!r} is not a special token of "
                f"tokenizer.json, so it cannot stand in for moorelm's {EOT}"
            )
        model_part = data.get("model")
        if EOT in json.dumps(model_part.get("vocab", {}) if isinstance(model_part, dict) else {}):
            raise MoorelmError(f"the tokenizer has {EOT} as an ordinary token; it cannot be imported")
        try:
            data = _rename_token(data, eos_token, EOT)
        except RecursionError:
            raise MoorelmError(f"{tj} nests too deeply to be a tokenizer") from None
        warnings.warn(f"the tokenizer's end-of-sequence token {eos_token!r} is renamed {EOT} "
                      "(moorelm's document separator); ids are unchanged", stacklevel=3)
    try:
        hf = HFTokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise MoorelmError(f"cannot read the tokenizer of {hf_dir}: {first_line(e)}") from None
    if hf.token_to_id(EOT) is None:
        raise MoorelmError(
            f"the tokenizer of {hf_dir} has no {EOT} token and no end-of-sequence token in "
            "tokenizer_config.json; moorelm needs one to separate documents"
        )
    return Tokenizer(hf, Tokenizer.kind_of(hf))


def _rename_token(node: Any, old: str, new: str) -> Any:
    """Replace every string (value or key) equal to ``old`` in a tokenizer.json tree."""
    if isinstance(node, str):
        return new if node == old else node
    if isinstance(node, list):
        return [_rename_token(x, old, new) for x in node]
    if isinstance(node, dict):
        return {(new if k == old else k): _rename_token(v, old, new) for k, v in node.items()}
    return node


def _tokenizer_config(src: HFSource) -> dict[str, Any]:
    tc = src.json("tokenizer_config.json")
    return tc if isinstance(tc, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older files store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _model_name(src: HFSource, conf: dict) -> str:
    """The model's name: config.json's ``_name_or_path`` when it is a name, else the hub id of a
    Hugging Face cache snapshot, else the folder's name."""
    name = conf.get("_name_or_path")
    if isinstance(name, str) and name.strip() and not Path(name).is_absolute():
        return name.strip()[:200]
    return hub_cache_name(src.path) or src.path.resolve().name


def _chat_settings(src: HFSource, conf: dict, tokenizer: Tokenizer) -> dict[str, Any]:
    """What chatting with the model needs, for config.json's ``chat`` section: the chat template
    (tokenizer_config.json's ``chat_template``, else chat_template.jinja), the bos/eos/pad
    tokens' text as the run's tokenizer spells them, and ``stop_ids``: every end-of-sequence id
    (generation_config.json's ``eos_token_id``, config.json's, the tokenizer's eos)."""
    tc = _tokenizer_config(src)
    template = tc.get("chat_template")
    if isinstance(template, list):  # several named templates: the "default" one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        template = src.text("chat_template.jinja")
    out: dict[str, Any] = {"template": template if isinstance(template, str) else None}
    eos_text = _token_text(tc.get("eos_token"))
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(tc.get(key))
        if text is not None and tokenizer.hf.token_to_id(text) is None and text == eos_text:
            text = EOT  # renamed by convert_tokenizer
        out[key] = text
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < tokenizer.vocab_size \
                    and v not in ids:
                ids.append(v)

    gen = src.json("generation_config.json")
    add((gen if isinstance(gen, dict) else {}).get("eos_token_id"))
    add(conf.get("eos_token_id"))
    if out["eos_token"] is not None:
        add(tokenizer.hf.token_to_id(out["eos_token"]))
    if not ids:
        add(tokenizer.eot_id)
    out["stop_ids"] = ids
    return out


@dataclass
class ImportedModel:
    """A model read from outside moorelm, in moorelm's terms, before anything is written:
    what ``write_run`` puts in a run folder and ``moorelm.load`` serves straight away."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # moorelm's names, float32
    tokenizer: Tokenizer
    name: str
    chat: dict[str, Any]
    imported_from: dict[str, Any]  # format, architecture, path (and name for GGUF)
    prompt_template: str | None = None  # a fine-tuned run's, carried by moorelm's export

    def build(self) -> GPT:
        """The GPT holding the weights (checks every name and shape against the config)."""
        return build_gpt(self.config, self.tensors, self.imported_from["path"], share=True)

    def run_config(self, model: GPT) -> dict[str, Any]:
        """config.json of the run folder (``moorelm.load`` keeps it in memory the same)."""
        out = {"model": self.config.to_dict(), "params": model.param_counts(),
               "imported_from": dict(self.imported_from), "name": self.name,
               "chat": dict(self.chat)}
        if self.prompt_template is not None:
            out["prompt_template"] = self.prompt_template
        return out


def read_hf(source: str | Path | HFSource, *, seq_len: int | None = None) -> ImportedModel:
    """Read a transformers GPT-2, Llama, Mistral, Qwen2 or Qwen3 folder (safetensors, single or
    sharded; never pickle, never remote code) into an ``ImportedModel``.

    ``seq_len`` shortens the context window (rotary models only need it to bound KV-cache
    memory; a GPT-2 model keeps the first ``seq_len`` position embeddings). A sliding-window
    model (Mistral) keeps a context no longer than its window, where full attention computes
    what its windowed attention does.
    """
    src = _as_source(source)
    hf_dir = src.path
    conf = _read_hf_config(src)
    family = conf["model_type"]
    window = _sliding_window(conf) if family != "gpt2" else None
    tensors = src.weights()
    prefixes = ("transformer.", "") if family == "gpt2" else ("model.", "")
    w = _Weights(tensors, prefixes, hf_dir)
    try:
        model_conf, sd = (_gpt2_import if family == "gpt2" else _llama_import)(conf, w)
    except (RuntimeError, IndexError) as e:  # e.g. q, k, v of sizes that do not concatenate
        raise MoorelmError(f"the weights in {hf_dir} do not fit together as a "
                           f"{family} model ({first_line(e, 120)})") from None
    w.prefixes = ("",)
    _head(model_conf, w, sd)
    ignored = {k for k in tensors if k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    unused = sorted(set(tensors) - w.used - ignored)
    if unused and not (model_conf["tie_embeddings"] and unused == ["lm_head.weight"]):
        raise MoorelmError(f"{hf_dir} has tensors moorelm cannot place (e.g. {unused[0]!r}); "
                           f"it is not a plain {_FAMILY_NAMES[family]} model")
    if seq_len is not None:
        if not 1 <= seq_len <= model_conf["seq_len"]:
            raise MoorelmError(f"--seq-len must be in [1, {model_conf['seq_len']}], got {seq_len}")
        if window is not None and seq_len > window:
            raise MoorelmError(f"--seq-len {seq_len} is longer than the model's sliding_window "
                               f"{window}; moorelm attends to the whole context, so it imports "
                               f"at most {window} positions")
        model_conf["seq_len"] = seq_len
        if family == "gpt2":
            sd["wpe.weight"] = sd["wpe.weight"][:seq_len].contiguous()
    elif window is not None and model_conf["seq_len"] > window:
        warnings.warn(f"the model attends within a sliding_window of {window} tokens; its context "
                      f"is imported as {window} positions (not {model_conf['seq_len']}), where "
                      "full attention is exact", stacklevel=2)
        model_conf["seq_len"] = window
    cfg = _settle_config(model_conf, (conf.get("moorelm") or {}).get("model"))
    # names and shapes against the config, and rotary tables no larger than the weights,
    # before anything is allocated
    check_gpt_header(cfg, {k: (tuple(t.shape), "F32") for k, t in sd.items()}, hf_dir)
    tc = _tokenizer_config(src)
    tokenizer = convert_tokenizer(src, _token_text(tc.get("eos_token")))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MoorelmError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{cfg.vocab_size} embeddings")
    origin = {"format": "hf", "architecture": family, "path": str(hf_dir.resolve())}
    settings = exported_settings(conf, _chat_settings(src, conf, tokenizer))
    return ImportedModel(cfg, sd, tokenizer, _model_name(src, conf), settings["chat"], origin,
                         settings.get("prompt_template"))


def _check_target(run: Path, overwrite: bool) -> RunFolder:
    target = RunFolder(run)
    target.check_folder()  # no folder of the user's files is written over
    if target.checkpoints() and not overwrite:
        raise MoorelmError(f"{run} already holds a run; choose another folder or pass --force")
    return target


def write_run(imported: ImportedModel, run: str | Path, *, overwrite: bool = False) -> Path:
    """Write an ``ImportedModel`` as a run folder: config.json, tokenizer.json and
    checkpoints/step-00000000, ready for ``generate``, ``evaluate``, ``chat`` and fine-tuning.
    The whole run is replaced, or nothing."""
    run = Path(run)
    target = _check_target(run, overwrite)
    model = imported.build()
    with target.rewrite(force=overwrite) as new:
        new.write_files(imported.run_config(model), imported.tokenizer)
        new.save(0, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    return run


def import_hf(hf_dir: str | Path, run: str | Path, *, seq_len: int | None = None,
              overwrite: bool = False) -> Path:
    """Turn a transformers folder (GPT-2, Llama, Mistral, Qwen2, Qwen3) into a moorelm run
    folder at ``run``: ``read_hf`` then ``write_run``."""
    hf_dir, run = Path(hf_dir), Path(run)
    if not hf_dir.is_dir():
        raise MoorelmError(f"{hf_dir} is not a folder; pass a Hugging Face model folder")
    _check_target(run, overwrite)  # before reading weights for nothing
    return write_run(read_hf(hf_dir, seq_len=seq_len), run, overwrite=overwrite)


__all__ = ["HFSource", "IMPORTABLE", "ImportedModel", "convert_tokenizer", "export_hf",
           "hf_architecture", "hf_config", "hf_state_dict", "import_hf", "is_hf_folder",
           "read_hf", "to_transformers", "write_run"]
