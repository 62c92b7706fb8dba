"""The run lifecycle: typed loop states, and the one place that saves and restores them.

A loop state is everything a phase carries from one iteration (Phase 1) or epoch (Phase 2) to the
next. `save()` turns it into a checkpoint payload -- tensors, numbers, strings and containers, so
`torch.load(weights_only=True)` reads it -- and `restore()` puts one back, RNG included: a resumed
run continues bit-identically. `RunLifecycle` owns the run's resume file (checkpoints/last.pt): the
stage it is in, the model, the metrics and history so far, and the wall time of earlier processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from newllm.config import retyped, to_container
from newllm.keys import PHASE1, PHASE2
from newllm.runtime import checkpoint as ckpt
from newllm.runtime.fileio import remove_stale_temps

log = logging.getLogger("newllm")


class Stateful(Protocol):  # the stopping rule of Phase 2 (phase2.Plateau)
    def state(self) -> dict: ...
    def load(self, state: dict) -> None: ...


@dataclass
class LoopState:
    """A loop's clock: `elapsed_s` seconds from earlier processes of this run, plus this one's since start_clock."""

    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def start_clock(self) -> None:
        self._t0 = time.perf_counter() - self.elapsed_s

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


@dataclass
class Phase1State(LoopState):
    """Phase 1 after `iteration` sweeps: the contexts P, the optimizer and the regulariser's running state."""

    optimizer: torch.optim.Optimizer | None = None
    diversity: torch.nn.Module | None = None
    contexts: torch.Tensor | None = None
    iteration: int = 0
    measuring_s: float = 0.0  # of elapsed, the time spent on held-out measurement

    def save(self) -> dict:
        return {"iteration": self.iteration, "elapsed_s": self.elapsed(), "measuring_s": self.measuring_s,
                "contexts": self.contexts, "optimizer": self.optimizer.state_dict(),
                "diversity": ckpt.module_state(self.diversity), "history": self.history, "rng": ckpt.rng_state()}

    def restore(self, saved: dict, device: torch.device) -> None:
        self.iteration, self.contexts = saved["iteration"], saved["contexts"].to(device)
        self.optimizer.load_state_dict(saved["optimizer"])
        ckpt.load_module_state(self.diversity, saved["diversity"], device)
        self.history = list(saved["history"])
        self.elapsed_s, self.measuring_s = saved.get("elapsed_s", 0.0), saved.get("measuring_s", 0.0)
        ckpt.set_rng_state(saved["rng"])


