"""Export benchmark: the default recipe and SmolLM2 leave as transformers folders, GGUF files
and PEFT adapters; how long, how big, how exact, and how fast llama.cpp runs the GGUF.

For two models, a small default-recipe run trained here for ``--train-seconds`` (bundled
Shakespeare, byte-level BPE) and the bundled SmolLM2-135M-Instruct (``moorelm import
smollm2``), it reports:

    export time and file size      --format hf, and --format gguf per --dtype (f32 f16 bf16 q8_0)
    max |logit diff| vs moorelm    transformers reading each export (AutoModelForCausalLM on
                                   the folder, ``gguf_file=`` on each GGUF, PeftModel on a
                                   PEFT adapter of random LoRA weights), on fixed prompts
    llama.cpp                      its last-position logits vs moorelm's, whether its greedy
                                   tokens equal moorelm's (f32), and its decode tokens/s on each
                                   GGUF next to moorelm's own decode tokens/s, same threads
    SmolLM2 round trip             import -> export gguf f32 -> import: same logits and ids

llama.cpp runs through ``llama-cpp-python`` in a separate virtual environment (never a moorelm
dependency): ``--llama-venv`` (default /work/cache/llama-venv) is created when missing from the
wheel in ``--wheel-dir``, which is built from PyPI's source first when absent (that build takes
a long time on 2 cores). Usage:

    python bench/export.py [--threads 2] [--train-seconds 60] [--new-tokens 64] [--skip-llama]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["ROMEO:\nBut, soft! what light", "The capital of France is",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]
TEXTS = ["12345 ünïcödé 北京 🙂", "def f(x):\n    return x * 2\n", "  two  spaces\t\ttabs\n\n"]
DTYPES = ("f32", "f16", "bf16", "q8_0")
# the default recipe's model as wt-export makes it (Qwen3's shape); given explicitly so the
# bench measures that shape whichever recipe this checkout's default still is
DEFAULT_SHAPE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, norm_eps=1e-6,
                     tie_embeddings=False, bias=False)
LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n_new, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
texts = json.loads(sys.argv[5])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
            verbose=False, seed=0, logits_all=True)
out = []
for ids in prompts:
    llm.reset()
    llm.eval(ids)
    last = [float(x) for x in llm.scores[len(ids) - 1]]
    new, start = [], time.perf_counter()
    for _ in range(n_new):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        new.append(tok)
        llm.eval([tok])
    out.append({"last": last, "new": new, "seconds": time.perf_counter() - start})
tokens = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
print(json.dumps({"runs": out, "tokens": tokens}))
"""


# ----------------------------------------------------------------------------- llama.cpp venv


def ensure_llama(venv: Path, wheels: Path) -> tuple[Path | None, str]:
    """The llama venv's python (built when missing), or None and why not."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"],
                                      capture_output=True).returncode == 0:
        return py, "ready"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        print("building llama-cpp-python from its PyPI source (slow on few cores) ...", flush=True)
        # CMAKE_ARGS from the environment replaces the native build (e.g. a VM whose CPU flags
        # promise AMX that its llama.cpp build then faults on)
        env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
               "MAKEFLAGS": f"-j{os.cpu_count() or 2}"}
        # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would return an older build
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                            "--no-binary", "llama-cpp-python", "llama-cpp-python",
                            "-w", str(wheels)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"wheel build failed: {r.stderr.strip().splitlines()[-1:]}"
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel), "numpy",
                        "typing-extensions", "diskcache", "jinja2"], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"venv install failed: {r.stderr.strip().splitlines()[-1:]}"
    return py, "installed"


def check_child(r: subprocess.CompletedProcess) -> None:
    """Raise with llama.cpp's child's error, naming the signal when it was killed by one."""
    if r.returncode < 0:
        raise RuntimeError(f"llama.cpp's process died of signal {-r.returncode} "
                           f"(a crash in its build for this CPU?) {r.stderr.strip()[-500:]}")
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[-1500:])


def run_llama(py: Path, path: Path, threads: int, n_new: int, prompts: list[list[int]],
              texts: list[str] = ()) -> dict:
    """llama.cpp on ``path``: per prompt its last logits, greedy tokens and decode seconds
    ("runs"), and its own token ids for ``texts`` ("tokens")."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", LLAMA_CHILD, str(path), str(threads), str(n_new),
                        json.dumps(prompts), json.dumps(list(texts))], capture_output=True,
                       text=True, env=env)
    check_child(r)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- measuring


