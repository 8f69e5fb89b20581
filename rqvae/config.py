"""Frozen configuration dataclasses for the RQ-VAE model and its training.

Both round-trip through plain dicts (``asdict`` / ``from_dict``) so a checkpoint or an MLflow run
can carry them and rebuild the exact model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")

ESTIMATORS = ("ste", "rotation")
RECON_LOSSES = ("mse", "cosine")


class DictConfig:
    """Mixin for frozen config dataclasses: plain-dict round trip for checkpoints and MLflow."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build from a dict, turning lists back into tuples and rejecting unknown keys."""
        unknown = set(data) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class ModelConfig(DictConfig):
    """Shape of an RQ-VAE.

    Attributes:
        input_dim: D, length of the item embeddings.
        hidden_dims: widths of the encoder's hidden layers; the decoder mirrors them.
        latent_dim: width of the quantized latent (the codewords' dimension).
        num_levels: L, residual quantization levels (length of the semantic-ID code tuple).
        codebook_size: K, codes per level.
        shared_codebook: one codebook for all levels instead of one per level.
        estimator: gradient estimator through the quantizer: "ste" (straight-through) or
            "rotation" (rotation trick, Fifty et al. 2024).
        normalize_inputs: L2-normalise embeddings before encoding (cosine geometry).
        anchor_first_level: take the level-1 code from K k-means centroids fitted on the
            (normalised) input embeddings and stored in the model; levels 2..L quantize the
            learned latent. A narrow latent keeps the highest-variance directions, which need not
            be the ones that decide who is whose neighbour; anchoring keeps coarse prefixes as
            coherent as RQ-KMeans while the finer levels keep the RQ-VAE's spread.
        anchor_levels: how many leading levels the input-space anchor names when
            ``anchor_first_level`` is set: 1 (level 1 only) or more, each further level a k-means
            of the input-space residual the previous anchor levels left (residual k-means). Up to
            ``num_levels``: then every level is anchored, the tokenizer is residual k-means in input
            space with the model's interface (registry, warm start, alignment, collision-aware last
            level), and the encoder, decoder and latent codebooks are left untrained and unused.
        anchor_reconstruction: the reconstruction is the anchored levels' input-space centroids
            plus the decoder's output, so the decoder learns what the anchor leaves (needs
            ``anchor_first_level``).
        dropout: dropout probability in the encoder/decoder hidden layers.
        collision_alternatives: when > 0, an item whose full code tuple another item fits better
            takes the nearest free one of its this-many nearest last-level codes before a suffix is
            needed (:func:`rqvae.resolve.spread_last_level`; the job applies it when it issues IDs).
            0 keeps every item on its nearest code. Part of the model because it decides its IDs:
            every run with the model issues them the same way.
    """

    input_dim: int
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256
    shared_codebook: bool = False
    estimator: str = "ste"
    normalize_inputs: bool = True
    anchor_first_level: bool = True
    anchor_levels: int = 1
    anchor_reconstruction: bool = False
    dropout: float = 0.0
    collision_alternatives: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.collision_alternatives <= self.codebook_size:
            raise ValueError(f"collision_alternatives must be between 0 and codebook_size = {self.codebook_size}, "
                             f"got {self.collision_alternatives}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if min(self.input_dim, self.latent_dim, self.num_levels, self.codebook_size) < 1:
            raise ValueError("input_dim, latent_dim, num_levels and codebook_size must be >= 1")
        if not 1 <= self.anchor_levels <= self.num_levels:
            raise ValueError(f"anchor_levels must be between 1 and num_levels = {self.num_levels}, "
                             f"got {self.anchor_levels}")

        if self.shared_codebook and self.anchor_first_level and self.anchor_levels == self.num_levels:
            raise ValueError("shared_codebook shares the latent codebook of the learned levels, and with anchor_levels "
                             "= num_levels every level is anchored (each with its own centroids): use fewer anchor "
                             "levels, or no shared codebook")
        if self.anchor_reconstruction and not self.anchor_first_level:
            raise ValueError("anchor_reconstruction adds the anchor's centroids, so it needs anchor_first_level")

    def shape_differences(self, other: ModelConfig) -> list[str]:
        """The fields (``name: mine vs other``) in which ``other`` is another model than this one.
        ``collision_alternatives`` is left out: it decides how IDs are issued, not the weights, so a
        warm start may change it."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in fields(self)
                if f.name != "collision_alternatives" and getattr(self, f.name) != getattr(other, f.name)]

    @property
    def anchored(self) -> int:
        """Number of leading levels the input-space anchor decides (0 without an anchor)."""
        return self.anchor_levels if self.anchor_first_level else 0


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """How ``rqvae.fit`` trains.

    Attributes:
        epochs: maximum passes over the training split.
        batch_size: items per optimisation step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of all steps with linear warm-up from 0 to ``lr``.
        min_lr_ratio: cosine decay floor as a fraction of ``lr``.
        beta: weight of the commitment loss (encoder pulled towards its codewords).
        codebook_weight: weight of the codebook loss (codewords pulled towards the residuals).
        usage_weight: weight of the code-usage (diversity) loss that pushes every level towards
            using all K codes evenly (batch-level entropy of soft assignments; 0 = off).
        reconstruction_loss: "mse" or "cosine" (1 - cos) between input and reconstruction.
        holdout_fraction: share of the items held out for early stopping and evaluation.
        patience: epochs without improvement of the held-out reconstruction loss before stopping
            (0 = never stop early).
        seed: seeds torch/numpy generators; the same seed gives the same model and codes.
        kmeans_init_size: items used for the k-means initialisation of the codebooks.
        kmeans_iters: Lloyd iterations per level for that initialisation (and for the input-space
            anchor's levels), at most.
        kmeans_tol: those iterations stop once an assignment differs from the one before it in at
            most this share of the rows (0: always ``kmeans_iters``). Run to this point instead of a
            fixed 25 iterations, the fully anchored default reconstructs WordNet's nouns at 0.6779
            instead of 0.6763 for 28 s of fitting instead of 19 s, and a 200k x 768 synthetic sample
            equally well in the same time (it converges sooner; bench/RESULTS.md).
        prefix_fill: with at least two anchored levels and a level after them: the most items a
            2-prefix should hold, as a share of the K full tuples it has room for, in the catalog the
            model will encode (``fit``'s ``catalog_items``). Level 2 then picks the code with the
            smallest distance plus a learned offset per (level-1 code, level-2 code)
            (``rqvae.kmeans.balance_offsets``), fitted so that on the training rows (up to
            ``rqvae.train.BALANCE_ROWS``) no pair holds more than the cap scaled to them; on the whole
            catalog it then holds approximately. Without it a cell that k-means left large sends its
            items to the few level-2 centroids that fit it, past the K distinct tuples a 2-prefix can
            hold (synthetic 1M x 768: 8,067 items in the largest 2-prefix, 34,221 items beyond the K
            their prefix can tell apart; bench/RESULTS.md). A cap of a few times the even share of the
            K^2 prefixes instead hurt 2-prefix coherence on WordNet (P2 nn 0.242 -> 0.211): only
            prefixes that would overflow are split. 0 = no new offsets (a fresh fit has none, plain
            residual k-means; a warm start keeps those of the model it starts from). The job's default
            is 0.5; this library default is 0.
        anchor_refine_passes: a fully anchored model (every level residual k-means in input space)
            refines its codewords jointly after the level-by-level fit, this many passes over the
            k-means rows: each pass encodes them, then sets every level's codewords, one level after
            another, to the means of what the other levels leave of the items holding each code (the
            least-squares codewords for those codes). Level 1's codes are still picked by its k-means
            centroids; only what a level-1 code adds to the reconstruction (``RQVAE.anchor_recon``)
            changes, so level-1 cells, P1 and level-1 NMI stay exactly as they were. The 2-prefix
            offsets are fitted anew after the last pass. Needs at least two levels (one has nothing to
            refine against: the option does nothing there). On WordNet's nouns (82k x 384) 5 passes raise
            the collision-free reconstruction cosine 0.6779 -> 0.6809 and P2 nn 0.229 -> 0.240 for
            6-10 s of fitting (1 pass: 0.6802; 10: 0.6811; bench/RESULTS.md). 0 = off (the codewords
            are the level-by-level k-means centroids). The job's default is 5; this library default
            is 0. A warm start runs none: it keeps what its model's refinement added to each level-1
            centroid, and its Lloyd iterations start at the refined codewords of levels 2 on.
            Refining there too moved more codes (demo catalog + 10% new items: full code tuples kept
            84.6% without, 79.2% with 3 passes) for +0.0003 of reconstruction cosine, so a model gets
            refined codewords with a fresh generation.
        dead_code_window: steps a code may go unused before it is re-seeded (0 = never).
        taxonomy_weight: lambda of the catalog-tree contrastive regularizer (0 = off; it is
            also off when no categories are given).
        taxonomy_temperature: softmax temperature of that contrastive loss.
        hierarchical_fraction: share of each batch drawn from one parent category's children
            when the regularizer is on.
        taxonomy_anchor_scale: with the regularizer on and an input-space anchor, the level-1
            anchor is guided by the taxonomy (``rqvae.taxonomy.guided_centers``): items are clustered
            on ``[x, scale * their category's mean]`` at the shallowest depth with at least K
            categories, and the centroids are fitted to reproduce those clusters from x alone.
            0 = the plain k-means anchor.
        taxonomy_anchor_epochs: epochs of that nearest-centroid fit.
        device: "auto" (cuda > mps > cpu), or a torch device string.
        bf16: bfloat16 autocast for the forward pass on CUDA.
        compile: wrap the model in ``torch.compile`` for training.
        cuda_graphs: capture one full training step (forward, backward, AdamW) as a CUDA graph after
            3 eager steps and replay it for every full batch: the host launches one graph instead of
            each kernel, which is what bounds the seed card's step on a GPU (bench/RESULTS.md). CUDA
            only, not with ``compile``; with the taxonomy regularizer (whose batches vary) steps run
            eagerly. A step that cannot be captured (an op reading back to the host) stops the fit
            with an error that says to turn this off. The graphed optimizer's rates are float32
            tensors, so runs differ from eager ones in the last bits. Not yet measured on a GPU.
        eval_every: epochs between held-out evaluations.
        ae_warmup_epochs: epochs of plain autoencoder training (no quantizer) before the codebooks
            are initialised by k-means on the trained latents. A random encoder moves fast once
            reconstruction gradients arrive; codebooks fitted before that are left behind and
            collapse onto a few codes.
        codebook_lr_scale: learning-rate multiplier for the codebooks (they must keep up with
            the moving latents).
        warm_start_lr_scale: a warm start (``fit(..., init=model)``) trains at ``lr`` times this: it
            fine-tunes a trained model, and at the full rate the codebooks drift so far that most
            items change codes (100k-item demo catalog, 10% new items, another seed: 2-prefix kept
            by 39% at 1e-3, 88-96% at 1e-4; docs/design.md "New generations").
        warm_start_epochs: a warm start trains at most this many epochs. Every epoch of fine-tuning
            moves more codes for little gain (demo catalog retrained on itself at 1e-4: full code
            tuples kept 90.7% after 3 epochs, 79.4% after 10, 55.1% after 30, with reconstruction
            cosine 0.6064 / 0.6069 / 0.6052 against 0.6061 before); raise it when the catalog drifted
            far and more codes may move. It also caps the Lloyd iterations that refine the input-space
            anchor, for the same reason: a fully anchored model warm-started on the demo catalog + 10%
            new items kept 86.9% of its full code tuples after 2 iterations, 78.9% after 5 and 67.2%
            after 25, with reconstruction cosine 0.6357 / 0.6359 / 0.6362 (0.6353 unrefined).
        deterministic: run ``fit`` under ``torch.use_deterministic_algorithms`` (warn-only; the
            previous setting is restored afterwards). On CPU the backward of codebook indexing
            otherwise sums in a varying order and two same-seed runs drift apart. On CUDA also set
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before the process starts.
    """

    epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.05
    beta: float = 0.25
    codebook_weight: float = 1.0
    usage_weight: float = 0.1
    reconstruction_loss: str = "mse"
    holdout_fraction: float = 0.05
    patience: int = 10
    seed: int = 0
    kmeans_init_size: int = 100_000
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-3
    prefix_fill: float = 0.0
    anchor_refine_passes: int = 0
    dead_code_window: int = 100
    taxonomy_weight: float = 0.0
    taxonomy_temperature: float = 0.1
    hierarchical_fraction: float = 0.5
    taxonomy_anchor_scale: float = 2.0
    taxonomy_anchor_epochs: int = 3
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    eval_every: int = 1
    ae_warmup_epochs: int = 5
    codebook_lr_scale: float = 10.0
    warm_start_lr_scale: float = 0.1
    warm_start_epochs: int = 3
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.reconstruction_loss not in RECON_LOSSES:
            raise ValueError(f"reconstruction_loss must be one of {RECON_LOSSES}")
        if self.cuda_graphs and self.compile:
            raise ValueError("cuda_graphs and compile cannot both be on: a compiled model is not captured here; "
                             "turn one off (torch.compile(mode='reduce-overhead') makes its own graphs)")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if self.kmeans_iters < 1 or not 0.0 <= self.kmeans_tol < 1.0:
            raise ValueError(f"kmeans_iters must be >= 1 and kmeans_tol in [0, 1); got {self.kmeans_iters} and "
                             f"{self.kmeans_tol}")
        if self.anchor_refine_passes < 0:
            raise ValueError(f"anchor_refine_passes must be >= 0 (0 = off), got {self.anchor_refine_passes}")
        if not 0.0 <= self.prefix_fill <= 1.0:
            raise ValueError(f"prefix_fill must be in [0, 1] (0 = off), got {self.prefix_fill}")
