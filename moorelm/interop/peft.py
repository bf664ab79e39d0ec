"""LoRA adapters in PEFT's format: a moorelm LoRA run <-> ``adapter_config.json`` +
``adapter_model.safetensors``.

    moorelm export LORA_RUN --format peft OUT       # PeftModel.from_pretrained(base, OUT) loads it
    moorelm export BASE_RUN --format hf BASE_HF     # ... onto this base
    moorelm import PEFT_DIR RUN --base BASE_RUN     # a PEFT LoRA adapter on top of a base run

Export maps each adapted moorelm layer onto the module of the transformers model that
``moorelm export --format hf`` writes for the base: for the Llama family (and others named
like it) the fused ``c_attn`` becomes ``q_proj``, ``k_proj`` and ``v_proj``, each with the
same ``lora_A`` and its rows of ``lora_B`` (``B_q A``, ``B_k A``, ``B_v A`` are exactly the
fused update's rows); ``attn.c_proj`` -> ``o_proj``, ``c_gate`` -> ``gate_proj``, ``c_fc`` ->
``up_proj``, ``mlp.c_proj`` -> ``down_proj``. For GPT-2 the names are the same as moorelm's
and the config says ``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores its weight transposed).
``r`` and ``lora_alpha`` are the run's rank and alpha, so PEFT's scale is moorelm's.

Import goes the other way. Separate ``q_proj``/``k_proj``/``v_proj`` adapters fuse into one
``c_attn`` adapter: with one shared ``lora_A`` (what export writes) at the same rank, else
stacked (``A = [A_q; A_k; A_v]``, ``B`` block-diagonal) at the sum of their ranks; every
layer is then zero-padded to the largest rank and alpha is scaled with it, which changes no
product. The run written is a LoRA run with separate adapters (``merged: false``) whose
model.safetensors is the base run's checkpoint. A base that does not fit (another
architecture, other shapes, a target module the base does not have, another base name) is
refused with one line naming the mismatch.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import torch

from moorelm.errors import MoorelmError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# moorelm layer suffix -> the Llama-family module (c_attn is split three ways)
_LLAMA = {"attn.c_proj": "self_attn.o_proj", "mlp.c_gate": "mlp.gate_proj",
          "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")
_GPT2 = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
OWN_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}


def _family(cfg) -> str:
    from moorelm.interop.hf import hf_architecture

    return hf_architecture(cfg)


def _layer_re():
    return re.compile(r"blocks\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_gate|mlp\.c_fc|mlp\.c_proj)")


def _lora_state(run: Path) -> tuple[dict, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config.json, ModelConfig, base tensors, adapter tensors) of a LoRA run's newest checkpoint."""
    from moorelm.codecs import ADAPTER_FILE, MODEL_FILE, LoRACodec, read_tensors, split_adapters
    from moorelm.run import RunFolder

    folder = RunFolder(run)
    config = folder.read_config()
    if not config.get("lora"):
        raise MoorelmError(f"{run} is not a LoRA run (its config.json has no 'lora' section); "
                           "--format peft exports LoRA adapters, use --format hf for a whole model")
    ck = folder.check()
    codec = LoRACodec(config["lora"])
    files = {n: read_tensors(ck / n) for n in (MODEL_FILE, ADAPTER_FILE) if (ck / n).exists()}
    base, adapters = split_adapters(codec.trained_state(files))
    return config, folder.model_config(config), base, adapters


