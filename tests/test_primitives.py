"""Primitives implemented once and shared: flatten, the weight init, the file writers, the ContextModel type."""

from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from newllm import analysis
from newllm.config import flatten
from newllm.models import ContextModel, ContextUpdate
from newllm.models.baselines import GRULM, TransformerLM
from newllm.models.context_lm import ContextLM
from newllm.models.updaters import GatedUpdater, ResidualUpdater
from newllm.models.weights import init_normal_
from newllm.training.solvers import sequential_pass, zeros_init

CONFIG = {"model": {"layers": 2, "updater": {"_target_": "g", "gates": [1, 2]}, "extra": {}},
          "data": {"files": ["a.txt", {"b": 1}], "name": "text"}, "seed": None}


def test_flatten_nested_dicts_to_dotted_keys_lists_kept_as_leaves():
    assert flatten(CONFIG) == {"model.layers": 2, "model.updater._target_": "g", "model.updater.gates": [1, 2],
                               "data.files": ["a.txt", {"b": 1}], "data.name": "text", "seed": None}
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": 1}
    assert flatten({}) == {}


def test_runs_table_config_cells_hold_lists_as_json(tmp_path: Path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    row = analysis.read_run(tmp_path)
    assert row["model.updater.gates"] == "[1, 2]" and row["data.files"] == '["a.txt", {"b": 1}]'
    assert row["model.layers"] == 2 and row["seed"] is None and "model.extra" not in row


def test_checkpoint_module_sits_below_tracking():
    """checkpoint.py writes through fileio, not tracking (arrows point down)."""
    from newllm.runtime import fileio

    for module in ("checkpoint", "fileio"):  # what they import, read from the source (no process needed)
        tree = ast.parse((Path(fileio.__file__).parent / f"{module}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "newllm.runtime.tracking" not in imported, module


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "sequential":
        return ContextLM(40, "sequential", 2, 24, 16, None, 0.1, 0.0, partial(GatedUpdater))
    if kind == "layerwise":
        return ContextLM(40, "layerwise", 2, 24, 16, None, 0.1, 0.0, partial(ResidualUpdater, layernorm_mix=1.0))
    if kind == "gru":
        return GRULM(40, 2, 24, 16, None, 0.05, 0.0)
    return TransformerLM(40, 2, 24, 16, None, 0.05, 0.0, heads=4, max_len=32)


# Seed 0, recorded before the two init copies (ContextLM._init_weights, baselines._init_normal) became
# init_normal_: sum |w| over all parameters, then embedding[0, 0], head[0, 0] and a core weight [0, 0].
INIT_PINS = {
    "sequential": (330.46863421254375, "blocks.0.fnn.0.weight", (0.00132786, -0.00210148, 0.0883783)),
    "layerwise": (380.04562417072293, "blocks.0.fnn.0.weight", (-0.01493104, -0.02391453, 0.0456514)),
    "gru": (750.3619597523375, "rnn.weight_hh_l0", (0.03853565, 0.00270689, 0.16242789)),
    # re-pinned when the transformer became nanoGPT's GPT (issue 24: tied head, so head[0, 0] = embedding[0, 0])
    "transformer": (669.6283328244003, "decoder.layers.0.linear1.weight", (-0.03185289, -0.03185289, -0.00836134)),
}


@pytest.mark.parametrize("kind", list(INIT_PINS))
def test_initial_weights_of_a_seed_are_pinned(kind):
    mass, core, values = INIT_PINS[kind]
    sd = _model(kind).state_dict()
    assert float(sum(t.double().abs().sum() for t in sd.values())) == pytest.approx(mass, rel=1e-9)
    firsts = (sd["embedding.weight"][0, 0], sd["head.weight"][0, 0], sd[core].flatten()[0])
    assert [float(v) for v in firsts] == pytest.approx(values, abs=1e-8)


def test_init_normal_std_by_prefix_and_zero_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(500, 64), nn.Linear(64, 64), nn.LayerNorm(64))
    nn.init.normal_(net[1].bias)
    init_normal_(net, 0.02, {"1": 0.3})
    assert net[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert net[1].weight.std().item() == pytest.approx(0.3, rel=0.05)
    assert not net[1].bias.any() and (net[2].weight == 1).all()  # LayerNorm keeps its own init


class ToyMap:
    """The least a solver needs: f(c, x) and context_dim."""

    context_dim = 3

    def update(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(c + x[..., :3])


@pytest.mark.parametrize("kind", list(INIT_PINS))
def test_context_models_are_told_apart_by_their_interface(kind):
    model = _model(kind)
    assert isinstance(model, ContextModel) == (kind in ("sequential", "layerwise"))
    assert isinstance(model, ContextUpdate) == (kind in ("sequential", "layerwise"))


def test_solvers_take_the_state_size_from_the_context_update():
    toy, x = ToyMap(), torch.randn(2, 5, 4)
    assert isinstance(toy, ContextUpdate) and not isinstance(toy, ContextModel)
    assert zeros_init(toy, x).shape == (2, 5, 3) and sequential_pass(toy, x).shape == (2, 5, 3)
    with pytest.raises(TypeError, match="update\\(c, x\\) and context_dim"):
        zeros_init(lambda c, t: c, x)
