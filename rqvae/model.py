"""RQ-VAE: MLP encoder -> residual quantizer -> mirrored MLP decoder (Rajput et al. 2023, TIGER)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rqvae.config import ModelConfig
from rqvae.quantizer import QuantizerOutput, ResidualQuantizer, ranked_codes, residual_codes


class Quantized(NamedTuple):
    """Codes of a batch: codes (B, L) int64; error (B,) float32 = |latent - sum of its codewords| (for a
    fully anchored model: |normalised input - sum of its centroids|).

    With ``quantize(x, alternatives=k)`` also the k best last-level codes (B, k) int64, nearest first
    (column 0 is ``codes[:, -1]``), and the error each would give (B, k) float32.
    """

    codes: torch.Tensor
    error: torch.Tensor
    alternatives: torch.Tensor | None = None
    alternative_errors: torch.Tensor | None = None


class RQVAEOutput(NamedTuple):
    """Training-time forward pass: reconstruction (B, D), latent (B, d) and the quantizer's output."""

    reconstruction: torch.Tensor
    latent: torch.Tensor
    quant: QuantizerOutput


def mlp(widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of the given widths with SiLU (and optional dropout) between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Residual-quantized autoencoder that maps an item embedding to L codes of K each.

    Input x: (B, D) float32. ``quantize`` gives codes (B, L); ``decode_codes`` maps codes back to
    (B, D) reconstructions; ``forward`` is the training pass.
    """

    anchor: torch.Tensor  # (K, D) input-space level-1 centroids, when config.anchor_first_level
    anchor_deeper: torch.Tensor  # (A - 1, K, D) input-space residual centroids of levels 2..A, when A > 1
    anchor_offsets: torch.Tensor  # (K, K) level-2 offsets per level-1 code, when A > 1 and L > 2 (zeros: off)
    anchor_recon: torch.Tensor  # (K, D) what a level-1 code adds to the reconstruction, when fully anchored, L > 1

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = mlp(widths, config.dropout)
        self.decoder = mlp(widths[::-1], config.dropout)
        self.quantizer = ResidualQuantizer(
            dim=config.latent_dim, num_levels=config.num_levels, codebook_size=config.codebook_size,
            shared=config.shared_codebook, estimator=config.estimator,
        )
        if config.anchor_first_level:
            # Random until fit() replaces it with k-means centroids, like the latent codebooks.
            self.register_buffer("anchor", torch.randn(config.codebook_size, config.input_dim) * 0.01)
            if config.anchored > 1:
                self.register_buffer("anchor_deeper", torch.randn(
                    config.anchored - 1, config.codebook_size, config.input_dim) * 0.01)
            if self.balances_prefixes:
                # Zero (nearest centroid) until fit() balances the 2-prefixes (TrainConfig.prefix_fill).
                self.register_buffer("anchor_offsets", torch.zeros(config.codebook_size, config.codebook_size))
            if self.refines_first_level:
                # fit() sets it to the level-1 centroids, then refines it with the deeper levels
                # (TrainConfig.anchor_refine_passes); a level-1 code is still picked by ``anchor``.
                self.register_buffer("anchor_recon", self.anchor.clone())

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    @property
    def fully_anchored(self) -> bool:
        """Every level is anchored: the codes are residual k-means in input space, the reconstruction is
        their centroid sum, and the encoder, decoder and latent codebooks take no part (``fit`` trains
        nothing)."""
        return self.config.anchored == self.config.num_levels

    @property
    def balances_prefixes(self) -> bool:
        """The anchored level 2 has per-level-1-code offsets (``anchor_offsets``) that keep one level-2
        code from crowding a level-1 cell: at least two anchored levels and a level after them."""
        return self.config.anchored >= 2 and self.config.num_levels >= 3

    @property
    def refines_first_level(self) -> bool:
        """Fully anchored with a level after the first: level 1's reconstruction codeword is its own
        buffer (``anchor_recon``), refined together with the deeper levels' centroids so that the sum
        of the codewords reconstructs better, while ``anchor`` (plain k-means of the inputs) keeps
        picking level-1 codes: the level-1 cells stay what input-space k-means made them."""
        return self.fully_anchored and self.config.num_levels > 1

    def recon_book(self, level: int) -> torch.Tensor:
        """(K, D) codewords that anchored ``level``'s codes add to the reconstruction (and subtract from
        the residual the next level quantizes): :meth:`anchor_book`'s, except level 1's when
        :attr:`refines_first_level`."""
        return self.anchor_recon if level == 0 and self.refines_first_level else self.anchor_book(level)

    def _first_recon(self) -> torch.Tensor | None:
        return self.anchor_recon.float() if self.refines_first_level else None

    def _offsets(self) -> torch.Tensor | None:
        return self.anchor_offsets.float() if self.balances_prefixes else None

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space input: x (B, D), L2-normalised when the config says so."""
        return F.normalize(x, dim=-1) if self.config.normalize_inputs else x

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output z (B, d) for raw embeddings x (B, D)."""
        return self.encoder(self.prepare(x))

    def anchor_book(self, level: int) -> torch.Tensor:
        """(K, D) input-space centroids of anchored ``level`` (0-based, below ``config.anchored``)."""
        return self.anchor if level == 0 else self.anchor_deeper[level - 1]

    @torch.no_grad()
    def anchor_codes(self, x: torch.Tensor, *, prepared: bool = False) -> torch.Tensor | None:
        """(B, A) codes of the A anchored levels (residual k-means in input space), or None without
        an anchor.

        ``prepared``: x is already :meth:`prepare`'s output (saves normalising it twice).
        """
        if not self.config.anchored:
            return None
        books = [self.anchor_book(level).float() for level in range(self.config.anchored)]
        return residual_codes((x if prepared else self.prepare(x)).float(), books, offsets=self._offsets(),
                              first_recon=self._first_recon())[0]

    def anchor_sum(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, D) sum of the anchored levels' input-space codewords (:meth:`recon_book`) named by ``codes``
        (B, >= A)."""
        return sum((self.recon_book(level)[codes[:, level]] for level in range(self.config.anchored)),
                   torch.zeros(codes.shape[0], self.config.input_dim, device=codes.device))

    def _latent_and_anchor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder output z (B, d) and anchor codes for x (B, D), normalising x once for both."""
        p = self.prepare(x)
        return self.encoder(p), self.anchor_codes(p, prepared=True)

    def forward(self, x: torch.Tensor, first: torch.Tensor | None = None) -> RQVAEOutput:
        """Training pass for x (B, D); ``first``: the anchored codes (B, A) when known already (they
        are the anchor's: computed here when None)."""
        if first is None:
            z, first = self._latent_and_anchor(x)
        else:
            z = self.encode_latent(x)
        quant = self.quantizer(z.float(), first)
        if self.fully_anchored and first is not None:
            return RQVAEOutput(self.anchor_sum(first), z, quant)
        reconstruction = self.decoder(quant.quantized)
        if self.config.anchor_reconstruction and first is not None:
            reconstruction = reconstruction + self.anchor_sum(first)
        return RQVAEOutput(reconstruction, z, quant)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (B, L), per-level residual inputs (L, B, d) and final residual (B, d) for x (B, D)."""
        z, first = self._latent_and_anchor(x)
        return self.quantizer.assign(z.float(), first)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, alternatives: int = 0) -> Quantized:
        """Codes (B, L) and quantization error (B,) for raw embeddings x (B, D); with
        ``alternatives`` > 0 also that many ranked last-level codes (see :class:`Quantized`). Fully
        anchored, the error and the alternatives are the input-space residual's, as RQ-KMeans'."""
        if self.fully_anchored:
            books = [self.anchor_book(level).float() for level in range(self.num_levels)]
            return Quantized(*residual_codes(self.prepare(x).float(), books, alternatives, self._offsets(),
                                             self._first_recon()))
        codes, inputs, residual = self.assign(x)
        if alternatives <= 0:
            return Quantized(codes, residual.norm(dim=-1))
        ranked, errors = ranked_codes(inputs[-1], self.quantizer.codebook(self.num_levels - 1).float(), alternatives)
        left = residual.norm(dim=-1)
        errors[:, 0] = left  # the item's own code: the same bits as its quantization error
        return Quantized(codes, left, ranked, errors)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, D) of items from their codes (B, L)."""
        if self.fully_anchored:
            return self.anchor_sum(codes)
        out = self.decoder(self.quantizer.codes_to_latent(codes))
        return out + self.anchor_sum(codes) if self.config.anchor_reconstruction else out
