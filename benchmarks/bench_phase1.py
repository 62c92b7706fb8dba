"""Phase 1 speed: the parallel Jacobi sweeps of newllm against a naive per-token loop, and the floor.

    python -m benchmarks.bench_phase1 --quick
    python -m benchmarks.bench_phase1 --dims 256 --layers 2 --tokens 10000,100000

For each (context_dim C, layers L, stream length N), same model (layer-wise, gated, E=96,
random init, seed 0), same random token stream, one stream, objective = CVFP MSE only (w = 0):
- parallel: newllm's train_phase1 (init=zeros, so only sweeps are timed), seconds per iteration;
- naive: the same objective with a Python loop over positions, one f call per token (graph kept,
  one backward, one Adam step). When a full naive iteration would exceed --naive-budget seconds it
  runs on a prefix of the stream and its per-token rate is used (`naive_tokens` says how many:
  the cost per token does not depend on N, but this is an extrapolation);
- matmul floor: the forward and both backward matmuls of the model's Linear shapes at the same
  rows, timed in the same run: the machine's practical limit for the FLOPs an iteration must do;
- pass 0 (the sequential no-grad pass), measured (or on a prefix, same rule as naive);
- pass 0 also against its bandwidth floor: every token reads each matrix it multiplies by once (f's weights
  less the hoisted x-part; read rate measured in the same run), against its matvecs alone at BLAS's rate
  (pass0_matvec_s: the part no loop overhead explains), and stepped through `update` (pass0_stepwise_s);
- `--whole C:L:N[:updater[:E]]` runs the complete train_phase1 (init=sequential, pass 0 included, --iterations
  sweeps) and compares it with the floor. `--inits` compares init=sequential|zeros|chunked|burn_in on real
  data (chatterbot, default objective) for time, convergence and effective rank.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import torch
from omegaconf import OmegaConf

from benchmarks.common import (
    interleaved,
    ints,
    linear_shapes,
    matmul_seconds,
    parser,
    report,
    setup,
    timed,
    timed_value,
    train_flops,
)
from newllm.config import DataConfig, Phase1Config, TokenizerConfig
from newllm.models.context_lm import ContextLM
from newllm.models.updaters import GatedUpdater, ResidualUpdater
from newllm.training.diversity import FrobeniusDeviation, NoDiversity
from newllm.training.phase1 import train_phase1
from newllm.training.solvers import sequential_pass, shifted_inputs

VOCAB, EMBED = 4096, 96
MATMUL_ROWS = 2048  # rows of the reference matmuls: large enough for the peak rate, small enough to be quick


def make_model(c: int, layers: int, device: torch.device, seed: int = 0, vocab: int = VOCAB,
               updater: str = "gated", embed: int = EMBED) -> ContextLM:
    torch.manual_seed(seed)
    upd = functools.partial(GatedUpdater) if updater == "gated" else functools.partial(ResidualUpdater)
    return ContextLM(vocab, "layerwise", layers, c, embed, None, 0.02, 0.0, upd).to(device)


def parse_whole(spec: str) -> tuple[int, int, int, str, int]:
    """C:L:N[:updater[:E]] -> (C, L, N, updater, E); e.g. 768:6:6400:residual:768."""
    parts = spec.split(":")
    if not 3 <= len(parts) <= 5 or (len(parts) > 3 and parts[3] not in ("gated", "residual")):
        raise SystemExit(f"--whole {spec!r} is not allowed: expected C:L:N[:gated|residual[:E]]")
    c, layers, n = (int(float(v)) for v in parts[:3])
    return c, layers, n, parts[3] if len(parts) > 3 else "gated", int(parts[4]) if len(parts) > 4 else EMBED


def pass0_matrices(model: ContextLM) -> list[torch.Tensor]:
    """The matrices one pass-0 token multiplies by, as the recurrence holds them: each block's context part of
    its first Linear (all of it where x is not hoisted), its further fnn Linears, the gated updater's three gates
    stacked. The hoisted x-part is read once per pass, not per token, so it is not here."""
    mats = []
    for block, hoisted, (w_c, gates) in zip(model.blocks, model._hoistable(), model._context_weights(), strict=True):
        first, *rest = [m for m in block.fnn if isinstance(m, torch.nn.Linear)]
        mats.append(w_c if hoisted else first.weight.t().contiguous())
        mats += [m.weight.t().contiguous() for m in rest]
        if gates is not None:
            mats.append(gates[0])
    return mats


def weight_read_seconds(model: ContextLM, tokens: int, device: torch.device) -> tuple[float, float]:
    """Bandwidth floor of a per-token loop: each token must read every matrix of pass0_matrices once.

    Returns (floor seconds for `tokens` tokens, GB/s), from timing a sum over a buffer of that many bytes,
    repeated, in this run: the machine's rate for reading them from wherever they live (cache for small
    models, DRAM for large ones).
    """
    n_bytes = sum(w.numel() * w.element_size() for w in pass0_matrices(model))
    buf = torch.ones(n_bytes // 4, device=device)
    reps = max(1, min(2000, int(2e9 // n_bytes)))
    seconds = timed(lambda: [buf.sum() for _ in range(reps)], device) / reps
    return tokens * seconds, n_bytes / seconds / 1e9


def matvec_seconds(model: ContextLM, tokens: int, device: torch.device, reps: int = 200) -> float:
    """What pass 0 would take if nothing but its matrix-vector products cost time: one token's
    addmm(bias, (1, in), (in, out)) for every matrix of pass0_matrices, at this run's BLAS rate, x tokens."""
    mats = pass0_matrices(model)
    vecs = [(torch.randn(1, w.shape[0], device=device), torch.randn(1, w.shape[1], device=device)) for w in mats]

    def run() -> None:
        for _ in range(reps):
            for (v, bias), w in zip(vecs, mats, strict=True):
                torch.addmm(bias, v, w)

    run()  # warm-up
    return tokens * statistics.median(timed(run, device) for _ in range(3)) / reps


