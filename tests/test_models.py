"""Context LM and baselines: shapes, argument order, embedding LN in every path, generate, params."""

from __future__ import annotations

import pytest
import torch

from newllm.errors import GenerationError
from newllm.models import count_parameters
from newllm.models.baselines import GRULM, TransformerLM
from newllm.training.solvers import sequential_pass
from tests.helpers_science import context_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("architecture", ["sequential", "layerwise"])
@pytest.mark.parametrize("updater", ["gated", "residual"])
def test_update_shapes_with_context_dim_not_embed_dim(architecture, updater):
    m = context_lm(architecture, updater, context_dim=24, embed_dim=16)
    c, x = torch.randn(3, 5, 24), torch.randn(3, 5, 16)
    assert m.update(c, x).shape == (3, 5, 24)
    assert m(torch.randint(0, 40, (2, 7))).shape == (2, 7, 40)


@pytest.mark.parametrize("architecture", ["sequential", "layerwise"])
def test_swapped_arguments_fail_loudly(architecture):
    m = context_lm(architecture, context_dim=24, embed_dim=16)
    c, x = torch.randn(4, 24), torch.randn(4, 16)
    with pytest.raises(ValueError, match="arguments swapped"):
        m.update(x, c)


def test_sequential_and_layerwise_structure():
    seq = context_lm("sequential", layers=3)
    lw = context_lm("layerwise", layers=3)
    assert len(seq.blocks) == 1 and sum(isinstance(mod, torch.nn.Linear) for mod in seq.blocks[0].fnn) == 3
    assert len(lw.blocks) == 3 and all(len(b.fnn) == 2 for b in lw.blocks)  # Linear + ReLU each
    # layer-wise: every block has its own gates and its own LayerNorm
    assert len({id(b.updater.norm) for b in lw.blocks}) == 3


def test_init_std_sets_f_and_not_embedding_or_head():
    m = context_lm(init_std=0.3, context_dim=64, embed_dim=64, vocab=400)
    assert m.blocks[0].fnn[0].weight.std().item() == pytest.approx(0.3, rel=0.05)
    assert m.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_embedding_layernorm_in_every_path():
    m = context_lm("layerwise").eval()
    with torch.no_grad():  # make LN matter: a non-trivial affine LN
        m.embed_norm.weight.uniform_(0.5, 2.0)
        m.embed_norm.bias.uniform_(-1.0, 1.0)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        x = m.embed_norm(m.embedding(ids))
        assert torch.allclose(m.embed(ids), x)
        ref = sequential_pass(m, x)  # the Phase-1 path
        assert torch.allclose(m.contexts_window(ids), ref, atol=1e-6)  # the Phase-2 path
    # generate (greedy via top_k=1) follows the same contexts: its first token is argmax head(c_T)
    out = m.generate(ids[0], 1, top_k=1)
    assert int(out[0]) == int(m.head(ref[0, -1]).argmax())


@pytest.mark.parametrize("architecture", ["sequential", "layerwise"])  # the stepped and the scripted loop
def test_generate_keeps_constant_state(architecture):
    """Between tokens generate carries one C-vector and nothing that grows with the text: the recurrence reads
    the prompt once, every head read is a (1, C) context, and it is exactly c_t of prompt + tokens so far."""
    m = context_lm(architecture).eval()
    prompt, reads, lengths = torch.tensor([1, 2, 3]), [], []
    hook = m.head.register_forward_pre_hook(lambda _, args: reads.append(args[0].detach().clone()))
    recurrence = m.recurrence

    def counted_recurrence(x: torch.Tensor, *rest) -> torch.Tensor:
        lengths.append(x.shape[1])
        return recurrence(x, *rest)

    m.recurrence = counted_recurrence
    out = m.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    hook.remove()
    del m.recurrence
    assert out.shape == (20,) and out.dtype == torch.long and int(out.max()) < 40
    assert lengths == [len(prompt)]  # sampled tokens are stepped one at a time, never re-read
    if architecture == "sequential":  # the eager loop: every head read is seen
        assert [tuple(c.shape) for c in reads] == [(1, 24)] * 20
        with torch.no_grad():
            contexts = m.contexts_window(torch.cat([prompt, out[:-1]]).unsqueeze(0))[0]
        torch.testing.assert_close(torch.cat(reads), contexts[len(prompt) - 1 :], atol=1e-5, rtol=1e-5)
    else:  # the whole sampling loop is one TorchScript call: the head module is never called from Python
        assert reads == []
    # What is carried between tokens is c_t of the text so far and nothing else: two calls, the second from
    # prompt + the first one's tokens, sample what one call samples from the same random stream.
    gen = torch.Generator().manual_seed(0)
    first = m.generate(prompt, 8, generator=gen)
    second = m.generate(torch.cat([prompt, first]), 12, generator=gen)
    assert torch.cat([first, second]).tolist() == out.tolist()
    with pytest.raises(ValueError, match="at least one token"):
        m.generate(torch.tensor([], dtype=torch.long), 3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"top_k={bad} is not allowed"):
            m.generate(prompt, 3, top_k=bad)


