"""Each notebook executes top to bottom (nbclient, this environment's kernel) against a tiny real sweep."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"
# notebook -> (at least this many figures, a text the outputs must show)
EXPECTED = {
    "01_single_run.ipynb": (2, "Hello, how are you? ->"),
    "02_architecture_sweep.ipynb": (3, "multirun/grid"),
    "03_optuna_studies.ipynb": (4, "hypervolume"),
}


def _texts(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out += [str(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(out)


def test_notebooks_are_stored_clean_and_only_call_the_library():
    # 04 runs on the instruments' own sweeps: tests/test_instruments_cli.py executes it
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted([*EXPECTED, "04_long_context_and_memory.ipynb"])
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert [c.metadata.get("tags") for c in code].count(["parameters"]) == 1, path.name
        assert "from newllm import analysis" in "".join(c.source for c in code)
        assert not any("def " in c.source or "import torch" in c.source for c in code), f"{path.name} copies logic"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, analysis_outputs, compare_outputs, monkeypatch):
    monkeypatch.setenv("NEWLLM_OUTPUTS", str(analysis_outputs["outputs"]))
    monkeypatch.setenv("NEWLLM_COMPARE", str(compare_outputs))
    monkeypatch.setenv("NEWLLM_SWEEP", analysis_outputs["grid"])
    monkeypatch.setenv("NEWLLM_OPTUNA_STORAGE", analysis_outputs["storage"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # raises on any cell error
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    min_figures, text = EXPECTED[name]
    assert figures >= min_figures, f"{name}: {figures} figures"
    assert text in _texts(nb)
    if name == "02_architecture_sweep.ipynb":  # the compare_models table, one row per model
        assert "test_ppl_minus_layerwise/mean" in _texts(nb) and "transformer" in _texts(nb)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
