"""Phase 2 speed: training tokens/s of the context model (propagate: sequential loop or Jacobi
sweeps; fixed contexts) against torch.nn.GRU of the same hidden size and the transformer baseline, and
with --kinds the transformers families (llama, mamba, mamba2, rwkv, recurrent_gemma, xlstm: the library's
backbone + newllm's head, at the model knobs' defaults: heads 4, state_size 16, expand 2, conv_kernel 4).

    python -m benchmarks.bench_phase2 --quick
    python -m benchmarks.bench_phase2 --dims 256 --layers 2 --batch 32 --seq-len 64
    python -m benchmarks.bench_phase2 --kinds \
        context/propagate,context/fixed,gru,transformer,llama,mamba,mamba2,rwkv,recurrent_gemma,xlstm

Same vocab (4096), embed_dim (96; the transformers families embed at C), layers, hidden size C, batch and
window for every model (so not matched parameters: a width is what these rows hold equal); one
training step = forward, masked CE, backward, grad clip, AdamW step, exactly as train_phase2 does
(contexts from newllm.training.phase2.train_contexts_window). `fixed` trains the head on contexts
computed once by f; that one-off cost is reported separately (`setup_tok_s`: no-grad contexts/s).
Medians over interleaved repetitions of --steps steps each.
"""

from __future__ import annotations

import functools

import torch
from omegaconf import OmegaConf

from benchmarks.common import interleaved, ints, parser, report, setup, timed_value
from newllm.config import Phase2Config
from newllm.metrics import masked_cross_entropy
from newllm.models.baselines import GRULM, TransformerLM
from newllm.models.context_lm import ContextLM
from newllm.models.hf_baselines import FAMILIES, HFLM
from newllm.models.updaters import GatedUpdater
from newllm.training.phase2 import contexts_of, train_contexts_window

VOCAB, EMBED = 4096, 96


def build(kind: str, c: int, layers: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gru":
        return GRULM(VOCAB, layers, c, EMBED, None, 0.02, 0.0).to(device)
    if kind == "transformer":
        return TransformerLM(VOCAB, layers, c, EMBED, None, 0.02, 0.0, heads=4).to(device)
    if kind in FAMILIES:
        return HFLM(VOCAB, kind, layers, c, EMBED, heads=4).to(device)
    return ContextLM(VOCAB, "layerwise", layers, c, EMBED, None, 0.02, 0.0,
                     functools.partial(GatedUpdater)).to(device)


def stepper(kind: str, c: int, layers: int, batch: int, seq_len: int, steps: int, jacobi_tol: float,
            device: torch.device):
    """A closure running `steps` training steps of one model; returns it and the one-off setup seconds."""
    model = build(kind.split("/")[0], c, layers, device)
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, VOCAB, (steps, batch, seq_len + 1), generator=g).to(device)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    cfg = OmegaConf.structured(Phase2Config(solver="jacobi" if kind.endswith("jacobi") else "sequential",
                                            jacobi_tol=jacobi_tol, seq_len=seq_len, batch_size=batch))
    setup_s, fixed = 0.0, None
    if kind == "context/fixed":
        for p in model.updater_parameters():
            p.requires_grad_(False)
        flat = windows[:, :, :-1].reshape(-1, seq_len)
        setup_s, fixed = timed_value(lambda: contexts_of(model, flat, batch * 4), device)
        fixed = fixed.reshape(steps, batch, seq_len, -1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def run() -> None:
        for i in range(steps):
            inputs, targets = windows[i, :, :-1], windows[i, :, 1:]
            ctx = fixed[i] if fixed is not None else train_contexts_window(model, inputs, cfg)
            loss = masked_cross_entropy(model.head(ctx), targets, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    return run, setup_s


OURS = ("context/propagate", "context/propagate-jacobi", "context/fixed", "gru", "transformer")
KINDS = (*OURS, *FAMILIES)  # the default stays OURS (the GPU check's bench step is sized for those)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dims", type=ints, default=None, help="hidden sizes C (default 128,256)")
    p.add_argument("--layers", type=ints, default=None, help="layers (default 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="training steps per repetition")
    p.add_argument("--jacobi-tol", type=float, default=1e-6)
    p.add_argument("--kinds", default=",".join(OURS), help=f"comma-separated, from {','.join(KINDS)}")
    args = p.parse_args()
    unknown = [k for k in args.kinds.split(",") if k not in KINDS]
    if unknown:  # a short name (`fixed`) would otherwise build a context model and time propagate under it
        p.error(f"--kinds {','.join(unknown)} is not allowed: expected names from {','.join(KINDS)}")
    device = setup(args)
    dims = args.dims or ([128] if args.quick else [128, 256])
    rows = []
    for c in dims:
        for layers in args.layers or [2]:
            runs, setups = {}, {}
            for kind in args.kinds.split(","):
                runs[kind], setups[kind] = stepper(kind, c, layers, args.batch, args.seq_len, args.steps,
                                                   args.jacobi_tol, device)
                runs[kind]()  # warm-up
            med = interleaved(runs, args.reps, device)
            tokens = args.steps * args.batch * args.seq_len
            gru = tokens / med["gru"] if "gru" in med else float("nan")
            for kind, sec in med.items():
                rows.append({"model": kind, "C": c, "L": layers, "batch": args.batch, "seq_len": args.seq_len,
                             "tok_s": tokens / sec, "vs_gru": tokens / sec / gru, "step_ms": sec / args.steps * 1e3,
                             "setup_tok_s": tokens / setups[kind] if setups[kind] else float("nan")})
    report(rows, "phase2_speed", device, args.out, ["model", "C", "L", "batch", "seq_len", "tok_s", "vs_gru",
                                                    "step_ms", "setup_tok_s"])


if __name__ == "__main__":
    main()
