"""The Linear -> ReLU -> Linear model every fixture generator quantizes, rebuilt around a state dict."""

from __future__ import annotations

import torch


def run_mlp(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model sized from the state dict's weights, with those weights, on the recorded input."""
    (n0, k0), (n2, k2) = state["0.weight"].shape, state["2.weight"].shape
    model = torch.nn.Sequential(torch.nn.Linear(k0, n0), torch.nn.ReLU(), torch.nn.Linear(k2, n2))
    model.load_state_dict(state, assign=True)
    with torch.no_grad():
        return model(x)
