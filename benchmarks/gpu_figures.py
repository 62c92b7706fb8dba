"""The key figure of each benchmarks/gpu_check.sh step, as one short line (what its summary table shows).

    python benchmarks/gpu_figures.py env                  # python, torch, CUDA, GPU
    python benchmarks/gpu_figures.py run RUN_DIR          # a newllm run: wall time, Phase-1/2 speed, val ppl
    python benchmarks/gpu_figures.py pytest LOG           # pytest's closing counts
    python benchmarks/gpu_figures.py csv FILE KIND        # phase1 | phase2 | memory: the headline of a bench CSV
    python benchmarks/gpu_figures.py study STORAGE_URL    # an Optuna study: trials by state, best value

Never raises: a figure that cannot be read is printed as `?` plus the reason, since the step's status
(from its exit code) is what says whether it worked.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def env() -> str:
    import platform

    import torch

    gpu = "no CUDA"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    # TF32 as torch leaves it: full fp32 matmuls, but cuDNN (the GRU baseline) may use TF32 (its default)
    tf32 = f"tf32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}"
    return (f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, {gpu}, {tf32}")


def run(run_dir: str) -> str:
    m = json.loads((Path(run_dir) / "metrics.json").read_text())

    def num(key: str, fmt: str) -> str:
        value = m.get(key)
        return format(float(value), fmt) if value is not None else "-"

    return (f"{m.get('device')}: wall {num('time/wall_s', '.0f')} s, "
            f"phase1 {num('phase1/token_iterations_per_s', '.3g')} tok-it/s, "
            f"phase2 {num('phase2/tokens_per_s', '.3g')} tok/s, val ppl {num('phase2/val_ppl', '.2f')}")


def pytest_counts(log: str) -> str:
    lines = [ln for ln in Path(log).read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary line"


def csv(path: str, kind: str) -> str:
    import pandas as pd

    df = pd.read_csv(path)
    if kind == "phase1":
        best = df.loc[df["parallel_tok_it_s"].idxmax()]
        return (f"{best['parallel_tok_it_s']:.3g} tok-it/s at C={best['C']} N={best['N']}, matmul efficiency "
                f"{best['efficiency']:.2f}, {len(df)} cases")
    if kind == "phase2":
        rows = {r["model"]: r for _, r in df[df["C"] == df["C"].max()].iterrows()}
        return ", ".join(f"{k} {r['tok_s']:.3g}" for k, r in rows.items()) + f" tok/s (C={df['C'].max()})"
    if kind == "memory":
        longest = df[df["N"] == df["N"].max()]
        return ", ".join(f"{r['model']} {r['peak_mb']:.0f} MB" for _, r in longest.iterrows()) + \
            f" peak at N={df['N'].max()}"
    raise ValueError(f"kind {kind!r}: phase1, phase2 or memory")


def study(storage: str) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parts = []
    for summary in optuna.get_all_study_summaries(storage):
        trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
        states: dict[str, int] = {}
        for t in trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        best = summary.best_trial.values if summary.best_trial is not None else None
        parts.append(f"{summary.study_name}: {', '.join(f'{n} {s}' for s, n in states.items())}; best {best}")
    return "; ".join(parts) or "no study in the storage"


def main() -> None:
    what, *args = sys.argv[1:]
    figures = {"env": env, "run": run, "pytest": pytest_counts, "csv": csv, "study": study}
    try:
        print(figures[what](*args))
    except Exception as err:  # noqa: BLE001 -- a figure is a courtesy; the step's exit code is the verdict
        print(f"? ({type(err).__name__}: {str(err)[:80]})")


if __name__ == "__main__":
    main()
