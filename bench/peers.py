"""Peer residual quantizers to compare the project's RQ-VAE / RQ-KMeans against, near their documented defaults.

Each ``fit_*`` function fits on X (float32, N x D) with ``levels`` x ``codebook_size`` codes and returns a
:class:`PeerResult`: codes int64 (N, levels), reconstruction float32 (N, D) or None, fit seconds and
encode throughput (items/s, encoding all of X after the fit). Needs the bench-only packages of
bench/requirements-bench.txt (semantic-id, vector-quantize-pytorch, faiss-cpu); each import is local,
so a missing package only disables its peer.

    python bench/peers.py --items 5000      # smoke run on the WordNet catalog (or random data without it)

Settings (versions tested: semantic-id 0.2.5, vector-quantize-pytorch 1.32.0, faiss-cpu 1.15.1):

* semantic_id_rqkmeans: ``semantic_id.RQKMeans(n_levels, n_clusters)`` with its defaults (sklearn KMeans,
  n_init=10, max_iter=100, tol=1e-4, metric l2), ``random_state=seed``; ``.fit(X)``, ``.encode(X)``,
  ``.decode(codes)``.
* vqtorch_residual_vq: ``vector_quantize_pytorch.ResidualVQ(dim, num_quantizers, codebook_size,
  kmeans_init=True, threshold_ema_dead_code=2)``, other settings default (EMA codebooks, decay 0.8,
  kmeans_iters 10 on the first batch); trained by forward passes in train mode (the EMA update needs no
  optimizer) for ``epochs`` shuffled epochs of ``batch_size``; codes and reconstruction (= the
  quantized output) from one eval pass.
* faiss_residual_quantizer: ``faiss.ResidualQuantizer(d, M=levels, nbits=log2(codebook_size))`` with its
  defaults (beam search max_beam_size=5, train_type Train_progressive_dim, 10 k-means iterations per
  level, subsampling to 256 points per centroid = 65,536 training points); ``compute_codes`` /
  ``decode``.
* faiss_kmeans_residual: greedy residual k-means, a ``faiss.Kmeans(d, k, niter=20, seed)`` per level on
  the residuals (faiss defaults otherwise); the plain-RQ-KMeans counterpart of the above without beam.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class PeerResult:
    codes: np.ndarray  # int64 (N, levels)
    reconstruction: np.ndarray | None  # float32 (N, D)
    fit_seconds: float
    encode_items_per_s: float
    # float32 (K, D): the last level's codewords when the reconstruction is a sum of one codeword per
    # level (every peer here); bench/quality_real.py's "<peer>_spread16" rows rank an item's
    # alternative last-level codes with it.
    last_level: np.ndarray | None = None

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray | None, float, float]:
        return self.codes, self.reconstruction, self.fit_seconds, self.encode_items_per_s


def _check_x(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"X must be (N, D), got shape {x.shape}")
    return x


def fit_semantic_id_rqkmeans(x: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                             n_init: int | None = None) -> PeerResult:
    """PyPI ``semantic-id``: ``RQKMeans`` (sklearn KMeans per level on the residuals), CPU backend.

    ``n_init=None`` keeps the package default (10 restarts per level): the slowest peer, ~50 s for 5k items
    on 2 idle cores (several minutes when they are shared); pass n_init=1 for a quick run."""
    from semantic_id import RQKMeans

    x = _check_x(x)
    model = RQKMeans(n_levels=levels, n_clusters=codebook_size, random_state=seed, n_init=n_init)
    t0 = time.perf_counter()
    model.fit(x)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = model.encode(x)
    enc_s = time.perf_counter() - t0
    recon = model.decode(codes).astype(np.float32, copy=False)
    return PeerResult(codes.astype(np.int64), recon, fit_s, len(x) / enc_s,
                      np.asarray(model.codebooks_[-1], dtype=np.float32))


def fit_vqtorch_residual_vq(x: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                            epochs: int = 5, batch_size: int = 1024) -> PeerResult:
    """PyPI ``vector-quantize-pytorch``: ``ResidualVQ`` with k-means init and EMA codebook updates."""
    import torch
    from vector_quantize_pytorch import ResidualVQ

    x = _check_x(x)
    n, d = x.shape
    torch.manual_seed(seed)
    rvq = ResidualVQ(dim=d, num_quantizers=levels, codebook_size=codebook_size,
                     kmeans_init=True, threshold_ema_dead_code=2)
    xt = torch.from_numpy(x)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    rvq.train()
    with torch.no_grad():  # EMA updates happen inside forward; there are no trainable codebook weights
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                if len(idx) < codebook_size and i > 0:
                    continue  # a short tail batch only adds EMA noise (and cannot seed k-means)
                rvq(xt[idx].unsqueeze(0))
    fit_s = time.perf_counter() - t0
    rvq.eval()
    t0 = time.perf_counter()
    codes_l, recon_l = [], []
    with torch.no_grad():
        for i in range(0, n, 8192):
            quantized, indices, _ = rvq(xt[i:i + 8192].unsqueeze(0))
            codes_l.append(indices[0])
            recon_l.append(quantized[0])
    enc_s = time.perf_counter() - t0
    codes = torch.cat(codes_l).numpy().astype(np.int64)
    recon = torch.cat(recon_l).numpy().astype(np.float32, copy=False)
    return PeerResult(codes, recon, fit_s, n / enc_s, rvq.codebooks[-1].numpy().astype(np.float32))


def fit_faiss_residual_quantizer(x: np.ndarray, levels: int = 3, codebook_size: int = 256,
                                 seed: int = 0) -> PeerResult:
    """``faiss.ResidualQuantizer`` (beam-search residual quantizer), faiss defaults."""
    import faiss

    x = _check_x(x)
    nbits = int(codebook_size).bit_length() - 1
    if 1 << nbits != codebook_size:
        raise ValueError(f"faiss.ResidualQuantizer needs a power-of-two codebook size, got {codebook_size}")
    rq = faiss.ResidualQuantizer(x.shape[1], levels, nbits)
    rq.cp.seed = seed
    t0 = time.perf_counter()
    rq.train(x)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = rq.compute_codes(x)
    enc_s = time.perf_counter() - t0
    recon = rq.decode(packed)
    codes = (packed if nbits == 8 else faiss.unpack_bitstrings(packed, levels, nbits)).astype(np.int64)
    books = faiss.vector_to_array(rq.codebooks).reshape(levels * codebook_size, x.shape[1])
    return PeerResult(codes, recon.astype(np.float32, copy=False), fit_s, len(x) / enc_s,
                      books[-codebook_size:].astype(np.float32))


def fit_faiss_kmeans_residual(x: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                              niter: int = 20) -> PeerResult:
    """Greedy residual k-means with one ``faiss.Kmeans`` per level; reconstruction = sum of centroids."""
    import faiss

    x = _check_x(x)
    n, d = x.shape
    t0 = time.perf_counter()
    centroids = []
    resid = x.copy()
    for lvl in range(levels):
        km = faiss.Kmeans(d, codebook_size, niter=niter, seed=seed + lvl)
        km.train(resid)
        _, assign = km.index.search(resid, 1)
        resid -= km.centroids[assign[:, 0]]
        centroids.append(km.centroids.copy())
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = np.empty((n, levels), dtype=np.int64)
    recon = np.zeros_like(x)
    resid = x.copy()
    for lvl, c in enumerate(centroids):
        index = faiss.IndexFlatL2(d)
        index.add(c)
        _, assign = index.search(resid, 1)
        codes[:, lvl] = assign[:, 0]
        resid -= c[assign[:, 0]]
        recon += c[assign[:, 0]]
    enc_s = time.perf_counter() - t0
    return PeerResult(codes, recon, fit_s, n / enc_s, centroids[-1])


PEERS: dict[str, Callable[..., PeerResult]] = {
    "semantic_id_rqkmeans": fit_semantic_id_rqkmeans,
    "vqtorch_residual_vq": fit_vqtorch_residual_vq,
    "faiss_residual_quantizer": fit_faiss_residual_quantizer,
    "faiss_kmeans_residual": fit_faiss_kmeans_residual,
}


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("semantic-id", "vector-quantize-pytorch", "faiss-cpu", "torch", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _load_x(path: Path | None, items: int, seed: int) -> tuple[np.ndarray, str]:
    if path is not None and path.exists():
        import pyarrow.parquet as pq

        col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
        x = col.values.to_numpy().reshape(len(col), -1).astype(np.float32)
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(x), size=min(items, len(x)), replace=False))
        return x[idx], f"{path.name} ({len(idx):,} of {len(x):,} items)"
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((items, 384), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, f"random unit vectors ({items:,})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, default=Path(__file__).resolve().parent / ".cache" / "wordnet_nouns.parquet")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    a = p.parse_args(argv)
    x, source = _load_x(a.catalog, a.items, a.seed)
    print(f"X: {source}, dim {x.shape[1]}; versions: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()))
    print("| peer | codes | unique IDs | used codes per level | recon MSE | rel. error | fit s | encode items/s |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for name in a.peers.split(","):
        r = PEERS[name](x, levels=a.levels, codebook_size=a.codebook_size, seed=a.seed)
        shape_ok = r.codes.shape == (len(x), a.levels) and r.codes.min() >= 0 and r.codes.max() < a.codebook_size
        ok &= shape_ok
        used = "/".join(str(len(np.unique(r.codes[:, j]))) for j in range(a.levels))
        uniq = len(np.unique(r.codes, axis=0))
        if r.reconstruction is not None:
            err = ((x - r.reconstruction) ** 2).sum(1)
            mse, rel = f"{err.mean() / x.shape[1]:.3e}", f"{np.sqrt(err.sum() / (x ** 2).sum()):.3f}"
        else:
            mse = rel = "-"
        print(f"| {name} | {r.codes.shape}{'' if shape_ok else ' BAD'} | {uniq:,} | {used} | {mse} | {rel} "
              f"| {r.fit_seconds:.1f} | {r.encode_items_per_s:,.0f} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