def moorelm_decode(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens and the seconds of the n - 1 one-token steps after the first (prefill
    excluded), with moorelm's KV cache."""
    from moorelm.generate import generate_tokens

    out, start = [], None
    with torch.no_grad():
        for t in generate_tokens(model, torch.tensor([ids]), n, temperature=0.0):
            out.append(int(t[0]))
            if start is None:
                start = time.perf_counter()
    return out, time.perf_counter() - start


def max_diff(model, ref, prompts: list[list[int]]) -> float:
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            worst = max(worst, (model(x)[0] - ref(x).logits).abs().max().item())
    return worst


def hf_gguf(path: Path, head_dim: int):
    import transformers

    kw = {"head_dim": head_dim} if head_dim != 128 else {}  # its qwen3 reader assumes 128
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **kw).eval()
    except TypeError:
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def measure(name: str, run: Path, work: Path, args, llama_py: Path | None) -> dict:
    import transformers

    from moorelm.errors import MoorelmError
    from moorelm.interop.gguf_export import export_gguf
    from moorelm.interop.hf import export_hf
    from moorelm.run import RunFolder

    loaded = RunFolder(run).load()
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    res: dict = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                 "hf": {}, "gguf": {}}
    # -- hf
    t = time.perf_counter()
    try:
        out = export_hf(run, work / f"{name}-hf", overwrite=True)
        secs = time.perf_counter() - t
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        size = sum(f.stat().st_size for f in out.iterdir())
        res["hf"] = {"seconds": secs, "bytes": size, "max_diff": max_diff(model, ref, prompts)}
        del ref
    except MoorelmError as e:
        res["hf"] = {"refused": str(e)}
    print(f"[{name}] hf: {res['hf']}", flush=True)
    # -- moorelm decode
    ours = [moorelm_decode(model, ids, args.new_tokens) for ids in prompts]
    res["moorelm_tok_s"] = (args.new_tokens - 1) * len(prompts) / sum(s for _, s in ours)
    with torch.no_grad():
        last = [model(torch.tensor([ids]))[0][0, -1] for ids in prompts]
    res["max_abs_logit"] = max(x.abs().max().item() for x in last)
    # -- gguf per dtype
    for dtype in DTYPES:
        path = work / f"{name}-{dtype}.gguf"
        info = export_gguf(run, path, dtype=dtype, force=True)
        row = {"seconds": info["seconds"], "bytes": info["bytes"], "arch": info["architecture"]}
        ref = hf_gguf(path, model.config.head_dim)
        row["max_diff_transformers"] = max_diff(model, ref, prompts)
        del ref
        if llama_py is not None:
            try:
                texts = PROMPTS + TEXTS
                out = run_llama(llama_py, path, args.threads, args.new_tokens, prompts, texts)
                got = out["runs"]
                row["llama_same_ids"] = sum(a == tok.encode(t) for a, t in zip(out["tokens"], texts))
                row["llama_tok_s"] = args.new_tokens * len(got) / sum(g["seconds"] for g in got)
                row["max_diff_llama_last"] = max(
                    (torch.tensor(g["last"][: ref.shape[0]]) - ref).abs().max().item()
                    for g, ref in zip(got, last))
                row["greedy_same"] = sum(g["new"] == o for g, (o, _) in zip(got, ours))
            except RuntimeError as e:
                row["llama_error"] = str(e).splitlines()[-1][:200]
        res["gguf"][dtype] = row
        print(f"[{name}] gguf {dtype}: {row}", flush=True)
        if dtype != "f32":
            path.unlink()
    return res


