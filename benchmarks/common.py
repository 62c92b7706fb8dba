"""Shared benchmark helpers: interleaved timing, the machine's matmul rate, FLOP counts, tables/CSV.

Timings are medians over repetitions that alternate between the compared implementations in one
process, so a change in machine load hits all of them alike. Every table records the date, the
load average and the thread count beside the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from newllm.runtime.fileio import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced grid (minutes on a busy 2-core CPU)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per case (median reported)")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/<name>.csv)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is steadier on a CPU shared with other jobs)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return device_of(args.device)


def ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def device_of(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    return timed_value(fn, device)[0]


def timed_value(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds, return value) of fn(), synchronised with the device around it."""
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def interleaved(cases: dict[str, Callable[[], float | None]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per case over `reps` rounds, each round running every case once in turn.

    A case may return its own measured seconds (e.g. per iteration); otherwise its wall time counts.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            wall, own = timed_value(fn, device)
            times[name].append(own if isinstance(own, float) else wall)
    return {name: statistics.median(v) for name, v in times.items()}


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def train_flops(shapes: list[tuple[int, int]], rows: int) -> float:
    """Forward + backward FLOPs of the Linear layers for `rows` positions: 2 (fwd) + 4 (grad in, grad W) per MAC.

    Elementwise work (gates, LayerNorm, ReLU) is not counted: the floor is the matmuls alone.
    """
    return 6.0 * rows * sum(i * o for i, o in shapes)


def matmul_seconds(shapes: list[tuple[int, int]], rows: int, device: torch.device, reps: int = 3) -> float:
    """Median time of the forward and both backward matmuls of these Linear shapes at `rows` rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    mats = [(torch.randn(rows, i, generator=g).to(device), torch.randn(i, o, generator=g).to(device),
             torch.randn(rows, o, generator=g).to(device)) for i, o in shapes]

    def run() -> None:
        for x, w, gy in mats:
            x @ w  # forward
            gy @ w.T  # grad input
            x.T @ gy  # grad weight

    run()  # warm-up
    return statistics.median(timed(run, device) for _ in range(reps))


def context_header(device: torch.device) -> dict[str, object]:
    load1, load5, _ = os.getloadavg()
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "load1": round(load1, 2),
            "load5": round(load5, 2), "threads": torch.get_num_threads(), "device": str(device),
            "torch": torch.__version__}


def report(rows: list[dict], name: str, device: torch.device, out: Path | None, columns: list[str]) -> pd.DataFrame:
    """Print a compact table (with date/load) and write every column to CSV (temp file + rename)."""
    header = context_header(device)
    df = pd.DataFrame(rows)
    for k, v in header.items():
        df[k] = v
    path = out or RESULTS / f"{name}.csv"
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df[[c for c in columns if c in df]].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"wrote {path}")
    return df
