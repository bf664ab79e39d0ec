"""House rules checked mechanically: imports follow the data (module level and inside
functions, every package and subpackage), no import cycles, the public API is lazy and torch
stays out of modules that do not need it, no pickling loads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moorelm"

# Layers, lowest first. A module may import, at the top or inside a function, only modules of
# its own layer or lower ones. Entries are paths below ``moorelm`` ("" is moorelm/__init__.py,
# the public API); a package's entry covers its submodules unless they have their own entry.
# An entry for a module that does not exist (yet) is harmless, so a branch that adds one merges
# without touching this table.
LAYERS = [
    {"errors", "atomic", "jsonfile", "hub"},  # hub: Hugging Face ids, the probe, the cache
    {"config", "corpus", "device", "classify"},  # classify: HF encoders, nothing of moorelm's GPT
    {"tokenizer"},
    {"data", "decode_plan", "model", "grammar"},  # grammar: JSON-schema constrained decoding
    {"optim", "codecs", "run", "plots", "quantize"},  # run: the run folder; codecs: one per
    # kind of model; quantize: weight formats for inference
    {"inspect", "chat", "scoring"},  # inspect: a forward pass laid open; chat: chat templates;
    # scoring: per-token log-probs of given text
    {"generate", "evaluate", "training"},  # training/: the loop
    {"inference"},  # the engine's parts, below the HTTP server
    {"finetune", "interop", "scaling"},
    {""},
    {"serve", "harness"},  # harness: lm-evaluation-harness over moorelm.load, as serve
    {"cli", "__main__"},
]

# Imports against the layers or in a cycle that other branches remove; an entry that no longer
# occurs is harmless. (importer, imported): why it is still here.
KNOWN = {
}


def module_name(path: Path) -> str:
    """moorelm/a/b.py -> "a.b"; moorelm/a/__init__.py -> "a"; moorelm/__init__.py -> ""."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _target(dotted: str) -> str | None:
    """'moorelm.x.y' -> 'x.y' if it names a module of the package (else its nearest package)."""
    if dotted != "moorelm" and not dotted.startswith("moorelm."):
        return None
    name = dotted[len("moorelm."):] if dotted != "moorelm" else ""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path) -> dict[str, int]:
    """Every moorelm module ``path`` imports, anywhere in the file -> the first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            if node.module:
                # `from moorelm.x import y` imports the submodule x.y when y is one
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[8:] in MODULES
                         else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for dotted in names:
            target = _target(dotted)
            if target is not None:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer_of(module: str) -> int | None:
    """The layer of the longest entry that is ``module`` or a package above it."""
    best = None
    for i, names in enumerate(LAYERS):
        for entry in names:
            covers = module == entry or (entry != "" and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > best[0]):
                best = (len(entry), i)
    return None if best is None else best[1]


def test_every_module_has_a_layer():
    """Each module of the package, __init__ files and every subpackage included, is placed
    in a layer (a new module or subpackage gets an entry in LAYERS)."""
    missing = sorted(name or "moorelm/__init__.py" for name in MODULES if layer_of(name) is None)
    assert not missing, f"place these in tests/test_imports.py LAYERS: {missing}"


def test_imports_flow_one_way():
    """No module imports one of a later layer, neither at its top nor inside a function."""
    wrong = []
    for name, deps in GRAPH.items():
        for dep, line in deps.items():
            if layer_of(dep) > layer_of(name) and (name, dep) not in KNOWN:
                wrong.append(f"moorelm/{MODULES[name].relative_to(PKG)}:{line} imports "
                             f"{'moorelm.' + dep if dep else 'moorelm'} from a later layer")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """The module graph (function-level imports included) has no cycle; a package's
    __init__ counts only where its own names are imported."""
    edges = {m: {d for d in deps if d != m and (m, d) not in KNOWN} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(c or "moorelm" for c in cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_classify_never_touches_the_gpt():
    """moorelm.classify (Hugging Face encoders) imports nothing of moorelm but the first layer
    (errors, atomic, jsonfile), device (whether the hardware has native bf16) and itself; the
    GPT classifier in finetune/ builds on it, not the other way round."""
    for name, deps in GRAPH.items():
        if name == "classify" or name.startswith("classify."):
            outside = {d for d in deps if d not in LAYERS[0] | {"device"}
                       and d.split(".")[0] != "classify"}
            assert not outside, f"moorelm.{name} imports {outside}"


def test_nothing_imports_the_cli():
    """The CLI imports everything and nothing imports it."""
    for name, deps in GRAPH.items():
        if layer_of(name) != len(LAYERS) - 1:
            assert not any(d == "cli" or d.startswith("cli.") for d in deps), name


TORCH_FREE = ["errors", "atomic", "hub", "config", "corpus", "classify", "classify.data",
              "classify.metrics", "classify.encoder", "classify.predict", "classify.train",
              "scaling.fit", "scaling.trend", "scaling.report", "finetune.genre"]

NO_TORCH = """
import importlib, json, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoTorch())
for name in json.loads(sys.argv[1]):
    importlib.import_module("moorelm." + name)