def test_residual_updater_needs_c_plus_e_hidden():
    from newllm.models.updaters import ResidualUpdater
    with pytest.raises(ValueError, match="hidden_dim=10"):
        ResidualUpdater(context_dim=24, embed_dim=16, hidden_dim=10)


@pytest.mark.parametrize("cls", [GRULM, TransformerLM])
def test_baselines_share_the_interface(cls):
    torch.manual_seed(0)
    m = cls(vocab_size=40, layers=2, context_dim=32, embed_dim=16, hidden_dim=None, init_std=0.02, dropout=0.0)
    ids = torch.randint(0, 40, (3, 11))
    assert m.contexts_window(ids).shape == (3, 11, 32)
    assert m(ids).shape == (3, 11, 40)
    counts = count_parameters(m)
    assert counts["params"] == sum(p.numel() for p in m.parameters())
    assert counts["params_core"] == counts["params"] - counts["params_embedding"] - counts["params_head"]


@pytest.mark.parametrize("cls", [GRULM, TransformerLM])
def test_baselines_generate_what_a_full_recompute_decodes(cls):
    """top_k=1 is greedy: the cached decode (GRU hidden state, transformer KV cache) makes the tokens an argmax
    over a forward of the whole prefix makes, step by step; top_k=3 draws only among the 3 largest logits."""
    torch.manual_seed(0)
    m = cls(vocab_size=40, layers=2, context_dim=32, embed_dim=16, hidden_dim=None, init_std=0.3, dropout=0.0).eval()
    prompt = torch.randint(0, 40, (5,))
    made = m.generate(prompt, 12, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq[None])[0, -1].argmax().view(1)])
    assert made.tolist() == seq[5:].tolist() and len(set(made.tolist())) > 1
    sampled = m.generate(prompt, 12, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(1))
    seq = torch.cat([prompt, sampled])
    with torch.no_grad():
        logits = m(seq[None])[0, 4:-1]
    assert all(tok in logits[i].topk(3).indices.tolist() for i, tok in enumerate(sampled.tolist()))
    with pytest.raises(GenerationError, match="top_k=0 is not allowed"):
        m.generate(prompt, 2, top_k=0)


def test_transformer_is_causal():
    torch.manual_seed(0)
    m = TransformerLM(40, 2, 32, 16, None, 0.02, 0.0).eval()
    ids = torch.randint(0, 40, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 40
    with torch.no_grad():
        a, b = m.contexts_window(ids), m.contexts_window(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5) and not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("schema", ["GRUConfig", "TransformerConfig"])
def test_match_width_picks_the_closest_baseline_size(schema):
    from omegaconf import OmegaConf

    import newllm.config as config
    from newllm.models.sizing import match_width, params_of

    base = OmegaConf.structured(getattr(config, schema)(layers=1, embed_dim=16))
    target = count_parameters(context_lm("layerwise", vocab=40))["params_core"]
    width, got = match_width(base, target, 40, max_width=256)
    assert got == params_of(OmegaConf.merge(base, {"context_dim": width}), 40)
    step = base.get("heads", 1)
    neighbours = [params_of(OmegaConf.merge(base, {"context_dim": w}), 40) for w in (width - step, width + step)]
    assert all(abs(got - target) <= abs(n - target) for n in neighbours)
    assert abs(got - target) / target < 0.15


@pytest.mark.parametrize("name", ["layerwise", "sequential"])
def test_default_init_is_not_a_near_identity_map(name):
    """At init_std 0.02 the gates sit at 0.5 and the update is tiny: f(c, x) ~ LN(c), whose fixed
    point is trivial (identity score ~0.99). The shipped default must start well away from that."""
    from newllm.metrics import identity_mapping_score
    from newllm.models import build_model
    from newllm.models.sizing import compose_model

    model_cfg, _ = compose_model([f"model={name}"])
    torch.manual_seed(0)
    default = build_model(model_cfg, 512)
    model_cfg.init_std = 0.02
    small = build_model(model_cfg, 512)
    score = identity_mapping_score(default.update, default.context_dim, default.embed_dim)
    assert identity_mapping_score(small.update, small.context_dim, small.embed_dim) > 0.95
    assert score < 0.9


@pytest.mark.parametrize(("window", "sees"), [(1, 0), (3, 4), (None, 9)])
def test_transformer_attention_window_limits_what_a_position_sees(window, sees):
    """model.attention_window=w: each layer attends w - 1 positions back, so with 2 layers position t
    depends on the 2 (w - 1) tokens before it (w = 1: none at all), found by changing one at a time."""
    torch.manual_seed(0)
    model = TransformerLM(20, 2, 16, 16, None, 0.1, 0.0, heads=2, max_len=16, attention_window=window).eval()
    ids = torch.randint(0, 20, (1, 10))
    with torch.no_grad():
        base = model(ids)[0, 9]
        changed = []
        for j in range(9):
            other = ids.clone()
            other[0, j] = (other[0, j] + 1) % 20
            changed.append(not torch.allclose(model(other)[0, 9], base))
    assert sum(changed) == sees and all(changed[9 - sees :])
