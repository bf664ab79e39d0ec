"""docs/quickstart.ipynb runs end to end (tiny sizes), so the notebook cannot rot.

The notebook is executed with nbclient in a kernel of this very Python (a kernel spec written
into tmp_path and found through JUPYTER_PATH, so no user or system kernel is involved), with
``MOORELM_NOTEBOOK_QUICK=1`` (its parameters cell picks tiny sizes) and every output under
tmp_path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
KERNEL = "moorelm-test"


def _kernel_spec(root: Path) -> Path:
    """A kernel spec running ipykernel in this interpreter, under ``root/kernels``."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moorelm test", "language": "python"}))
    return root


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"the notebook has {len(cells)} cells tagged {tag!r}"
    return cells[0]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_committed_notebook_has_no_outputs():
    """The notebook is committed without outputs or execution counts (small diffs)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "QUICK" in _tagged(nb, "parameters").source


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
    """Every cell runs without error in quick mode; the loss plot and the scaling section show
    images, the SmolLM2 chat reply is not empty, samples and classifications are printed."""
    jupyter = _kernel_spec(tmp_path / "jupyter")
    work = tmp_path / "work"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("MOORELM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MOORELM_NOTEBOOK_DIR", str(work))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    for tag in ("loss-plot", "scaling"):
        assert any("image/png" in o.get("data", {}) for o in _tagged(nb, tag).outputs), tag
    reply = [ln for ln in _text(_tagged(nb, "chat")).splitlines() if ln.startswith("reply:")]
    assert reply and reply[0][len("reply:"):].strip()
    assert "perplexity" in _text(_tagged(nb, "sample"))
    labels = _text(_tagged(nb, "classify"))
    assert any(g in labels for g in ("comedy", "tragedy", "history"))
    assert (work / "shk" / "metrics.csv").exists() and (work / "ladder" / "report.html").exists()