def phase1_cfg(n: int, iterations: int, **kw) -> object:
    base = dict(max_tokens=n, max_iterations=iterations, min_iterations=iterations, convergence_target=1.0,
                convergence_threshold=1e-30, erank_every=10**9, erank_samples=256, val_iterations=1,
                val_every=10**9, memory_cap=1)
    return OmegaConf.structured(Phase1Config(**{**base, **kw}))


def parallel_seconds_per_iteration(model: ContextLM, ids: torch.Tensor, iterations: int,
                                   device: torch.device) -> float:
    """Median seconds of one train_phase1 iteration (init=zeros: no pass 0 in the timed loop)."""
    res = train_phase1(model, ids, ids[:64], phase1_cfg(ids.numel(), iterations, init="zeros"), 0.0,
                       NoDiversity(), device, progress=False)
    t = [0.0] + [row["phase1/time_s"] for row in res.history]
    return sorted(b - a for a, b in zip(t, t[1:], strict=False))[len(t[1:]) // 2]


def naive_iteration(model: ContextLM, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """The reference: the same CVFP step with a Python loop over positions, one f call per token."""
    x = model.embed(ids.unsqueeze(0))
    with torch.no_grad():
        p = torch.zeros(1, ids.numel(), model.context_dim, device=ids.device)
        c_in = shifted_inputs(p)
    optimizer.zero_grad(set_to_none=True)
    loss = x.new_zeros(())
    for t in range(ids.numel()):
        c = model.update(c_in[:, t], x[:, t])
        loss = loss + (c - p[:, t]).pow(2).mean()
    (loss / ids.numel()).backward()
    torch.nn.utils.clip_grad_norm_(model.updater_parameters(), 1.0)
    optimizer.step()


def prefix_for_budget(per_token_s: float, n: int, budget_s: float) -> int:
    return max(64, min(n, int(budget_s / max(per_token_s, 1e-9))))


def bench_case(c: int, layers: int, n: int, args, device: torch.device) -> dict:
    model = make_model(c, layers, device)
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.Adam(model.updater_parameters(), lr=1e-3)
    shapes = linear_shapes(model.blocks)
    flops = train_flops(shapes, n)
    rows = min(n, MATMUL_ROWS)

    calib = timed(lambda: naive_iteration(model, ids[:64], opt), device) / 64
    m = prefix_for_budget(calib, n, args.naive_budget)
    x = model.embed(ids.unsqueeze(0)).detach()
    calib0 = timed(lambda: sequential_pass(model, x[:, :64]), device) / 64
    m0 = prefix_for_budget(calib0, n, args.naive_budget)
    read_floor, read_gbs = weight_read_seconds(model, n, device)
    iters = max(2, min(args.iterations, math.ceil(2e10 / flops)))  # fewer sweeps for the big cases
    med = interleaved({
        "naive": lambda: naive_iteration(model, ids[:m], opt),
        "parallel": lambda: parallel_seconds_per_iteration(model, ids, iters, device),
        "pass0": lambda: sequential_pass(model, x[:, :m0], recurrence=model.recurrence),
        "pass0_stepwise": lambda: sequential_pass(model, x[:, :m0]),  # f called token by token
        "matmul": lambda: matmul_seconds(shapes, rows, device),  # the reference, interleaved like the rest
        "matvec": lambda: matvec_seconds(model, n, device),  # pass 0's matvecs alone, at BLAS's rate
    }, args.reps, device)
    mm_rate = train_flops(shapes, rows) / med["matmul"]
    naive_tok_s, par_tok_s = m / med["naive"], n / med["parallel"]
    return {"C": c, "L": layers, "N": n, "naive_tokens": m, "naive_tok_it_s": naive_tok_s,
            "parallel_tok_it_s": par_tok_s, "speedup": par_tok_s / naive_tok_s,
            "sweep_s": med["parallel"], "gflop_per_it": flops / 1e9,
            "achieved_gflops": flops / med["parallel"] / 1e9, "matmul_gflops": mm_rate / 1e9,
            "efficiency": flops / med["parallel"] / mm_rate, "pass0_tokens": m0,
            "pass0_s": med["pass0"] * n / m0, "pass0_stepwise_s": med["pass0_stepwise"] * n / m0,
            "pass0_read_floor_s": read_floor, "weight_read_gbs": read_gbs,
            "pass0_of_read_floor": read_floor / (med["pass0"] * n / m0), "pass0_matvec_s": med["matvec"],
            "pass0_of_matvec": med["matvec"] / (med["pass0"] * n / m0), "sweeps_timed": iters}


def whole_run(spec: str, args, device: torch.device) -> dict:
    """Complete train_phase1 (pass 0 + `--iterations` sweeps + final metrics) against the matmul floor."""
    c, layers, n, updater, embed = parse_whole(spec)
    model = make_model(c, layers, device, updater=updater, embed=embed)
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    shapes = linear_shapes(model.blocks)
    rows = min(n, MATMUL_ROWS)

    def mm_rate() -> float:
        return train_flops(shapes, rows) / matmul_seconds(shapes, rows, device)

    # The reference is re-measured around every run (a shared CPU's rate drifts); the median is the floor.
    rates, runs = [mm_rate()], []
    for init in args.whole_inits.split(","):
        wall, res = timed_value(lambda init=init: train_phase1(
            make_model(c, layers, device, updater=updater, embed=embed), ids, ids[:64],
            phase1_cfg(n, args.iterations, init=init), 0.0,
            NoDiversity(), device, progress=False), device)
        runs.append((init, wall, res.metrics["phase1/train_time_s"]))
        rates.append(mm_rate())
    rate = sorted(rates)[len(rates) // 2]
    floor = args.iterations * train_flops(shapes, n) / rate
    return [{"C": c, "L": layers, "N": n, "updater": updater, "E": embed, "init": init,
             "iterations": args.iterations, "whole_s": wall,
             "sweeps_s": sweeps, "pass0_and_metrics_s": wall - sweeps, "matmul_gflops": rate / 1e9,
             "matmul_gflops_range": f"{min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f}", "floor_s": floor,
             "whole_over_floor": wall / floor, "sweep_efficiency": floor / sweeps} for init, wall, sweeps in runs]


def init_comparison(args, device: torch.device) -> list[dict]:
    """init=sequential|zeros|chunked|burn_in on real data with the default objective: same fixed point, other start."""
    from newllm.data import load_data

    data = load_data(OmegaConf.structured(DataConfig()), OmegaConf.structured(TokenizerConfig()),
                     "outputs/cache", 42)
    n = min(args.init_tokens, data.train_ids.numel())
    rows = []
    for init in ("sequential", "zeros", "chunked", "burn_in"):
        model = make_model(64 if args.quick else 256, 2, device, vocab=data.vocab_size)
        cfg = OmegaConf.structured(Phase1Config(max_tokens=n, max_iterations=args.init_iterations, init=init,
                                                erank_every=10**9))
        t0 = time.perf_counter()
        res = train_phase1(model, data.train_ids, data.val_ids, cfg, 0.5, FrobeniusDeviation().to(device), device,
                           progress=False)
        wall = time.perf_counter() - t0
        m = res.metrics
        rows.append({"init": init, "C": model.context_dim, "L": len(model.blocks), "N": n, "wall_s": wall,
                     "sweeps_s": m["phase1/train_time_s"], "iterations": m["phase1/iterations"],
                     "train_step_stability": m["phase1/train_step_stability"], "residual": m["phase1/residual"],
                     "erank": m["phase1/effective_rank"], "erank_ratio": m["phase1/effective_rank_ratio"],
                     "val_convergence": m["phase1/val_convergence_rate"]})
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dims", type=ints, default=None, help="context_dim list (default 64,256,768)")
    p.add_argument("--layers", type=ints, default=None, help="layers list (default 2,6)")
    p.add_argument("--tokens", type=ints, default=None, help="stream lengths (default 1000,10000,100000)")
    p.add_argument("--iterations", type=int, default=10, help="sweeps per timed run")
    p.add_argument("--naive-budget", type=float, default=10.0, help="seconds a naive/pass-0 case may take")
    p.add_argument("--whole", default=None,
                   help="C:L:N[:gated|residual[:E]] specs for the whole-run check (default 256:2:100000)")
    p.add_argument("--whole-inits", default="sequential,chunked")
    p.add_argument("--inits", action="store_true", help="also compare training.phase1.init on real data")
    p.add_argument("--init-tokens", type=int, default=16384)
    p.add_argument("--init-iterations", type=int, default=40)
    args = p.parse_args()
    device = setup(args)
    q = args.quick
    dims = args.dims or ([64, 256] if q else [64, 256, 768])
    layers = args.layers or ([2] if q else [2, 6])
    tokens = args.tokens or ([1000, 10000] if q else [1000, 10000, 100000])
    whole = args.whole if args.whole is not None else ("256:2:10000" if q else "256:2:100000")

    rows = [bench_case(c, lay, n, args, device) for c in dims for lay in layers for n in tokens]
    report(rows, "phase1_speed", device, args.out, ["C", "L", "N", "naive_tokens", "naive_tok_it_s",
           "parallel_tok_it_s", "speedup", "sweep_s", "gflop_per_it", "achieved_gflops", "matmul_gflops",
           "efficiency", "pass0_s", "pass0_stepwise_s", "pass0_read_floor_s", "pass0_of_read_floor", "weight_read_gbs",
           "pass0_matvec_s", "pass0_of_matvec", "pass0_tokens"])
    if whole:
        rows = [r for spec in whole.split(",") for r in whole_run(spec, args, device)]
        report(rows, "phase1_whole", device, None, ["C", "L", "N", "updater", "E", "init", "iterations", "whole_s",
               "sweeps_s", "pass0_and_metrics_s", "matmul_gflops", "matmul_gflops_range", "floor_s", "whole_over_floor",
               "sweep_efficiency"])
    if args.inits:
        report(init_comparison(args, device), "phase1_inits", device, None, ["init", "C", "L", "N", "wall_s",
               "sweeps_s", "iterations", "train_step_stability", "residual", "erank", "erank_ratio", "val_convergence"])


if __name__ == "__main__":
    main()
