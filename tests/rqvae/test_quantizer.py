"""Tests of rqvae.quantizer: round-trip invariants, gradient estimators, k-means init, dead codes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rqvae.config import ModelConfig
from rqvae.model import RQVAE
from rqvae.quantizer import ResidualQuantizer, rotate_onto, usage_entropy_gap

ESTIMATORS = ["ste", "rotation"]
SHARED = [False, True]
DIM, LEVELS, K = 4, 3, 8


def blobs(n_per: int = 40, k: int = 8, dim: int = DIM, spread: float = 0.05, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """k <= 2 * dim tight Gaussian blobs centred at +-5 on the axes (>= 7 apart).

    Returns points (k * n_per, dim) and centres (k, dim).
    """
    g = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.cat([torch.eye(dim), -torch.eye(dim)])[:k]
    points = centres.repeat_interleave(n_per, 0) + spread * torch.randn(k * n_per, dim, generator=g)
    return points, centres


def make_quantizer(shared: bool, estimator: str = "ste", *, init: bool = True) -> ResidualQuantizer:
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=DIM, num_levels=LEVELS, codebook_size=K, shared=shared, estimator=estimator)
    if init:
        q.init_kmeans(blobs()[0], iters=10, seed=0)
    return q


def books_per_level(q: ResidualQuantizer) -> list[torch.Tensor]:
    """The (K, d) codebook of every level, read from the parameter directly."""
    return [q.codebooks.detach()[0 if q.shared else lv] for lv in range(q.num_levels)]


def greedy_codes(z: torch.Tensor, books: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Brute-force greedy residual assignment: codes (B, L) and the residual each level saw."""
    residual, codes, inputs = z.detach().double(), [], []
    for book in books:
        d = (residual[:, None, :] - book.double()[None]).pow(2).sum(-1)  # (B, K)
        idx = d.argmin(1)
        inputs.append(residual)
        codes.append(idx)
        residual = residual - book.double()[idx]
    return torch.stack(codes, 1), inputs


