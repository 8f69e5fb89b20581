"""Training throughput of the seed model card's configuration, on CPU or a GPU.

    python bench/train_throughput.py                          # 63k items x 1024-d, 20 epochs, auto device
    python bench/train_throughput.py --epochs 1000 --device cuda --bf16 --compile --save model.pt

Model: 1024 -> 512 -> 256 -> 128 -> 32, 3 x 256 codes, batch 4096. The training set lives on the
device and the loop makes no per-step host round trips (losses are summed on the device and read
once per epoch). Reports samples/s (training steps only), wall time, and time-to-quality: the
wall time at which the held-out reconstruction loss first came within 2% of the run's best, and the
median epoch's wall time (steady state: without a compile's first steps).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rqvae import ModelConfig, TrainConfig, fit, save_checkpoint  # noqa: E402
from rqvae.synthetic import CatalogSpec, make_catalog  # noqa: E402


class EpochClock:
    """fit() callback: wall time and held-out reconstruction loss at the end of every epoch."""

    def __init__(self) -> None:
        self.start, self.rows, self.summary = 0.0, [], {}

    def on_train_begin(self, info: dict) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.rows.append((time.perf_counter() - self.start, metrics.get("val_recon", float("nan"))))

    def on_train_end(self, summary: dict) -> None:
        self.summary = summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=63_000, help="training items")
    p.add_argument("--dim", type=int, default=1024, help="embedding length D")
    p.add_argument("--epochs", type=int, default=20, help="epochs (no early stopping)")
    p.add_argument("--batch-size", type=int, default=4096, help="batch size")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each full training step from a CUDA graph "
                   "(TrainConfig.cuda_graphs)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--save", help="write the trained model's checkpoint here (e.g. for bench/encode_device.py)")
    a = p.parse_args(argv)
    x = make_catalog(CatalogSpec(n_items=a.items, dim=a.dim, seed=0)).embeddings
    clock = EpochClock()
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, patience=0, device=a.device, bf16=a.bf16,
                      compile=a.compile, cuda_graphs=a.cuda_graphs)
    t0 = time.perf_counter()
    result = fit(x, ModelConfig(input_dim=a.dim, hidden_dims=(512, 256, 128), latent_dim=32), cfg, callbacks=[clock])
    total = time.perf_counter() - t0
    train_items, steps = result.train_items, a.epochs * max(1, result.train_items // a.batch_size)
    loop_seconds = clock.rows[-1][0]
    best = min(v for _, v in clock.rows)
    to_quality = next(t for t, v in clock.rows if v <= best * 1.02)
    device = torch.cuda.get_device_name() if result.device.startswith("cuda") else platform.processor() or "cpu"
    times = [t for t, _ in clock.rows]
    per_epoch = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else times[0]
    figures = {"device": result.device, "device_name": device, "threads": torch.get_num_threads(),
               "samples_per_s": steps * a.batch_size / loop_seconds, "epochs": a.epochs,
               "loop_seconds": loop_seconds, "fit_seconds": total,
               "epoch_seconds_median": per_epoch, "time_to_quality_s": to_quality,
               "best_val_recon": best, "train_items": train_items,
               "graph_replays": clock.summary.get("graph_replays", 0)}
    print(json.dumps(figures, indent=2))
    if a.save:
        save_checkpoint(result.model, a.save)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
