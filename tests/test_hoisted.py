"""The hoisted recurrence (input projections out of the time loop) equals stepping f token by token.

Speed is benchmarks/' business; here only that the fast path computes the same thing: contexts,
gradients and generated text, for both updaters and both architectures, in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from newllm.models.sampling import sample_token
from newllm.training.solvers import chunked_pass, sequential_pass
from tests.helpers_science import context_lm

CASES = [(arch, upd) for arch in ("layerwise", "sequential") for upd in ("gated", "residual")]


def stepwise(model, x: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: f applied one position at a time through the public update."""
    c = model.initial_context(x.shape[0]) if c0 is None else c0
    out = []
    for t in range(x.shape[1]):
        c = model.update(c, x[:, t])
        out.append(c)
    return torch.stack(out, dim=1)


def tokens(model, batch: int = 3, length: int = 17, seed: int = 1) -> torch.Tensor:
    """Random ids on the model's device (drawn on the CPU: the same ids whatever the device)."""
    ids = torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(model.head.weight.device)


@pytest.mark.parametrize(("arch", "updater"), CASES)
def test_recurrence_equals_stepwise_update_fp32(arch, updater, device):
    model = context_lm(arch, updater, layers=3, init_std=0.3).to(device)
    x = model.embed(tokens(model)).detach()
    c0 = torch.randn(3, model.context_dim, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref, fast = stepwise(model, x, c0), model.recurrence(x, c0)
    assert fast.shape == (3, 17, model.context_dim)
    # Float reassociation only (addmm into the hoisted term, gates in one matmul): ~1e-5 after 17 steps
    # through three LayerNorms at init_std 0.3; a wrong hoist (stale x, dropped bias) is O(1).
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    assert (ref[:, 1:] - ref[:, :-1]).abs().max() > 1e-2  # the contexts move: the check has teeth


@pytest.mark.parametrize(("arch", "updater"), CASES)
def test_recurrence_gradients_equal_stepwise(arch, updater, device):
    """Phase 2 `propagate` trains through the hoisted loop: same loss, same gradients."""
    grads = []
    for fast in (False, True):
        model = context_lm(arch, updater, layers=2, init_std=0.3, seed=4).to(device)
        ids = tokens(model, seed=5)
        contexts = model.contexts_window(ids) if fast else stepwise(model, model.embed(ids))
        torch.nn.functional.cross_entropy(model.head(contexts).flatten(0, 1), ids.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_gated_step_backward_is_autograds_in_float64():
    """gated_mix_backward, the one hand-derived derivative of the gated step, against autograd."""
    from newllm.models.updaters import gate_activations, gated_mix, gated_mix_backward

    g = torch.Generator().manual_seed(3)
    c = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    logits = torch.randn(4, 15, dtype=torch.float64, generator=g, requires_grad=True)
    dz = torch.randn(4, 5, dtype=torch.float64, generator=g)
    a = gate_activations(logits)
    (gated_mix(c, a) * dz).sum().backward()
    dc, dg = gated_mix_backward(dz, c.detach(), a.detach())
    torch.testing.assert_close(dc, c.grad)
    torch.testing.assert_close(dg, logits.grad)


def test_the_scripted_training_recurrence_has_autograds_gradients_in_float64():
    """Phase 2 of the default family (layer-wise, gated) trains through a hand-written reverse loop:
    gradcheck holds it to finite differences for every input (c0, hoisted projections, each weight)."""
    from newllm.models.scripted import gated_layerwise_trainable

    g, (b, t, c, k) = torch.Generator().manual_seed(0), (2, 5, 4, 2)
    def rand(*shape, scale=1.0):  # noqa: E306
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
    hoisted, w_c = [rand(b, t, c) for _ in range(k)], [rand(c, c, scale=0.5) for _ in range(k)]
    w_g, b_g = [rand(c, 3 * c, scale=0.5) for _ in range(k)], [rand(3 * c) for _ in range(k)]
    ln_w, ln_b = [rand(c) for _ in range(k)], [rand(c) for _ in range(k)]
    c0, n = rand(b, c), k

    def fn(c0, *flat):
        parts = [list(flat[i * n : (i + 1) * n]) for i in range(6)]
        return gated_layerwise_trainable(parts[0], c0, *parts[1:], 1e-5)

    assert torch.autograd.gradcheck(fn, (c0, *hoisted, *w_c, *w_g, *b_g, *ln_w, *ln_b))


def test_phase2_of_the_default_family_trains_through_the_scripted_function_and_falls_back_otherwise(device):
    model = context_lm("layerwise", "gated", layers=2).to(device)
    ids = tokens(model)
    assert type(model.contexts_window(ids).grad_fn).__name__ == "_GatedLayerwiseBackward"
    with torch.autocast(device.type, dtype=torch.bfloat16):  # autocast rounds op by op: the eager step does that
        assert "GatedLayerwise" not in type(model.contexts_window(ids).grad_fn).__name__
    for other in (context_lm("sequential", "gated", layers=2).to(device),
                  context_lm("layerwise", "residual", layers=2).to(device)):
        assert "GatedLayerwise" not in type(other.contexts_window(ids).grad_fn).__name__


@pytest.mark.parametrize(("arch", "updater"), CASES)
def test_recurrence_under_bf16_autocast_is_as_accurate_as_stepping(arch, updater):
    """bf16 rounds differently on the two paths (addmm into the hoisted term vs cat + linear), so they
    are not bit-equal; the fast path must be as close to the fp32 truth as the reference bf16 path is."""
    model = context_lm(arch, updater, layers=2, init_std=0.3)
    x = model.embed(tokens(model)).detach()
    with torch.no_grad():
        exact = stepwise(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, fast = stepwise(model, x).float(), model.recurrence(x).float()
    ref_err, fast_err = (ref - exact).abs().mean(), (fast - exact).abs().mean()
    assert ref_err > 1e-4  # bf16 really ran
    assert fast_err < 2 * ref_err, (float(fast_err), float(ref_err))
    assert fast_err < 0.05


def test_only_blocks_reading_the_embedding_are_hoisted():
    assert context_lm("layerwise", "gated", layers=3)._hoistable() == [True, True, True]
    assert context_lm("layerwise", "residual", layers=3)._hoistable() == [True, False, False]
    assert context_lm("sequential", "residual", layers=3)._hoistable() == [True]


@pytest.mark.parametrize("updater", ["gated", "residual"])
def test_pass0_solvers_agree_with_and_without_the_model_loop(updater):
    model = context_lm("layerwise", updater, layers=2, init_std=0.3)
    x = model.embed(tokens(model, batch=2, length=30)).detach()
    torch.testing.assert_close(sequential_pass(model, x, recurrence=model.recurrence),
                               sequential_pass(model, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_pass(model, x, 4, recurrence=model.recurrence),
                               chunked_pass(model, x, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("arch", "updater"), CASES)
def test_generate_samples_what_stepping_f_samples(arch, updater, device):
    """Same seed, same text: the vocabulary tables change how a step is computed, not what it samples.
    The generator is a CPU one whatever the device (as analysis.generate_text passes it)."""
    model = context_lm(arch, updater, layers=2, init_std=0.3).eval().to(device)
    prompt = torch.tensor([3, 1, 4, 1, 5], device=device)
    got = model.generate(prompt, 40, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        c = stepwise(model, model.embed(prompt.view(1, -1)))[:, -1]
        want = []
        for _ in range(40):
            tok = sample_token(model.head(c)[0], 0.8, 10, gen, gen.device)
            want.append(tok)
            c = model.update(c, model.embed(torch.tensor([tok], device=device)))
    assert got.tolist() == want
    assert len(set(want)) > 3  # not a constant stream


def test_burn_in_pass_is_exact_with_enough_burn_in_and_close_with_some():
    """init=burn_in: slices start burn_in tokens early from zeros. burn_in >= N is the sequential pass;
    a short burn-in differs only by what f still remembers of c = 0 (small for the damped gated f)."""
    from newllm.training.solvers import burn_in_pass

    model = context_lm("layerwise", "gated", layers=2, init_std=0.3)
    x = model.embed(tokens(model, batch=2, length=203)).detach()
    with torch.no_grad():
        exact = sequential_pass(model, x)
        full = burn_in_pass(model, x, 8, 203, recurrence=model.recurrence)
        short = burn_in_pass(model, x, 8, 32, recurrence=model.recurrence)
        none = burn_in_pass(model, x, 8, 0, recurrence=model.recurrence)
        chunked = chunked_pass(model, x, 8, recurrence=model.recurrence)
    assert short.shape == exact.shape == (2, 203, model.context_dim)
    torch.testing.assert_close(full, exact, atol=1e-4, rtol=1e-4)
    by_hand = torch.cat([sequential_pass(model, x[:, a : a + 26]) for a in range(0, 203, 26)], dim=1)
    torch.testing.assert_close(none, by_hand, atol=1e-5, rtol=1e-5)  # burn_in 0: each slice from zeros
    torch.testing.assert_close(chunked, none, atol=1e-6, rtol=1e-6)  # chunked_pass is burn_in 0
    torch.testing.assert_close(short[:, :26], exact[:, :26], atol=1e-4, rtol=1e-4)  # slice 0 starts at 0
    err_short, err_none = (short - exact).abs().max(), (none - exact).abs().max()
    assert err_none > 0.1  # plain chunks really differ at the slice starts
    assert err_short < err_none / 10, (float(err_short), float(err_none))


def test_scripted_loop_runs_without_grad_and_equals_the_python_loop(device):
    """Layer-wise gated without autograd runs one TorchScript loop; it must equal the Python steps."""
    from newllm.models import scripted

    model = context_lm("layerwise", "gated", layers=3, init_std=0.3).to(device)
    x = model.embed(tokens(model, length=40)).detach()
    with torch.no_grad():
        assert model._scriptable()
        fast = model.recurrence(x)
    python_loop = model.recurrence(x).detach()  # grad enabled: the Python loop (a graph is recorded)
    torch.testing.assert_close(fast, python_loop, atol=1e-4, rtol=1e-4)  # reassociation only, as above
    for name in ("_gated_layerwise_loop", "_gated_layerwise_sample"):  # really scripted, not the fallback
        assert isinstance(scripted._compiled(name), torch.jit.ScriptFunction), name
    dropped = context_lm("layerwise", "gated")
    dropped.blocks[0].fnn.append(torch.nn.Dropout(0.5))
    with torch.no_grad():
        assert not dropped.train()._scriptable() and dropped.eval()._scriptable()
        assert not context_lm("layerwise", "residual")._scriptable()
