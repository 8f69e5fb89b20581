"""RQ-KMeans: residual k-means directly on the embeddings; the baseline every metric is compared to.

Same interface as :class:`rqvae.model.RQVAE` for encoding (``quantize``, ``decode_codes``,
``num_levels``, ``codebook_size``), no encoder or decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rqvae.config import DictConfig
from rqvae.kmeans import kmeans, nearest
from rqvae.model import Quantized
from rqvae.quantizer import residual_codes


@dataclass(frozen=True)
class RQKMeansConfig(DictConfig):
    """Shape of an RQ-KMeans quantizer.

    Attributes:
        input_dim: D, embedding length.
        num_levels: L, residual levels.
        codebook_size: K, centroids per level.
        normalize_inputs: L2-normalise embeddings first (as RQVAE does by default).
    """

    input_dim: int
    num_levels: int = 3
    codebook_size: int = 256
    normalize_inputs: bool = True


class RQKMeans(nn.Module):
    """Residual k-means tokenizer: level l clusters the residuals left by levels < l."""

    codebooks: torch.Tensor  # (L, K, D) float32 buffer of centroids

    def __init__(self, config: RQKMeansConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("codebooks", torch.zeros(config.num_levels, config.codebook_size, config.input_dim))

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @classmethod
    def fit(cls, x: np.ndarray, config: RQKMeansConfig, *, iters: int = 25, seed: int = 0,
            max_fit_items: int | None = None) -> RQKMeans:
        """Fit on x (N, D) float32; ``max_fit_items`` subsamples (seeded) to bound the cost."""
        model = cls(config)
        rng = np.random.default_rng(seed)
        if max_fit_items is not None and len(x) > max_fit_items:
            x = x[np.sort(rng.choice(len(x), max_fit_items, replace=False))]
        residual = model.prepare(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        for level in range(config.num_levels):
            centers = kmeans(residual, config.codebook_size, iters=iters, seed=seed + level)
            model.codebooks[level] = centers
            idx, _ = nearest(residual, centers)
            residual = residual - centers[idx]
        return model

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.normalize_inputs else x

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, alternatives: int = 0) -> Quantized:
        """Codes (B, L) and error (B,) = |x - sum of its centroids| in (normalised) input space; with
        ``alternatives`` > 0 also that many ranked last-level codes (see :class:`Quantized`)."""
        return Quantized(*residual_codes(self.prepare(x.float()), list(self.codebooks), alternatives))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the centroids named by codes (B, L) -> (B, D)."""
        return sum((self.codebooks[lv][codes[:, lv]] for lv in range(self.num_levels)),
                   torch.zeros(codes.shape[0], self.config.input_dim, device=codes.device))
