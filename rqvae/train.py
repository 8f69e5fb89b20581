"""Training loop ``fit``: AdamW, warm-up + cosine decay, k-means init, dead-code reset, early stop."""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rqvae.callbacks import call
from rqvae.config import ModelConfig, TrainConfig
from rqvae.kmeans import balance_offsets, kmeans, nearest, squared_distances
from rqvae.losses import reconstruction_loss, taxonomy_loss
from rqvae.model import RQVAE
from rqvae.quantizer import cluster_means, residual_codes
from rqvae.sampler import HierarchicalSampler, shuffled_batches
from rqvae.taxonomy import guided_centers, guiding_depth


@dataclass
class FitResult:
    """What ``fit`` returns: the best model (eval mode, on ``device``) and its history."""

    model: RQVAE
    history: list[dict[str, float]]
    best_epoch: int
    device: str
    train_items: int
    holdout_items: int
    holdout_index: np.ndarray = field(repr=False)


def select_device(preference: str = "auto") -> torch.device:
    """"auto" picks cuda > mps > cpu; anything else is passed to ``torch.device``."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator for the loop's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into sorted (train, holdout) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = int(n * fraction) if n * fraction >= 1 else 0
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class _Loop:
    """State shared by the training steps of one ``fit`` call."""

    model: RQVAE
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    device: torch.device
    categories: torch.Tensor | None
    step: int = 0
    quantize: bool = True
    forward: Any = None  # the model, or torch.compile(model); checkpoints always come from ``model``
    anchor_codes: torch.Tensor | None = None  # (N, A) every item's anchored codes: the anchor is fixed in training
    graphs: _GraphedStep | None = None  # with cfg.cuda_graphs: the captured step (see step_on)

    def loss(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x (B, D); ``idx`` selects category rows for the regularizer."""
        first = None
        if self.quantize:  # the anchored codes in float32, outside autocast: as encoding computes them
            first = (self.anchor_codes[idx] if self.anchor_codes is not None and idx is not None
                     else self.model.anchor_codes(x))
        bf16 = self.cfg.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16,
                            cache_enabled=self.graphs is None):  # a graph must not keep casts made outside it
            if not self.quantize:  # autoencoder warm-up: no quantizer in the loop
                x_hat = self.model.decoder(self.model.encode_latent(x)).float()
                recon = reconstruction_loss(self.model.prepare(x), x_hat, self.cfg.reconstruction_loss)
                return {"recon": recon, "loss": recon}
            out = (self.model if self.forward is None else self.forward)(x, first)
        recon = reconstruction_loss(self.model.prepare(x), out.reconstruction.float(), self.cfg.reconstruction_loss)
        q = out.quant
        total = (recon + self.cfg.codebook_weight * q.codebook_loss + self.cfg.beta * q.commitment_loss
                 + self.cfg.usage_weight * q.usage_loss)
        terms = {"recon": recon, "codebook": q.codebook_loss, "commitment": q.commitment_loss, "usage": q.usage_loss}
        if self.categories is not None and idx is not None and self.cfg.taxonomy_weight > 0:
            tax = taxonomy_loss(self._prefixes(out.latent.float(), q.codes), self.categories[idx],
                                self.cfg.taxonomy_temperature)
            total = total + self.cfg.taxonomy_weight * tax
            terms["taxonomy"] = tax
        terms["loss"] = total
        return terms

    def _prefixes(self, z: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Per level, the cumulative codeword sum up to that level with a straight-through path to z."""
        quantizer = self.model.quantizer
        cumulative, out = torch.zeros_like(z), []
        for level in range(quantizer.num_levels):
            cumulative = cumulative + quantizer.codebook(level)[codes[:, level]].detach()
            out.append(z + (cumulative - z).detach())
        return out

    def train_step(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch x (B, D) of items ``idx``; returns its loss terms (detached)."""
        self.model.train()
        terms = self._update(x, idx)
        self._after_update(lambda: x)
        return terms

    def _update(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss, backward and optimizer step: the part of a step a CUDA graph captures, so it makes no
        decision on data on the host and reads nothing back."""
        terms = self.loss(x, idx)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}

    def _after_update(self, batch: Callable[[], torch.Tensor]) -> None:
        """The host's part of a step: the learning-rate schedule, the step count, and every
        ``dead_code_window // 10`` steps the dead-code reset from the step's batch (``batch()``: only
        gathered on those steps)."""
        self.scheduler.step()
        self.step += 1
        window = self.cfg.dead_code_window
        if self.quantize and window > 0 and self.step % max(1, window // 10) == 0:
            with torch.no_grad():
                codes, inputs, _ = self.model.assign(batch())
                self.model.quantizer.reset_dead_codes(inputs, codes, window, self.generator,
                                                      anchored=self.model.config.anchored)

    def step_on(self, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """A training step on the rows ``idx`` of the whole training array x (N, D): replayed from a
        CUDA graph when ``cfg.cuda_graphs`` holds and the batch is full, else :meth:`train_step`.
        The terms returned are the graph's own output tensors: use them before the next step."""
        if self.graphs is None or len(idx) != self.cfg.batch_size:
            return self.train_step(x[idx], idx)
        return self.graphs.step(self, x, idx)


GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before the capture, as torch's capture recipe asks


@dataclass
class _GraphedStep:
    """One full training step (:meth:`_Loop._update`) captured as a CUDA graph on the first full
    batches, then replayed: the host then launches one graph a step instead of each of its ~300
    kernels, which on a GPU cost the host 12-19 ms a step against about 2 ms of GPU work
    (bench/RESULTS.md). The batch's indices are copied into a fixed buffer and the rows are gathered
    inside the graph from the training array, which stays at one address for the whole fit.

    The last warm-up step runs with torch's sync debug mode at "error", so an op that would read back
    to the host (which a capture cannot hold) fails there, eagerly and with its own traceback, instead
    of breaking the capture. Either failure stops the fit with an error that names the fix."""

    warmed: int = 0
    replays: int = 0
    graph: Any = None
    side: Any = None  # the warm-up's side stream
    static_idx: torch.Tensor | None = None
    static_terms: dict[str, torch.Tensor] | None = None

    def step(self, loop: _Loop, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.graph is None and self.warmed < GRAPH_WARMUP_STEPS:
            return self._warm_up(loop, x, idx)
        if self.graph is None:
            self._capture(loop, x, idx)
        assert self.static_idx is not None and self.static_terms is not None
        loop.model.train()  # what the graph was captured in; the host-side work after it reads the flag too
        self.static_idx.copy_(idx)
        self.graph.replay()
        self.replays += 1
        loop._after_update(lambda: x[idx])
        return dict(self.static_terms)

    def _warm_up(self, loop: _Loop, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        self.warmed += 1
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        last, mode = self.warmed == GRAPH_WARMUP_STEPS, torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(self.side):
                loop.model.train()
                if last:
                    torch.cuda.set_sync_debug_mode("error")
                terms = loop._update(x[idx], idx)
        except RuntimeError as err:
            raise RuntimeError(f"cuda_graphs: the training step reads back to the host, so it cannot be captured "
                               f"as a CUDA graph ({err}); train with cuda_graphs off") from err
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(self.side)
        loop._after_update(lambda: x[idx])
        return terms

    def _capture(self, loop: _Loop, x: torch.Tensor, idx: torch.Tensor) -> None:
        loop.model.train()
        static_idx, graph, stream = idx.clone(), torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                terms = loop._update(x[static_idx], static_idx)
        except RuntimeError as err:  # torch's capture context may leave the capture stream current
            torch.cuda.set_stream(stream)
            cause = err.__context__ or err
            raise RuntimeError(f"cuda_graphs: capturing the training step as a CUDA graph failed ({cause}); train "
                               "with cuda_graphs off") from err
        self.graph, self.static_idx, self.static_terms = graph, static_idx, terms


def _batches(loop: _Loop, train_idx: torch.Tensor,
             sampler: HierarchicalSampler | None) -> Iterator[torch.Tensor]:
    """Index batches (into the full array) for one epoch."""
    if sampler is not None:
        yield from (train_idx[b] for b in sampler.batches(loop.generator, loop.device))
    else:
        yield from (train_idx[b] for b in shuffled_batches(len(train_idx), loop.cfg.batch_size,
                                                            loop.generator, loop.device))


@torch.no_grad()
def _evaluate(loop: _Loop, x: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
    """Held-out loss terms plus per-level code usage, one host sync."""
    loop.model.eval()
    sums: dict[str, torch.Tensor] = {}
    used = torch.zeros(loop.model.num_levels, loop.model.codebook_size, device=loop.device)
    for part in idx.split(8192):
        terms = loop.loss(x[part])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v * len(part)
        codes = loop.model.quantize(x[part]).codes
        used.scatter_(1, codes.T, 1.0)
    out = {f"val_{k}": float(v) / len(idx) for k, v in sums.items()}
    for level, u in enumerate(used.sum(1).tolist()):
        out[f"val_l{level + 1}_utilization"] = u / loop.model.codebook_size
    return out


def _init_codebooks(model: RQVAE, x: torch.Tensor, train_idx: torch.Tensor, cfg: TrainConfig,
                    generator: torch.Generator, catalog_items: int, categories: torch.Tensor | None = None) -> None:
    """k-means on up to ``kmeans_init_size`` training items: the input-space anchor (when the model
    has one, residual k-means over its levels), then the latent codebooks level by level on the
    residuals. With ``categories`` (the regularizer on) the level-1 anchor is taxonomy-guided."""
    rows, guide = _init_rows(x, train_idx, cfg, generator, categories)
    with torch.no_grad():
        model.eval()
        _fit_anchor(model, rows, cfg, catalog_items, guide=guide, pool=(x, train_idx))
        if model.fully_anchored:
            return
        z = torch.cat([model.encode_latent(part) for part in rows.split(8192)])
        first = model.anchor_codes(rows)
    model.quantizer.init_kmeans(z, iters=cfg.kmeans_iters, seed=cfg.seed, first=first, tol=cfg.kmeans_tol)


def adamw(params: Any, cfg: TrainConfig, device: torch.device, *, graphed: bool = False) -> torch.optim.AdamW:
    """AdamW at ``cfg``'s rate and decay: torch's fused implementation on CUDA, its default elsewhere.

    The seed card's training step is bound by the host launching kernels on a GPU, not by the GPU
    (bench/RESULTS.md): fused AdamW updates every parameter in one kernel per group where the
    multi-tensor default launches a dozen. CPU training keeps torch's default, and so its results bit
    for bit. ``graphed`` (a step replayed from a CUDA graph; ``params`` are param groups): the step
    counts live on the device (``capturable``) and every group's rate is a tensor there, which the
    schedule fills in place, since a replayed step reads its rate where the captured one did."""
    if graphed:
        groups = [dict(g, lr=torch.tensor(float(g.get("lr", cfg.lr)), device=device)) for g in params]
        return torch.optim.AdamW(groups, lr=torch.tensor(cfg.lr, device=device), weight_decay=cfg.weight_decay,
                                 fused=True, capturable=True)
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _build_loop(model: RQVAE, cfg: TrainConfig, steps_per_epoch: int, generator: torch.Generator,
                device: torch.device, categories: torch.Tensor | None) -> _Loop:
    books = [model.quantizer.codebooks]
    others = [p for name, p in model.named_parameters() if not name.startswith("quantizer.")]
    groups: list[dict[str, Any]] = [{"params": others}, {"params": books, "lr": cfg.lr * cfg.codebook_lr_scale}]
    graphed = cfg.cuda_graphs and categories is None  # the taxonomy's batches vary: those steps stay eager
    optimizer = adamw(groups, cfg, device, graphed=graphed)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, int(total * cfg.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))  # same factor for both groups
    forward = torch.compile(model) if cfg.compile else model
    return _Loop(model, cfg, optimizer, scheduler, generator, device, categories, forward=forward,
                 graphs=_GraphedStep() if graphed else None)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the block when ``enabled``."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def fit(
    x: np.ndarray,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    category_ids: np.ndarray | None = None,
    callbacks: Sequence[Any] = (),
    init: RQVAE | None = None,
    catalog_items: int | None = None,
) -> FitResult:
    """Train an RQ-VAE on embeddings x (N, D) float32 and return the best model by held-out loss.

    Args:
        x: (N, D) item embeddings.
        model_config: model shape; default ``ModelConfig(input_dim=D)``.
        train_config: training settings; default ``TrainConfig()``.
        category_ids: optional (N, T) int path-prefix ids per taxonomy depth (-1 = unknown);
            enables the contrastive regularizer and hierarchical batches when
            ``train_config.taxonomy_weight > 0``.
        callbacks: objects with ``on_train_begin/on_epoch_end/on_train_end`` (see callbacks.py).
        init: a trained model of the same shape to start from (a warm start, e.g. the previous
            generation's champion): its weights and codebooks are the starting point instead of the
            autoencoder warm-up and the k-means initialisation, and its input-space anchor is refined by
            at most ``warm_start_epochs`` Lloyd iterations that start at its centroids (and no joint
            refinement passes: ``TrainConfig.anchor_refine_passes``); training then runs
            at ``lr * warm_start_lr_scale`` for at most ``warm_start_epochs``. Codes therefore keep their
            meaning, so a retrained model gives most items the codes they had (docs/design.md "New
            generations").
        catalog_items: how many items the model will encode (x may be a sample of them); default
            len(x). It scales ``train_config.prefix_fill``'s cap from the catalog to the rows fitted.
    """
    cfg = train_config or TrainConfig()
    if catalog_items is not None and catalog_items < 1:
        raise ValueError(f"catalog_items must be at least 1, got {catalog_items}")
    if init is not None:
        passes = max(1, cfg.warm_start_epochs)  # epochs of fine-tuning, and Lloyd iterations of the anchor's refinement
        cfg = dataclasses.replace(cfg, lr=cfg.lr * cfg.warm_start_lr_scale, epochs=min(cfg.epochs, passes),
                                  kmeans_iters=min(cfg.kmeans_iters, passes),
                                  anchor_refine_passes=0)  # keeps what its model's refinement added
    with deterministic_algorithms(cfg.deterministic):
        return _fit(x, model_config, cfg, category_ids, list(callbacks), init, catalog_items or len(x))


def _fit(x: np.ndarray, model_config: ModelConfig | None, cfg: TrainConfig, category_ids: np.ndarray | None,
         callbacks: list[Any], init: RQVAE | None, catalog_items: int) -> FitResult:
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array (N, D) of embeddings, got shape {x.shape}")
    mcfg = model_config or ModelConfig(input_dim=int(x.shape[1]))
    if x.shape[1] != mcfg.input_dim:
        raise ValueError(f"x must have shape (N, {mcfg.input_dim}), got {x.shape}")
    if category_ids is not None and (np.ndim(category_ids) != 2 or len(category_ids) != len(x)):
        raise ValueError(f"category_ids must have shape (N={len(x)}, T), got {np.shape(category_ids)}")
    generator = seed_everything(cfg.seed)
    device = select_device(cfg.device)
    if cfg.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}: train with device='cuda' (or 'auto' on "
                         "a GPU machine), or leave cuda_graphs off")
    train_np, hold_np = split_holdout(len(x), cfg.holdout_fraction, cfg.seed)
    if len(train_np) < 2:
        raise ValueError(f"need at least 2 training items, got {len(train_np)}")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    train_idx, hold_idx = torch.from_numpy(train_np).to(device), torch.from_numpy(hold_np).to(device)
    model = RQVAE(mcfg).to(device)
    use_tax = category_ids is not None and cfg.taxonomy_weight > 0
    cats = torch.from_numpy(np.asarray(category_ids, dtype=np.int64)).to(device) if use_tax else None
    sampler = (HierarchicalSampler(cats[train_idx, 0], min(cfg.batch_size, len(train_np)),
                                   cfg.hierarchical_fraction) if cats is not None else None)
    steps = max(1, len(train_np) // cfg.batch_size)
    loop = _build_loop(model, cfg, steps, generator, device, cats)
    if init is None:
        if not model.fully_anchored:  # fully anchored, the autoencoder and its codebooks take no part
            _warm_up_autoencoder(loop, xt, train_idx, steps)
        _init_codebooks(model, xt, train_idx, cfg, generator, catalog_items, cats)
    else:
        _start_from(model, init, xt, train_idx, cfg, generator, catalog_items, cats)
    if model.fully_anchored:
        return _score_only(loop, xt, train_idx, hold_idx, callbacks)
    if mcfg.anchored:  # the anchor does not change while the epochs run: its codes are computed once
        with torch.no_grad():
            parts = [model.anchor_codes(part) for part in xt.split(8192)]
            loop.anchor_codes = torch.cat([p for p in parts if p is not None])
    return _run_epochs(loop, xt, train_idx, hold_idx, sampler, callbacks)


def _start_from(model: RQVAE, init: RQVAE, x: torch.Tensor, train_idx: torch.Tensor, cfg: TrainConfig,
                generator: torch.Generator, catalog_items: int, categories: torch.Tensor | None = None) -> None:
    """Warm start: ``init``'s weights, codebooks and anchor, the anchor refined on this training set."""
    differences = model.config.shape_differences(init.config)
    if differences:
        raise ValueError(f"cannot warm-start from a model of another shape ({'; '.join(differences)})")
    model.load_state_dict(init.state_dict())
    model.quantizer.steps_unused.zero_()
    if model.config.anchored:
        with torch.no_grad():
            rows, guide = _init_rows(x, train_idx, cfg, generator, categories)
            _fit_anchor(model, rows, cfg, catalog_items, refine=True, guide=guide, pool=(x, train_idx))


def _init_rows(x: torch.Tensor, train_idx: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
               categories: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``kmeans_init_size`` training rows drawn with ``generator``, and their (rows, T) category
    ids when the taxonomy guides the anchor (``categories`` given, ``taxonomy_anchor_scale`` > 0)."""
    pick = torch.randperm(len(train_idx), generator=generator)[: cfg.kmeans_init_size].to(x.device)
    rows = torch.cat([x[train_idx[p]] for p in pick.split(8192)])
    guided = categories is not None and cfg.taxonomy_anchor_scale > 0
    return rows, (categories[train_idx[pick]] if guided else None)  # type: ignore[index]


def _fit_anchor(model: RQVAE, rows: torch.Tensor, cfg: TrainConfig, catalog_items: int, *, refine: bool = False,
                guide: torch.Tensor | None = None,
                pool: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Residual k-means of the input-space anchor on ``rows``, level by level; with ``refine`` the
    Lloyd iterations start at the model's current centroids (a warm start keeps their meaning). With
    ``guide`` ((rows, T) category ids) level 1 is taxonomy-guided (``rqvae.taxonomy.guided_centers``)
    at the shallowest depth with at least K categories."""
    prepared = model.prepare(rows).float()
    residual = prepared
    first = torch.zeros(0, dtype=torch.long)  # the rows' level-1 codes, once level 1 is fitted
    for level in range(model.config.anchored):
        book = model.anchor_book(level)
        init = book.float() if refine else None
        if level == 0 and model.refines_first_level:  # what refinement added to each centroid, kept by a warm start
            shift = (model.anchor_recon.float() - book.float()) if refine else torch.zeros_like(book, dtype=torch.float)
        if level == 0 and guide is not None:
            depth = guiding_depth(guide.cpu().numpy(), model.codebook_size)
            centers = guided_centers(residual, guide[:, depth], model.codebook_size,
                                     scale=cfg.taxonomy_anchor_scale, epochs=cfg.taxonomy_anchor_epochs,
                                     iters=cfg.kmeans_iters, seed=cfg.seed, init=init, tol=cfg.kmeans_tol)
        else:
            centers = kmeans(residual, model.codebook_size, iters=cfg.kmeans_iters, seed=cfg.seed + level,
                             init=init, tol=cfg.kmeans_tol)
        if level == 0 and model.refines_first_level:
            if refine:  # a centroid Lloyd re-seeded elsewhere (its old self is not the nearest) starts unshifted
                same = nearest(centers, book.float())[0] == torch.arange(len(centers), device=centers.device)
                shift = shift * same.unsqueeze(1).to(shift.dtype)
            model.anchor_recon.copy_(centers + shift)
        book.copy_(centers)
        if level == 1 and model.balances_prefixes:
            idx = _balanced_level2(model, residual, centers, first, cfg, catalog_items, refine, pool)
        else:
            idx = nearest(residual, centers)[0]
        if level == 0:
            first = idx
        residual = residual - model.recon_book(level).float()[idx]
    if model.refines_first_level and cfg.anchor_refine_passes > 0:
        _refine_jointly(model, prepared, cfg.anchor_refine_passes)
        if model.balances_prefixes and cfg.prefix_fill > 0:  # the cap again, fitted anew for the refined codewords
            c1 = nearest(prepared, model.anchor_book(0).float())[0]
            _balanced_level2(model, prepared - model.recon_book(0).float()[c1], model.anchor_book(1).float(), c1,
                             cfg, catalog_items, refine, pool)


def _refine_jointly(model: RQVAE, prepared: torch.Tensor, passes: int) -> None:
    """``passes`` rounds of joint codeword refinement of a fully anchored model on its k-means rows
    (``prepared``: already :meth:`RQVAE.prepare`'d): encode the rows, then give each level in turn the
    least-squares codewords for those codes, the mean per code of what the other levels' (latest)
    codewords leave. Level 1's refined codewords go to ``anchor_recon``: its centroids keep picking its
    codes. A code no row holds keeps its codeword. Each round lowers the rows' squared reconstruction
    error for the codes it starts from; the next encoding may then pick other codes at levels 2 on."""
    if not model.refines_first_level:
        raise ValueError("joint refinement needs a fully anchored model with at least two levels")
    levels, k = model.num_levels, model.codebook_size
    first = nearest(prepared, model.anchor_book(0).float())[0]  # level 1's centroids do not change here
    for _ in range(passes):
        books = [model.recon_book(level).float() for level in range(levels)]
        codes = torch.cat([residual_codes(part, [model.anchor_book(0).float(), *books[1:]], offsets=model._offsets(),
                                          first_recon=books[0], first_codes=cells)[0]
                           for part, cells in zip(prepared.split(65536), first.split(65536))])
        for level in range(levels):
            rest = prepared.clone()
            for other in range(levels):
                if other != level:
                    rest -= books[other][codes[:, other]]
            held = torch.bincount(codes[:, level], minlength=k) > 0
            books[level] = torch.where(held.unsqueeze(1), cluster_means(rest, codes[:, level], k), books[level])
        for level, book in enumerate(books):
            model.recon_book(level).copy_(book)


# The 2-prefix fill cap's auction runs on up to this many training rows (the k-means fits use
# ``kmeans_init_size``): its cap is a whole number of rows, so more rows hold the catalog's cap closer.
BALANCE_ROWS = 400_000


def _balanced_level2(model: RQVAE, residual: torch.Tensor, centers: torch.Tensor, cells: torch.Tensor,
                     cfg: TrainConfig, catalog_items: int, refine: bool,
                     pool: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Fit ``model.anchor_offsets`` (``rqvae.kmeans.balance_offsets``) and return the level-2 codes of
    ``residual`` (the k-means rows after level 1, in ``cells``) under them.

    The auction runs on the first ``BALANCE_ROWS`` rows of ``pool`` (x, training row indices; default
    the k-means rows; at 400k x 256 its distances take 400 MB), with a cap of ``prefix_fill * K``
    items of a ``catalog_items`` catalog scaled to those rows. A warm start grows the model's offsets
    from where they were, so the items they moved stay moved; with ``prefix_fill`` 0 it keeps them as
    they are (a fresh fit then has none)."""
    d = torch.cat([squared_distances(part, centers) for part in residual.split(65536)])
    if cfg.prefix_fill <= 0:
        if not refine:
            model.anchor_offsets.zero_()
        return (d + model.anchor_offsets.float()[cells]).argmin(dim=1)
    bid_d, bid_cells = d, cells
    if pool is not None and len(pool[1]) > len(residual):
        x, idx = pool
        first_book, first_recon = model.anchor_book(0).float(), model.recon_book(0).float()
        parts, part_cells = [], []
        for chunk in idx[:BALANCE_ROWS].split(65536):
            p = model.prepare(x[chunk]).float()
            c1 = nearest(p, first_book)[0]
            parts.append(squared_distances(p - first_recon[c1], centers))
            part_cells.append(c1)
        bid_d, bid_cells = torch.cat(parts), torch.cat(part_cells)
    k = model.codebook_size
    cap = max(1, math.ceil(cfg.prefix_fill * k * len(bid_d) / max(catalog_items, len(bid_d))))
    offsets = balance_offsets(bid_d, bid_cells, cap=cap, init=model.anchor_offsets.float() if refine else None)
    model.anchor_offsets.copy_(offsets)
    return (d + offsets[cells]).argmin(dim=1)


def _warm_up_autoencoder(loop: _Loop, x: torch.Tensor, train_idx: torch.Tensor, steps: int) -> None:
    """``ae_warmup_epochs`` of reconstruction-only training with its own short AdamW."""
    if loop.cfg.ae_warmup_epochs <= 0:
        return
    main = loop.optimizer, loop.scheduler
    params = [p for name, p in loop.model.named_parameters() if not name.startswith("quantizer.")]
    loop.optimizer = adamw(params, loop.cfg, loop.device)
    loop.scheduler = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, lambda s: 1.0)
    loop.quantize = False
    for _ in range(loop.cfg.ae_warmup_epochs):
        for idx in _batches(loop, train_idx, None):
            loop.train_step(x[idx], idx)
    loop.quantize, loop.step = True, 0
    loop.optimizer, loop.scheduler = main


def _score_only(loop: _Loop, x: torch.Tensor, train_idx: torch.Tensor, hold_idx: torch.Tensor,
                callbacks: list[Any]) -> FitResult:
    """A fully anchored model is fitted once its anchor is: no epochs run. One evaluation (held-out items,
    else the training items) is its history, reported to the callbacks as epoch 0."""
    call(callbacks, "on_train_begin", {"epochs": 0, "device": str(loop.device),
                                       "train_items": len(train_idx), "holdout_items": len(hold_idx)})
    scored = _evaluate(loop, x, hold_idx if len(hold_idx) else train_idx)
    # the latent codebooks' loss terms would describe parts that take no part: only reconstruction and usage
    metrics = {k: v for k, v in scored.items() if k == "val_recon" or k.endswith("_utilization")}
    metrics["val_loss"] = metrics["val_recon"]
    call(callbacks, "on_epoch_end", 0, metrics)
    call(callbacks, "on_train_end", {"best_epoch": 0, "epochs_run": 0})
    return FitResult(loop.model.eval(), [{"epoch": 0.0, **metrics}], 0, str(loop.device), len(train_idx),
                     len(hold_idx), hold_idx.cpu().numpy())


def _run_epochs(loop: _Loop, x: torch.Tensor, train_idx: torch.Tensor, hold_idx: torch.Tensor,
                sampler: HierarchicalSampler | None, callbacks: list[Any]) -> FitResult:
    """The epoch loop with early stopping on held-out reconstruction loss; restores the best weights."""
    cfg, history = loop.cfg, []
    best = (math.inf, -1, copy.deepcopy(loop.model.state_dict()))
    call(callbacks, "on_train_begin", {"epochs": cfg.epochs, "device": str(loop.device),
                                       "train_items": len(train_idx), "holdout_items": len(hold_idx)})
    for epoch in range(cfg.epochs):
        sums: dict[str, torch.Tensor] = {}
        n_batches = 0
        for idx in _batches(loop, train_idx, sampler):
            for k, v in loop.step_on(x, idx).items():
                sums[k] = sums.get(k, 0) + v
            n_batches += 1
        metrics = {f"train_{k}": float(v) / n_batches for k, v in sums.items()}
        metrics["lr"] = float(loop.scheduler.get_last_lr()[0])
        if len(hold_idx) and (epoch + 1) % cfg.eval_every == 0:
            metrics.update(_evaluate(loop, x, hold_idx))
        # Reconstruction through the quantizer is what the codes must serve; the total loss also
        # holds commitment/codebook terms that grow while the latents spread, misleading the stop.
        score = metrics.get("val_recon", math.inf if len(hold_idx) else metrics["train_recon"])
        if score < best[0]:  # epochs not evaluated (eval_every > 1) never compete with evaluated ones
            best = (score, epoch, copy.deepcopy(loop.model.state_dict()))
        history.append({"epoch": float(epoch), **metrics})
        call(callbacks, "on_epoch_end", epoch, metrics)
        if cfg.patience and epoch - best[1] >= cfg.patience:
            break
    loop.model.load_state_dict(best[2])
    summary: dict[str, Any] = {"best_epoch": best[1], "epochs_run": len(history)}
    if loop.graphs is not None:
        summary["graph_replays"] = loop.graphs.replays  # steps replayed from the CUDA graph (the rest ran eagerly)
    call(callbacks, "on_train_end", summary)
    return FitResult(loop.model.eval(), history, best[1], str(loop.device), len(train_idx), len(hold_idx),
                     hold_idx.cpu().numpy())
