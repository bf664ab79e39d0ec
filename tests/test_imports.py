"""House rules checked mechanically: imports follow the data, no pickling loads."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moorelm"

# a module may import only modules of its own layer or earlier ones
LAYERS = [
    {"errors", "atomic"},
    {"config", "corpus", "device"},
    {"tokenizer"},
    {"data", "decode_plan", "model"},
    {"optim", "codecs", "run", "checkpoint", "plots"},
    {"generate", "evaluate", "train"},
]


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if module in names:
            return i
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moorelm."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("moorelm."):
                    found.add(a.name.split(".")[1])
    return found


def test_core_imports_flow_one_way():
    """config -> tokenizer -> data/model -> optim/run -> train/generate: no module
    imports one from a later layer."""
    for path in PKG.glob("*.py"):
        me = layer_of(path.stem)
        if me is None:
            continue
        for dep in imports_of(path):
            d = layer_of(dep)
            assert d is None or d <= me, f"{path.name} imports {dep} from a later layer"


def test_nothing_imports_the_cli():
    """The CLI imports everything and nothing imports it."""
    for path in PKG.rglob("*.py"):
        if "cli" in path.relative_to(PKG).parts or path.name == "__main__.py":
            continue
        assert "cli" not in imports_of(path), f"{path} imports moorelm.cli"


def test_no_unpickling_loads():
    """No torch.load without weights_only=True and no pickle anywhere in the package."""
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
