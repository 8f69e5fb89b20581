"""Tests of the training side of rqvae: fit, losses, samplers, schedule, and one quality run."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from rqvae import RQVAE, FitResult, ModelConfig, RQKMeans, RQKMeansConfig, TrainConfig, encode_array, fit
from rqvae import train as rqvae_train
from rqvae.evaluate import evaluate_model
from rqvae.losses import level_weights, reconstruction_loss, supervised_contrastive, taxonomy_loss
from rqvae.sampler import HierarchicalSampler, shuffled_batches
from rqvae.synthetic import CatalogSpec, make_catalog
from rqvae.train import lr_factor, select_device, split_holdout

MODEL = ModelConfig(input_dim=32, hidden_dims=(64, 32), latent_dim=8, num_levels=2, codebook_size=16)
TRAIN = TrainConfig(epochs=3, batch_size=256, ae_warmup_epochs=1, kmeans_iters=10, patience=0, seed=0)
SELECTION = "val_recon"  # the held-out metric fit selects the best epoch by (lower is better)
HISTORY_KEYS = {"epoch", "lr", "train_loss", "train_recon", "train_codebook", "train_commitment",
                "val_loss", "val_recon", "val_codebook", "val_commitment", "val_l1_utilization",
                "val_l2_utilization"}


@pytest.fixture(scope="module")
def catalog() -> Any:
    return make_catalog(CatalogSpec(n_items=2000, dim=32, seed=1))


@pytest.fixture(scope="module")
def fitted(catalog: Any) -> FitResult:
    return fit(catalog.embeddings, MODEL, TRAIN)


class Recorder:
    """Callback that records every hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.calls.append(("begin", info))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append(("epoch", (epoch, dict(metrics))))

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.calls.append(("end", summary))


def weighted_terms(entry: dict[str, float], prefix: str, cfg: TrainConfig) -> float:
    """The loss rebuilt from its logged terms; a new, unknown term fails the lookup on purpose."""
    weights = {"recon": 1.0, "codebook": cfg.codebook_weight, "commitment": cfg.beta,
               "usage": cfg.usage_weight, "taxonomy": cfg.taxonomy_weight}
    terms = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix) and k != prefix + "loss"}
    return sum(weights[name] * v for name, v in terms.items() if not name.endswith("utilization"))


def heldout_loss(model: RQVAE, x: np.ndarray, cfg: TrainConfig) -> tuple[float, float]:
    """The fit loop's held-out (recon, loss) recomputed from the model's parts (mse, levels commitment,
    level 1 from the input-space anchor when the model has one)."""
    with torch.no_grad():
        xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
        residual = model.encoder(xt)
        quantized, sq_err = torch.zeros_like(residual), 0.0
        for level in range(model.num_levels):
            book = model.quantizer.codebooks[0 if model.config.shared_codebook else level]
            if level == 0 and model.config.anchor_first_level:  # level 1 chosen in input space
                idx = (xt[:, None, :] - model.anchor[None]).pow(2).sum(-1).argmin(1)
            else:
                idx = (residual[:, None, :] - book[None]).pow(2).sum(-1).argmin(1)
            word = book[idx]
            sq_err += float((residual - word).pow(2).mean())
            quantized, residual = quantized + word, residual - word
        recon = float((xt - model.decoder(quantized)).pow(2).sum(-1).mean())
    return recon, recon + (cfg.codebook_weight + cfg.beta) * sq_err


# ---------------------------------------------------------------- fit


def test_same_seed_same_model_other_seed_other_codes(catalog: Any, fitted: FitResult) -> None:
    x = catalog.embeddings
    again = fit(x, MODEL, TRAIN)
    codes = encode_array(fitted.model, x).codes
    np.testing.assert_array_equal(encode_array(again.model, x).codes, codes)
    for k, v in fitted.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    other = fit(x, MODEL, replace(TRAIN, seed=1))
    assert (encode_array(other.model, x).codes != codes).any(1).mean() > 0.5