def peft_check(base: Path, work: Path) -> dict:
    """Random rank-8 adapters on every block layer of ``base``: PEFT vs moorelm logits."""
    import peft
    import transformers

    from moorelm.finetune.lora import LoRAConfig, apply_lora
    from moorelm.interop.hf import export_hf
    from moorelm.interop.peft import export_peft
    from moorelm.run import RunFolder

    loaded = RunFolder(base).load()
    model, tok = loaded.model, loaded.tokenizer
    lora = LoRAConfig(rank=8, alpha=16.0, merged=False)
    apply_lora(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.02 * torch.randn_like(p))
    run = work / "lora"
    cfg = {**loaded.config, "lora": lora.to_dict(), "finetune": {"base_run": str(base)}}
    RunFolder(run).write_files(cfg, tok)
    RunFolder(run).save(1, lora.codec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    t = time.perf_counter()
    export_peft(run, work / "adapter", force=True)
    secs = time.perf_counter() - t
    hf_dir = work / "smollm2-hf"
    if not hf_dir.exists():
        export_hf(base, hf_dir)
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32),
        str(work / "adapter")).eval()
    ours = RunFolder(run).load().model
    prompts = [tok.encode(p) for p in PROMPTS]
    size = sum(f.stat().st_size for f in (work / "adapter").iterdir())
    return {"seconds": secs, "bytes": size, "max_diff": max_diff(ours, ref, prompts)}


def smollm2_round_trip(run: Path, work: Path) -> dict:
    from moorelm.interop.gguf import import_gguf
    from moorelm.run import RunFolder

    back = import_gguf(work / "smollm2-f32.gguf", work / "smol-back", force=True)
    a, b = RunFolder(run).load(), RunFolder(back).load()
    texts = PROMPTS + TEXTS
    same_ids = sum(a.tokenizer.encode(t) == b.tokenizer.encode(t) for t in texts)
    with torch.no_grad():
        diff = max((a.model(torch.tensor([ids]))[0] - b.model(torch.tensor([ids]))[0]).abs().max().item()
                   for ids in (a.tokenizer.encode(t) for t in texts))
    return {"same_ids": f"{same_ids}/{len(texts)}", "max_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default="nano", help="size of the default-recipe run")
    ap.add_argument("--llama-venv", default="/work/cache/llama-venv")
    ap.add_argument("--wheel-dir", default="/work/cache/wheels")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from moorelm.interop.gguf import import_gguf
    from moorelm.training.pretrain import pretrain

    llama_py, why = (None, "skipped") if args.skip_llama else ensure_llama(
        Path(args.llama_venv), Path(args.wheel_dir))
    print(f"llama.cpp: {why}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()
    results = {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads,
               "loadavg_start": load, "models": []}
    print(f"CPU {cpu}, {os.cpu_count()} cores, {args.threads} threads, load {load}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="moorelm-export-bench."))
    try:
        run = work / "default"
        t = time.perf_counter()
        pretrain(run, tokenizer="bpe", vocab_size=2048, preset=args.preset,
                 model_overrides=DEFAULT_SHAPE,
                 train_overrides=dict(max_time=args.train_seconds, threads=args.threads,
                                      eval_interval=0, batch_size=16),
                 progress=False)
        print(f"trained the default-recipe run ({args.preset}, bpe) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        results["models"].append(measure("default", run, work, args, llama_py))
        if not args.skip_smollm2:
            smol = work / "smollm2"
            t = time.perf_counter()
            import_gguf("smollm2", smol)
            print(f"imported smollm2 in {time.perf_counter() - t:.0f} s", flush=True)
            results["models"].append(measure("smollm2", smol, work, args, llama_py))
            results["smollm2_round_trip"] = smollm2_round_trip(smol, work)
            print(f"smollm2 round trip: {results['smollm2_round_trip']}", flush=True)
            results["peft_smollm2"] = peft_check(smol, work)
            print(f"peft (smollm2, rank 8 everywhere): {results['peft_smollm2']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
