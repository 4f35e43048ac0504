"""Finding layers in a model by role: the last nn.Linear, which reads the penultimate representations."""

from __future__ import annotations

from torch import nn


def last_linear(model: nn.Module, argument: str) -> str:
    """The name (in model.named_modules()) of the model's last nn.Linear; ValueError naming `argument` if none."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(f"{argument}: model has no nn.Linear; name the layer")
    return linear[-1]
