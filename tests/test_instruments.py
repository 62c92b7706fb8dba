import math

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from newllm.training.instruments import PositionLoss, bucket_labels, document_positions
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


# ----------------------------------------------------------------------------- positions within documents
def positions_by_reading(lengths: list[int], n_windows: int, seq_len: int) -> list[list[int]]:
    """The definition, read token by token: how many of the window's inputs belong to the target's
    document, plus one when the window also holds the token before that document (its first token is
    then predicted right after the previous document's end, as in the stream)."""
    doc_of = [d for d, n in enumerate(lengths) for _ in range(n)]
    rows = []
    for w in range(n_windows):
        window = range(w * seq_len, w * seq_len + seq_len)
        row = []
        for s in (i + 1 for i in window):  # the target of input i is token i + 1
            same = sum(doc_of[i] == doc_of[s] for i in window if i < s)
            starts_inside = doc_of[s] > 0 and doc_of.index(doc_of[s]) > window[0]
            row.append(same + starts_inside)
        rows.append(row)
    return rows


def test_document_positions_restart_at_each_document_and_stop_at_the_window():
    positions, documents = document_positions(torch.tensor([3, 10, 2, 20]), n_windows=4, seq_len=8)
    assert positions[0].tolist() == [1, 2, 1, 2, 3, 4, 5, 6]  # tokens 1-2 of doc 0, then doc 1 from its start
    assert documents[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert positions[1].tolist() == [1, 2, 3, 4, 1, 2, 1, 2]  # doc 1 began before the window: counted from it
    assert positions.tolist() == positions_by_reading([3, 10, 2, 20], 4, 8)
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 30, (12,), generator=rng)
        t = int(torch.randint(2, 20, (1,), generator=rng))
        n = (int(lengths.sum()) - 1) // t
        assert document_positions(lengths, n, t)[0].tolist() == positions_by_reading(lengths.tolist(), n, t)


def test_position_loss_buckets_by_document_position_and_counts_documents():
    positions = torch.tensor([[1, 2, 9, 10, 1, 17]])
    documents = torch.tensor([[0, 0, 0, 0, 1, 1]])
    ce = torch.tensor([[1.0, 3.0, 5.0, 7.0, 2.0, 4.0]])  # dense (B, T), as metrics.masked_token_losses gives
    acc = PositionLoss(20, n_documents=3)
    acc.add_losses(ce, torch.ones(1, 6, dtype=torch.bool), positions, documents)
    masked = torch.tensor([[True, True, True, True, False, False]])  # a second batch: only doc 0's targets
    acc.add_losses(ce * masked, masked, positions, documents)
    loss, tokens = acc.result()
    assert tokens == {"1-8": 5, "9-16": 4, "17-20": 1}
    assert loss == {"1-8": (2 * 1 + 2 * 3 + 2) / 5, "9-16": 6.0, "17-20": 4.0}
    assert acc.documents() == {"1-8": 2, "9-16": 1, "17-20": 1}


def test_evaluation_of_short_documents_leaves_late_buckets_empty():
    from newllm.models.baselines import GRULM
    from newllm.training.evaluation import evaluate
    from newllm.training.phase2 import make_windows, window_positions

    torch.manual_seed(0)
    model = GRULM(vocab_size=11, layers=1, context_dim=8, embed_dim=8, hidden_dim=None, init_std=0.02, dropout=0.0)
    lengths = torch.tensor([5, 8, 3, 7, 6, 8, 2, 4, 7, 8] * 3)  # no document longer than 8 tokens
    ids = torch.randint(0, 11, (int(lengths.sum()),))
    windows = make_windows(ids, torch.ones_like(ids, dtype=torch.bool), 32, "validation")
    within = evaluate(model, windows, 4, positions=window_positions(lengths, windows))
    assert within["tokens_by_position"]["1-8"] == within["tokens"] == 32 * 5
    assert all(n == 0 for k, n in within["tokens_by_position"].items() if k != "1-8")
    assert all(math.isnan(v) for k, v in within["loss_by_position"].items() if k != "1-8")
    assert math.isclose(within["loss_by_position"]["1-8"], within["loss"], rel_tol=1e-6)
    assert within["documents_by_position"]["1-8"] == int((lengths.cumsum(0) <= 32 * 5 + 1).sum()) + 1
    in_window = evaluate(model, windows, 4)  # positions in the window: later buckets hold other documents
    assert in_window["tokens_by_position"]["17-32"] == 16 * 5 and in_window["loss"] == within["loss"]
    assert window_positions(None, windows) is None


def test_document_lengths_of_every_split_match_their_streams(tmp_path):
    from newllm.data import load_data
    from tests.test_data import data_cfg, tok_cfg

    data = load_data(data_cfg(num_conversations=120), tok_cfg(), tmp_path)
    eot = data.tokenizer.token_to_id("<|endoftext|>")
    for ids, lengths in ((data.val_ids, data.val_doc_lengths), (data.test_ids, data.test_doc_lengths)):
        assert int(lengths.sum()) == len(ids) and len(lengths) == 12
        assert (ids[lengths.cumsum(0) - 1] == eot).all()  # every document ends with its own <|endoftext|>


@pytest.mark.slow
def test_run_reports_loss_by_position_at_eval_seq_len(tiny_run):
    run_dir, _ = tiny_run("pos", "model=gru", "training.phase1.enabled=false", "training.phase2.eval_seq_len=64",
                          "training.phase2.max_steps_per_epoch=3", "training.phase2.epochs=1")
    m = read_metrics(run_dir)
    assert m["phase2/eval_seq_len"] == 64
    for split in ("val", "test"):
        assert sorted(m[f"phase2/{split}_loss_by_position"]) == ["1-8", "17-32", "33-64", "9-16"]  # json sorts keys
        documents = m[f"phase2/{split}_documents_by_position"]
        # assistant targets: a conversation may have none in 1-8 (its first user turn is longer)
        assert all(0 < n <= m[f"data/{split}_documents"] for n in documents.values()) and len(documents) == 4
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
