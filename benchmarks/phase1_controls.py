"""The Phase-1 objective against its controls: a trained f and five fs that must score below it.

Not a speed benchmark: it measures what the held-out Phase-1 figures say about the trained default f
and the controls of newllm.training.controls (untrained, lr ~ 0, collapsed, memoryless, near-identity),
on the run's own data, config and seed, in one process:

    python benchmarks/phase1_controls.py                      # default config, seed 42
    python benchmarks/phase1_controls.py --seeds 1,2,3 -- training=quick data.num_conversations=300

Everything after `--` is a Hydra override, as on the newllm.run command line. Per model and seed it
prints and writes (benchmarks/results/phase1_controls.csv) the validation figures of
`evaluate_phase1` (convergence, memory, rank, probe and converged gain) and whether they would stop
Phase 1 as converged (`held_out_converged`). The trained f is the one `python -m newllm.run` trains
with the same config and seed (same data, same init, same Phase-1 sample).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from newllm import keys
from newllm.config import Phase1Config, instantiate, register_configs
from newllm.data import load_data, phase1_sample
from newllm.models import build_model
from newllm.run import prepare_config, seed_everything, typed
from newllm.training.controls import phase1_controls
from newllm.training.phase1 import evaluate_phase1, held_out_converged, held_out_ids, train_phase1

CONF = Path(__file__).resolve().parents[1] / "conf"
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["seed", "model", "converged_gain", "probe_gain", "probe_accuracy", "bigram_accuracy", "convergence_rate",
           "memory_length", "memory_length_capped", "effective_rank_ratio", "stops_as_converged", "stop_reason"]


def measure(overrides: list[str], seed: int) -> list[dict]:
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("config", overrides=[*overrides, f"seed={seed}"])
    prepare_config(cfg)
    seed_everything(cfg.seed)  # as newllm.run: seed, data, model -- the same initial f
    data = load_data(cfg.data, cfg.tokenizer, cfg.paths.cache_dir, min_tokens=cfg.training.phase2.seq_len + 1)
    p1 = typed(cfg.training.phase1, Phase1Config)
    ids, _ = phase1_sample(data, p1.max_tokens, cfg.data.split_seed)
    device = torch.device("cpu")
    reasons: dict[int, str] = {}

    def fresh() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, data.vocab_size)

    def train(model: torch.nn.Module, lr: float) -> None:
        p1.lr = lr
        result = train_phase1(model, ids, data.val_ids, p1, cfg.training.dist_reg_weight,
                               instantiate(cfg.training.diversity), device, progress=False)
        reasons[id(model)] = str(result.metrics[keys.P1_STOP_REASON])

    lr = p1.lr
    models = phase1_controls(fresh, train, lr)
    p1.lr = lr
    val = held_out_ids(data.val_ids, p1)
    rows = []
    for name, model in models.items():
        m = evaluate_phase1(model, val, p1)
        row = {"seed": seed, "model": name, **{k.removeprefix(keys.p1_held_out("val", "")): v for k, v in m.items()},
               "stops_as_converged": held_out_converged(m, p1), "stop_reason": reasons.get(id(model), "")}
        print(", ".join(f"{k}={row[k]:.3f}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in COLUMNS),
              flush=True)
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    ours, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42", help="comma-separated seeds (default 42, the config's)")
    p.add_argument("--out", type=Path, default=RESULTS / "phase1_controls.csv")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(ours)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    rows = [row for seed in args.seeds.split(",") for row in measure(overrides, int(seed))]
    table = pd.DataFrame(rows)[COLUMNS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = [list(table.columns), ["---"] * len(table.columns), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


if __name__ == "__main__":
    main(sys.argv[1:])