def test_fit_result_and_history(catalog: Any, fitted: FitResult) -> None:
    assert isinstance(fitted.model, RQVAE) and not fitted.model.training
    assert fitted.device == "cpu"
    assert (fitted.train_items, fitted.holdout_items) == (1900, 100)
    hold = fitted.holdout_index
    assert len(hold) == 100 and np.all(np.diff(hold) > 0) and hold.min() >= 0 and hold.max() < 2000
    assert [h["epoch"] for h in fitted.history] == [0.0, 1.0, 2.0]
    for h in fitted.history:
        assert set(h) >= HISTORY_KEYS
        assert all(math.isfinite(v) for v in h.values())
        assert 0 < h["val_l1_utilization"] <= 1 and 0 < h["val_l2_utilization"] <= 1
        assert h["train_loss"] == pytest.approx(weighted_terms(h, "train_", TRAIN), rel=1e-5)
        assert h["val_loss"] == pytest.approx(weighted_terms(h, "val_", TRAIN), rel=1e-5)
    assert fitted.best_epoch == int(np.argmin([h[SELECTION] for h in fitted.history]))


def test_callbacks_are_called_in_order(catalog: Any) -> None:
    rec = Recorder()
    result = fit(catalog.embeddings, MODEL, replace(TRAIN, epochs=2), callbacks=[rec, object()])
    assert [name for name, _ in rec.calls] == ["begin", "epoch", "epoch", "end"]
    begin, end = rec.calls[0][1], rec.calls[-1][1]
    assert begin == {"epochs": 2, "device": "cpu", "train_items": 1900, "holdout_items": 100}
    assert [e for e, _ in (c[1] for c in rec.calls[1:3])] == [0, 1]
    assert rec.calls[1][1][1]["val_loss"] == result.history[0]["val_loss"]
    assert end == {"best_epoch": result.best_epoch, "epochs_run": 2}


def test_early_stopping_on_a_plateau(catalog: Any) -> None:
    # lr 0 and no dead-code resets: the weights never move, so the held-out loss is flat.
    rec = Recorder()
    cfg = replace(TRAIN, epochs=10, lr=0.0, dead_code_window=0, patience=1)
    result = fit(catalog.embeddings, MODEL, cfg, callbacks=[rec])
    assert len(result.history) == 2 and result.best_epoch == 0
    assert result.history[0]["val_loss"] == result.history[1]["val_loss"]
    assert rec.calls[-1] == ("end", {"best_epoch": 0, "epochs_run": 2})


def test_returned_model_has_the_best_recorded_heldout_loss(catalog: Any, fitted: FitResult) -> None:
    best = fitted.history[fitted.best_epoch]
    recon, loss = heldout_loss(fitted.model, catalog.embeddings[fitted.holdout_index], TRAIN)
    assert recon == pytest.approx(best["val_recon"], rel=1e-4)
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)


