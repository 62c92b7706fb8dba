"""What a run leaves behind: metrics.json, history.csv, curves.png, checkpoint.pt, and loggers.

`RunTracker.log(row)` is the single place per-iteration/epoch rows go through: it keeps the
history, forwards rows to the configured experiment loggers and to report hooks (a sweeper's
pruning callback registers one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from newllm import keys
from newllm.config import instantiate
from newllm.runtime.fileio import atomic_write, save_json, save_text

ROW_IDS = (keys.HISTORY_PHASE, keys.HISTORY_STEP)  # which row a history entry is, not a measurement


class CSVLogger:
    """history.csv is always written by RunTracker; this logger adds nothing else."""

    def __init__(self, run_dir: str | Path | None = None) -> None:
        self.run_dir = run_dir

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def close(self) -> None: ...


def _param_value(value: Any) -> str | int | float | bool:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


class TensorBoardLogger:
    """Event files under <run dir>/<subdir>: scalars, the config (HParams plugin + a text table),
    curves.png as an image and metrics.json as text. `tensorboard --logdir outputs` shows every run."""

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))
        self.params: dict = {}
        self.final: dict[str, float] = {}

    def log_params(self, params: dict) -> None:
        self.params = {k: _param_value(v) for k, v in params.items()}
        table = "\n".join(f"| {k} | {v} |" for k, v in self.params.items())
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.final.update({k: v for k, v in metrics.items() if k.startswith("final/")})

    def log_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.suffix == ".png":
            import matplotlib.image

            self.writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], 0, dataformats="HWC")
        else:
            self.writer.add_text(path.name, "```\n" + path.read_text() + "\n```", 0)

    def close(self) -> None:
        if self.params:  # HParams plugin: this run's config against its final/* scalars (already written)
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(self.params, self.final):
                self.writer.file_writer.add_summary(summary)
        self.writer.close()


class MLflowLogger:
    """One MLflow run per newllm run: params (flattened config), metrics with steps, and artifacts.

    Default store: a local SQLite file under outputs/ (MLflow 3 refuses the old `file:` store unless
    MLFLOW_ALLOW_FILE_STORE=true); any tracking URI works. A resumed run logs into the same MLflow run.
    """

    def __init__(self, run_dir: str | Path, tracking_uri: str, experiment_name: str = "newllm",
                 artifact_location: str | None = None, run_name: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        id_file = Path(run_dir) / ".mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_location
            if location and "://" not in location:
                location = Path(location).resolve().as_uri()
            try:
                experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
            except Exception:  # noqa: BLE001 -- a parallel job created it first
                experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name or Path(run_dir).name,
                                     tags={"newllm.run_dir": str(Path(run_dir).resolve())})
        self.run_id = run.info.run_id
        save_text(id_file, self.run_id)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class RunTracker:
    def __init__(self, run_dir: Path, logger_cfg: DictConfig | dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.hooks: list[Callable[[dict], None]] = []
        self.loggers = [instantiate(c, run_dir=str(self.run_dir))
                        for c in (logger_cfg or {}).values() if c is not None]

    def log(self, row: dict) -> None:
        self.history.append(row)
        step = int(row.get(keys.HISTORY_STEP, len(self.history)))
        numeric = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k not in ROW_IDS}
        for lg in self.loggers:
            lg.log_metrics(numeric, step)
        for hook in self.hooks:
            hook(row)

    def log_params(self, params: dict) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def write_history(self) -> Path:
        path = self.run_dir / "history.csv"
        atomic_write(path, lambda tmp: pd.DataFrame(self.history).to_csv(tmp, index=False))
        return path

    def finish(self, metrics: dict) -> None:
        save_json(self.run_dir / "metrics.json", metrics)
        self.write_history()
        curves = plot_curves(self.history, self.run_dir / "curves.png")
        for lg in self.loggers:
            # under final/: the history's own keys (phase2/val_ppl per epoch...) keep clean curves
            lg.log_metrics({f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
            for artifact in (self.run_dir / "metrics.json", curves):
                lg.log_artifact(artifact)
            lg.close()


def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss, convergence, effective rank (Phase 1) and perplexity (Phase 2) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [
        ("Phase 1 loss", [keys.P1_CVFP_LOSS, keys.P1_DIVERSITY_LOSS], keys.PHASE1),
        ("Phase 1 convergence", [keys.P1_VAL_CONVERGENCE_RATE, keys.P1_VAL_CONVERGED_GAIN,
                                 keys.P1_TRAIN_STEP_STABILITY], keys.PHASE1),
        ("Phase 1 effective rank", [keys.P1_EFFECTIVE_RANK], keys.PHASE1),
        ("Phase 2 perplexity", [keys.P2_TRAIN_PPL, keys.P2_VAL_PPL], keys.PHASE2),
    ]
    for ax, (title, cols, phase) in zip(axes, panels, strict=True):
        part = df[df[keys.HISTORY_PHASE] == phase] if keys.HISTORY_PHASE in df else df.iloc[0:0]
        for col in cols:
            if col in part and part[col].notna().any():
                s = part[[keys.HISTORY_STEP, col]].dropna()
                ax.plot(s[keys.HISTORY_STEP], s[col], marker="." if len(s) < 30 else None, label=col.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("iteration" if phase == keys.PHASE1 else "step")
        if ax.lines:
            ax.legend(fontsize=8)
        if phase == keys.PHASE2 and ax.lines:
            ax.set_yscale("log")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
