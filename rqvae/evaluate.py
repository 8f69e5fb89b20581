"""Evaluate a tokenizer (RQVAE or RQKMeans) on an array: encode, reconstruct, compute every metric."""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import from_numpy

from rqvae.encode import Tokenizer, encode_array, reconstruct_array
from rqvae.metrics import evaluate_codes


def evaluate_model(model: Tokenizer, x: np.ndarray, *, category_ids: np.ndarray | None = None,
                   k: int = 10, n_queries: int = 2000, seed: int = 0,
                   batch_size: int | None = None) -> dict[str, float]:
    """The flat metric dict of :func:`rqvae.metrics.evaluate_codes` for x (N, D).

    Reconstructions are compared with the model-space input (L2-normalised when the model
    normalises its inputs), so reconstruction cosine is measured where the model works.
    """
    encoded = encode_array(model, x, batch_size=batch_size)
    x_hat = reconstruct_array(model, x, batch_size=batch_size)
    if getattr(getattr(model, "config", None), "normalize_inputs", False):
        x = F.normalize(from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dim=-1).numpy()
    return evaluate_codes(x, encoded.codes, model.codebook_size, x_hat=x_hat, category_ids=category_ids,
                          k=k, n_queries=n_queries, seed=seed)
