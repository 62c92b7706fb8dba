"""The no-grad recurrence of the layer-wise gated model as one TorchScript loop.

A step is two matvecs and ~10 small kernels per block; called from Python each kernel pays interpreter
and dispatch cost on top. Scripted, the loop runs without the interpreter (what is left is mostly the
matvecs at BLAS's rate: benchmarks/bench_phase1.py, pass0_of_matvec).
Same math as ContextLM._step with the gated updater (tested equal to float tolerance); used without
autograd (pass 0, validation, the held-out reference), where no graph has to be recorded, and for
generate's whole sampling loop. With autograd (Phase 2), see the second half of this file.

torch.jit.script is deprecated in torch 2.13 but is the one tool that compiles a data-dependent time
loop without unrolling it (torch.compile unrolls T steps; minutes of compile for a 10k-token pass).
If scripting ever fails, the same function runs eagerly: slower, same numbers.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn import functional as F

from newllm.models.sampling import draw_device, sample_token
from newllm.models.updaters import gate_activations, gated_mix, gated_mix_backward


def _gated_step(c: torch.Tensor, x_part: list[torch.Tensor], w_c: list[torch.Tensor], w_g: list[torch.Tensor],
                b_g: list[torch.Tensor], ln_w: list[torch.Tensor], ln_b: list[torch.Tensor], eps: float,
                ) -> torch.Tensor:
    """One token through every block: x_part[k] (B, H) is block k's hoisted x-projection plus bias."""
    size = [c.shape[-1]]
    for k in range(len(x_part)):
        h = torch.relu(torch.addmm(x_part[k], c, w_c[k]))
        a = gate_activations(torch.addmm(b_g[k], h, w_g[k]))
        c = F.layer_norm(gated_mix(c, a), size, ln_w[k], ln_b[k], eps)
    return c


def _gated_layerwise_loop(hoisted: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                          w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                          ln_b: list[torch.Tensor], eps: float) -> torch.Tensor:
    """hoisted[k] (B, T, H): block k's x-projection plus bias; w_c[k] (C, H); w_g[k] (H, 3C): the three
    gates stacked; ln_*: the block's LayerNorm. Returns contexts (B, T, C) from c (B, C)."""
    steps: list[torch.Tensor] = []
    for t in range(hoisted[0].shape[1]):
        c = _gated_step(c, [h[:, t] for h in hoisted], w_c, w_g, b_g, ln_w, ln_b, eps)
        steps.append(c)
    return torch.stack(steps, dim=1)


def _gated_layerwise_sample(embed: list[torch.Tensor], embed_eps: float, w_x: list[torch.Tensor],
                            b_x: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                            w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                            ln_b: list[torch.Tensor], eps: float, head_w: torch.Tensor, head_b: torch.Tensor,
                            n: int, temperature: float, top_k: int,
                            generator: torch.Generator | None, draw: torch.device) -> torch.Tensor:
    """n tokens sampled from c (1, C) as ContextLM.generate's eager loop samples them (sample_token, same random
    stream). head_w (C, V): the head's weight transposed, BLAS's fastest layout for one row. embed: [embedding
    matrix, its LayerNorm's weight and bias]; w_x[k] (E, H), b_x[k]: block k's x-part of its first Linear and
    its bias, applied to the one sampled token (nothing vocabulary-sized is built: memory stays that of the
    weights). top_k 0 = off."""
    out = torch.empty(n, dtype=torch.long)
    size = [embed[0].shape[1]]
    for i in range(n):
        tok = sample_token(torch.addmm(head_b, c, head_w)[0], temperature, top_k, generator, draw)
        out[i] = tok
        x = F.layer_norm(embed[0][tok : tok + 1], size, embed[1], embed[2], embed_eps)
        c = _gated_step(c, [torch.addmm(b_x[k], x, w_x[k]) for k in range(len(w_x))], w_c, w_g, b_g, ln_w, ln_b, eps)
    return out