def test_best_epoch_weights_are_restored(catalog: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Script the held-out scores (epoch 1 best) and snapshot the weights each evaluation sees.
    scripted, snapshots = iter([3.0, 1.0, 2.0, 4.0]), []
    real = rqvae_train._evaluate

    def scripted_evaluate(loop: Any, x: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
        out = real(loop, x, idx)
        snapshots.append(({k: v.clone() for k, v in loop.model.state_dict().items()}, out))
        score = next(scripted)
        return {**out, "val_loss": score, "val_recon": score}

    monkeypatch.setattr(rqvae_train, "_evaluate", scripted_evaluate)
    result = fit(catalog.embeddings, MODEL, replace(TRAIN, epochs=4))
    assert result.best_epoch == 1 and len(snapshots) == 4
    best_state, best_metrics = snapshots[1]
    final = result.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in best_state.items())
    assert not all(torch.equal(final[k], v) for k, v in snapshots[-1][0].items())
    held = catalog.embeddings[result.holdout_index]
    recon, loss = heldout_loss(result.model, held, TRAIN)
    assert (recon, loss) == pytest.approx((best_metrics["val_recon"], best_metrics["val_loss"]), rel=1e-4)


def test_best_epoch_is_chosen_among_evaluated_epochs(catalog: Any) -> None:
    # Scale the held-out items up (no input normalisation): their loss is far above the training loss.
    x = catalog.embeddings.copy()
    _, hold = split_holdout(len(x), TRAIN.holdout_fraction, TRAIN.seed)
    x[hold] *= 5.0
    mcfg = replace(MODEL, normalize_inputs=False)
    cfg = replace(TRAIN, epochs=4, eval_every=2, lr=0.0, dead_code_window=0)
    result = fit(x, mcfg, cfg)
    assert ["val_loss" in h for h in result.history] == [False, True, False, True]
    assert "val_loss" in result.history[result.best_epoch]


def test_taxonomy_regularizer_runs(catalog: Any) -> None:
    cfg = replace(TRAIN, epochs=2, taxonomy_weight=0.01)
    result = fit(catalog.embeddings, MODEL, cfg, category_ids=catalog.category_ids)
    for h in result.history:
        assert h["train_taxonomy"] > 0 and math.isfinite(h["train_taxonomy"])
        assert h["train_loss"] == pytest.approx(weighted_terms(h, "train_", cfg), rel=1e-5)
    off = fit(catalog.embeddings, MODEL, replace(TRAIN, epochs=1), category_ids=catalog.category_ids)
    assert "train_taxonomy" not in off.history[0]  # weight 0: regularizer off even with categories


@pytest.mark.parametrize("shape", [(2000, 31), (2000, 32, 1), (1, 32)])
def test_fit_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        fit(np.zeros(shape, dtype=np.float32), MODEL, TRAIN)


def test_fit_rejects_1d_input_without_model_config() -> None:
    with pytest.raises(ValueError):
        fit(np.zeros(10, dtype=np.float32), None, TRAIN)


def test_fit_rejects_category_ids_of_another_length(catalog: Any) -> None:
    with pytest.raises(ValueError):
        fit(catalog.embeddings, MODEL, replace(TRAIN, taxonomy_weight=0.01), category_ids=catalog.category_ids[:500])


def test_split_holdout_partitions_the_items() -> None:
    train, hold = split_holdout(101, 0.1, seed=3)
    assert len(hold) == 10 and len(train) == 91
    assert sorted(np.concatenate([train, hold]).tolist()) == list(range(101))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(hold) > 0)
    assert split_holdout(101, 0.001, seed=3)[1].size == 0
    assert not np.array_equal(hold, split_holdout(101, 0.1, seed=4)[1])


# ---------------------------------------------------------------- losses


def test_supervised_contrastive_hand_example() -> None:
    # Items 0 and 1 identical with label 0, item 2 orthogonal with label 1. With s = cos / t, anchor 0:
    # -log(e^(1/t) / (e^(1/t) + e^0)) = log(1 + e^(-1/t)); anchor 1 the same; anchor 2 has no positive.
    h = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    t = 0.5
    loss = supervised_contrastive(h, torch.tensor([0, 0, 1]), t)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_supervised_contrastive_unknown_labels_are_only_negatives() -> None:
    # A 4th item equal to item 0 with label -1 joins the denominator: log(2 + e^-2) per anchor.
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    loss = supervised_contrastive(h, torch.tensor([0, 0, 1, -1]), 0.5)
    assert loss.item() == pytest.approx(math.log(2 + math.exp(-2.0)), rel=1e-6)
    none = supervised_contrastive(h, torch.tensor([0, 1, 2, -1]), 0.5)
    assert none.item() == 0.0


