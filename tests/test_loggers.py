"""Experiment trackers: what a run logged, read back with each tracker's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from newllm.config import register_configs
from tests.conftest import REPO, TINY, read_metrics, run_in_process

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def composed_loggers(*overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=list(overrides))
    return {name: node["_target_"].rsplit(".", 1)[1] for name, node in cfg.logger.items()}


def test_logger_groups_compose_one_or_several():
    assert composed_loggers() == {"csv": "CSVLogger"}
    assert composed_loggers("logger=tensorboard") == {"tensorboard": "TensorBoardLogger"}
    assert composed_loggers("logger=[csv,mlflow]") == {"csv": "CSVLogger", "mlflow": "MLflowLogger"}
    assert composed_loggers("logger=many") == {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger",
                                               "mlflow": "MLflowLogger"}


@pytest.mark.slow
def test_many_loggers_record_metrics_params_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, outputs = tmp_path / "run", tmp_path / "outputs"
    run_in_process([*TINY, "logger=many", "data.num_conversations=150", "training.phase1.max_tokens=256",
                    "training.phase2.epochs=2", "training.phase2.patience=2", "training.phase2.max_steps_per_epoch=3",
                    "training.phase2.seq_len=16", "training.phase2.batch_size=8", "training.phase2.max_val_tokens=256",
                    f"hydra.run.dir={run_dir}", f"paths.output_root={outputs}"], cwd=tmp_path)
    history = pd.read_csv(run_dir / "history.csv")
    phase1 = history[history["phase"] == "phase1"]
    phase2 = history[history["phase"] == "phase2"]
    final = read_metrics(run_dir)

    # TensorBoard: event files in the run dir, read by TensorBoard's own accumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    losses = events.Scalars("phase1/cvfp_loss")
    assert [e.step for e in losses] == phase1["step"].tolist()
    assert [e.value for e in losses] == pytest.approx(phase1["phase1/cvfp_loss"].tolist(), rel=1e-6)
    assert [e.value for e in events.Scalars("phase2/val_ppl")] == pytest.approx(phase2["phase2/val_ppl"].tolist())
    (image,) = events.Images("curves")
    assert image.width > 100 and image.height > 100
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| model.context_dim | 32 |" in config_text
    metrics_text = events.Tensors("metrics.json/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(metrics_text.strip("`\n"))["phase2/val_ppl"] == final["phase2/val_ppl"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hparams.session_start_info.hparams["model.context_dim"].number_value == 32
    assert hparams.session_start_info.hparams["training.diversity._target_"].string_value.endswith("Deviation")
    (ppl,) = events.Scalars("final/phase2/val_ppl")
    assert ppl.value == pytest.approx(final["phase2/val_ppl"])

    # MLflow: the default local SQLite store under outputs/, read by MLflow's client
    client = MlflowClient(f"sqlite:///{outputs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("newllm").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.context_dim"] == "32" and run.data.params["seed"] == "42"
    assert run.data.metrics["final/phase2/val_ppl"] == pytest.approx(final["phase2/val_ppl"])
    p1 = client.get_metric_history(run.info.run_id, "phase1/train_step_stability")
    assert [m.step for m in p1] == phase1["step"].tolist()
    assert [m.value for m in p1] == pytest.approx(phase1["phase1/train_step_stability"].tolist())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"curves.png", "metrics.json"}
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == final