def peft_tensors(cfg, adapters: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """moorelm adapter tensors -> (PEFT's tensors, the transformers module names adapted)."""
    from moorelm.codecs import adapter_pairs

    family = _family(cfg)
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for layer, (a, b) in adapter_pairs(adapters).items():
        m = _layer_re().fullmatch(layer)
        if m is None:
            raise MoorelmError(f"the adapter on {layer!r} has no counterpart in transformers")
        i, name = m.group(1), m.group(2)
        if family == "gpt2":
            targets = [(f"transformer.h.{i}.{name}", b)]
        elif name == "attn.c_attn":
            parts = b.split([H * D, K * D, K * D], dim=0)
            targets = [(f"model.layers.{i}.self_attn.{p}", part) for p, part in zip(_QKV, parts)]
        else:
            targets = [(f"model.layers.{i}.{_LLAMA[name]}", b)]
        for module, bb in targets:
            out[f"{PREFIX}{module}.lora_A.weight"] = a.detach().float().clone()
            out[f"{PREFIX}{module}.lora_B.weight"] = bb.detach().float().clone()
            modules.append(module)
    return out, modules


def _short_targets(modules: list[str], all_modules: list[str]) -> list[str]:
    """The shortest suffixes (``q_proj``, ``attn.c_proj``) that select exactly ``modules``
    among ``all_modules``; full names where no suffix does."""
    chosen = set(modules)
    names: list[str] = []
    for module in modules:
        parts = module.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            hits = {x for x in all_modules if x == suffix or x.endswith("." + suffix)}
            if hits <= chosen:
                if suffix not in names:
                    names.append(suffix)
                break
    return names


def _hf_modules(cfg) -> list[str]:
    """Every linear module inside the blocks of the exported transformers model."""
    family = _family(cfg)
    out = []
    for i in range(cfg.n_layer):
        if family == "gpt2":
            out += [f"transformer.h.{i}.{n}" for n in _GPT2]
        else:
            out += [f"model.layers.{i}.self_attn.{p}" for p in _QKV]
            out += [f"model.layers.{i}.{n}" for n in _LLAMA.values() if n != "mlp.gate_proj"
                    or cfg.mlp == "swiglu"]
    return out


def export_peft(run: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the LoRA adapters of ``run`` as a PEFT adapter folder at ``out``."""
    from safetensors.torch import save_file

    from moorelm.atomic import replace_dir
    from moorelm.interop.hf import hf_config

    run, out = Path(run), Path(out)
    check_out_folder(out, force, OWN_FILES, "PEFT adapter")
    config, cfg, _, adapters = _lora_state(run)
    lora = config["lora"]
    if lora.get("train_embeddings"):
        raise MoorelmError(f"{run} trained its embeddings and head in full (train_embeddings); "
                           "PEFT's adapter would need them as modules_to_save, which moorelm does "
                           "not write: export the merged model with --format hf")
    hf_config(cfg)  # the base must export (raises naming the field that blocks it)
    tensors, modules = peft_tensors(cfg, adapters)
    family = _family(cfg)
    base = (config.get("finetune") or {}).get("base_run")
    base_name = Path(base).name if base else run.name
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]),
        "lora_dropout": float(lora.get("dropout") or 0.0),
        "target_modules": _short_targets(modules, _hf_modules(cfg)),
        "fan_in_fan_out": family == "gpt2", "bias": "none", "modules_to_save": None,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    with replace_dir(out, f"export to {out}") as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={
            "format": "pt", "moorelm_run": str(run.resolve()), "moorelm_architecture": family})
    return out


def check_out_folder(out: Path, force: bool, own: set[str], what: str) -> None:
    """Refuse an existing output unless it is an empty folder, or ``force`` is given and it
    holds only files an export of ``what`` writes (``own``: names or glob patterns): nothing
    else is ever deleted."""
    if out.is_symlink():
        raise MoorelmError(f"{out} is a link; choose another path")
    if out.exists() and not out.is_dir():
        raise MoorelmError(f"{out} exists and is not a folder; choose another path")
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        raise MoorelmError(f"{out} already exists and is not empty; choose another folder or "
                           "pass --force")
    foreign = [e for e in entries if not any(fnmatch.fnmatchcase(e, pat) for pat in own)]
    if foreign:
        raise MoorelmError(f"{out} holds {foreign[0]!r}, which a {what} export does not write; "
                           "moorelm replaces only its own exports, even with --force")


# ----------------------------------------------------------------------------- import


def _read_peft(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from moorelm.codecs import read_tensors
    from moorelm.jsonfile import read_json

    if not folder.is_dir():
        raise MoorelmError(f"{folder} is not a folder; pass a PEFT adapter folder")
    path = folder / CONFIG_FILE
    if not (path.exists() or path.is_symlink()):
        raise MoorelmError(f"{folder} has no {CONFIG_FILE}; it is not a PEFT adapter folder")
    conf = read_json(path)
    if not isinstance(conf, dict):
        raise MoorelmError(f"{path} is not a JSON object")
    if conf.get("peft_type") != "LORA":
        raise MoorelmError(f"{path}: peft_type {conf.get('peft_type')!r} cannot be imported; "
                           "moorelm imports LORA adapters")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if conf.get(key):
            raise MoorelmError(f"{path}: {key}={_show(conf[key])} cannot be imported; moorelm "
                               "imports plain LoRA adapters")
    if conf.get("bias", "none") != "none":
        raise MoorelmError(f"{path}: bias={conf['bias']!r} (trained biases) cannot be imported")
    for key in ("r", "lora_alpha"):
        v = conf.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise MoorelmError(f"{path}: {key} must be a positive number, got {_show(v)}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        extra = " (adapter_model.bin is pickled; moorelm reads safetensors only)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise MoorelmError(f"{folder} has no {WEIGHTS_FILE}{extra}")
    return conf, read_tensors(weights)


def _show(v: Any) -> str:
    return json.dumps(v)[:40] if not isinstance(v, str) else repr(v[:40])


_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight")
_HF_LAYER = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.+)")
_FROM_LLAMA = {v: k for k, v in _LLAMA.items()}


def _moorelm_layer(module: str, family: str) -> tuple[str, str | None] | None:
    """transformers module -> (moorelm layer, q/k/v part or None)."""
    m = _HF_LAYER.fullmatch(module)
    if m is None:
        return None
    i, rest = m.group(1), m.group(2)
    if family == "gpt2":
        return (f"blocks.{i}.{rest}", None) if rest in _GPT2 else None
    if rest.startswith("self_attn.") and rest.split(".", 1)[1] in _QKV:
        return f"blocks.{i}.attn.c_attn", rest.split(".", 1)[1][0]
    return (f"blocks.{i}.{_FROM_LLAMA[rest]}", None) if rest in _FROM_LLAMA else None


def _check_base_name(conf: dict, folder: Path, base: Path, base_cfg: dict,
                     ignore: bool) -> None:
    want = conf.get("base_model_name_or_path")
    if ignore or not isinstance(want, str) or not want.strip():
        return
    names = {base.resolve().name.lower(), str(base_cfg.get("name") or "").lower()}
    names |= {n.split("/")[-1] for n in names}
    short = want.rstrip("/").split("/")[-1].lower()
    if short not in names:
        raise MoorelmError(f"{folder} was trained on {want!r}, but the base run is "
                           f"{base_cfg.get('name') or base.name!r}; pass the matching base run "
                           "(or --ignore-base-name to apply it anyway)")


def import_peft(folder: str | Path, run: str | Path, *, base: str | Path, force: bool = False,
                ignore_base_name: bool = False) -> Path:
    """Write a LoRA run at ``run``: the PEFT adapter in ``folder`` on top of ``base``'s weights."""
    from moorelm.codecs import A_SUFFIX, B_SUFFIX, LoRACodec, model_tensors
    from moorelm.finetune.lora import LoRAConfig
    from moorelm.run import RunFolder

    folder, run, base = Path(folder), Path(run), Path(base)
    target = RunFolder(run)
    target.check_folder()
    if target.checkpoints() and not force:
        raise MoorelmError(f"{run} already holds a run; choose another folder or pass --force")
    conf, tensors = _read_peft(folder)
    loaded = RunFolder(base).load(device="cpu")
    if loaded.kind != "lm":
        raise MoorelmError(f"{base} holds a {loaded.kind!r} model; the base of a PEFT adapter "
                           "must be a plain language model run")
    base_cfg = loaded.config
    cfg = loaded.model.config
    family = _family(cfg)
    _check_base_name(conf, folder, base, base_cfg, ignore_base_name)
    r, alpha = conf["r"], float(conf["lora_alpha"])
    scale = alpha / (r ** 0.5 if conf.get("use_rslora") else r)
    # module -> {"A": .., "B": ..}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise MoorelmError(f"{folder / WEIGHTS_FILE} holds {key!r}, which is not a LoRA "
                               "adapter tensor")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t.float()
    weights = dict(loaded.model.state_dict())
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MoorelmError(f"{folder / WEIGHTS_FILE}: {module} has lora_{next(iter(ab))} "
                               "without its partner")
        where = _moorelm_layer(module, family)
        if where is None or where[0] + ".weight" not in weights:
            raise MoorelmError(f"{folder}: target module {module!r} does not exist in the base "
                               f"run {base} (a {family} model with {cfg.n_layer} layers)")
        layer, part = where
        w = weights[layer + ".weight"]
        a, b = ab["A"], ab["B"]
        out_rows = {"q": H * D, "k": K * D, "v": K * D}.get(part, w.shape[0])
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != w.shape[1] or b.shape[0] != out_rows \
                or a.shape[0] != b.shape[1]:
            raise MoorelmError(f"{folder}: the adapter on {module} has shapes A {tuple(a.shape)}, "
                               f"B {tuple(b.shape)}, but the base's layer is "
                               f"({out_rows}, {w.shape[1]}); the base model does not match")
        fused.setdefault(layer, {})[part or "all"] = (a, b)
    if not fused:
        raise MoorelmError(f"{folder / WEIGHTS_FILE} holds no adapters")
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, parts in fused.items():
        if "all" in parts:
            adapters[layer] = parts["all"]
            continue
        rows = {"q": H * D, "k": K * D, "v": K * D}
        present = [p for p in "qkv" if p in parts]
        a0 = parts[present[0]][0]
        if all(parts[p][0].shape == a0.shape and torch.equal(parts[p][0], a0) for p in present):
            b = torch.cat([parts[p][1] if p in parts else torch.zeros(rows[p], a0.shape[0])
                           for p in "qkv"], dim=0)
            adapters[layer] = (a0, b)
        else:  # stacked: A = [A_q; A_k; A_v], B block-diagonal
            a = torch.cat([parts[p][0] for p in present], dim=0)
            b = torch.zeros(sum(rows.values()), a.shape[0])
            col, row = 0, {"q": 0, "k": H * D, "v": H * D + K * D}
            for p in present:
                bp = parts[p][1]
                b[row[p]:row[p] + rows[p], col:col + bp.shape[1]] = bp
                col += bp.shape[1]
            adapters[layer] = (a, b)
    rank = max(a.shape[0] for a, _ in adapters.values())
    lora = LoRAConfig(rank=rank, alpha=scale * rank, targets=tuple(sorted(adapters)),
                      dropout=float(conf.get("lora_dropout") or 0.0), merged=False)
    state = model_tensors(loaded.model)
    dtype = loaded.model.wte.weight.dtype
    for layer, (a, b) in adapters.items():
        pad = rank - a.shape[0]
        state[layer + A_SUFFIX] = torch.cat([a, torch.zeros(pad, a.shape[1])]).to(dtype).contiguous()
        state[layer + B_SUFFIX] = torch.cat([b, torch.zeros(b.shape[0], pad)], dim=1).to(dtype).contiguous()
    files = LoRACodec(lora.to_dict()).checkpoint_files(loaded.model, state)
    run_config = {k: v for k, v in base_cfg.items() if k not in ("train", "finetune", "lora")}
    run_config.update(lora=lora.to_dict(), finetune={
        "method": "lora", "base_run": str(base.resolve()), "base_step": loaded.state.get("step"),
        "imported_from": {"format": "peft", "path": str(folder.resolve()),
                          "base_model_name_or_path": conf.get("base_model_name_or_path")}})
    with target.rewrite(force=force) as new:
        new.write_files(run_config, loaded.tokenizer)
        new.save(0, files, {"tokens": 0, "elapsed": 0.0})
    return run


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "check_out_folder", "export_peft", "import_peft",
           "peft_tensors"]
