"""Parameter budgets: model.core_params solves the width so every architecture and baseline has the
same core parameter count (within 2 %)."""

from __future__ import annotations

import re

import pytest
import torch

from newllm.errors import ConfigError
from newllm.models import build_model, count_parameters
from newllm.models.sizing import compose_model, solve_core_params
from tests.conftest import read_metrics

MODELS = [["model=sequential"], ["model=layerwise"], ["model=sequential", "model/updater=residual"],
          ["model=layerwise", "model/updater=residual"], ["model=gru"], ["model=transformer"]]


def core(model_cfg) -> int:
    return count_parameters(build_model(model_cfg, 50))["params_core"]  # a real model, not the meta one


@pytest.mark.parametrize("overrides", MODELS, ids=lambda o: "+".join(x.split("=")[1] for x in o))
@pytest.mark.parametrize(("layers", "budget"), [(1, 40_000), (4, 150_000)])
def test_every_model_meets_the_budget_within_2_percent(overrides, layers, budget):
    model_cfg, _ = compose_model([*overrides, f"model.layers={layers}", f"model.core_params={budget}"])
    solved = solve_core_params(model_cfg, budget)
    assert abs(core(solved) - budget) <= 0.02 * budget
    assert solved.embed_dim == model_cfg.embed_dim and solved.layers == layers
    if "heads" in solved:
        assert solved.context_dim % solved.heads == 0


def test_core_params_do_not_depend_on_the_vocabulary():
    model_cfg, _ = compose_model(["model=layerwise"])
    counts = {v: count_parameters(build_model(model_cfg, v)) for v in (50, 5000)}
    assert counts[50]["params_core"] == counts[5000]["params_core"]
    assert counts[50]["params"] != counts[5000]["params"]


def test_an_explicit_hidden_dim_keeps_its_ratio_to_the_width():
    model_cfg, _ = compose_model(["model=layerwise", "model.hidden_dim=256"])  # 2 x context_dim=128
    solved = solve_core_params(model_cfg, 400_000)
    assert solved.hidden_dim == round(2 * solved.context_dim) and abs(core(solved) - 400_000) <= 8_000


def test_sequential_and_layerwise_at_one_budget_differ_in_width_not_size():
    """At equal (layers, context_dim) layer-wise has 1.65x the core parameters at L=2, C=128."""
    sizes = {}
    for arch in ("sequential", "layerwise"):
        plain, _ = compose_model([f"model={arch}"])
        sizes[arch] = core(plain), solve_core_params(plain, 150_000)
    assert sizes["layerwise"][0] / sizes["sequential"][0] == pytest.approx(1.65, abs=0.01)
    (_, seq), (_, lw) = sizes["sequential"], sizes["layerwise"]
    assert seq.context_dim > lw.context_dim and abs(core(seq) - core(lw)) <= 0.04 * 150_000


@pytest.mark.parametrize("budget", [100, 10**9])
def test_an_unreachable_budget_is_one_line(budget):
    model_cfg, _ = compose_model(["model=gru"])
    with pytest.raises(ConfigError) as e:
        solve_core_params(model_cfg, budget)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.core_params={budget} is not allowed for this model")


@pytest.mark.slow
def test_a_run_with_a_budget_records_the_width_it_chose(tiny_run, tmp_path):
    run_dir, _ = tiny_run("budget", "model=sequential", "model.core_params=20000", "training.phase1.max_iterations=2",
                          "training.phase2.max_steps_per_epoch=2", "save_contexts=false")
    m = read_metrics(run_dir)
    assert m["model/core_params_budget"] == 20000 and abs(m["model/params_core"] - 20000) <= 400
    assert m["model/context_dim"] != 32  # TINY's context_dim=32 is replaced by the solved width
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]["model"]
    assert saved["context_dim"] == m["model/context_dim"] and saved["core_params"] == 20000
    from newllm import analysis

    row = analysis.load_runs(run_dir.parent, cache=False).iloc[0]
    assert row["model.context_dim"] == m["model/context_dim"]  # the table shows the width that ran

    _, proc = tiny_run("too_small", "model.core_params=50", f"paths.output_root={tmp_path / 'fresh'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: " + solve_error(["model.core_params=50", "model.context_dim=32", "model.embed_dim=24"], 50)]
    assert not (tmp_path / "fresh" / "cache").exists()  # refused before any data was read


def solve_error(overrides: list[str], budget: int) -> str:
    model_cfg, _ = compose_model(overrides)
    with pytest.raises(ConfigError) as e:
        solve_core_params(model_cfg, budget)
    return str(e.value)


def test_budget_value_is_checked():
    from hydra import compose, initialize_config_dir

    from newllm.config import validate
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf")):
        expected = "model.core_params=-5 is not allowed: expected null (no budget) or a positive integer"
        with pytest.raises(ConfigError, match=re.escape(expected)):
            validate(compose("config", ["model.core_params=-5"]))
        assert compose("config", []).model.core_params is None  # off by default


@pytest.mark.parametrize(("args", "says"), [
    (["model=layerwise", "--baseline", "model=nonexistent"],
     "Could not find 'model/nonexistent' Available options in 'model': gru layerwise llama mamba mamba2 "
     "recurrent_gemma rwkv sequential transformer xlstm"),
    (["model.architecture=magic", "--baseline", "model=gru"],
     "Invalid value 'magic', expected one of [sequential, layerwise]"),
    (["model.nokey=3", "--baseline", "model=gru"], "Key 'nokey' not in 'ContextModelConfig'"),
    (["model.context_dim=-5", "--baseline", "model=gru"], "model.context_dim=-5 is not allowed"),
])
def test_sizing_cli_refuses_bad_overrides_in_one_line(args, says, capsys):
    """python -m newllm.models.sizing: the error contract of newllm.run (one stderr line naming the bad value,
    exit 2), not a traceback from deep inside the model build."""
    from newllm.models.sizing import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and says in err, err
    assert err.count("\n") == 1


def test_sizing_cli_prints_the_matched_width(capsys):
    from newllm.models.sizing import main

    main(["model=layerwise", "--baseline", "model=gru"])
    out = capsys.readouterr().out
    reference = int(out.split("params_core=")[1].split()[0])
    width = int(out.split("override: model.context_dim=")[1].split()[0])
    gru, _ = compose_model(["model=gru", f"model.context_dim={width}"])
    assert abs(core(gru) - reference) <= 0.02 * reference
