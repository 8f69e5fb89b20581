"""Loss functions: reconstruction and the catalog-tree contrastive regularizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean per-item reconstruction loss. x, x_hat: (B, D). "mse": mean squared error summed over
    D then averaged over items; "cosine": mean of 1 - cos(x, x_hat)."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(x, x_hat, dim=-1)).mean()
    return (x - x_hat).pow(2).sum(-1).mean()


def supervised_contrastive(h: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one batch.

    h: (B, d) representations; labels: (B,) int64, -1 = unknown (neither anchor nor positive).
    For every anchor with at least one positive: -mean over positives p of log softmax_j(s_aj)[p],
    s = cos / temperature, self-pairs excluded. Returns 0 when no anchor has a positive.
    """
    h = F.normalize(h.float(), dim=-1)
    sim = h @ h.T / temperature  # (B, B)
    eye = torch.eye(len(h), dtype=torch.bool, device=h.device)
    sim = sim.masked_fill(eye, float("-inf"))
    known = labels >= 0
    positives = (labels[:, None] == labels[None, :]) & known[:, None] & known[None, :] & ~eye
    log_prob = sim.log_softmax(dim=1).masked_fill(~positives, 0.0)
    n_pos = positives.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return h.new_zeros(())
    return -(log_prob.sum(1)[anchors] / n_pos[anchors]).mean()


def level_weights(num_levels: int) -> list[float]:
    """Weights per level, coarser levels weighted more: w_l proportional to 1/l, summing to 1."""
    raw = [1.0 / (level + 1) for level in range(num_levels)]
    return [w / sum(raw) for w in raw]


def taxonomy_loss(prefixes: list[torch.Tensor], category_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Catalog-tree contrastive regularizer (after Instacart's semantic IDs).

    prefixes: per level l, the (B, d) cumulative quantized latent of codes 1..l (carrying gradient
    to the encoder); category_ids: (B, T) int64 path-prefix ids, column t = depth t+1. Level l is
    pulled together with items sharing the depth-l category; coarser levels weigh more.
    """
    levels = min(len(prefixes), category_ids.shape[1])
    weights = level_weights(levels)
    return sum((w * supervised_contrastive(prefixes[lv], category_ids[:, lv], temperature)
                for lv, w in enumerate(weights)), prefixes[0].new_zeros(()))
