"""Host-device syncs in the hot loops: Phase 1 reads its scalars once per iteration, Phase 2 never per step.

On CUDA every read of a device value on the host (`.item()`, `.tolist()`, `float(t)`, `if t:`, a boolean
mask index, `.cpu()`) waits for the GPU's queue to drain. The counter below wraps those Tensor methods and
counts the calls made from newllm's own code (torch's internals are not newllm's to fix), so it runs on
CPU and counts what WOULD sync on CUDA. With --device cuda, `torch.cuda.set_sync_debug_mode` counts the
syncs that really happen, torch's own included, and the same bounds must hold.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import newllm
from newllm import metrics
from newllm.training.diversity import FrobeniusDeviation
from newllm.training.phase1 import Phase1Loop, phase1_ids
from newllm.training.phase2 import Phase2Loop, Windows
from tests.helpers_science import context_lm, phase1_cfg, phase2_cfg
from tests.test_phase2 import V, pattern_data

NEWLLM = str(Path(newllm.__file__).resolve().parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")


class SyncCounter:
    def __init__(self) -> None:
        self.calls: list[str] = []  # "method from file:line", for the failure message
        self.cuda_syncs = 0

    def __len__(self) -> int:
        return len(self.calls)


def _counting(counter: SyncCounter, name: str, original):
    def wrapper(self, *args, **kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_filename.startswith(NEWLLM):
            counter.calls.append(f"{name} from {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return original(self, *args, **kwargs)
    return wrapper


def _counting_getitem(counter: SyncCounter, original):
    def wrapper(self, index):
        # a boolean mask as index: the result's size depends on the data, so the host must read it
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(NEWLLM):
                counter.calls.append(f"mask index from {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return original(self, index)
    return wrapper


@contextmanager
def count_host_syncs(device: torch.device) -> Iterator[SyncCounter]:
    counter = SyncCounter()
    with pytest.MonkeyPatch.context() as mp:
        for name in READS:
            mp.setattr(torch.Tensor, name, _counting(counter, name, getattr(torch.Tensor, name)))
        mp.setattr(torch.Tensor, "__getitem__", _counting_getitem(counter, torch.Tensor.__getitem__))
        if device.type != "cuda":
            yield counter
            return
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counter.cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)


def test_the_counter_counts_newllm_reads_and_not_torchs(device):
    a, b = torch.zeros(4, 3, device=device), torch.ones(4, 3, device=device)
    with count_host_syncs(device) as syncs:
        metrics.convergence_rate(a, b, 0.5)  # float() of a device scalar, in newllm/metrics.py
        torch.nn.utils.clip_grad_norm_([torch.nn.Parameter(a)], 1.0)  # torch's own code
    assert [c.split(":")[0] for c in syncs.calls] == ["__float__ from metrics.py"], syncs.calls


def phase1_loop(device: torch.device, **overrides) -> Phase1Loop:
    """Training iterations 1..9 with nothing else due: no held-out check, no rank, no checkpoint."""
    cfg = phase1_cfg(**{"max_tokens": 512, "max_iterations": 10, "val_every": 1000, "erank_every": 1000,
                        "checkpoint_every": 0, "erank_samples": 64, "context_noise": 0.01, **overrides})
    ids = torch.randint(0, 40, (512,), generator=torch.Generator().manual_seed(0))
    model = context_lm("layerwise").to(device)
    val = phase1_ids(ids[:256], cfg).to(device)
    return Phase1Loop(model, phase1_ids(ids, cfg).to(device), val, cfg, 0.3, FrobeniusDeviation().to(device), None)


@pytest.mark.parametrize("chunk_size", [4096, 100])  # one chunk; several (with the RNG replay)
def test_a_phase1_training_iteration_reads_the_device_once(device, chunk_size):
    loop = phase1_loop(device, chunk_size=chunk_size)
    loop.step(1)  # warm-up: lazy state (Adam's moments) is created on the first step
    for k in range(2, 6):
        with count_host_syncs(device) as syncs:
            row, last = loop.step(k)
        assert not last
        assert len(syncs) == 1, syncs.calls  # history_row's one .tolist() of every scalar at once
        assert syncs.calls[0].startswith("tolist from phase1.py")
        assert syncs.cuda_syncs <= 1, syncs.cuda_syncs
        assert row["phase1/grad_norm"] > 0  # a real training step ran


def test_a_phase2_training_step_never_reads_the_device_and_an_evaluation_reads_it_once_per_split(device):
    model = context_lm("layerwise", vocab=V).to(device)
    cfg = phase2_cfg(seq_len=16, batch_size=8, epochs=1, lr=1e-2)
    loop = Phase2Loop(model, Windows.build(model, pattern_data(), cfg, device), cfg, device, 0, None, None)
    batches = loop.batches()
    loop.step(batches[0], 1)  # warm-up (AdamW's state)
    with count_host_syncs(device) as syncs:
        for idx in batches[1:4]:
            loop.step(idx, 1)
    assert syncs.calls == [] and syncs.cuda_syncs == 0, (syncs.calls, syncs.cuda_syncs)
    with count_host_syncs(device) as syncs:
        loop.evaluation(1)
    # the tally (one read), the validation sums (one read), the position buckets (one read)
    assert len(syncs) == 3, syncs.calls
    assert loop.state.history[-1]["phase2/train_loss"] > 0
