"""Run lifecycle: a SIGKILLed run resumes to the same metrics; Phase 1 reused by from_run; bad checkpoints."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer

from newllm.errors import ConfigError
from newllm.runtime import checkpoint as ckpt
from newllm.runtime.rundirs import check_resume_overrides
from tests.conftest import TINY, cli_env, read_metrics, run_cli, run_in_process, tree

# Small enough for seconds per run, long enough to be interrupted in both phases: Phase 1 runs all
# 8 iterations (checkpoint every 2), Phase 2 runs 3 epochs (checkpoint every epoch). Noise and
# dropout make the RNG state part of what a resume must restore.
LIFECYCLE = [*TINY, "data.num_conversations=150", "training.phase1.max_tokens=256",
             "training.phase1.val_iterations=2", "training.phase1.max_iterations=8",
             "training.phase1.min_iterations=8", "training.phase1.checkpoint_every=2",
             "training.phase1.context_noise=0.01", "training.phase2.epochs=3", "training.phase2.patience=3",
             "training.phase2.max_steps_per_epoch=3", "training.phase2.seq_len=16",
             "training.phase2.batch_size=8", "training.phase2.max_val_tokens=256", "model.dropout=0.1"]
VOLATILE = {"time/wall_s", "time/wall_s_this_process", "phase1/held_out_time_s", "phase1/train_time_s",
            "phase2/train_time_s", "phase1/token_iterations_per_s", "phase2/tokens_per_s", "phase2/time_to_best_s"}

# The real CLI, killed with SIGKILL by itself right after it logs row (phase, step): no cleanup runs.
# Optionally it first pauses PAUSE_S seconds after row (pause phase, pause step): slow work that a
# checkpoint taken after it must count in the run's total time.
KILLER = """
import os, runpy, signal, sys, time
import newllm.runtime.tracking as t
phase, step, pause_phase, pause_step = map(int, sys.argv[1:5])
pause_s = float(sys.argv[5])
log = t.RunTracker.log
def at(row, phase, step):
    return row.get("phase") == f"phase{phase}" and row.get("step" if phase == 1 else "epoch") == step
def log_then_die(self, row):
    log(self, row)
    if at(row, pause_phase, pause_step):
        time.sleep(pause_s)
    if at(row, phase, step):
        os.kill(os.getpid(), signal.SIGKILL)
