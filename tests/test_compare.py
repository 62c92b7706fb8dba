"""Issue 17: seeds vary only the weights on one split, Phase 2 stops on its plateau (or its cap), and the
compare_models sweep + `python -m newllm.analyze compare` give one row per model."""

from __future__ import annotations

import copy
import json
import math
import re

import pandas as pd
import pytest
import torch

from newllm.data import TokenData
from newllm.training.phase2 import train_phase2
from tests.conftest import read_metrics, run_in_process
from tests.helpers_science import context_lm, phase2_cfg
from tests.test_phase2 import pattern_data

CPU = torch.device("cpu")
V = 16
MODELS = {"sequential", "layerwise", "gru", "transformer"}


def random_data(n_train: int = 320, n_val: int = 256) -> TokenData:
    """Random tokens: nothing generalises, so validation is best early and then plateaus or worsens."""
    g = torch.Generator().manual_seed(0)
    tr, va = torch.randint(0, V, (n_train,), generator=g), torch.randint(0, V, (n_val,), generator=g)
    return TokenData(tr, torch.ones_like(tr, dtype=torch.bool), va, torch.ones_like(va, dtype=torch.bool), None)


def cfg(**kw):
    return phase2_cfg(**{"seq_len": 16, "batch_size": 16, "lr": 3e-2, **kw})