def test_taxonomy_loss_weights_levels() -> None:
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cats = torch.tensor([[0, 0], [0, 1], [1, 2]])  # depth 1: items 0, 1 together; depth 2: all apart
    loss = taxonomy_loss([h, h, h], cats, 0.5)  # 3 prefixes, 2 depths: 2 levels weighted 2/3, 1/3
    assert loss.item() == pytest.approx(2 / 3 * math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_level_weights() -> None:
    assert level_weights(3) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert level_weights(1) == [1.0]


def test_reconstruction_loss_kinds() -> None:
    x, x_hat = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert reconstruction_loss(x, x_hat, "mse").item() == pytest.approx((2.0 + 1.0) / 2)
    assert reconstruction_loss(x, x_hat, "cosine").item() == pytest.approx((1.0 + 0.0) / 2)


# ---------------------------------------------------------------- samplers, schedule, device


def test_hierarchical_sampler_batches() -> None:
    parents = torch.tensor([0] * 10 + [1] * 6 + [2] * 8 + [-1] * 4)  # 28 items, 3 known parents
    sampler = HierarchicalSampler(parents, batch_size=8, fraction=0.5)
    batches = list(sampler.batches(torch.Generator().manual_seed(0), torch.device("cpu")))
    assert len(batches) == 28 // 8
    chosen, generator = set(), torch.Generator().manual_seed(1)
    for _ in range(20):
        for b in sampler.batches(generator, torch.device("cpu")):
            assert b.shape == (8,) and b.dtype == torch.int64
            assert int(b.min()) >= 0 and int(b.max()) < 28
            head, tail = parents[b[:4]], parents[b[4:]]
            assert len(set(head.tolist())) == 1 and int(head[0]) >= 0
            assert bool((tail != head[0]).all())
            chosen.add(int(head[0]))
    assert chosen == {0, 1, 2}


def test_hierarchical_sampler_with_a_single_parent() -> None:
    sampler = HierarchicalSampler(torch.zeros(20, dtype=torch.long), batch_size=8)
    for b in sampler.batches(torch.Generator().manual_seed(0), torch.device("cpu")):
        assert b.shape == (8,) and int(b.max()) < 20


def test_shuffled_batches() -> None:
    batches = list(shuffled_batches(10, 3, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert [len(b) for b in batches] == [3, 3, 3]  # the partial batch is dropped
    flat = torch.cat(batches).tolist()
    assert len(set(flat)) == 9 and flat != sorted(flat)
    small = list(shuffled_batches(2, 5, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert [sorted(b.tolist()) for b in small] == [[0, 1]]


def test_lr_factor_warmup_and_cosine() -> None:
    assert lr_factor(0, 100, 10, 0.05) == pytest.approx(0.1)
    assert lr_factor(4, 100, 10, 0.05) == pytest.approx(0.5)
    assert lr_factor(9, 100, 10, 0.05) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.05) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way: cos = 0
    assert lr_factor(100, 100, 10, 0.05) == pytest.approx(0.05)
    assert lr_factor(500, 100, 10, 0.05) == pytest.approx(0.05)


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cuda:1") == torch.device("cuda", 1)  # passed through, not probed
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert select_device("auto") == torch.device("cpu")


def test_adamw_is_fused_on_cuda_only() -> None:
    """CUDA takes torch's fused AdamW (the GPU step is launch-bound); the CPU keeps torch's default, so
    its training results stay what they were. The learning rate and decay are the config's either way."""
    param = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(lr=0.02, weight_decay=0.1)
    on_gpu = rqvae_train.adamw([param], cfg, torch.device("cuda"))  # constructing it touches no GPU
    on_cpu = rqvae_train.adamw([param], cfg, torch.device("cpu"))
    assert on_gpu.defaults["fused"] is True and not on_cpu.defaults["fused"]
    assert on_cpu.defaults["foreach"] is None  # torch picks: the per-parameter loop on CPU
    for opt in (on_gpu, on_cpu):
        assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (0.02, 0.1)


def test_graphed_optimizer_takes_its_rates_from_tensors_the_schedule_fills_in_place() -> None:
    """A step replayed from a CUDA graph reads the rate from the address it was captured with: the
    graphed AdamW's rates are tensors (per group), and the schedule must fill those very tensors."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(lr=0.01)
    opt = rqvae_train.adamw([{"params": [a]}, {"params": [b], "lr": 0.1}], cfg, torch.device("cpu"), graphed=True)
    assert opt.defaults["capturable"] and opt.defaults["fused"]
    rates = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(r, torch.Tensor) for r in rates) and [float(r) for r in rates] == pytest.approx([0.01, 0.1])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        a.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.step()
        schedule.step()
    assert [g["lr"] for g in opt.param_groups] == rates  # the same tensor objects ...
    assert [float(r) for r in rates] == pytest.approx([0.01 / 8, 0.1 / 8])  # ... holding the scheduled rates


def test_cuda_graphs_are_refused_off_cuda_and_with_compile(catalog: Any) -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, got cpu: train with device='cuda'"):
        fit(catalog.embeddings[:300], MODEL, TrainConfig(epochs=1, device="cpu", cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs and compile cannot both be on"):
        TrainConfig(cuda_graphs=True, compile=True)


def test_full_batches_go_to_the_graphed_step_and_a_short_one_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    class GraphedSteps:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def step(self, loop: Any, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
            self.sizes.append(len(idx))
            return {}

    loop = rqvae_train._Loop(RQVAE(MODEL), TrainConfig(batch_size=8), None, None, None,  # type: ignore[arg-type]
                             torch.device("cpu"), None, graphs=GraphedSteps())  # type: ignore[arg-type]
    eager: list[int] = []
    monkeypatch.setattr(loop, "train_step", lambda x, idx: eager.append(len(idx)) or {})
    x = torch.zeros(20, MODEL.input_dim)
    for idx in torch.arange(20).split(8):
        loop.step_on(x, idx)
    assert loop.graphs.sizes == [8, 8] and eager == [4]  # type: ignore[union-attr]


# ---------------------------------------------------------------- quality


@pytest.mark.slow
def test_reduced_scale_quality_bar() -> None:
    x = make_catalog(CatalogSpec(n_items=8000, dim=64, seed=0)).embeddings
    mcfg = ModelConfig(input_dim=64, hidden_dims=(128, 64), latent_dim=16, num_levels=3, codebook_size=32)
    result = fit(x, mcfg, TrainConfig(epochs=10, batch_size=32, seed=0))
    baseline = RQKMeans.fit(x, RQKMeansConfig(input_dim=64, num_levels=3, codebook_size=32), seed=0)
    ours, base = evaluate_model(result.model, x), evaluate_model(baseline, x)
    keys = ["unique_rate"] + [f"l{lv}_{m}" for lv in (1, 2, 3) for m in ("dead_codes", "perplexity", "prefix_nn")]
    report = "rqvae vs rqkmeans: " + ", ".join(f"{k} {ours[k]:.4g} vs {base[k]:.4g}" for k in keys)
    for level in (1, 2, 3):
        assert ours[f"l{level}_dead_codes"] == 0, report
        assert ours[f"l{level}_perplexity"] >= 0.8 * 32, report
    # At this scale the two are within a few items of each other, and which is ahead depends on the CPU's
    # float kernels: 0.8538 vs 0.8541 on a Sapphire Rapids host (3 items of 8000), ahead on an EPYC one.
    # The bar is "not behind by more than 0.2%"; the real-data comparison is bench/'s job.
    assert ours["unique_rate"] >= base["unique_rate"] - 0.002, report
    assert ours["l1_prefix_nn"] >= base["l1_prefix_nn"] - 0.02, report


def test_fit_trains_under_deterministic_algorithms_and_restores_the_flag(catalog: Any) -> None:
    seen: list[bool] = []

    class Probe:
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            seen.append(torch.are_deterministic_algorithms_enabled())

    assert not torch.are_deterministic_algorithms_enabled()
    fit(catalog.embeddings, MODEL, replace(TRAIN, epochs=2), callbacks=[Probe()])
    assert seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()
    seen.clear()
    fit(catalog.embeddings, MODEL, replace(TRAIN, epochs=1, deterministic=False), callbacks=[Probe()])
    assert seen == [False]


@pytest.mark.slow
def test_compiled_training_returns_the_plain_module_and_a_clean_checkpoint(catalog: Any) -> None:
    from rqvae.checkpoint import checkpoint_bytes, load_checkpoint, to_payload

    result = fit(catalog.embeddings, MODEL, replace(TRAIN, epochs=1, compile=True))
    assert isinstance(result.model, RQVAE)
    assert not any(k.startswith("_orig_mod.") for k in to_payload(result.model)["state_dict"])
    again = load_checkpoint(checkpoint_bytes(result.model))
    np.testing.assert_array_equal(encode_array(again, catalog.embeddings).codes,
                                  encode_array(result.model, catalog.embeddings).codes)
