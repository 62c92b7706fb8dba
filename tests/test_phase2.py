"""Phase 2: perplexity below uniform, masks, fixed contexts, freezing, baselines through the same code."""

from __future__ import annotations

import pytest
import torch

from newllm.data import TokenData
from newllm.errors import DataError, TrainingError
from newllm.models.baselines import GRULM, TransformerLM
from newllm.training import phase2
from newllm.training.phase2 import make_windows, train_phase2
from tests.helpers_science import context_lm, phase2_cfg

CPU = torch.device("cpu")
V = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def pattern_data(n_train: int = 1024, n_val: int = 256, seed: int = 0) -> TokenData:
    """A learnable corpus: a fixed random cycle of V tokens with 10 % noise."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(V, generator=g)

    def stream(n):
        ids = cycle[torch.arange(n) % V].clone()
        noise = torch.rand(n, generator=g) < 0.1
        ids[noise] = torch.randint(0, V, (int(noise.sum()),), generator=g)
        return ids

    tr, va = stream(n_train), stream(n_val)
    return TokenData(tr, torch.ones_like(tr, dtype=torch.bool), va, torch.ones_like(va, dtype=torch.bool), None)


def quick(**kw):
    base = dict(seq_len=16, batch_size=16, epochs=3, lr=1e-2, patience=3)
    return phase2_cfg(**{**base, **kw})


def test_context_model_perplexity_drops_below_uniform(device):
    m = context_lm("layerwise", vocab=V)
    r = train_phase2(m.to(device), pattern_data(), quick(), device, seed=0, progress=False)
    assert r.metrics["phase2/uniform_ppl"] == V
    assert r.metrics["phase2/val_ppl"] < V / 2
    assert r.metrics["phase2/val_acc"] > 0.5
    losses = [row["phase2/val_loss"] for row in r.history]
    assert r.metrics["phase2/val_loss"] == pytest.approx(min(losses))  # best epoch kept and reported


def make_baseline(cls):
    torch.manual_seed(0)
    return cls(vocab_size=V, layers=1, context_dim=24, embed_dim=16, hidden_dim=None, init_std=0.02, dropout=0.0)


@pytest.mark.parametrize("cls", [GRULM, TransformerLM])
def test_baselines_train_through_the_same_code_with_the_same_keys(cls, device):
    data = pattern_data()
    ref = train_phase2(context_lm("layerwise", vocab=V), data, quick(epochs=1, max_steps_per_epoch=2), CPU,
                       seed=0, progress=False)
    r = train_phase2(make_baseline(cls).to(device), data, quick(), device, seed=0, progress=False)
    assert set(r.metrics) == set(ref.metrics)
    assert [set(row) for row in r.history] == [set(ref.history[0])] * len(r.history)
    assert r.metrics["phase2/val_ppl"] < V / 2


def test_fixed_contexts_train_only_the_head(device):
    m = context_lm("layerwise", vocab=V).to(device)
    f_before = [p.detach().clone() for p in m.updater_parameters()]
    head_before = m.head.weight.detach().clone()
    r = train_phase2(m, pattern_data(), quick(context="fixed", epochs=2), device, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(f_before, m.updater_parameters(), strict=True))
    assert not torch.equal(head_before, m.head.weight)
    assert r.metrics["phase2/val_ppl"] < V  # contexts as features already beat a uniform guess


def test_loss_mask_restricts_what_is_predicted():
    data = pattern_data()
    inputs, targets, mask = make_windows(data.train_ids, data.train_mask, 16, "training")
    assert torch.equal(targets[0], data.train_ids[1:17]) and torch.equal(inputs[0], data.train_ids[:16])
    half = data.val_mask.clone()
    half[::2] = False
    data.val_mask = half
    r = train_phase2(context_lm("layerwise", vocab=V), data, quick(epochs=1), CPU, seed=0, progress=False)
    expected = int(half[1 : 1 + (len(half) - 1) // 16 * 16].sum())
    assert r.metrics["phase2/val_tokens"] == expected


def test_reconstruction_loss_trains_a_decoder_and_still_learns(monkeypatch):
    """The term is in the loss: its decoder's weights move, and f trains differently than without it."""
    decoders = []

    class Recorded(phase2.ReconstructionDecoder):  # keeps each decoder and its initial weights
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append((self, [p.detach().clone() for p in self.parameters()]))

    monkeypatch.setattr(phase2, "ReconstructionDecoder", Recorded)
    data = pattern_data()
    r = train_phase2(context_lm("layerwise", vocab=V), data, quick(reconstruction_weight=0.5, epochs=1),
                     CPU, seed=0, progress=False)
    assert r.metrics["phase2/val_ppl"] < V
    ((decoder, before),) = decoders
    assert all(not torch.equal(a, b) for a, b in zip(before, decoder.parameters(), strict=True))
    plain = train_phase2(context_lm("layerwise", vocab=V), data, quick(reconstruction_weight=0.0, epochs=1),
                         CPU, seed=0, progress=False)
    assert len(decoders) == 1  # weight 0: no decoder at all
    assert r.metrics["phase2/val_loss"] != pytest.approx(plain.metrics["phase2/val_loss"], rel=1e-6, abs=0)


