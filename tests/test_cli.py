"""The real CLI end to end: files, metrics, config errors, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import read_metrics

REQUIRED_KEYS = [
    "phase1/train_step_stability", "phase1/effective_rank", "phase1/effective_rank_ratio", "phase1/iterations",
    "phase1/residual", "phase1/val_convergence_rate", "phase1/val_memory_length", "phase1/val_memory_length_capped",
    "phase1/stop_reason", "phase1/token_iterations_per_s",
    "phase2/val_ppl", "phase2/val_acc", "phase2/val_loss", "phase2/train_ppl", "phase2/tokens_per_s",
    "model/params", "time/wall_s", "seed", "device", "data/train_tokens", "data/val_tokens",
]


def test_quick_run_writes_every_artifact(tiny_run):
    run_dir, proc = tiny_run("run")
    for name in ("metrics.json", "history.csv", "curves.png", "checkpoint.pt", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    m = read_metrics(run_dir)
    for key in REQUIRED_KEYS:
        assert key in m, key
        if key not in ("device", "phase1/stop_reason"):
            assert math.isfinite(float(m[key])), (key, m[key])
    assert m["device"] == "cpu" and m["seed"] == 42
    assert 0.0 <= m["phase1/val_convergence_rate"] <= 1.0 and 0.0 <= m["phase1/train_step_stability"] <= 1.0
    assert m["phase1/stop_reason"] in ("val_converged", "max_iterations")
    assert m["phase2/val_ppl"] < m["phase2/uniform_ppl"]  # learned something beyond a uniform guess
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model"]["context_dim"] == 32 and "head.weight" in ckpt["model"]
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + m["phase1/iterations"] + m["phase2/epochs"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=nonexistent", "model"),  # unknown group option
        ("model.context_dim=abc", "context_dim"),  # wrong type
        ("model.contxt_dim=64", "contxt_dim"),  # misspelt key
        ("training.dist_reg_weight=1.5", "training.dist_reg_weight=1.5"),  # out of range
        ("model.context_dim=-4", "model.context_dim=-4"),
        ("training.phase1.init=magic", "training.phase1.init='magic'"),
        ("training.diversity=vicreg", "select one with training/diversity=<name>"),  # dot for a group
        ("training.phase1.val_streams=0", "training.phase1.val_streams=0 is not allowed: expected a positive"),
        ("training.phase1.val_init=sequential", "val_init"),  # removed: held-out sweeps always start at c = 0
        ("training.phase1.val_streams=256", "too short to measure val_iterations=8 sweeps"),  # 1,024 / 256 = 4
    ],
)
def test_config_errors_name_the_key(tiny_run, override, expected):
    _, proc = tiny_run("bad", override, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr


def test_value_errors_are_one_line(tiny_run):
    _, proc = tiny_run("bad", "training.dist_reg_weight=1.5", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training.dist_reg_weight=1.5 is not allowed: expected a number in [0, 1]"]
    assert "Traceback" not in proc.stderr


def test_same_seed_same_metrics_different_seed_different_weights(tiny_run):
    a, _ = tiny_run("a")
    b, _ = tiny_run("b")
    c, _ = tiny_run("c", "seed=7")
    ma, mb = read_metrics(a), read_metrics(b)
    volatile = {"time/wall_s", "phase1/train_time_s", "phase1/held_out_time_s", "phase2/train_time_s",
                "phase1/token_iterations_per_s", "phase2/tokens_per_s", "data/tokenizer_cache_hit",
                "data/tokens_cache_hit"}
    assert {k: v for k, v in ma.items() if k not in volatile} == {k: v for k, v in mb.items() if k not in volatile}
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    wc = torch.load(c / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["head.weight"], wc["head.weight"])
