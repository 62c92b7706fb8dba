"""The long-context presets (recall_capacity_quick, data_scaling_quick, recall_capacity_state_quick) end to end
through the real CLI, the analyze subcommands on them, and notebook 04 on their folders."""

import json
import shutil

import pytest

from newllm import keys
from newllm.analysis.instruments import position_table, recall_frontier, recall_table, scaling_fit
from newllm.errors import ScalingError
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
    run_cli(["-m", "+sweep=recall_capacity_state_quick", f"paths.output_root={out}", f"hydra.sweep.dir={out}/state"],
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


def test_recall_capacity_state_quick_draws_the_frontier(sweeps):
    """8 tiny mqar runs (4 models x 2 widths) and `analyze recall`: a state size per run, the frontier plot."""
    tmp, out = sweeps
    table = recall_frontier(out / "state").set_index(["choices/model", "state_floats"])
    # T = 32 (data.seq_len): layerwise C, GRU 2 C, transformer 2 x 2 x 32 x C, mamba 2 x 2C x (16 + 4)
    assert sorted(table.index) == sorted((m, k * c) for c in (16, 32) for m, k in
                                         (("layerwise", 1), ("gru", 2), ("transformer", 128), ("mamba", 80)))
    assert table["accuracy"].between(0, 1).all() and (table["n"] == 1).all()
    assert (table["chance"] == 1 / 23).all()  # recall_task: vocabulary 48, 23 value ids
    assert (table["chance_stored_value"] == 1 / 2).all()  # the quick twin's 2 pairs
    proc = run_in_process(["recall", str(out / "state")], cwd=tmp, module="newllm.analyze")
    assert "recall_vs_state.png" in proc.stdout and (out / "state/analysis/recall_vs_state.png").exists()


def test_data_scaling_quick_and_analyze_scaling(sweeps):
    """The quick runs are too short for a power-law regime (test loss 6.21, 6.20, 6.05, 5.74, 5.43 by budget:
    flat, then falling): the fit is refused, with offset or without, in one line naming why."""
    tmp, out = sweeps
    with pytest.raises(ScalingError, match="curve downward"):
        scaling_fit(out / "scaling")
    for offset in ([], ["--offset"]):
        proc = run_in_process(["scaling", str(out / "scaling"), *offset], cwd=tmp, module="newllm.analyze",
                              check=False)
        [line] = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and line.startswith("error: ") and "curve downward" in line, proc.stderr


def test_analyze_scaling_fits_real_run_dirs_with_hand_set_losses(sweeps, tmp_path):
    """The same ten run dirs with test loss set to 30 N^-0.3 (+-0.5 % by seed): b recovered, plot written."""
    _, out = sweeps
    root = tmp_path / "scaling"
    shutil.copytree(out / "scaling", root, ignore=shutil.ignore_patterns(".runs_cache.parquet", "analysis"))
    for metrics_file in root.glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        loss = 30 * metrics[keys.DATA_TRAIN_TOKENS] ** -0.3 * (1.005 if metrics["seed"] else 0.995)
        metrics_file.write_text(json.dumps({**metrics, keys.P2_TEST_LOSS: loss}))
    runs, fit = scaling_fit(root)
    assert sorted(runs[keys.DATA_TRAIN_TOKENS].unique()) == [250, 500, 1000, 2000, 4000] and fit.n_seeds == 2
    assert fit.n_points == 10 and len(fit.residuals) == 10
    assert fit.b == pytest.approx(0.3, abs=1e-9) and abs(fit.b - 0.3) <= fit.ci95_b < 0.05 and fit.r2 > 0.99
    proc = run_in_process(["scaling", str(root)], cwd=tmp_path, module="newllm.analyze")
    assert "N^-0.300" in proc.stdout and "R^2" in proc.stdout and (root / "analysis/data_scaling.png").exists()


def test_notebook_04_executes_on_the_quick_sweeps(sweeps, monkeypatch):
    import os

    import nbformat
    from nbclient import NotebookClient

    from tests.conftest import REPO

    _, out = sweeps
    monkeypatch.setenv("NEWLLM_RECALL_SWEEP", str(out / "recall"))
    monkeypatch.setenv("NEWLLM_SCALING_SWEEP", str(out / "scaling"))
    monkeypatch.setenv("NEWLLM_STATE_SWEEP", str(out / "state"))
    monkeypatch.delenv("NEWLLM_COMPARE", raising=False)  # the comparison section: notebooks 02's test and test_compare
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(REPO / "notebooks/04_long_context_and_memory.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 4  # positions, recall vs pairs, scaling, recall vs state
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "with offset: no offset fit" in text and "curve downward" in text and "10 runs" in text
    assert "set COMPARE to a compare_models(_sota) sweep folder" in text
    frontier = "".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "state_floats" in frontier and "mamba" in frontier