@dataclass
class TrainTally:
    """Training CE sum, correct top-1 and token count since the last evaluation, the sum of the steps' losses,
    and how many steps. The sums stay on the training device, added to at every step without a host sync;
    `read()` brings them over once (at an evaluation or a checkpoint)."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    steps: int = 0

    def add(self, token_sums: torch.Tensor, loss: torch.Tensor) -> None:
        """token_sums: metrics.masked_token_sums of the step; loss: its total loss (non-finite taints the sum)."""
        step = torch.cat([token_sums, loss.detach().double().view(1)])
        self.sums = self.sums.to(step.device) + step
        self.steps += 1

    def read(self) -> tuple[float, int, int, float]:
        """(CE sum, correct, tokens, sum of the steps' total losses): the one sync."""
        ce, correct, count, loss = self.sums.tolist()
        return ce, int(correct), int(count), loss

    @classmethod
    def restore(cls, running: list, steps: int) -> TrainTally:
        return cls(torch.tensor([float(v) for v in running], dtype=torch.float64), steps)


@dataclass
class Phase2State(LoopState):
    """Phase 2 after `epoch` whole epochs and `step` optimizer steps."""

    optimizer: torch.optim.Optimizer | None = None
    generator: torch.Generator | None = None  # the batch order
    stop: Stateful | None = None
    decoder: torch.nn.Module | None = None  # the reconstruction decoder, when trained
    epoch: int = 0
    step: int = 0
    n_seen: int = 0
    tally: TrainTally = field(default_factory=TrainTally)

    def save(self) -> dict:
        return {"epoch": self.epoch, "elapsed_s": self.elapsed(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "decoder": self.decoder.state_dict() if self.decoder is not None else None,
                "history": self.history, "stop": self.stop.state(), "step": self.step, "n_seen": self.n_seen,
                "running": list(self.tally.read()), "running_steps": self.tally.steps, "rng": ckpt.rng_state()}

    def restore(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.decoder is not None:
            self.decoder.load_state_dict(saved["decoder"])
        self.generator.set_state(saved["generator"])
        self.history = list(saved["history"])
        self.stop.load(saved["stop"])
        self.epoch, self.step, self.n_seen = saved["epoch"], saved["step"], saved["n_seen"]
        self.tally = TrainTally.restore(saved["running"], saved["running_steps"])
        self.elapsed_s = saved.get("elapsed_s", 0.0)
        ckpt.set_rng_state(saved["rng"])


class RunLifecycle:
    """Where a run is (stage), what it resumes from, and its resume checkpoint.

    `open(cfg, run_dir)` handles resume=<run dir>: that run's own config (device and progress may
    change) and its last checkpoint. The run calls `restore` once its model exists, `checkpointer(stage)`
    for each phase's periodic saves, `enter_phase2` at the phase boundary and `close` at the end.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, resumed: dict | None) -> None:
        self.cfg, self.run_dir, self.resumed = cfg, run_dir, resumed
        self.stage = resumed["stage"] if resumed is not None else PHASE1
        self.wall_before = resumed.get("wall_s", 0.0) if resumed is not None else 0.0
        self.t_start = time.perf_counter()
        self.model: torch.nn.Module | None = None
        self.metrics: dict = {}
        self.history: list[dict] = []

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: str | Path) -> RunLifecycle:
        if not cfg.get("resume"):
            return cls(cfg, Path(run_dir), None)
        stored, resumed = ckpt.resume_config(cfg.resume)
        stored = retyped(stored)
        stored.device, stored.progress, stored.resume = cfg.device, cfg.progress, None
        # A kill mid-write left its temp file (checkpoints/.last.pt.<hex>.tmp); this process now holds the folder.
        for stale in remove_stale_temps(cfg.resume):
            log.info("removed %s, a temp file of a write the interrupted run did not finish", stale)
        return cls(stored, Path(cfg.resume), resumed)

    def restore(self, model: torch.nn.Module, metrics: dict, history: list[dict]) -> None:
        """Bind the run's model, metrics and history (kept by reference); on resume, fill them back in."""
        self.model, self.metrics, self.history = model, metrics, history
        if self.resumed is not None:
            history[:] = list(self.resumed["history"])
            model.load_state_dict(self.resumed["model"])
            metrics.update(self.resumed["metrics"])
            log.info("resuming %s from %s", self.stage, self.run_dir / ckpt.RESUME_FILE)

    def loop_state(self, stage: str) -> dict | None:
        """The saved loop state to continue `stage` from, or None to start it fresh."""
        if self.resumed is None or self.stage != stage:
            return None
        return self.resumed["loop"]

    def checkpointer(self, stage: str) -> Callable[[dict], None]:
        return lambda loop: self.save(stage, loop)

    def save(self, stage: str, loop: dict | None) -> None:
        ckpt.save(self.run_dir / ckpt.RESUME_FILE, "resume", {
            "stage": stage, "loop": loop, "config": to_container(self.cfg), "model": self.model.state_dict(),
            "metrics": ckpt.primitive(self.metrics), "history": self.history, "rng": ckpt.rng_state(),
            "wall_s": self.wall_s()})

    def enter_phase2(self) -> None:
        """The phase boundary: checkpoint the start of Phase 2, or -- resuming a run killed before Phase 2's
        first checkpoint -- restore the RNG state it had there."""
        if self.stage == PHASE1:
            self.save(PHASE2, None)
            self.stage, self.resumed = PHASE2, None  # a resumed Phase-1 loop state is spent
        elif self.resumed is not None and self.resumed["loop"] is None:
            ckpt.set_rng_state(self.resumed["rng"])

    def this_process_s(self) -> float:
        return time.perf_counter() - self.t_start

    def wall_s(self) -> float:
        return self.wall_before + self.this_process_s()

    def close(self) -> None:
        (self.run_dir / ckpt.RESUME_FILE).unlink(missing_ok=True)  # finished: nothing left to resume


def final_payload(model: torch.nn.Module, cfg: DictConfig, vocab_size: int, metrics: dict[str, Any]) -> dict:
    """checkpoint.pt: the final model, its config, and its scalar metrics."""
    return {"model": model.state_dict(), "config": to_container(cfg), "vocab_size": vocab_size,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}
