"""Peak memory of generating 1k/10k/100k tokens: context model (one C-vector of state) against the
transformer baseline decoding with a KV cache (state grows with every token), and with --models the
transformers families (newllm/models/hf_baselines.py) generating through HFLM.generate's steps with the
library's own caches: llama's KV cache grows, the recurrent families' states (Mamba, Mamba2, RWKV, xLSTM;
Griffin's once its local-attention window is full) do not.

    python -m benchmarks.bench_memory --quick
    python -m benchmarks.bench_memory --tokens 1000,10000,100000 --cap 120
    python -m benchmarks.bench_memory --models context,transformer,llama,mamba,mamba2,rwkv,recurrent_gemma,xlstm

How it is measured (CPU): each case runs in a fresh child process. After building the model and
a short warm-up, the child resets the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`)
and reads the resident set; after generating it reads the peak (VmHWM). `peak_mb` is peak minus
the resident set before generation: every byte the generation touched, torch's C++ buffers
included. (tracemalloc sees only Python's own heap, not torch tensors, and torch keeps no peak
statistics for CPU memory; on CUDA `torch.cuda.max_memory_allocated` is used instead.)
The transformer's cache is allocated for the whole length up front (the cheapest KV cache: no
re-allocation). Generation stops after --cap seconds; `generated` says how many tokens were made
then. For a capped transformer run the cache for all N tokens is already allocated and counted.
`state_mb` is the state carried after the tokens generated (`state_floats` x 4 bytes: C floats for the
context model, the KV cache for attention; the transformer's buffer holds all N positions from the start,
llama's DynamicCache grows a position per token). The transformers families use the model knobs'
defaults at --dim and --layers (heads 4, state_size 16, expand 2, conv_kernel 4, Griffin's window 2048).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import device_of, ints, parser, report, setup
from newllm.models.baselines import TransformerLM
from newllm.models.context_lm import ContextLM
from newllm.models.hf_baselines import FAMILIES, HFLM
from newllm.models.sampling import sample_token
from newllm.models.updaters import GatedUpdater

VOCAB, EMBED = 4096, 96
MODELS = ("context", "transformer", *FAMILIES)


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(kind: str, n: int, c: int, layers: int, cap: float, device: torch.device) -> dict:
    torch.manual_seed(0)
    prompt = torch.tensor([1, 2, 3])
    model = build(kind, n + prompt.numel() + 1, c, layers).to(device).eval()
    for _ in range(3):  # warm-up: one-off allocations are not generation memory (TorchScript's profiling
        model.generate(prompt.to(device), 8)  # executor optimises a function on its second call)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = rss_kb("VmRSS")
    t0 = time.perf_counter()
    generated = generate_capped(model, prompt.to(device), n, cap)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mb = (rss_kb("VmHWM") - rss0) / 1024
    held = n if kind == "transformer" else generated  # the transformer's buffer is allocated for all N
    return {"model": kind, "N": n, "C": c, "L": layers, "generated": generated, "seconds": seconds,
            "tok_s": generated / seconds, "peak_mb": peak_mb,
            "state_mb": model.state_floats(prompt.numel() + held) * 4 / 2**20}


def build(kind: str, max_len: int, c: int, layers: int) -> torch.nn.Module:
    if kind == "context":
        return ContextLM(VOCAB, "layerwise", layers, c, EMBED, None, 0.02, 0.0, functools.partial(GatedUpdater))
    if kind == "transformer":
        return TransformerLM(VOCAB, layers, c, EMBED, None, 0.02, 0.0, heads=4, max_len=max_len)
    return HFLM(VOCAB, kind, layers, c, EMBED, heads=4, max_len=max_len)


@torch.no_grad()
def generate_capped(model: torch.nn.Module, prompt: torch.Tensor, n: int, cap: float) -> int:
    """The models' own sampling steps, stopped after `cap` seconds; returns tokens generated."""
    g = torch.Generator(device=prompt.device).manual_seed(0)
    t_end = time.perf_counter() + cap
    if isinstance(model, ContextLM):
        step = 1024  # ContextLM.generate in slices (its state is one vector: slicing changes nothing)
        done = 0
        while done < n and time.perf_counter() < t_end:
            model.generate(prompt, min(step, n - done), generator=g)
            done += min(step, n - done)
        return done
    if isinstance(model, HFLM):
        return hf_capped(model, prompt, n, t_end, g)
    cache = model.new_cache(1, n + prompt.numel())
    for t, tok in enumerate(prompt.tolist()):
        logits = model.step(torch.tensor([tok], device=prompt.device), t, cache)
    for i in range(n):
        if time.perf_counter() > t_end:
            return i
        tok = sample_token(logits[0], 1.0, 0, g)  # the sampler every generate loop uses
        logits = model.step(torch.tensor([tok], device=prompt.device), prompt.numel() + i, cache)
    return n


def hf_capped(model: HFLM, prompt: torch.Tensor, n: int, t_end: float, g: torch.Generator) -> int:
    """HFLM.generate's loop (the library's cache, newllm's sampler), stopped at t_end."""
    dec = model.new_decoding()
    logits = model.step(prompt.view(1, -1), dec)
    for i in range(n):
        if time.perf_counter() > t_end:
            return i
        tok = sample_token(logits[0], 1.0, 0, g)
        logits = model.step(torch.tensor([[tok]], device=prompt.device), dec)
    return n


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=ints, default=None, help="lengths (default 1000,10000,100000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cap", type=float, default=120.0, help="seconds of generation per case at most")
    p.add_argument("--models", default="context,transformer", help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one case
    args = p.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models {','.join(unknown)} is not allowed: expected names from {','.join(MODELS)}")
    device = setup(args)
    if args.child:
        kind, n = args.child.split(":")
        print(json.dumps(child(kind, int(n), args.dim, args.layers, args.cap, device)))
        return
    tokens = args.tokens or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    rows = []
    for n in tokens:
        for kind in args.models.split(","):
            cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", f"{kind}:{n}", "--dim", str(args.dim),
                   "--layers", str(args.layers), "--cap", str(args.cap), "--device", str(device)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    report(rows, "memory", device_of(str(device)), args.out,
           ["model", "N", "C", "L", "generated", "seconds", "tok_s", "peak_mb", "state_mb"])


if __name__ == "__main__":
    main()