# ----------------------------------------------------------------------------- split vs seed
@pytest.mark.slow
def test_seeds_share_one_split_and_differ_in_weights(tiny_run):
    runs = {s: tiny_run(f"seed{s}", f"seed={s}", "data.split_seed=5", "save_checkpoint=true")[0] for s in (1, 2)}
    m1, m2 = read_metrics(runs[1]), read_metrics(runs[2])
    data_keys = [k for k in m1 if k.startswith("data/") and not k.endswith(("cache_hit", "_s"))]
    assert "data/fingerprint" in data_keys and "data/train_tokens" in data_keys
    assert {k: m1[k] for k in data_keys} == {k: m2[k] for k in data_keys}  # same split, same token counts
    assert m1["data/split_seed"] == 5
    w1, w2 = (torch.load(runs[s] / "checkpoint.pt", weights_only=False)["model"] for s in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # the seed changed the initialisation
    assert m1["phase2/val_loss"] != m2["phase2/val_loss"]


# ----------------------------------------------------------------------------- stopping rule
@pytest.mark.usefixtures("one_thread")
def test_plateau_stops_early_and_restores_the_best_weights():
    r = train_phase2(context_lm("layerwise", vocab=V), random_data(), cfg(epochs=50, patience=2), CPU, seed=0,
                     progress=False)
    m = r.metrics
    assert m["phase2/stop_reason"] == "plateau"
    assert m["phase2/epochs"] < 50 and m["phase2/evaluations"] == m["phase2/epochs"] == len(r.history)
    # the last `patience` evaluations did not beat the best one, the one before them did
    assert m["phase2/best_evaluation"] == m["phase2/evaluations"] - 2
    losses = [row["phase2/val_loss"] for row in r.history]
    assert m["phase2/val_loss"] == min(losses) == losses[m["phase2/best_evaluation"] - 1]
    best = r.history[m["phase2/best_evaluation"] - 1]
    assert m["phase2/best_step"] == best["step"] and m["phase2/time_to_best_s"] == best["phase2/time_s"]


@pytest.mark.usefixtures("one_thread")
def test_the_cap_is_reported_when_it_ends_the_run():
    r = train_phase2(context_lm("layerwise", vocab=V), pattern_data(), cfg(epochs=2, lr=1e-2), CPU, seed=0,
                     progress=False)
    assert r.metrics["phase2/stop_reason"] == "cap" and r.metrics["phase2/epochs"] == 2
    # 1024 tokens -> 63 windows of 16 -> 4 batches of 16 per epoch
    assert r.metrics["phase2/steps"] == 8 and r.metrics["phase2/evaluations"] == 2


@pytest.mark.usefixtures("one_thread")
def test_eval_every_and_max_steps_count_steps_across_epochs():
    """4 steps per epoch, an evaluation every 3 steps, at most 7 steps: evaluations after steps 3, 6 and
    (the cap, mid-epoch 2) 7."""
    r = train_phase2(context_lm("layerwise", vocab=V), pattern_data(), cfg(epochs=50, eval_every=3, max_steps=7,
                     lr=1e-2), CPU, seed=0, progress=False)
    assert [(row["step"], row["epoch"], row["evaluation"]) for row in r.history] == [(3, 1, 1), (6, 2, 2), (7, 2, 3)]
    assert r.metrics["phase2/stop_reason"] == "cap" and r.metrics["phase2/steps"] == 7
    assert r.metrics["phase2/epochs"] == 2 and r.metrics["phase2/evaluations"] == 3


@pytest.mark.usefixtures("one_thread")
def test_min_delta_counts_small_gains_as_no_gain_but_keeps_the_best_weights():
    """min_delta = 10 nats: only the first evaluation (from inf) is a gain, so patience 2 stops after 3; the
    weights kept are still the lowest val loss of the 3."""
    r = train_phase2(context_lm("layerwise", vocab=V), pattern_data(), cfg(epochs=50, patience=2, min_delta=10.0,
                     lr=1e-2), CPU, seed=0, progress=False)
    losses = [row["phase2/val_loss"] for row in r.history]
    assert r.metrics["phase2/stop_reason"] == "plateau" and len(losses) == 3
    assert losses[2] < losses[0]  # it was still learning: the min_delta made it stop
    assert r.metrics["phase2/val_loss"] == min(losses)


@pytest.mark.usefixtures("one_thread")
def test_resume_from_an_epoch_checkpoint_with_mid_epoch_evaluations_is_exact():
    """eval_every=3 with 4 steps per epoch: the epoch-1 checkpoint holds the train statistics of step 4, not
    yet evaluated; continuing from it gives the uninterrupted run's numbers."""
    settings = cfg(epochs=3, eval_every=3, lr=1e-2, patience=50)
    torch.manual_seed(0)
    full = train_phase2(context_lm("layerwise", vocab=V), pattern_data(), settings, CPU, seed=0, progress=False)
    saved = {}

    def checkpoint(loop: dict) -> None:
        if loop["epoch"] == 1:
            saved.update(loop=copy.deepcopy(loop), model=copy.deepcopy(model.state_dict()))

    torch.manual_seed(0)
    model = context_lm("layerwise", vocab=V)
    train_phase2(model, pattern_data(), settings, CPU, seed=0, progress=False, checkpoint=checkpoint)
    assert saved["loop"]["running"][2] > 0  # step 4's tokens, counted for the next evaluation
    model = context_lm("layerwise", vocab=V)
    model.load_state_dict(saved["model"])
    resumed = train_phase2(model, pattern_data(), settings, CPU, seed=0, progress=False, state=saved["loop"])
    timing = ("phase2/train_time_s", "phase2/tokens_per_s", "phase2/time_to_best_s")
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == \
        {k: v for k, v in full.metrics.items() if k not in timing}
    assert [row["phase2/val_loss"] for row in resumed.history] == [row["phase2/val_loss"] for row in full.history]


# ----------------------------------------------------------------------------- the comparison table
@pytest.mark.slow
def test_compare_models_quick_end_to_end(compare_outputs):
    reruns = [json.loads(p.read_text()) for p in compare_outputs.rglob("rerun_best.json")]
    assert {r["label"] for r in reruns} == MODELS and all(r["seeds"] == [1, 2] for r in reruns)
    proc = run_in_process(["compare", str(compare_outputs)], cwd=compare_outputs, module="newllm.analyze")
    assert "test_ppl_minus_layerwise" in proc.stdout
    assert (compare_outputs / "analysis/compare_models.png").stat().st_size > 0 and "compare_models.png" in proc.stdout
    table = pd.read_csv(compare_outputs / "compare_models.csv")
    assert list(table.model) == ["layerwise", "gru", "sequential", "transformer"]  # reference first
    assert (table.seeds == 2).all() and (table.stopped_plateau + table.stopped_cap == 2).all()
    numbers = ["test_ppl/mean", "test_ppl/ci95", "core_params", "best_step/mean", "time_to_best_s/mean",
               "tuned/training.phase2.lr", "tuned/training.phase2.weight_decay"]
    assert table[numbers].map(math.isfinite).all().all()
    assert table["core_params"].between(9800, 10200).all()  # the same 10000 budget, within 2 %
    context = table.model.isin(["layerwise", "sequential"])
    assert table.loc[context, "tuned/training.dist_reg_weight"].notna().all()
    assert table.loc[~context, "tuned/training.dist_reg_weight"].isna().all()  # not a knob of the baselines
    diff = "test_ppl_minus_layerwise/mean"
    assert math.isnan(table.loc[0, diff]) and table.loc[1:, diff].map(math.isfinite).all()
    # each study its own sampler seed: the two context LMs (one space) no longer get the same proposal
    lr = table.set_index("model")["tuned/training.phase2.lr"]
    assert lr["layerwise"] != lr["sequential"] and lr["gru"] != lr["transformer"]
    costs = table.set_index("model")
    assert (costs.params == costs.embedding_params + costs.head_params + costs.core_params).all()
    assert costs.loc["transformer", "head_params"] == 0  # tied to the token embedding, as GPT-2
    assert (costs.loc[["layerwise", "sequential"], "phase1_flops/mean"] > 0).all()
    assert (costs.loc[["gru", "transformer"], "phase1_flops/mean"] == 0).all()
    assert (costs["train_flops/mean"] >= costs["phase2_flops/mean"]).all() and (costs["phase2_flops/mean"] > 0).all()
    # state per sequence: C for a context LM, L x C for the GRU, the KV cache at the window for the transformer
    width = {m: read_metrics(p.parent)["model/context_dim"] for m in MODELS
             for p in [next((compare_outputs / m / "reruns").glob("*/metrics.json"))]}
    assert costs.loc["layerwise", "state_floats"] == width["layerwise"]
    assert costs.loc["gru", "state_floats"] == 2 * width["gru"]
    assert costs.loc["transformer", "state_floats"] == 2 * 2 * 32 * width["transformer"]  # training=quick: T 32


@pytest.mark.slow
def test_the_sweeper_logs_each_study_with_its_own_trial_count(compare_outputs):
    log = (compare_outputs.parents[2] / "sweep.log").read_text()
    assert re.search(r"Study compare_models_quick_gru in \S+: 0 of 1 trials done", log)  # n_trials=1
    assert re.search(r"Study compare_models_quick_gru_reruns in \S+: 0 of 2 trials done", log)  # one per seed


@pytest.mark.slow
def test_compare_pairs_seeds_and_reruns_are_tagged(compare_outputs):
    from newllm.analysis.compare import compare_models, rerun_runs

    runs = rerun_runs(compare_outputs)
    assert sorted(runs.seed.unique()) == [1, 2] and runs.split_seed.nunique() == 1
    table = compare_models(compare_outputs).set_index("model")
    a = runs[runs.model == "gru"].set_index("seed")["phase2/test_ppl"]
    b = runs[runs.model == "layerwise"].set_index("seed")["phase2/test_ppl"]
    d = a - b  # by hand: mean and Student-t half-width of two paired differences (t_0.975,1 = 12.706)
    assert table.loc["gru", "test_ppl_minus_layerwise/mean"] == pytest.approx(d.mean())
    assert table.loc["gru", "test_ppl_minus_layerwise/ci95"] == pytest.approx(12.7062 * d.std(ddof=1) / 2 ** 0.5,
                                                                              rel=1e-4)
    import optuna

    study = optuna.load_study(study_name="compare_models_quick_gru_reruns",
                              storage=f"sqlite:///{compare_outputs.parents[1] / 'optuna.db'}")
    attrs = [t.user_attrs for t in study.trials]
    assert sorted(a["rerun_seed"] for a in attrs) == [1, 2] and {a["rerun_label"] for a in attrs} == {"gru"}
    assert all("phase2/test_ppl" in a for a in attrs)


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), [
    ("training.phase2.patience=0", "error: training.phase2.patience=0 is not allowed: expected a positive integer"),
    ("training.phase2.eval_every=-1", "error: training.phase2.eval_every=-1 is not allowed: expected an integer >= 0"),
    ("training.phase2.max_steps=0",
     "error: training.phase2.max_steps=0 is not allowed: expected null (no cap) or a positive integer"),
    ("training.phase2.min_delta=-0.1", "error: training.phase2.min_delta=-0.1 is not allowed: expected a number >= 0"),
])
def test_bad_stopping_settings_are_one_line_errors(tiny_run, override, expected):
    _, proc = tiny_run("bad", override, check=False)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")][0].startswith(expected)


