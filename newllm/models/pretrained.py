"""Pretrained token embeddings: model.embedding.pretrained=<hub model name | local dir>.

Only two files of the hub model are read: tokenizer.json and the one safetensors file that holds
the token-embedding matrix (only that tensor is loaded). Rows are copied by token *string* into
ContextLM.embedding, so every token the two vocabularies share gets its pretrained vector; with
tokenizer.pretrained naming the same model (run.py sets it by default) that is the whole hub
vocabulary, and the tokens newllm adds (ChatML markers, pad) keep their fresh initialisation.
Offline, a model missing from the local hub cache is one clear error at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from newllm import keys
from newllm.data.hub import hub_reachable
from newllm.errors import PretrainedError, first_line

# Names of the token-embedding weight in common architectures (GPT-2, Llama/Mistral/Qwen, BERT, T5, ...).
EMBEDDING_KEYS = ("wte.weight", "embed_tokens.weight", "word_embeddings.weight", "tok_embeddings.weight",
                  "embed_in.weight", "shared.weight")


def _fetch(name: str, filename: str, offline: bool) -> Path | None:
    """A file of the model: from a local dir, else from the hub (or its local cache). None if absent."""
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name, filename, local_files_only=offline))
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: caught first)
        if offline and filename == "tokenizer.json":
            raise PretrainedError(f"model.embedding.pretrained={name!r} cannot be loaded: the Hugging Face Hub is "
                                  "unreachable and the model is not in the local hub cache (HF_HUB_CACHE); use a "
                                  "local model directory or model.embedding.pretrained=null") from None
        return None
    except EntryNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 -- unknown repo, auth, network: one line
        raise PretrainedError(f"model.embedding.pretrained={name!r} cannot be loaded ({first_line(err)})") from err


def fetch(name: str) -> dict[str, Path]:
    """{'tokenizer': tokenizer.json, 'weights': the safetensors file holding the token embedding}."""
    offline = not Path(name).is_dir() and not hub_reachable()
    tokenizer = _fetch(name, "tokenizer.json", offline)
    if tokenizer is None:
        raise PretrainedError(f"model.embedding.pretrained={name!r} has no tokenizer.json (a fast tokenizer is needed)")
    weights = _fetch(name, "model.safetensors", offline)
    if weights is None:  # sharded: the index says which shard holds the embedding
        index = _fetch(name, "model.safetensors.index.json", offline)
        if index is None:
            where = " in the local hub cache (offline)" if offline else ""
            raise PretrainedError(f"model.embedding.pretrained={name!r} has no model.safetensors "
                                  f"or sharded index{where}")
        weight_map = json.loads(index.read_text())["weight_map"]
        key = _embedding_key(list(weight_map), name)
        weights = _fetch(name, weight_map[key], offline)
        if weights is None:
            raise PretrainedError(f"model.embedding.pretrained={name!r}: shard {weight_map[key]} is missing")
    return {"tokenizer": tokenizer, "weights": weights}


def _embedding_key(keys: list[str], name: str) -> str:
    for suffix in EMBEDDING_KEYS:
        for key in keys:
            if key == suffix or key.endswith("." + suffix):
                return key
    raise PretrainedError(f"model.embedding.pretrained={name!r}: no token-embedding tensor among its weights "
                          f"(looked for names ending in {', '.join(EMBEDDING_KEYS)})")


def embedding_matrix(weights: Path, name: str = "") -> torch.Tensor:
    """(V_pretrained, E) float32, reading only that tensor from the safetensors file."""
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise PretrainedError("model.embedding.pretrained needs safetensors: pip install 'newllm[pretrained]'") from err
    with safe_open(str(weights), framework="pt") as f:
        return f.get_tensor(_embedding_key(list(f.keys()), name or str(weights))).float()


def copy_embedding(embedding: nn.Embedding, matrix: torch.Tensor, ours: Tokenizer, theirs: Tokenizer,
                   name: str) -> dict[str, float]:
    """Copy matrix rows into `embedding` for every token string both tokenizers know."""
    if matrix.shape[1] != embedding.embedding_dim:
        raise PretrainedError(f"model.embed_dim={embedding.embedding_dim} does not match the width "
                              f"{matrix.shape[1]} of {name}'s token embedding: set model.embed_dim={matrix.shape[1]}")
    their_vocab = theirs.get_vocab()
    pairs = [(i, their_vocab[t]) for t, i in ours.get_vocab().items()
             if t in their_vocab and their_vocab[t] < matrix.shape[0] and i < embedding.num_embeddings]
    if not pairs:
        raise PretrainedError(f"model.embedding.pretrained={name!r}: its tokenizer shares no token with ours")
    our_ids, their_ids = (torch.tensor(x) for x in zip(*sorted(pairs), strict=True))
    with torch.no_grad():
        embedding.weight[our_ids.to(embedding.weight.device)] = matrix[their_ids].to(embedding.weight)
    return {keys.MODEL_PRETRAINED_ROWS: len(pairs),
            keys.MODEL_PRETRAINED_COVERAGE: len(pairs) / embedding.num_embeddings}


def apply_pretrained(model: nn.Module, name: str, files: dict[str, Path], tokenizer: Tokenizer) -> dict[str, float]:
    """Load `name`'s token embedding into model.embedding; returns what was copied (for metrics.json)."""
    theirs = Tokenizer.from_file(str(files["tokenizer"]))
    return copy_embedding(model.embedding, embedding_matrix(files["weights"], name), tokenizer, theirs, name)
