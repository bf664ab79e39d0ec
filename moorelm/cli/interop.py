"""Interop verbs: ``export`` (a run -> transformers, GGUF or PEFT) and ``import`` (the reverse).

    moorelm export runs/demo --format hf out/demo-hf
    moorelm export runs/demo --format gguf out/demo.gguf --dtype q8_0
    moorelm export runs/demo-lora --format peft out/demo-adapter
    moorelm import out/demo-hf runs/demo-back
    moorelm import out/demo.gguf runs/demo-back
    moorelm import out/demo-adapter runs/demo-lora-back --base runs/demo

An existing output is refused unless ``--force``, and even then only a previous export of the
same format is replaced (a GGUF file; a folder holding only the files such an export writes):
moorelm never deletes what it did not write.
"""

from __future__ import annotations

from pathlib import Path

from moorelm.errors import MoorelmError

FORMATS = ("hf", "gguf", "peft")
DTYPES = ("f32", "f16", "bf16", "q8_0")


def cmd_export(args) -> int:
    fmt, out = args.format, Path(args.out)
    if fmt not in FORMATS:
        raise MoorelmError(f"--format {fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    if args.dtype is not None and fmt != "gguf" and args.dtype != "f32":
        raise MoorelmError(f"--dtype {args.dtype} applies to --format gguf only; --format {fmt} "
                           "writes float32")
    if fmt == "gguf":
        from moorelm.interop.gguf_export import export_gguf

        info = export_gguf(args.run, out, dtype=args.dtype or "f32", force=args.force)
        print(f"exported {args.run} -> {out} ({info['architecture']}, {info['dtype']}, "
              f"{info['bytes'] / 2**20:.1f} MiB; run it with llama.cpp, Ollama or "
              f"'moorelm import {out} RUN')")
    elif fmt == "peft":
        from moorelm.interop.peft import export_peft

        export_peft(args.run, out, force=args.force)
        print(f"exported {args.run} -> {out} (load it with peft.PeftModel.from_pretrained on the "
              "base run exported with --format hf)")
    else:
        from moorelm.interop.hf import export_hf

        out = export_hf(args.run, out, overwrite=args.force)
        print(f"exported {args.run} -> {out} (load it with transformers' AutoModelForCausalLM "
              "and AutoTokenizer)")
    return 0


def cmd_import(args) -> int:
    from moorelm.interop.gguf import import_gguf, resolve_source
    from moorelm.interop.hf import import_hf
    from moorelm.interop.peft import CONFIG_FILE, import_peft
    from moorelm.interop.sources import local_source

    source = local_source(args.hf_dir)  # a hub id: its snapshot in the Hugging Face cache
    if (source / CONFIG_FILE).exists():
        if args.base is None:
            raise MoorelmError(f"{source} is a PEFT adapter folder; name the run it adapts with "
                               "--base RUN")
        run = import_peft(source, args.run, base=args.base, force=args.force,
                          ignore_base_name=args.ignore_base_name)
    elif args.base is not None:
        raise MoorelmError(f"--base applies to PEFT adapter folders only; {source} has no "
                           f"{CONFIG_FILE}")
    elif resolve_source(args.hf_dir) is not None:  # FILE.gguf or a bundled name (smollm2)
        run = import_gguf(args.hf_dir, args.run, seq_len=args.seq_len, force=args.force)
    else:
        run = import_hf(source, args.run, seq_len=args.seq_len, overwrite=args.force)
    print(f"imported {args.hf_dir} -> {run} (try: moorelm generate {run} --prompt '...')")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run as a transformers folder, a GGUF file or a PEFT adapter",
        description="Export the newest checkpoint of a run. --format hf: a folder that "
        "transformers' AutoModelForCausalLM and AutoTokenizer load (GPT-2 architecture for "
        "learned positions, LayerNorm, GELU; Llama for rotary, RMSNorm, SwiGLU; Qwen3 for those "
        "with QK-norm, as the default recipe trains; with the chat template, special tokens and "
        "every EOS id). --format gguf: "
        "one file for llama.cpp and Ollama (llama, qwen2 or qwen3 architecture; byte-level BPE "
        "or SentencePiece vocabularies; weights as --dtype). --format peft: the LoRA adapters of "
        "a fine-tuned run as adapter_config.json + adapter_model.safetensors, for "
        "peft.PeftModel on the base run exported with --format hf. Variants with no exact "
        "counterpart are refused, naming the field.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="folder (hf, peft) or .gguf file (gguf) to write; must be new "
                   "unless --force")
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="output format: hf (default), gguf, peft")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="GGUF weight type: f32 (default, exact), f16, bf16, q8_0 (8-bit blocks); "
                   "norms stay f32")
    p.add_argument("--force", action="store_true", help="replace OUT if it is an earlier export "
                   "of the same format (anything else is never deleted)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="turn a transformers folder, a GGUF file or a PEFT adapter into a run",
        description="Read a local transformers GPT-2, Llama (2, 3, 3.1+), Mistral, Qwen2 or Qwen3 "
        "folder (safetensors weights only; pickled .bin files and remote code are refused), a "
        "llama, qwen2 or qwen3 GGUF file, or a PEFT LoRA adapter "
        "folder on top of a base run (--base), and write a moorelm run folder that generate, "
        "evaluate and fine-tuning can use.",
    )
    p.add_argument("hf_dir", metavar="SOURCE", help="Hugging Face model folder, or hub id "
                   "org/name (from the local Hugging Face cache; downloaded first when the hub "
                   "can be reached: safetensors, configs and tokenizer files only), a "
                   "FILE.gguf, 'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), "
                   "or a PEFT adapter folder (with --base)")
    p.add_argument("run", metavar="RUN", help="run folder to write")
    p.add_argument("--base", default=None, metavar="RUN",
                   help="the base run a PEFT adapter folder applies to")
    p.add_argument("--ignore-base-name", action="store_true",
                   help="apply a PEFT adapter although its base_model_name_or_path names "
                   "another model (shapes are still checked)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="shorten the context window (bounds KV-cache memory of long-context models)")
    p.add_argument("--force", action="store_true", help="replace RUN if it already holds a run")
    p.set_defaults(func=cmd_import)
