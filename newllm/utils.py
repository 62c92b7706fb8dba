"""Small pure helpers with no newllm imports, so that every layer (run, checkpoint, analysis) can use them."""

from __future__ import annotations

from typing import Any


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'layers': 2, 'sizes': [1, 2]}} -> {'model.layers': 2, 'model.sizes': [1, 2]}.

    Nested dicts become dotted keys; every other value (lists included) is a leaf, kept as is.
    An empty nested dict leaves no key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
