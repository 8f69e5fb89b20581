"""Encode items/s of ``rqvae.encode_array`` on one device (a GPU when lent): the model's own rate, no engine.

    python bench/encode_device.py --device cuda --model model.pt   # e.g. the model train_throughput.py --save wrote
    python bench/encode_device.py --items 20000 --base-items 5000 --dim 64 --check-items 2000   # CPU smoke run

The catalog is synthetic (``rqvae.synthetic``: --base-items distinct items, tiled to --items rows) and is
held in host memory as float32, so every model call pays the host -> device copy, as the encode UDF's
calls do. For each batch size and each --alternatives setting (0: codes only; 16: also the ranked
last-level codes the job's collision handling uses) it reports items/s, the best of --repeat passes
over the whole array after one untimed warm-up call. Then it encodes the first --check-items rows on
the CPU too and reports the share of items whose codes agree with the device's: both run float32, but
a GPU's kernels sum in another order, so an item whose distances to two codes nearly tie can take the
other one. Without --model the model is an untrained one of the seed card's shape (1024 -> 512 -> 256
-> 128 -> 32, 3 x 256 at D = 1024): its weights do not change the speed, only which codes come out.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rqvae import RQVAE, ModelConfig, encode_array, load_checkpoint, select_device  # noqa: E402
from rqvae.synthetic import CatalogSpec, make_catalog  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=4_000_000, help="rows encoded per pass")
    p.add_argument("--base-items", type=int, default=250_000, help="distinct synthetic items, tiled to --items")
    p.add_argument("--dim", type=int, default=1024, help="embedding length D (must match --model)")
    p.add_argument("--model", help="checkpoint to encode with (default: an untrained model of the seed card's shape)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda")
    p.add_argument("--batch-sizes", default="8192,65536,262144", help="comma-separated rows per model call")
    p.add_argument("--alternatives", default="0,16", help="comma-separated numbers of ranked last-level codes")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per setting (best is reported)")
    p.add_argument("--check-items", type=int, default=100_000, help="rows whose device codes are compared with "
                   "the CPU's (0: skip)")
    p.add_argument("--json", help="write the figures to this file")
    a = p.parse_args(argv)
    if a.items < 1 or a.base_items < 1 or a.repeat < 1:
        p.error("--items, --base-items and --repeat must be at least 1")
    return a


def load_model(path: str | None, dim: int) -> RQVAE:
    if path is None:
        torch.manual_seed(0)
        return RQVAE(ModelConfig(input_dim=dim, hidden_dims=(512, 256, 128), latent_dim=32)).eval()
    model = load_checkpoint(path)
    if model.config.input_dim != dim:
        raise SystemExit(f"--model {path} takes D = {model.config.input_dim}, not --dim {dim}: pass --dim "
                         f"{model.config.input_dim}")
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def items_per_s(model: RQVAE, x: np.ndarray, batch_size: int, alternatives: int, repeat: int,
                device: torch.device) -> float:
    encode_array(model, x[:batch_size], batch_size=batch_size, alternatives=alternatives)  # warm-up call
    best = float("inf")
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        encode_array(model, x, batch_size=batch_size, alternatives=alternatives)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = select_device(a.device)
    t0 = time.perf_counter()
    base = make_catalog(CatalogSpec(n_items=min(a.base_items, a.items), dim=a.dim, seed=0)).embeddings
    x = np.ascontiguousarray(np.resize(base, (a.items, a.dim)), dtype=np.float32)  # tiled rows
    print(f"catalog {a.items:,} x {a.dim} ({len(base):,} distinct) in {time.perf_counter() - t0:.1f} s", flush=True)
    model = load_model(a.model, a.dim)
    on_device = model.to(device)
    rows = []
    for alternatives in (int(v) for v in a.alternatives.split(",")):
        for batch_size in (int(v) for v in a.batch_sizes.split(",")):
            rate = items_per_s(on_device, x, batch_size, alternatives, a.repeat, device)
            rows.append({"batch_size": batch_size, "alternatives": alternatives, "items_per_s": rate})
            print(f"batch {batch_size:>7,}  alternatives {alternatives:>2}: {rate:,.0f} items/s", flush=True)
    figures: dict = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                     "items": a.items, "dim": a.dim, "model": a.model or "untrained, seed card shape",
                     "levels": model.num_levels, "codebook_size": model.codebook_size, "rates": rows}
    if a.check_items:  # on the CPU itself this only exercises the check
        check = x[:min(a.check_items, len(base))]
        on_dev = encode_array(on_device, check, batch_size=int(a.batch_sizes.split(",")[0])).codes
        on_cpu = encode_array(load_model(a.model, a.dim), check).codes
        figures["codes_agree_with_cpu"] = {"items": len(check), "share": float((on_dev == on_cpu).all(1).mean()),
                                           "level_shares": (on_dev == on_cpu).mean(0).tolist()}
        print(f"codes agree with the CPU's on {figures['codes_agree_with_cpu']['share']:.4%} of {len(check):,} "
              "items", flush=True)
    print(json.dumps(figures, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