def test_validation_is_never_silently_replaced():
    data = pattern_data()
    data.val_ids, data.val_mask = data.val_ids[:5], data.val_mask[:5]
    with pytest.raises(DataError, match="validation stream has 5 tokens"):
        train_phase2(context_lm(vocab=V), data, quick(), CPU, seed=0, progress=False)
    data = pattern_data()
    data.val_mask = torch.zeros_like(data.val_mask)
    with pytest.raises(DataError, match="no tokens to predict"):
        train_phase2(context_lm(vocab=V), data, quick(), CPU, seed=0, progress=False)


def test_fixed_contexts_are_computed_in_eval_mode():
    """context=fixed with Phase 1 skipped or reused: the model arrives in train mode, and the features
    were computed with dropout on (different at every computation, unlike the f they stand for)."""
    from functools import partial

    from newllm.models.context_lm import ContextLM
    from newllm.models.updaters import GatedUpdater

    torch.manual_seed(0)
    m = ContextLM(V, "layerwise", 2, 24, 16, None, 0.1, 0.5, partial(GatedUpdater)).train()
    data = pattern_data()
    served = []

    def cache(inputs, compute):  # the run's cache hook: here it only keeps what was computed
        served.append((inputs, compute()))
        return served[-1][1]

    train_phase2(m, data, quick(context="fixed", epochs=1, max_steps_per_epoch=1), CPU, seed=0, progress=False,
                 contexts_cache=cache)
    (inputs, contexts), = served
    m.eval()
    with torch.no_grad():
        expected = m.contexts_window(inputs)
    torch.testing.assert_close(contexts, expected)


def test_train_figures_come_from_the_same_epoch_as_the_kept_weights():
    """Random tokens overfit: validation is best at epoch 1 of 5. phase2/train_* came from the last epoch
    while phase2/val_* and the weights were epoch 1's."""
    g = torch.Generator().manual_seed(0)
    tr, va = torch.randint(0, V, (320,), generator=g), torch.randint(0, V, (256,), generator=g)
    data = TokenData(tr, torch.ones_like(tr, dtype=torch.bool), va, torch.ones_like(va, dtype=torch.bool), None)
    r = train_phase2(context_lm("layerwise", vocab=V), data, quick(epochs=5, lr=3e-2, patience=5), CPU, seed=0,
                     progress=False)
    m, best, last = r.metrics, r.history[r.metrics["phase2/best_epoch"] - 1], r.history[-1]
    assert m["phase2/best_epoch"] == 1 and m["phase2/epochs"] == 5
    for k in ("loss", "ppl", "acc"):
        assert m[f"phase2/train_{k}"] == best[f"phase2/train_{k}"]
        assert m[f"phase2/val_{k}"] == best[f"phase2/val_{k}"]
        assert m[f"phase2/last_epoch_train_{k}"] == last[f"phase2/train_{k}"]
    assert m["phase2/train_loss"] != m["phase2/last_epoch_train_loss"]


def test_a_non_finite_loss_stops_the_run_at_the_next_evaluation_naming_the_steps(device):
    """The loss joins the tally on the device (no sync per step); the evaluation that reads it refuses a NaN."""
    m = context_lm("layerwise", vocab=V).to(device)
    with torch.no_grad():
        m.head.bias[3] = float("nan")  # every logit row holds a NaN: the very first loss is NaN
    with pytest.raises(TrainingError, match=r"phase 2 loss became non-finite in epoch 1, within steps 1-4; lower"):
        train_phase2(m, pattern_data(), quick(max_steps_per_epoch=4), device, seed=0, progress=False)
