"""Weight initialisation shared by the context LM and the baselines."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def init_normal_(module: nn.Module, std: float, std_by_prefix: Mapping[str, float] | None = None) -> None:
    """Every Linear and Embedding weight in `module` ~ N(0, std), their biases 0 (GPT-2's scheme).

    `std_by_prefix` sets another std for the submodules whose name (as in named_modules) starts with
    a key, e.g. {"blocks.": 0.1}. Modules are visited in named_modules order, so a seed fixes the weights.
    """
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            own = next((s for prefix, s in (std_by_prefix or {}).items() if name.startswith(prefix)), std)
            nn.init.normal_(m.weight, 0.0, own)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
