"""Heads on top of a backbone's pooled features (USCL, Chen et al., MICCAI 2021, Sec. 2.3)."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Sequential):
    """g: two-layer MLP with ReLU, ``z = W2 relu(W1 r)`` (SimCLR / USCL), 256 outputs by default."""

    def __init__(self, in_dim: int = 512, hidden_dim: int = 512, out_dim: int = 256) -> None:
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class LinearClassifier(nn.Linear):
    """h: a linear layer from features to class logits."""

    def __init__(self, in_dim: int = 512, n_classes: int = 3) -> None:
        if in_dim < 1 or n_classes < 1:
            raise ValueError(f"in_dim and n_classes must be >= 1, got {in_dim}, {n_classes}")
        super().__init__(in_dim, n_classes)

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features)