def codeword_sum(books: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    return torch.stack([books[lv][codes[:, lv]] for lv in range(len(books))]).sum(0)


def test_rotate_onto_hand_example_forward_jacobian_and_rotation() -> None:
    e = torch.tensor([[1.0, 2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    g = torch.tensor([[0.7, -0.2, 1.1]], dtype=torch.float64)
    out = rotate_onto(e, q)
    torch.testing.assert_close(out.detach(), q, atol=1e-12, rtol=0)
    (out * g).sum().backward()

    en, qn = np.array([1.0, 2.0, -0.5]), np.array([0.3, -1.0, 2.0])
    u, v = en / np.linalg.norm(en), qn / np.linalg.norm(qn)
    w = (u + v) / np.linalg.norm(u + v)
    rot = np.eye(3) - 2 * np.outer(w, w) + 2 * np.outer(v, u)
    np.testing.assert_allclose(rot @ u, v, atol=1e-12)
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)  # orthogonal ...
    assert np.linalg.det(rot) == pytest.approx(1.0)  # ... and a proper rotation
    expected = np.linalg.norm(qn) / np.linalg.norm(en) * rot.T @ g[0].numpy()
    np.testing.assert_allclose(e.grad[0].numpy(), expected, atol=1e-12)
    assert not np.allclose(expected, g[0].numpy())  # the example does not degenerate to STE


def test_rotate_onto_rows_are_independent() -> None:
    e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    out = rotate_onto(e, q)
    torch.testing.assert_close(out.detach(), q)
    out[:, 0].sum().backward()  # upstream gradient g = (1, 0, 0) on both rows
    # row 0: u = e_x, v = e_y, w = (e_x + e_y)/sqrt2, so R^T e_x = e_x - (e_x + e_y) + 0 = -e_y, scale 2/1.
    torch.testing.assert_close(e.grad[0], torch.tensor([0.0, -2.0, 0.0], dtype=torch.float64))
    # row 1: e == q, R = I and scale 1, so the gradient passes unchanged
    torch.testing.assert_close(e.grad[1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("shared", SHARED)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_forward_quantized_is_sum_of_selected_codewords(estimator: str, shared: bool) -> None:
    q = make_quantizer(shared, estimator)
    z = blobs(n_per=3, seed=1)[0] + 0.3 * torch.randn(24, DIM, generator=torch.Generator().manual_seed(2))
    out = q(z)
    books = books_per_level(q)
    expected_codes, _ = greedy_codes(z, books)
    assert out.codes.shape == (24, LEVELS) and out.codes.dtype == torch.int64
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < K
    torch.testing.assert_close(out.codes, expected_codes)
    by_hand = codeword_sum(books, out.codes)
    torch.testing.assert_close(out.quantized.detach(), by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.codes_to_latent(out.codes).detach(), by_hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", SHARED)
def test_level_inputs_and_losses_match_hand_computation(shared: bool) -> None:
    q = make_quantizer(shared)
    z = torch.randn(16, DIM, generator=torch.Generator().manual_seed(3)) * 3
    out = q(z)
    books = books_per_level(q)
    codes, inputs = greedy_codes(z, books)
    torch.testing.assert_close(out.level_inputs.double(), torch.stack(inputs), atol=1e-5, rtol=0)
    per_level = [(inputs[lv] - books[lv].double()[codes[:, lv]]).pow(2).mean() for lv in range(LEVELS)]
    assert out.codebook_loss.item() == pytest.approx(float(sum(per_level)), rel=1e-5)
    assert out.commitment_loss.item() == pytest.approx(float(sum(per_level)), rel=1e-5)


@pytest.mark.parametrize("shared", SHARED)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_quantizer_backward_path(estimator: str, shared: bool) -> None:
    q = make_quantizer(shared, estimator)
    z = (torch.randn(5, DIM, generator=torch.Generator().manual_seed(4)) * 3).double().requires_grad_()
    q = q.double()
    g = torch.randn(5, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (q(z).quantized * g).sum().backward()
    if estimator == "ste":
        torch.testing.assert_close(z.grad, g)  # straight-through: identity
    else:
        qz = codeword_sum(books_per_level(q), q.assign(z)[0]).double()
        scale = qz.norm(dim=1) / z.detach().norm(dim=1)
        torch.testing.assert_close(z.grad.norm(dim=1), scale * g.norm(dim=1))  # a scaled rotation
        assert not torch.allclose(z.grad, g)
    assert q.codebooks.grad is None  # codebooks learn only through the codebook loss


def tiny_model(estimator: str, shared: bool) -> tuple[RQVAE, torch.Tensor]:
    torch.manual_seed(0)
    model = RQVAE(ModelConfig(input_dim=6, hidden_dims=(8,), latent_dim=DIM, num_levels=2, codebook_size=5,
                              shared_codebook=shared, estimator=estimator))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encode_latent(x), iters=5)
    return model, x


@pytest.mark.parametrize("shared", SHARED)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_model_codes_round_trip_to_forward_latent(estimator: str, shared: bool) -> None:
    model, x = tiny_model(estimator, shared)
    model.eval()
    quant = model.quantize(x)
    forward = model(x)
    assert quant.codes.shape == (32, 2) and quant.codes.dtype == torch.int64
    assert int(quant.codes.min()) >= 0 and int(quant.codes.max()) < 5
    assert len(torch.unique(quant.codes[:, 0])) > 1  # the example uses several codes
    torch.testing.assert_close(quant.codes, forward.quant.codes)
    rebuilt = model.quantizer.codes_to_latent(quant.codes)
    torch.testing.assert_close(rebuilt, forward.quant.quantized.detach(), atol=1e-5, rtol=0)
    latent = model.encoder(torch.nn.functional.normalize(x, dim=-1))
    torch.testing.assert_close(quant.error, (latent - rebuilt).norm(dim=1).detach(), atol=1e-5, rtol=0)
    assert float(quant.error.min()) > 0


@pytest.mark.parametrize("shared", SHARED)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reconstruction_gradient_reaches_every_encoder_parameter(estimator: str, shared: bool) -> None:
    model, x = tiny_model(estimator, shared)
    model.train()
    out = model(x)
    target = torch.nn.functional.normalize(x, dim=-1)
    (target - out.reconstruction).pow(2).sum(-1).mean().backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert model.quantizer.codebooks.grad is None


@pytest.mark.parametrize("shared", SHARED)
def test_init_kmeans_puts_a_codeword_on_every_blob(shared: bool) -> None:
    points, centres = blobs()
    q = make_quantizer(shared, init=False)
    random_init = q.codebooks.detach().clone()
    q.steps_unused.fill_(7)
    q.init_kmeans(points, iters=10, seed=0)
    assert not torch.allclose(q.codebooks.detach(), random_init)
    level0 = q.codebooks.detach()[0]
    dist = torch.cdist(centres, level0)  # (blobs, K)
    assert float(dist.min(1).values.max()) < 0.1  # every blob centre has a codeword on it
    assert float(dist.min(0).values.max()) < 0.1  # every codeword sits on a blob
    assert int(q.steps_unused.abs().sum()) == 0
    if not shared:  # later levels quantize the small within-blob residuals
        assert float(q.codebooks.detach()[1:].norm(dim=-1).max()) < 0.5


@pytest.mark.parametrize("shared", SHARED)
def test_shared_codebook_is_one_book_for_every_level(shared: bool) -> None:
    q = make_quantizer(shared)
    assert q.codebooks.shape == (1 if shared else LEVELS, K, DIM)
    assert q.steps_unused.shape == (1 if shared else LEVELS, K)
    same = [q.codebook(lv).data_ptr() == q.codebook(0).data_ptr() for lv in range(LEVELS)]
    assert all(same) if shared else same == [True, False, False]


@pytest.mark.parametrize("shared", SHARED)
def test_usage_counters_track_training_forwards_only(shared: bool) -> None:
    q = make_quantizer(shared)
    z = blobs(n_per=1, seed=3)[0][:3]  # three items on three blobs
    q.train()
    q(z)
    codes = q(z).codes
    used = torch.zeros_like(q.steps_unused, dtype=torch.bool)
    for lv in range(LEVELS):
        used[0 if shared else lv, codes[:, lv]] = True
    assert bool((q.steps_unused[used] == 0).all())
    assert bool((q.steps_unused[~used] == 2).all())
    q.eval()
    q(z)
    assert bool((q.steps_unused[~used] == 2).all())


@pytest.mark.parametrize("shared", SHARED)
def test_reset_dead_codes_reseeds_exactly_the_dead_codes_at_high_error_residuals(shared: bool) -> None:
    q = make_quantizer(shared)
    # a batch: blob points plus 3 outliers far from every codeword
    outliers = torch.tensor([[0.0, 0, 0, 30], [0, 0, 25, 40], [40, 0, 0, 35]])  # distinct errors, no ties
    z = torch.cat([blobs(n_per=4, seed=6)[0], outliers])
    codes, inputs, _ = q.assign(z)
    window = 10
    dead = {0: [1, 5]} if shared else {0: [1, 5], 2: [3]}
    for book, idx in dead.items():
        q.steps_unused[book, idx] = window
    q.steps_unused[0, 2] = window - 1  # one step short: not dead
    before, counters = q.codebooks.detach().clone(), q.steps_unused.clone()

    n = q.reset_dead_codes(inputs, codes, window, torch.Generator().manual_seed(0))

    assert n == sum(len(v) for v in dead.values())
    changed = (q.codebooks.detach() != before).any(-1)  # (books, K)
    expected = torch.zeros_like(changed)
    for book, idx in dead.items():
        expected[book, idx] = True
    torch.testing.assert_close(changed, expected)
    counters[expected] = 0
    torch.testing.assert_close(q.steps_unused, counters)
    books = [before[0 if shared else lv] for lv in range(LEVELS)]
    for book, idx in dead.items():
        level = book
        r = inputs[level]
        err = (r - books[level][codes[:, level]]).pow(2).sum(1)
        worst = r[err.argsort(descending=True)[: len(idx)]]
        new = q.codebooks.detach()[book, idx]
        gap = torch.cdist(new, worst)  # each new codeword sits on its own worst residual
        assert float(gap.min(1).values.max()) < 1e-2 * float(worst.norm(dim=1).min())
        assert len(set(gap.argmin(1).tolist())) == len(idx)


def test_reset_dead_codes_without_dead_codes_changes_nothing() -> None:
    q = make_quantizer(False)
    z = blobs(n_per=2)[0]
    codes, inputs, _ = q.assign(z)
    before = q.codebooks.detach().clone()
    assert q.reset_dead_codes(inputs, codes, window=5) == 0
    assert torch.equal(q.codebooks.detach(), before)


def test_rotation_scale_on_a_known_pair() -> None:
    # e along x with |e| = 2, q along y with |q| = 3: gradient scale |q|/|e| = 1.5.
    e = torch.tensor([[2.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 3.0]])
    rotate_onto(e, q)[0, 1].backward()  # upstream gradient e_y
    # R^T e_y = e_x (R maps x onto y), so the gradient is 1.5 * e_x
    torch.testing.assert_close(e.grad, torch.tensor([[1.5, 0.0]]))
    assert math.isclose(float(e.grad.norm()), 1.5, rel_tol=1e-6)


def test_usage_entropy_gap_hand_values() -> None:
    book = torch.tensor([[0.0], [2.0]])  # K = 2 codes on a line
    # one residual at 0.5: d = (0.25, 2.25), t = 0.25, p = softmax(-1, -9) -> gap = 1 - H(p) / log 2
    p1 = 1 / (1 + math.exp(-8.0))
    h = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert usage_entropy_gap(torch.tensor([[0.5]]), book).item() == pytest.approx(1 - h / math.log(2), rel=1e-5)
    # mirrored residuals share the codes evenly: p = (1/2, 1/2), no gap
    assert usage_entropy_gap(torch.tensor([[0.5], [1.5]]), book).item() == pytest.approx(0.0, abs=1e-6)


def test_usage_loss_only_in_training_and_zero_for_even_usage() -> None:
    q = make_quantizer(False)
    points = blobs(n_per=5, seed=7)[0]
    collapsed = points[:5]  # one blob: a single level-0 code
    q.train()
    assert q(collapsed).usage_loss.item() > q(points).usage_loss.item() > 0
    q.eval()
    assert q(collapsed).usage_loss.item() == 0.0