def _rerun(root, label: str, seed: int, test_ppl, **costs) -> None:
    """What +sweep=compare_models leaves for one re-run: rerun_best.json beside a job folder with its files."""
    folder = root / label / "reruns"
    (folder / str(seed) / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / "rerun_best.json").write_text(json.dumps({"label": label, "rerun_study": label, "params": {}}))
    (folder / str(seed) / ".hydra" / "config.yaml").write_text(f"seed: {seed}\ndata:\n  split_seed: 0\n")
    metrics = {"phase2/test_ppl": test_ppl, "phase2/val_ppl": 10.0, "model/params_core": 1000,
               "phase2/stop_reason": "plateau", "phase2/best_step": 5, "phase2/time_to_best_s": 1.0, **costs}
    (folder / str(seed) / "metrics.json").write_text(json.dumps(metrics))


def test_a_diverged_rerun_is_a_number_in_the_table_not_a_string(tmp_path):
    """metrics.json writes a non-finite value as the string "nan"; compare reads runs as the runs table does,
    so a diverged seed makes that model's mean NaN (visible) instead of a TypeError or a string cell."""
    from newllm.analysis.compare import compare_models, rerun_runs

    for seed, (a, b) in enumerate([(12.0, 11.0), (13.0, "nan"), (14.0, 12.0)]):
        _rerun(tmp_path, "layerwise", seed, a)
        _rerun(tmp_path, "gru", seed, b)
    runs = rerun_runs(tmp_path)
    assert runs["phase2/test_ppl"].map(type).eq(float).all()
    table = compare_models(tmp_path).set_index("model")
    assert table.loc["layerwise", "test_ppl/mean"] == pytest.approx(13.0)
    assert math.isnan(table.loc["gru", "test_ppl/mean"])
    assert table.loc["gru", "test_ppl_minus_layerwise/mean"] == pytest.approx(-1.5)  # the seeds both finished


