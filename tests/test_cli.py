"""The CLI end to end: files, metrics, config errors, reproducibility -- newllm.run's entry point in-process
(tests.conftest.run_in_process), and a real process where the process is what is checked."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

from tests.conftest import REPO, TINY, read_metrics, run_cli, run_in_process

pytestmark = pytest.mark.slow  # every test here runs the CLI end to end

REQUIRED_KEYS = [
    "phase1/train_step_stability", "phase1/effective_rank", "phase1/effective_rank_ratio", "phase1/iterations",
    "phase1/residual", "phase1/val_convergence_rate", "phase1/val_memory_length", "phase1/val_memory_length_capped",
    "phase1/val_probe_gain", "phase1/val_converged_gain", "phase1/test_converged_gain",
    "phase1/stop_reason", "phase1/token_iterations_per_s",
    "phase2/val_ppl", "phase2/val_acc", "phase2/val_loss", "phase2/train_ppl", "phase2/tokens_per_s",
    "model/params", "time/wall_s", "seed", "device", "data/train_tokens", "data/val_tokens",
]


def test_quick_run_writes_every_artifact(tiny_run):
    run_dir, proc = tiny_run("run")
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("metrics.json", "history.csv", "curves.png", "checkpoint.pt", ".hydra/config.yaml",
                 "tokenizer.json", "checkpoints/phase1.pt"):
        assert (run_dir / name).is_file(), name
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~umask, name  # as open(..., "w") makes
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
        ("training.phase1.init=magic", "Invalid value 'magic', expected one of [sequential, zeros, chunked, burn_in]"),
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


def test_value_errors_are_one_line_and_exit_status_2_of_a_real_process(tmp_path):
    """A real `python -m newllm.run` (the other tests here run its entry point in-process): the status the
    shell sees, and nothing else on stderr -- no warning, nothing printed at interpreter exit."""
    proc = run_cli([*TINY, f"hydra.run.dir={tmp_path / 'bad'}", f"paths.output_root={tmp_path / 'outputs'}",
                    "training.dist_reg_weight=1.5"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    expected = "error: training.dist_reg_weight=1.5 is not allowed: expected a number in [0, 1]"
    assert proc.stderr.splitlines() == [expected]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model/updater=residual", "model.hidden_dim=50"], "model.hidden_dim=50 is not allowed: expected "
         "model.context_dim + model.embed_dim = 56 with model/updater=residual (or null)"),
        # 2 blocks x (Linear(C+E -> C) + 3 gates Linear(C -> C) + LayerNorm) + embedding + head, by hand
        (["model.context_dim=100000"], "model.context_dim=100000, model.embed_dim=24, model.hidden_dim=null, "
         "model.layers=2, tokenizer.vocab_size=512 make a model of 80,057,212,848 parameters: training it needs "
         "1,280.9 GB"),
        (["training.phase1.lr=inf"], "training.phase1.lr=inf is not allowed: expected a finite number"),
        (["training.phase2.lr=inf"], "training.phase2.lr=inf is not allowed: expected a finite number"),
        (["model.init_std=inf"], "model.init_std=inf is not allowed: expected a finite number"),
        (["training.dist_reg_weight=nan"], "training.dist_reg_weight=nan is not allowed: expected a finite number"),
    ],
)
def test_errors_that_were_tracebacks_are_one_line(tiny_run, overrides, expected):
    """Each of these used to print a traceback (or fail after seconds of work): now exit 2, one line."""
    run_dir, proc = tiny_run("bad", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {expected}"), line
    assert not (run_dir / "tokenizer.json").exists()  # refused before the data was read


def test_schemas_are_not_offered_as_group_options(tmp_path):
    proc = run_in_process(["model=context_model_schema"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "MissingMandatoryValue" not in proc.stderr
    assert "Could not find 'model/context_model_schema'" in proc.stderr
    options = proc.stderr.split("Available options in 'model':")[1].split("Config search path")[0].split()
    files = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))  # the options, and only them
    assert options == files and {"gru", "layerwise", "sequential", "transformer", "llama", "mamba"} <= set(files)
    groups = run_in_process(["--help"], cwd=tmp_path).stdout
    assert "_schema" not in groups and f"model: {', '.join(files)}" in groups


def test_same_seed_same_metrics_different_seed_different_weights(tiny_run):
    a, _ = tiny_run("a")
    b, _ = tiny_run("b")
    c, _ = tiny_run("c", "seed=7")
    ma, mb = read_metrics(a), read_metrics(b)
    volatile = {"time/wall_s", "time/wall_s_this_process", "phase1/held_out_time_s", "phase1/train_time_s",
                "phase2/train_time_s", "phase1/token_iterations_per_s", "phase2/tokens_per_s", "phase2/time_to_best_s",
                "data/tokenizer_cache_hit", "data/tokens_cache_hit"}
    assert {k: v for k, v in ma.items() if k not in volatile} == {k: v for k, v in mb.items() if k not in volatile}
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    wc = torch.load(c / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["head.weight"], wc["head.weight"])
