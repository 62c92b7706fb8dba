import math

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from newllm.training.instruments import PositionLoss, bucket_labels
from tests.conftest import read_metrics


def test_bucket_labels_are_log2_and_end_at_the_window():
    assert bucket_labels(8) == ["1-8"]
    assert bucket_labels(40) == ["1-8", "9-16", "17-32", "33-40"]
    assert bucket_labels(64) == ["1-8", "9-16", "17-32", "33-64"]


def test_bucketed_loss_equals_hand_computed_means():
    # vocab 2, logits 0 everywhere except where set: CE = log 2 at zero logits
    w, t = 2, 20
    logits = torch.zeros(w, t, 2)
    targets = torch.zeros(w, t, dtype=torch.long)
    logits[:, 8:16, 0] = 5.0  # positions 9-16 predict the target confidently
    logits[0, 16:, 1] = 5.0  # window 0, positions 17-20: confidently wrong
    mask = torch.ones(w, t, dtype=torch.bool)
    mask[1, :4] = False  # 4 masked targets in bucket 1-8
    acc = PositionLoss(t)
    acc.add(logits[:1], targets[:1], mask[:1])  # two batches, accumulated
    acc.add(logits[1:], targets[1:], mask[1:])
    loss, tokens = acc.result()
    right, wrong = F.softplus(torch.tensor(-5.0)).item(), F.softplus(torch.tensor(5.0)).item()
    assert tokens == {"1-8": 12, "9-16": 16, "17-20": 8}
    assert math.isclose(loss["1-8"], math.log(2), rel_tol=1e-6)
    assert math.isclose(loss["9-16"], right, rel_tol=1e-5)
    assert math.isclose(loss["17-20"], (4 * wrong + 4 * math.log(2)) / 8, rel_tol=1e-6)


def test_bucket_with_no_target_is_nan_with_zero_tokens():
    acc = PositionLoss(16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :3] = True
    acc.add(torch.zeros(1, 16, 4), torch.zeros(1, 16, dtype=torch.long), mask)
    loss, tokens = acc.result()
    assert tokens == {"1-8": 3, "9-16": 0}
    assert math.isclose(loss["1-8"], math.log(4), rel_tol=1e-6) and math.isnan(loss["9-16"])


@pytest.mark.slow
def test_run_reports_loss_by_position_at_eval_seq_len(tiny_run):
    run_dir, _ = tiny_run("pos", "model=gru", "training.phase1.enabled=false", "training.phase2.eval_seq_len=64",
                          "training.phase2.max_steps_per_epoch=3", "training.phase2.epochs=1")
    m = read_metrics(run_dir)
    assert m["phase2/eval_seq_len"] == 64
    for split in ("val", "test"):
        assert sorted(m[f"phase2/{split}_loss_by_position"]) == ["1-8", "17-32", "33-64", "9-16"]  # json sorts keys
        tokens = m[f"phase2/{split}_tokens_by_position"]
        assert sum(tokens.values()) == m[f"phase2/{split}_tokens"]
        mean = sum(m[f"phase2/{split}_loss_by_position"][k] * n for k, n in tokens.items()) / sum(tokens.values())
        assert math.isclose(mean, m[f"phase2/{split}_loss"], rel_tol=1e-4)
    assert (run_dir / "loss_by_position.png").stat().st_size > 0


@pytest.mark.slow
def test_eval_seq_len_beyond_transformer_max_len_is_one_line_error(tiny_run):
    _, proc = tiny_run("tf", "model=transformer", "model.max_len=16", "training.phase1.enabled=false",
                       "training.phase2.seq_len=8", "training.phase2.eval_seq_len=32", check=False)
    assert proc.returncode == 2
    assert "training.phase2.eval_seq_len=32" in proc.stderr and "model.max_len=16" in proc.stderr


# ----------------------------------------------------------------------------- recall against state size
def frontier_table(chance: bool = True) -> pd.DataFrame:
    """Hand-made recall_frontier output: two families, two pair counts, states out of order."""
    rows = [("mamba", 5120, 4, 0.9), ("mamba", 2560, 4, 0.5), ("gru", 64, 4, 0.1), ("gru", 256, 4, 0.3),
            ("mamba", 2560, 8, 0.2), ("gru", 64, 8, 0.05)]
    table = pd.DataFrame(rows, columns=["choices/model", "state_floats", "num_pairs", "accuracy"])
    table["n"] = 3
    if chance:
        table["chance"] = 1 / 63
    return table


def test_recall_frontier_plot_is_accuracy_against_log_state_one_line_per_family():
    import matplotlib

    matplotlib.use("Agg")
    from newllm.analysis.instruments import plot_recall_frontier

    fig = plot_recall_frontier(frontier_table())
    four, eight = fig.axes
    assert (four.get_xscale(), eight.get_xscale()) == ("log", "log")
    assert (four.get_title(), eight.get_title()) == ("4 key-value pairs", "8 key-value pairs")
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in four.get_lines()}
    assert lines["gru"] == ([64, 256], [0.1, 0.3])
    assert lines["mamba"] == ([2560, 5120], [0.5, 0.9])  # sorted by state size
    assert lines["chance (no past)"][1] == [1 / 63, 1 / 63]
    assert {ln.get_label() for ln in eight.get_lines()} == {"gru", "mamba", "chance (no past)"}
    assert "model/state_floats" in four.get_xlabel()


def test_recall_frontier_plot_without_chance_or_model_column():
    import matplotlib

    matplotlib.use("Agg")
    from newllm.analysis.instruments import plot_recall_frontier

    table = frontier_table(chance=False)
    fig = plot_recall_frontier(table[table["choices/model"] == "gru"].drop(columns="choices/model"))
    labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
    assert labels == ["runs", "runs"]