t.RunTracker.log = log_then_die
sys.argv = ["newllm.run", *sys.argv[6:]]
runpy.run_module("newllm.run", run_name="__main__")
"""
PAUSE_S = 3.0


def killed_run(args: list[str], cwd: Path, phase: int, step: int, pause: tuple[int, int] = (0, 0)) -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-c", KILLER, str(phase), str(step), *map(str, pause), str(PAUSE_S),
                           *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}\n{proc.stderr[-3000:]}"


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE and not k.endswith("cache_hit")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run: the numbers every resumed or reused run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    run_cli([*LIFECYCLE, f"hydra.run.dir={root / 'run'}", f"paths.output_root={root / 'outputs'}"], cwd=root)
    return root / "run"


@pytest.fixture(scope="module")
def resumed(reference, tmp_path_factory) -> Path:
    """The reference run killed in Phase 1, resumed, killed in Phase 2, resumed to the end. Before each
    checkpoint it resumed from, it paused PAUSE_S seconds (Phase-1 iteration 3, Phase-2 epoch 1)."""
    tmp = tmp_path_factory.mktemp("resumed")
    run_dir = tmp / "run"  # the same outputs/ (tokenizer cache) as the reference: metrics name its path
    args = [*LIFECYCLE, f"hydra.run.dir={run_dir}", f"paths.output_root={reference.parent / 'outputs'}"]
    killed_run(args, tmp, phase=1, step=5, pause=(1, 3))  # last checkpoint: iteration 4
    state = ckpt.load(run_dir / ckpt.RESUME_FILE, "resume")
    assert (state["stage"], state["loop"]["iteration"]) == ("phase1", 4)
    assert not (run_dir / "metrics.json").exists()

    # resume= alone: the run continues in its own dir (no new run dir), and is killed again mid-Phase 2
    killed_run([f"resume={run_dir}", "progress=false"], tmp, phase=2, step=2, pause=(2, 1))  # ckpt: epoch 1
    state = ckpt.load(run_dir / ckpt.RESUME_FILE, "resume")
    assert (state["stage"], state["loop"]["epoch"]) == ("phase2", 1)
    run_cli([f"resume={run_dir}"], cwd=tmp)
    assert not (tmp / "outputs" / "runs").exists() and (run_dir / ".hydra" / "resume" / "config.yaml").is_file()
    return run_dir


@pytest.mark.slow
def test_killed_in_both_phases_resumes_to_identical_metrics(reference, resumed):
    run_dir = resumed
    assert not (run_dir / ckpt.RESUME_FILE).exists()  # finished: nothing left to resume
    got, want = read_metrics(run_dir), read_metrics(reference)
    assert stable(got) == stable(want)
    assert (run_dir / "history.csv").read_text().count("\n") == (reference / "history.csv").read_text().count("\n")
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_resumed_run_reports_total_times_and_rates(resumed):
    """Times and rates count every process up to the checkpoints it resumed from, not just the last one."""
    m = read_metrics(resumed)
    assert m["phase1/train_time_s"] >= PAUSE_S  # paused in the first process, before checkpoint 4
    assert m["phase2/train_time_s"] >= PAUSE_S  # paused in the second process, before epoch 1's checkpoint
    assert m["time/wall_s"] >= m["time/wall_s_this_process"] + 2 * PAUSE_S
    assert m["phase2/tokens_per_s"] == pytest.approx(m["phase2/tokens_seen"] / m["phase2/train_time_s"])
    iterations = m["phase1/tokens"] * m["phase1/iterations"]
    assert m["phase1/token_iterations_per_s"] == pytest.approx(iterations / m["phase1/train_time_s"])
    history = pd.read_csv(resumed / "history.csv")
    for phase in (1, 2):  # elapsed time per row keeps growing across the resumes
        times = history[history["phase"] == f"phase{phase}"][f"phase{phase}/time_s"]
        assert times.is_monotonic_increasing and times.iloc[-1] >= PAUSE_S


@pytest.mark.slow
def test_resume_refuses_finished_runs_and_other_overrides(reference, tmp_path):
    proc = run_in_process([f"resume={reference}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: resume={str(reference)!r}: that run already finished" in proc.stderr
    check_resume_overrides(["resume=x", "device=cpu", "progress=false", "hydra.run.dir=y"])  # allowed
    with pytest.raises(ConfigError, match=r"drop the overrides \['training.phase2.lr=0.1'\]"):
        check_resume_overrides(["resume=x", "training.phase2.lr=0.1"])


@pytest.mark.slow
def test_resume_refusals_write_nothing(reference, tmp_path):
    """A path that does not exist, a folder that is not a run, a finished run: one line, exit 2, and
    every folder exactly as it was (no .hydra/resume, no run.log, no created path)."""
    missing = tmp_path / "does" / "not" / "exist"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a run")
    cases = [(missing, "is not a run directory"), (stranger, "is not a run directory"),
             (reference, "that run already finished")]
    for target, message in cases:
        before = tree(tmp_path), tree(reference)
        proc = run_in_process([f"resume={target}"], cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: resume={str(target)!r}") and message in line, line
        assert (tree(tmp_path), tree(reference)) == before, target
    assert not (tmp_path / "does").exists()


@pytest.mark.slow
def test_a_run_that_is_still_running_is_not_resumed(reference, tmp_path):
    """resume= of a run whose process is alive is refused (its folder is locked while it runs); once
    that process is gone (SIGKILL), the same resume continues it to the reference's numbers."""
    import subprocess

    run_dir = tmp_path / "run"
    args = [*LIFECYCLE, f"hydra.run.dir={run_dir}", f"paths.output_root={reference.parent / 'outputs'}"]
    # never killed by itself (phase 0); paused 10 min after Phase-1 iteration 3, its checkpoint 2 written
    running = subprocess.Popen([sys.executable, "-c", KILLER, "0", "0", "1", "3", "600", *args], cwd=tmp_path,
                               env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (run_dir / ckpt.RESUME_FILE).is_file() or running.poll() is not None:
                break
            time.sleep(0.5)
        assert running.poll() is None and (run_dir / ckpt.RESUME_FILE).is_file()
        proc = run_cli([f"resume={run_dir}"], cwd=tmp_path, check=False)
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line == (f"error: resume={str(run_dir)!r}: that run is still running (another process holds its "
                        "folder); resume it once that process has ended")
        assert not (run_dir / ".hydra" / "resume").exists()
    finally:
        running.kill()
        running.wait()
    run_cli([f"resume={run_dir}"], cwd=tmp_path)
    assert stable(read_metrics(run_dir)) == stable(read_metrics(reference))


@pytest.mark.slow
def test_from_run_skips_phase1_reuses_its_weights_and_caches_fixed_contexts(reference, tmp_path):
    args = [*LIFECYCLE, f"training.phase1.from_run={reference}", "training.phase2.context=fixed",
            f"paths.output_root={tmp_path / 'outputs'}"]
    run_dir = tmp_path / "p2"
    run_in_process([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    got, want = read_metrics(run_dir), read_metrics(reference)
    assert got["phase1/from_run"] == str(reference / ckpt.PHASE1_FILE)
    assert "phase1/cvfp_loss" not in (run_dir / "history.csv").read_text()  # no Phase-1 iteration ran
    for key in ("phase1/train_step_stability", "phase1/effective_rank", "phase1/val_convergence_rate"):
        assert got[key] == want[key]
    # f frozen in fixed mode: the final f is exactly the reference's Phase-1 f; the head was trained anew
    p1 = torch.load(reference / ckpt.PHASE1_FILE, weights_only=True)["model"]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], p1[k]) for k in p1 if not k.startswith("head."))
    assert not torch.equal(final["head.weight"], p1["head.weight"])

    # the fixed-mode contexts were cached next to the Phase-1 checkpoint, and a second run reuses them
    cached = sorted((reference / "checkpoints").glob("phase1_contexts-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_in_process([*args, f"hydra.run.dir={tmp_path / 'b'}", "training.phase2.lr=0.01"], cwd=tmp_path)
    assert sorted((reference / "checkpoints").glob("phase1_contexts-*.pt")) == cached
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    contexts = ckpt.load(cached[0], "contexts")["contexts"]
    assert contexts.shape[-1] == 32 and torch.isfinite(contexts).all()
    assert read_metrics(tmp_path / "b")["phase2/val_ppl"] != read_metrics(run_dir)["phase2/val_ppl"]


@pytest.mark.slow
def test_from_run_names_the_differing_model_keys(reference):
    state = torch.load(reference / ckpt.PHASE1_FILE, weights_only=True)
    model = {**state["config"]["model"], "context_dim": 48, "layers": 3}
    tokenizer = Tokenizer.from_file(str(reference / "tokenizer.json"))
    with pytest.raises(ckpt.CheckpointError, match="model config differs") as err:
        ckpt.load_phase1(reference, model, tokenizer)
    assert "model.context_dim: 32 there, 48 here" in str(err.value)
    assert "model.layers: 2 there, 3 here" in str(err.value)
    assert ckpt.load_phase1(reference, state["config"]["model"], tokenizer)["kind"] == "phase1"
    other = Tokenizer.from_str(tokenizer.to_str())
    other.add_special_tokens(["<|extra|>"])
    with pytest.raises(ckpt.CheckpointError, match="different tokenizer"):
        ckpt.load_phase1(reference, state["config"]["model"], other)


@pytest.mark.slow
def test_truncated_and_foreign_checkpoints_are_one_clear_error(reference, tmp_path):
    good = (reference / ckpt.PHASE1_FILE).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a newllm checkpoint"):
        ckpt.load(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": ckpt.FORMAT, "version": 1, "obj": ValueError("arbitrary object")}, pickled)
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load(pickled)  # weights_only=True refuses arbitrary objects
    with pytest.raises(ckpt.CheckpointError, match="'final' checkpoint"):
        ckpt.load_phase1(reference / "checkpoint.pt", {}, None)
    # killed before its first checkpoint: resume starts over with the config Hydra saved at the start
    (tmp_path / "early" / ".hydra").mkdir(parents=True)
    (tmp_path / "early" / ".hydra" / "config.yaml").write_text((reference / ".hydra" / "config.yaml").read_text())
    cfg, state = ckpt.resume_config(tmp_path / "early")
    assert state is None and cfg.training.phase1.checkpoint_every == 2
    # through the CLI: a run whose resume checkpoint was cut short -> one line, exit 2, no traceback
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / ckpt.RESUME_FILE).write_bytes(good[:1000])
    before = tree(tmp_path / "run")
    proc = run_in_process([f"resume={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "last.pt is not a readable checkpoint (truncated or foreign file" in line
    assert tree(tmp_path / "run") == before  # refused before Hydra wrote .hydra/resume or run.log


def test_fixed_context_cache_key_holds_shape_dtype_and_precision():
    """tensor_hash of a (2, 64) equalled that of a (4, 32) with the same bytes, and bf16 contexts shared
    a cache entry with fp32 ones."""
    x = torch.arange(128, dtype=torch.int64)
    assert ckpt.tensor_hash(x.reshape(2, 64)) != ckpt.tensor_hash(x.reshape(4, 32))
    assert ckpt.tensor_hash(x.float()) != ckpt.tensor_hash(x.float().view(torch.int32))  # same bytes, other dtype
    assert ckpt.tensor_hash(x.reshape(2, 64)) == ckpt.tensor_hash(x.reshape(2, 64).clone())
    w = [torch.ones(3, 3)]
    keys = {ckpt.contexts_key(x.reshape(2, 64), w, "fp32"), ckpt.contexts_key(x.reshape(4, 32), w, "fp32"),
            ckpt.contexts_key(x.reshape(2, 64), w, "bf16"), ckpt.contexts_key(x.reshape(2, 64), [2 * w[0]], "fp32")}
    assert len(keys) == 4


def test_phase1_resumed_from_a_checkpoint_file_continues_bit_identically_on_the_device(device, tmp_path):
    """The loop state through a real checkpoint file (loaded to the CPU, as resume does) on --device: context
    noise and dropout draw from the device's generator, EMAVariance keeps a running mean outside its buffers,
    Adam its moments. Iterations 4-5 after a restore equal those of a run that never stopped, to the bit."""
    from functools import partial

    from newllm.models.context_lm import ContextLM
    from newllm.models.updaters import GatedUpdater
    from newllm.training.diversity import EMAVariance
    from newllm.training.phase1 import Phase1Loop, phase1_ids
    from tests.helpers_science import phase1_cfg

    cfg = phase1_cfg(max_tokens=256, max_iterations=6, min_iterations=6, val_every=1000, erank_every=1000,
                     checkpoint_every=0, context_noise=0.01, erank_samples=64, chunk_size=100)
    ids = torch.randint(0, 40, (256,), generator=torch.Generator().manual_seed(0))

    def loop(saved: dict | None = None) -> Phase1Loop:
        torch.manual_seed(0)
        model = ContextLM(40, "layerwise", 2, 24, 16, None, 0.1, 0.1, partial(GatedUpdater)).to(device)
        if saved is not None:
            model.load_state_dict(saved["model"])
        return Phase1Loop(model, phase1_ids(ids, cfg).to(device), phase1_ids(ids[:128], cfg).to(device), cfg,
                          0.3, EMAVariance(momentum=0.5).to(device), None if saved is None else saved["loop"])

    def rows(lp: Phase1Loop, ks) -> list[dict]:
        return [{k: v for k, v in lp.step(k)[0].items() if k != "phase1/time_s"} for k in ks]

    reference = rows(loop(), range(1, 6))
    first = loop()
    assert rows(first, range(1, 4)) == reference[:3]
    ckpt.save(tmp_path / "last.pt", "resume", {"loop": first.state.save(), "model": first.model.state_dict()})
    torch.manual_seed(1234)  # whatever ran in between: the restore must set every generator back
    resumed = loop(ckpt.load(tmp_path / "last.pt", "resume"))
    assert resumed.state.diversity.running_mean.device.type == device.type  # was left on the CPU
    assert rows(resumed, range(4, 6)) == reference[3:]
