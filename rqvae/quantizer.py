"""Residual vector quantizer: L levels of K codes, each level quantizing what the previous left.

Residual quantization as in Zeghidour et al. 2021 (SoundStream) and Lee et al. 2022 (RQ-VAE); the
rotation-trick estimator follows Fifty et al. 2024, "Restructuring Vector Quantization with the
Rotation Trick" (arXiv:2410.06424).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rqvae.kmeans import kmeans, nearest, nearest_offset, squared_distances


class QuantizerOutput(NamedTuple):
    """Result of a training-time forward pass.

    quantized: (B, d) the sum of the selected codewords in the forward pass, carrying the
        gradient estimator's backward path to the input latent.
    codes: (B, L) int64 selected code per level.
    level_inputs: (L, B, d) the residual each level quantized (level 0: the latent itself).
    codebook_loss: scalar, sum over levels of mean ||sg(r_l) - c_l||^2.
    commitment_loss: scalar, sum over levels of mean ||r_l - sg(c_l)||^2.
    usage_loss: scalar, mean over levels of 1 - H(p_l) / log K, where p_l is the batch mean of
        the soft assignments softmax(-||r_l - c_k||^2 / t_l) and t_l the batch's mean squared
        distance to the nearest code (detached). 0 when every code takes an equal share.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    level_inputs: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    usage_loss: torch.Tensor