import moorelm
assert moorelm.ModelConfig is importlib.import_module("moorelm.config").ModelConfig
assert set(moorelm.__all__) <= set(dir(moorelm))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""


def test_modules_without_torch_import_without_torch():
    """`import moorelm.config` (and the other modules that need no torch: errors, atomic,
    corpus, the classify package, the scaling fits and report) works where torch and
    transformers cannot be imported at all, and leaves them out of sys.modules; so do
    `import moorelm`, its dir() and its config names."""
    out = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps(TORCH_FREE)],
                         capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


LOAD_WITHOUT_DYNAMO = """
import sys, moorelm
from moorelm.config import build_configs, with_vocab
from moorelm.model import GPT, meta_device
lm = moorelm.load(sys.argv[1], device="cpu")
lm.generate("a", max_new_tokens=2, temperature=0)
moorelm.load(sys.argv[1], device="cpu", weights="int8")
cfg, _ = build_configs(recipe="moorelm", model_overrides=dict(n_layer=1, n_head=2, n_embd=32,
                                                             seq_len=16))
with meta_device():
    GPT(with_vocab(cfg, 50))
from moorelm.cli import build_parser
build_parser()  # every command's flags, as `moorelm serve` builds them before serving
print(sorted({m.split(".")[0] if m.startswith(("sympy", "matplotlib")) else m
              for m in sys.modules if m.startswith(("torch._dynamo", "triton", "sympy",
                                                     "matplotlib"))}))
"""


def test_loading_and_generating_leave_torch_dynamo_out(tiny_run):
    """Loading a run (fp32 and int8), generating from it and building a rotary model on the
    meta device never import torch._dynamo: initialisers and aranges on meta tensors go
    through PyTorch's reference ops, whose first use imports it (and triton), ~2 s and ~140 MiB
    resident in every process that loads a run. Nor sympy (``to_empty`` on a meta model
    imports it: ~30 MiB), nor matplotlib, which only drawing needs (~0.8 s, ~30 MiB): the
    CLI's parsers are built with them out too (``moorelm serve`` builds every command's)."""
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DYNAMO, str(tiny_run)],
                         capture_output=True, text=True, timeout=300, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


def test_public_api_resolves_every_name():
    """Every name in moorelm.__all__ resolves (lazily) to the object of the module that
    defines it, and dir(moorelm) lists them."""
    code = ("import moorelm, moorelm.model, moorelm.generate, moorelm.tokenizer\n"
            "names = [n for n in moorelm.__all__ if getattr(moorelm, n) is None]\n"
            "assert moorelm.GPT is moorelm.model.GPT and moorelm.Tokenizer is moorelm.tokenizer.Tokenizer\n"
            "assert moorelm.LanguageModel is moorelm.generate.LanguageModel\n"
            "assert callable(moorelm.load) and callable(moorelm.pretrain)\n"
            "assert set(moorelm.__all__) <= set(dir(moorelm)), names\n"
            "try:\n    moorelm.no_such_name\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr


def test_no_unpickling_loads():
    """No torch.load without weights_only=True and no pickle anywhere in the package."""
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
