"""Interop verbs: ``export`` (a run -> a Hugging Face folder) and ``import`` (the reverse).

    moorelm export runs/demo --format hf out/demo-hf
    moorelm import out/demo-hf runs/demo-back
"""

from __future__ import annotations

from moorelm.errors import MoorelmError

FORMATS = ("hf",)


def cmd_export(args) -> int:
    from moorelm.interop.hf import export_hf

    if args.format not in FORMATS:
        raise MoorelmError(f"--format {args.format!r} is not valid; choose one of: {', '.join(FORMATS)}")
    out = export_hf(args.run, args.out, overwrite=args.force)
    print(f"exported {args.run} -> {out} (load it with transformers' AutoModelForCausalLM "
          "and AutoTokenizer)")
    return 0


def cmd_import(args) -> int:
    from moorelm.interop.gguf import import_gguf, resolve_source
    from moorelm.interop.hf import import_hf

    if resolve_source(args.hf_dir) is not None:  # FILE.gguf or a bundled name (smollm2)
        run = import_gguf(args.hf_dir, args.run, seq_len=args.seq_len, force=args.force)
    else:
        run = import_hf(args.hf_dir, args.run, seq_len=args.seq_len, overwrite=args.force)
    print(f"imported {args.hf_dir} -> {run} (try: moorelm generate {run} --prompt '...')")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run as a Hugging Face transformers model folder",
        description="Export the newest checkpoint of a run as a folder that transformers' "
        "AutoModelForCausalLM and AutoTokenizer load: GPT-2 architecture for GPT-2-style models "
        "(learned positions, LayerNorm, GELU), Llama for modern ones (rotary, RMSNorm, SwiGLU, "
        "grouped-query attention). Other variants cannot be exported exactly and are refused.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="folder to write (must be new or empty unless --force)")
    p.add_argument("--format", default="hf", help="output format: hf (default)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="turn a Hugging Face GPT-2 or Llama folder into a run",
        description="Read a local transformers GPT-2 or Llama folder (safetensors weights only; "
        "pickled .bin files are refused) and write a moorelm run folder that generate, "
        "evaluate and fine-tuning can use.",
    )
    p.add_argument("hf_dir", metavar="SOURCE", help="Hugging Face model folder (local), a "
                   "Llama-family FILE.gguf, or 'smollm2' (the bundled SmolLM2-135M-Instruct GGUF)")
    p.add_argument("run", metavar="RUN", help="run folder to write")
    p.add_argument("--seq-len", type=int, default=None,
                   help="shorten the context window (bounds KV-cache memory of long-context models)")
    p.add_argument("--force", action="store_true", help="replace RUN if it already holds a run")
    p.set_defaults(func=cmd_import)