def usage_entropy_gap(residual: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """1 - H(mean soft assignment) / log K for residuals (B, d) against a codebook (K, d)."""
    d = squared_distances(residual, book)  # (B, K)
    temperature = d.min(dim=1).values.mean().detach().clamp_min(1e-8)
    p = torch.softmax(-d / temperature, dim=1).mean(0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    # log K as a Python float, not a tensor made on the book's device: on a GPU that was a host-to-device
    # copy in every training step (same float32 bits for every K tried, 2 to 8192).
    return 1.0 - entropy / math.log(book.shape[0])


def rotate_onto(e: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rotation trick: return ``q`` in the forward pass, a rotated + rescaled ``e`` in the backward.

    With u = e/|e|, v = q/|q| and w = (u+v)/|u+v| (all detached), R = I - 2ww^T + 2vu^T rotates u
    onto v; the output is sg(|q|/|e|) * R e, so the gradient w.r.t. e is that fixed rotation and
    scale applied to the upstream gradient. e, q: (B, d) -> (B, d).
    """
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (e / e_norm).detach()
    v = (q / q_norm).detach()
    w = F.normalize(u + v, dim=-1, eps=eps)
    rotated = e - 2.0 * (e * w).sum(-1, keepdim=True) * w + 2.0 * (e * u).sum(-1, keepdim=True) * v
    return (q_norm / e_norm).detach() * rotated


def cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, d) mean of the rows of x (N, d) with each label in [0, k); empty clusters get row means."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype).unsqueeze(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), x.mean(0, keepdim=True))


@torch.no_grad()
def ranked_codes(residual: torch.Tensor, book: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codewords of ``book`` (K, d) to each residual (B, d), nearest first (ties by
    code number, so column 0 is :func:`nearest`'s choice): codes (B, k) int64 and the norm of what
    each leaves, |r - c| (B, k), from the same squared distances the ranking used.

    The norms are not recomputed as |r - c| of gathered codewords: that (B, k, d) gather and
    subtraction was 64% of the encode time with 16 alternatives at d = 768 (one thread), four times
    the nearest-code search itself. Callers that report column 0 as the item's quantization error
    overwrite it with the explicit |r - c| (:func:`residual_codes`, ``RQVAE.quantize``)."""
    d = squared_distances(residual, book)
    k = min(k, book.shape[0])
    order = _smallest_stable(d, k) if 0 < k < book.shape[0] else d.sort(dim=1, stable=True).indices[:, :k]
    return order, d.gather(1, order).sqrt_()


def residual_codes(residual: torch.Tensor, books: list[torch.Tensor], alternatives: int = 0,
                   offsets: torch.Tensor | None = None, first_recon: torch.Tensor | None = None,
                   first_codes: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Greedy residual assignment of ``residual`` (B, D) to the codebooks ``books`` (each (K, D)), level by
    level: codes (B, L) int64, the norm of what they leave (B,), and with ``alternatives`` > 0 the ranked
    last-level codes and their errors (:func:`ranked_codes`; column 0 is the chosen code and its error
    the same bits as the returned norm), else None. The last level's distances are computed once for
    both the choice and the ranking.

    ``offsets`` (K, K): the second level picks ``argmin_j |r - c_j|^2 + offsets[level-1 code, j]``
    instead of the nearest centroid (:func:`rqvae.kmeans.balance_offsets`); the second level must not
    be the ranked last one.

    ``first_recon`` (K, D): the first level picks the nearest centroid of ``books[0]`` but subtracts its
    row of ``first_recon`` (the codeword a level-1 code adds to the reconstruction, when that is not the
    centroid that picks it: ``rqvae.train``'s joint refinement). ``first_codes`` (B,): the level-1 codes,
    when already known (they are the nearest centroids of ``books[0]``; its search is then skipped)."""
    if offsets is not None and (len(books) < 2 or (len(books) == 2 and alternatives > 0)):
        raise ValueError(f"offsets apply to a second level that is not ranked; got {len(books)} levels "
                         f"and {alternatives} alternatives")
    codes: list[torch.Tensor] = []
    ranked, errors = None, None
    for level, book in enumerate(books):
        if level == len(books) - 1 and alternatives > 0:
            ranked, errors = ranked_codes(residual, book, alternatives)
            idx = ranked[:, 0]
        elif level == 0 and first_codes is not None:
            idx = first_codes
        elif level == 1 and offsets is not None:
            idx = nearest_offset(residual, book, offsets, codes[0])
        else:
            idx = nearest(residual, book)[0]
        codes.append(idx)
        residual = residual - (first_recon if level == 0 and first_recon is not None else book)[idx]
    left = residual.norm(dim=-1)
    if errors is not None:
        errors[:, 0] = left
    return torch.stack(codes, dim=1), left, ranked, errors


def _smallest_stable(d: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k smallest values of each row of d (B, K), ascending, equal values by index:
    exactly the first k columns of ``d.sort(dim=1, stable=True).indices``, at the cost of a top-k (a full
    sort of K = 256 columns was 30% of the encode time with 16 alternatives, one CPU thread).

    ``topk`` alone may pick any of the values tied at the k-th place; a row where more than k values are
    at most the k-th smallest takes the full stable sort instead (rare: exact float ties)."""
    values, idx = d.topk(k, dim=1, largest=False, sorted=True)
    by_index = idx.sort(dim=1).indices  # the chosen set by code number, then stably by value
    idx = idx.gather(1, by_index)
    idx = idx.gather(1, values.gather(1, by_index).sort(dim=1, stable=True).indices)
    ambiguous = (d <= values[:, -1:]).sum(dim=1) > k
    if bool(ambiguous.any()):
        idx[ambiguous] = d[ambiguous].sort(dim=1, stable=True).indices[:, :k]
    return idx


def _forced(first: torch.Tensor | None, level: int) -> torch.Tensor | None:
    """``level``'s codes (B,) when an anchor's (B, A) codes give them, else None (chosen here)."""
    return first[:, level] if first is not None and level < first.shape[1] else None


class ResidualQuantizer(nn.Module):
    """L-level residual quantizer with independent or shared codebooks of K codewords of size d."""

    steps_unused: torch.Tensor  # (books, K) int64 buffer: training steps since each code was last used

    def __init__(
        self, *, dim: int, num_levels: int, codebook_size: int, shared: bool = False, estimator: str = "ste",
        commitment: str = "levels",
    ) -> None:
        super().__init__()
        self.dim, self.num_levels, self.codebook_size = dim, num_levels, codebook_size
        self.shared, self.estimator, self.commitment = shared, estimator, commitment
        n_books = 1 if shared else num_levels
        self.codebooks = nn.Parameter(torch.randn(n_books, codebook_size, dim) * 0.01)  # (books, K, d)
        self.register_buffer("steps_unused", torch.zeros(n_books, codebook_size, dtype=torch.long))

    def codebook(self, level: int) -> torch.Tensor:
        """(K, d) codewords used at ``level`` (0-based)."""
        return self.codebooks[0 if self.shared else level]

    def assign(self, z: torch.Tensor, first: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy residual assignment without gradients.

        z: (B, d); ``first``: optional (B, A) codes of the first A levels decided elsewhere (the
        input-space anchor), used instead of the nearest codewords at those levels.
        Returns codes (B, L) int64, level inputs (L, B, d), final residual (B, d).
        """
        residual = z.detach().float()
        codes, inputs = [], []
        for level in range(self.num_levels):
            book = self.codebook(level).detach().float()
            given = _forced(first, level)
            idx = given if given is not None else nearest(residual, book)[0]
            inputs.append(residual)
            codes.append(idx)
            residual = residual - book[idx]
        return torch.stack(codes, dim=1), torch.stack(inputs), residual

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the codewords named by ``codes`` (B, L) -> (B, d)."""
        return sum((self.codebook(lv)[codes[:, lv]] for lv in range(self.num_levels)),
                   torch.zeros(codes.shape[0], self.dim, device=codes.device))

    def forward(self, z: torch.Tensor, first: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize latents z (B, d) with the configured gradient estimator (``first``: see assign)."""
        codes, level_inputs, _ = self.assign(z, first)
        # Residuals that carry gradient to z: r_l = z - sum_{j<l} sg(c_j).
        offsets = torch.zeros_like(z)
        codebook_loss = commitment_loss = usage_loss = z.new_zeros(())
        for level in range(self.num_levels):
            selected = self.codebook(level)[codes[:, level]]  # (B, d), grad to the codebook
            r = z - offsets
            if self.training and _forced(first, level) is None:  # anchored level: usage is fixed
                usage_loss = usage_loss + usage_entropy_gap(r, self.codebook(level)) / self.num_levels
            codebook_loss = codebook_loss + F.mse_loss(selected, r.detach())
            if self.commitment == "levels":
                commitment_loss = commitment_loss + F.mse_loss(r, selected.detach())
            offsets = offsets + selected.detach()
        if self.commitment == "final":
            commitment_loss = F.mse_loss(z, offsets)
        if self.training:
            self._track_usage(codes)
        quantized = rotate_onto(z, offsets) if self.estimator == "rotation" else z + (offsets - z).detach()
        return QuantizerOutput(quantized, codes, level_inputs, codebook_loss, commitment_loss, usage_loss)

    @torch.no_grad()
    def _track_usage(self, codes: torch.Tensor) -> None:
        self.steps_unused += 1
        for level in range(self.num_levels):  # index_fill_ takes the 0 as a scalar: no host tensor to copy over
            self.steps_unused[0 if self.shared else level].index_fill_(0, codes[:, level], 0)

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, *, iters: int = 25, seed: int = 0,
                    first: torch.Tensor | None = None, tol: float = 0.0) -> None:
        """Initialise codebooks by k-means on z (N, d), level by level on the residuals.

        With a shared codebook the first level's k-means seeds it (later residuals are smaller
        and would otherwise pull every codeword towards zero). With ``first`` (B, A) codes fixed by
        an anchor, the anchored levels' codewords start at the mean latent residual of each anchor
        cluster. ``iters`` / ``tol``: the k-means' iterations at most and its early stop.
        """
        residual = z.detach().float()
        for level in range(1 if self.shared else self.num_levels):
            given = _forced(first, level)
            if given is not None:
                centers = cluster_means(residual, given, self.codebook_size)
            else:
                centers = kmeans(residual, self.codebook_size, iters=iters, seed=seed + level, tol=tol)
            self.codebooks.data[level] = centers.to(self.codebooks.dtype)
            idx = given if given is not None else nearest(residual, centers)[0]
            residual = residual - centers[idx]
        self.steps_unused.zero_()

    @torch.no_grad()
    def reset_dead_codes(self, level_inputs: torch.Tensor, codes: torch.Tensor, window: int,
                         generator: torch.Generator | None = None, anchored: int = 0) -> int:
        """Re-seed codes unused for ``window`` steps from the worst-quantized residuals.

        level_inputs: (L, B, d) residuals each level saw in a recent batch; codes: (B, L).
        ``anchored``: the first ``anchored`` levels' assignments come from the input-space anchor, so
        their books are left alone (re-seeding a latent codeword cannot change which items the
        anchor sends to it).
        Returns the number of codes re-seeded.
        """
        total = 0
        for book in range(int(anchored), self.codebooks.shape[0]):
            dead = (self.steps_unused[book] >= window).nonzero().squeeze(1)
            if dead.numel() == 0:
                continue
            level = book  # shared book: draw from level 0's residuals
            r = level_inputs[level]
            err = squared_distances(r, self.codebook(level).float()).gather(1, codes[:, level:level + 1])
            order = err.squeeze(1).argsort(descending=True)
            pick = order[torch.arange(dead.numel(), device=r.device) % order.numel()]
            noise = torch.randn(dead.numel(), self.dim, generator=generator, device="cpu").to(r.device)
            self.codebooks.data[book, dead] = (r[pick] + 1e-3 * r[pick].norm(dim=1, keepdim=True) * noise
                                               ).to(self.codebooks.dtype)
            self.steps_unused[book, dead] = 0
            total += int(dead.numel())
        return total