def test_the_table_shows_params_state_and_compute_per_model(tmp_path):
    """Parameters by part and state from metrics.json; training FLOPs are Phase 1 + Phase 2, averaged over seeds
    (a baseline has no Phase 1: 0); runs written before these metrics existed show NaN, not a KeyError."""
    from newllm.analysis.compare import compare_models

    parts = {"model/params": 5000, "model/params_embedding": 3000, "model/params_head": 1000, "model/state_floats": 64}
    for seed, flops in enumerate([100.0, 300.0]):
        _rerun(tmp_path, "layerwise", seed, 12.0, **parts, **{"phase1/train_flops": 50.0, "phase2/train_flops": flops})
        _rerun(tmp_path, "transformer", seed, 13.0, **{**parts, "model/params_head": 0, "model/state_floats": 4096,
                                                       "phase2/train_flops": 2 * flops})
        _rerun(tmp_path, "old", seed, 14.0)
    table = compare_models(tmp_path).set_index("model")
    lw, tf, old = table.loc["layerwise"], table.loc["transformer"], table.loc["old"]
    assert (lw["params"], lw["embedding_params"], lw["head_params"], lw["core_params"]) == (5000, 3000, 1000, 1000)
    assert (tf["head_params"], tf["state_floats"]) == (0, 4096)
    assert (lw["phase1_flops/mean"], lw["phase2_flops/mean"], lw["train_flops/mean"]) == (50.0, 200.0, 250.0)
    assert (tf["phase1_flops/mean"], tf["train_flops/mean"]) == (0.0, 400.0)
    assert math.isnan(old["train_flops/mean"]) and math.isnan(old["phase1_flops/mean"]) and old["core_params"] == 1000
