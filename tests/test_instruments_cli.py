"""The long-context presets (recall_capacity_quick, data_scaling_quick) end to end through the real CLI, and
the analyze subcommands on them."""

import pytest

from newllm.analysis.instruments import position_table, recall_table, scaling_fit
from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow  # every test here starts the CLI


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruments")
    out = tmp / "out"
    run_cli(["-m", "+sweep=recall_capacity_quick", f"paths.output_root={out}",
             f"hydra.sweep.dir={out}/recall"], cwd=tmp)
    run_cli(["-m", "+sweep=data_scaling_quick", f"paths.output_root={out}", f"hydra.sweep.dir={out}/scaling"],
            cwd=tmp)
    return tmp, out


def test_recall_capacity_quick_and_analyze_recall(sweeps):
    tmp, out = sweeps
    table = recall_table(out / "recall")
    assert len(table) == 16 and set(table["num_pairs"]) == {2, 4}
    assert set(table["choices/model"]) == {"layerwise", "sequential", "gru", "transformer"}
    assert table["accuracy"].between(0, 1).all()
    assert (table["chance"] == 1 / 63).all()  # vocab 128: 63 value ids, whatever the pairs
    proc = run_in_process(["recall", str(out / "recall")], cwd=tmp, module="newllm.analyze")
    assert "recall_vs_pairs.png" in proc.stdout and (out / "recall/analysis/recall_vs_pairs.png").exists()
    positions = position_table(out / "recall")
    assert list(positions.columns[-2:]) == ["9-16", "17-32"]
    proc = run_in_process(["positions", str(out / "recall")], cwd=tmp, module="newllm.analyze")
    assert (out / "recall/analysis/loss_by_position.png").exists()


def test_data_scaling_quick_and_analyze_scaling(sweeps):
    tmp, out = sweeps
    runs, fit = scaling_fit(out / "scaling")
    assert sorted(runs["data/train_tokens"].unique()) == [250, 500, 1000, 2000, 4000] and fit.n_seeds == 2
    assert fit.n_points == 10 and len(fit.residuals) == 10 and fit.r2 <= 1
    proc = run_in_process(["scaling", str(out / "scaling")], cwd=tmp, module="newllm.analyze")
    assert "N^-" in proc.stdout and "R^2" in proc.stdout and (out / "scaling/analysis/data_scaling.png").exists()


def test_notebook_04_executes_on_the_quick_sweeps(sweeps, monkeypatch):
    import os

    import nbformat
    from nbclient import NotebookClient

    from tests.conftest import REPO

    _, out = sweeps
    monkeypatch.setenv("NEWLLM_RECALL_SWEEP", str(out / "recall"))
    monkeypatch.setenv("NEWLLM_SCALING_SWEEP", str(out / "scaling"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(REPO / "notebooks/04_long_context_and_memory.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 3
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "N^-" in text and "6 runs" in text