@functools.cache
def _compiled(name: str):
    function = globals()[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(function)
    except Exception as err:  # noqa: BLE001 -- any scripting failure: fall back to the eager loop
        warnings.warn(f"TorchScript unavailable ({err}); {name} runs eagerly", stacklevel=2)
        return function


def gated_layerwise_loop(hoisted: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                         w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                         ln_b: list[torch.Tensor], eps: float) -> torch.Tensor:
    return _compiled("_gated_layerwise_loop")(hoisted, c, w_c, w_g, b_g, ln_w, ln_b, eps)


def gated_layerwise_sample(inputs: tuple, c: torch.Tensor, params: tuple, head: torch.nn.Linear, n: int,
                           temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """The whole sampling loop of generate in TorchScript. inputs: (embed, embed_eps, w_x, b_x) as
    _gated_layerwise_sample takes them; params: what gated_layerwise_loop takes after c."""
    return _compiled("_gated_layerwise_sample")(*inputs, c, *params, head.weight.t().contiguous(), head.bias, n,
                                                temperature, top_k, generator, draw_device(generator, c.device))


# ----------------------------------------------------------------------------- with autograd (Phase 2)
# Phase 2 `propagate` trains through the recurrence. Recorded op by op, autograd pays graph bookkeeping
# for ~10 kernels per block and token, forward and backward. Here the forward is the scripted loop,
# saving what the backward needs; the backward is a scripted reverse loop that carries only dL/dc, and
# every weight gradient is one matmul over all (token, batch) rows after it (nothing weight-shaped is
# accumulated inside the loop). Same math as the eager step; tested equal to autograd's gradients.
def _gated_forward_saving(hoisted: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                          w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                          ln_b: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """[contexts (B, T, C), then per (T, K, B, .) layout: block inputs c, hidden h, gates f|i|u, pre-LN z,
    LN mean, LN rstd]."""
    n_t, n_k = hoisted[0].shape[1], len(hoisted)
    b, d, hid = c.shape[0], c.shape[1], w_c[0].shape[1]
    out = c.new_empty(b, n_t, d)
    c_in, hs = c.new_empty(n_t, n_k, b, d), c.new_empty(n_t, n_k, b, hid)
    fiu, zs = c.new_empty(n_t, n_k, b, 3 * d), c.new_empty(n_t, n_k, b, d)
    means, rstds = c.new_empty(n_t, n_k, b, 1), c.new_empty(n_t, n_k, b, 1)
    size = [d]
    for t in range(n_t):
        for k in range(n_k):
            c_in[t, k] = c
            h = torch.relu(torch.addmm(hoisted[k][:, t], c, w_c[k]))
            hs[t, k] = h
            a = gate_activations(torch.addmm(b_g[k], h, w_g[k]))
            fiu[t, k] = a
            z = gated_mix(c, a)
            zs[t, k] = z
            c, mean, rstd = torch.native_layer_norm(z, size, ln_w[k], ln_b[k], eps)
            means[t, k], rstds[t, k] = mean, rstd
        out[:, t] = c
    return [out, c_in, hs, fiu, zs, means, rstds]


def _gated_backward_loop(grad_out: torch.Tensor, c_in: torch.Tensor, hs: torch.Tensor, fiu: torch.Tensor,
                         zs: torch.Tensor, means: torch.Tensor, rstds: torch.Tensor, w_c: list[torch.Tensor],
                         w_g: list[torch.Tensor], ln_w: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reverse time loop: [dL/dc0, then (T, K, B, .) dL/d(pre-ReLU) a, dL/d(gate logits), dL/d(block output)].

    (Precomputing the dc-independent factors for all steps at once measured slower: 44 vs 40 ms at
    B=32, T=64, C=256, L=2; the extra passes over (T, K, B, 3C) cost more than the kernels they save.)
    """
    n_t, n_k = c_in.shape[0], c_in.shape[1]
    d_a, d_g, d_out = torch.empty_like(hs), torch.empty_like(fiu), torch.empty_like(c_in)
    w_c_t = [w.t() for w in w_c]
    w_g_t = [w.t() for w in w_g]
    dc = torch.zeros_like(c_in[0, 0])
    for t in range(n_t - 1, -1, -1):
        dc = dc + grad_out[:, t]
        for k in range(n_k - 1, -1, -1):
            d_out[t, k] = dc
            zhat = (zs[t, k] - means[t, k]) * rstds[t, k]
            dzhat = dc * ln_w[k]  # LayerNorm backward: dz = rstd (dzhat - mean(dzhat) - zhat mean(dzhat zhat))
            dz = rstds[t, k] * (dzhat - dzhat.mean(-1, keepdim=True) - zhat * (dzhat * zhat).mean(-1, keepdim=True))
            dc_kept, dg = gated_mix_backward(dz, c_in[t, k], fiu[t, k])
            d_g[t, k] = dg
            da = torch.mm(dg, w_g_t[k]) * (hs[t, k] > 0)
            d_a[t, k] = da
            dc = torch.addmm(dc_kept, da, w_c_t[k])  # through z's f c, and through h = relu(c W_c + hoisted)
    return [dc, d_a, d_g, d_out]


@functools.cache
def _compiled_training():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_gated_forward_saving), torch.jit.script(_gated_backward_loop)
    except Exception as err:  # noqa: BLE001 -- any scripting failure: the same functions, eagerly
        warnings.warn(f"TorchScript unavailable ({err}); the gated layer-wise training loop runs eagerly",
                      stacklevel=2)
        return _gated_forward_saving, _gated_backward_loop


class _GatedLayerwise(torch.autograd.Function):
    """Inputs: (eps, K, c0, *hoisted[K], *w_c[K], *w_g[K], *b_g[K], *ln_w[K], *ln_b[K]) -> contexts (B, T, C)."""

    @staticmethod
    def forward(ctx, eps: float, n_k: int, c0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        hoisted, w_c, w_g, b_g, ln_w, ln_b = (list(params[i * n_k : (i + 1) * n_k]) for i in range(6))
        out, *saved = _compiled_training()[0](hoisted, c0, w_c, w_g, b_g, ln_w, ln_b, eps)
        ctx.n_k = n_k
        ctx.save_for_backward(*saved, *w_c, *w_g, *ln_w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        n_k = ctx.n_k
        c_in, hs, fiu, zs, means, rstds, *weights = ctx.saved_tensors
        w_c, w_g, ln_w = (weights[i * n_k : (i + 1) * n_k] for i in range(3))
        dc0, d_a, d_g, d_out = _compiled_training()[1](grad_out.contiguous(), c_in, hs, fiu, zs, means, rstds,
                                                      w_c, w_g, ln_w)
        rows = lambda t, k: t[:, k].reshape(-1, t.shape[-1])  # noqa: E731 -- (T*B, .) rows of block k
        zhat = (zs - means) * rstds
        d_hoisted = [d_a[:, k].transpose(0, 1) for k in range(n_k)]  # (B, T, H)
        d_wc = [rows(c_in, k).t() @ rows(d_a, k) for k in range(n_k)]
        d_wg = [rows(hs, k).t() @ rows(d_g, k) for k in range(n_k)]
        d_bg = [rows(d_g, k).sum(0) for k in range(n_k)]
        d_lnw = [(rows(d_out, k) * rows(zhat, k)).sum(0) for k in range(n_k)]
        d_lnb = [rows(d_out, k).sum(0) for k in range(n_k)]
        return None, None, dc0, *d_hoisted, *d_wc, *d_wg, *d_bg, *d_lnw, *d_lnb


def gated_layerwise_trainable(hoisted: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                              w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                              ln_b: list[torch.Tensor], eps: float) -> torch.Tensor:
    """gated_layerwise_loop with gradients to every input: scripted forward, scripted reverse loop."""
    return _GatedLayerwise.apply(eps, len(hoisted), c, *hoisted, *w_c, *w_g, *b_g, *ln_w, *ln_b)
