"""Pretrained token embeddings from a tiny model in the hub format (local dir and offline hub cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from newllm.data.tokenizer import train_bpe
from newllm.models import pretrained
from tests.conftest import TINY, read_metrics, run_cli

safetensors_torch = pytest.importorskip("safetensors.torch")

WIDTH = 24  # = TINY's model.embed_dim
TEXTS = ["Hello there, how are you doing today?", "I am a small model with a tiny vocabulary.",
         "What is your favourite programming language?"] * 20


def make_model_dir(path: Path, key: str = "transformer.wte.weight") -> tuple[torch.Tensor, Tokenizer]:
    """config.json + model.safetensors (embedding + one other weight) + tokenizer.json, as on the hub."""
    path.mkdir(parents=True)
    tokenizer = train_bpe(TEXTS, vocab_size=300, min_frequency=2)
    tokenizer.save(str(path / "tokenizer.json"))
    matrix = torch.randn(tokenizer.get_vocab_size(), WIDTH, generator=torch.Generator().manual_seed(1))
    safetensors_torch.save_file({key: matrix, "transformer.h.0.mlp.weight": torch.ones(3, 3)},
                                str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": WIDTH}))
    return matrix, tokenizer


def as_hub_cache(cache: Path, repo: str, model_dir: Path) -> None:
    """Lay the model out as huggingface_hub's cache does: refs/main -> snapshots/<commit>/<files>."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots").mkdir()
    model_dir.rename(root / "snapshots" / commit)


def test_local_dir_rows_copied_by_token_string(tmp_path):
    matrix, theirs = make_model_dir(tmp_path / "tiny", key="model.embed_tokens.weight")
    files = pretrained.fetch(str(tmp_path / "tiny"))
    assert torch.equal(pretrained.embedding_matrix(files["weights"]), matrix)
    ours = train_bpe(["A different corpus, with other merges: hello you, how are things?"] * 20, 280, 2)
    emb = torch.nn.Embedding(ours.get_vocab_size() + 2, WIDTH)
    before = emb.weight.detach().clone()
    info = pretrained.copy_embedding(emb, matrix, ours, theirs, "tiny")
    shared = [t for t in ours.get_vocab() if t in theirs.get_vocab()]
    assert info["model/pretrained_rows"] == len(shared) >= 256  # at least the byte-level alphabet
    for t in shared:
        assert torch.equal(emb.weight[ours.token_to_id(t)], matrix[theirs.token_to_id(t)])
    assert torch.equal(emb.weight[-2:], before[-2:])  # rows no pretrained token maps to keep their init
    with pytest.raises(pretrained.PretrainedError, match="model.embed_dim=16 does not match the width 24"):
        pretrained.copy_embedding(torch.nn.Embedding(10, 16), matrix, ours, theirs, "tiny")


def test_weights_without_an_embedding_are_one_clear_error(tmp_path):
    path = tmp_path / "no_embedding"
    path.mkdir()
    safetensors_torch.save_file({"lm_head.weight": torch.ones(2, 2)}, str(path / "model.safetensors"))
    with pytest.raises(pretrained.PretrainedError, match="no token-embedding tensor"):
        pretrained.embedding_matrix(path / "model.safetensors", "x")


@pytest.mark.slow
def test_offline_model_not_in_the_hub_cache_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    proc = run_cli([*TINY, "model.embedding.pretrained=gpt2", f"hydra.run.dir={tmp_path / 'r'}"],
                   cwd=tmp_path, check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        "error: model.embedding.pretrained='gpt2' cannot be loaded: the Hugging Face Hub is unreachable and the "
        "model is not in the local hub cache (HF_HUB_CACHE); use a local model directory or "
        "model.embedding.pretrained=null"]
    assert not (tmp_path / "r" / "tokenizer.json").exists()  # failed before any work


@pytest.mark.slow
def test_cli_copies_a_cached_hub_model_embedding_frozen(tmp_path, monkeypatch):
    """model.embedding.pretrained=<hub name>, offline, served from the local hub cache."""
    matrix, theirs = make_model_dir(tmp_path / "tiny")
    as_hub_cache(tmp_path / "hub", "newllm-test/tiny-wte", tmp_path / "tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    run_dir = tmp_path / "run"
    run_cli([*TINY, "model.embedding.pretrained=newllm-test/tiny-wte", "model.embedding.freeze=true",
             "data.num_conversations=150", "training.phase1.max_tokens=256", "training.phase2.seq_len=16",
             "training.phase2.max_steps_per_epoch=3", "training.phase2.max_val_tokens=256",
             f"hydra.run.dir={run_dir}", f"paths.output_root={tmp_path / 'outputs'}"], cwd=tmp_path)
    ours = Tokenizer.from_file(str(run_dir / "tokenizer.json"))  # the tokenizer the run used
    shared = [t for t in ours.get_vocab() if t in theirs.get_vocab()]
    m = read_metrics(run_dir)
    assert m["model/pretrained_rows"] == len(shared) >= 256
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    weight = final["model"]["embedding.weight"]
    our_ids = torch.tensor([ours.token_to_id(t) for t in shared])
    their_ids = torch.tensor([theirs.token_to_id(t) for t in shared])
    assert torch.equal(weight[our_ids], matrix[their_ids])  # frozen through both phases
    assert final["config"]["tokenizer"]["pretrained"] == "newllm-test/tiny-wte"  # its tokenizer is requested
