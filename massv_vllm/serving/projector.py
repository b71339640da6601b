"""The MASSV projector: target image embeddings -> drafter embedding space.

One plain-torch module shared by the transformers drafter (training) and the vLLM drafter
(serving), so both compute exactly the same function with the same parameter names
(``projector.linears.{i}.weight|bias``).
"""

from __future__ import annotations

import torch
from torch import nn

from massv_vllm.serving.config import ProjectorConfig

_ACTS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "relu": lambda: nn.ReLU(),
}


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, out_dim: int):
        super().__init__()
        dims = [cfg.input_dim] + [cfg.hidden_dim] * (cfg.depth - 1) + [out_dim]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = _ACTS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.linears[0].weight.dtype)
        for i, lin in enumerate(self.linears):
            if i:
                x = self.act(x)
            x = lin(x)
        return x

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """LLaVA-style init: small normal weights, zero bias."""
        for lin in self.linears:
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
