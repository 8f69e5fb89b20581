"""The GPU check's scripts run on the CPU too (issue 14 asks for them ready and tested without a GPU):
bench/train_throughput.py --save writes a checkpoint that bench/encode_device.py then encodes with, and
encode_device reports a rate per setting and the share of codes that agree with the CPU's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np

from rqvae import encode_array, load_checkpoint
from rqvae.synthetic import CatalogSpec, make_catalog

BENCH = helpers.ROOT / "bench"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)


def test_trained_checkpoint_is_encoded_on_the_device_at_every_setting(tmp_path: Path) -> None:
    model, train_json, encode_json = tmp_path / "m.pt", tmp_path / "train.json", tmp_path / "encode.json"
    out = run("train_throughput.py", "--items", "1200", "--dim", "48", "--epochs", "2", "--batch-size", "256",
              "--device", "cpu", "--save", str(model), "--json", str(train_json))
    assert out.returncode == 0, out.stderr
    trained = json.loads(train_json.read_text())
    assert trained["device"] == "cpu" and trained["epochs"] == 2 and trained["train_items"] < 1200
    assert trained["graph_replays"] == 0  # no --cuda-graphs
    assert 0 < trained["epoch_seconds_median"] <= trained["loop_seconds"]
    assert load_checkpoint(model).config.input_dim == 48

    out = run("encode_device.py", "--items", "3000", "--base-items", "1000", "--dim", "48", "--model", str(model),
              "--device", "cpu", "--batch-sizes", "512,2048", "--alternatives", "0,4", "--repeat", "1",
              "--check-items", "700", "--json", str(encode_json))
    assert out.returncode == 0, out.stderr
    figures = json.loads(encode_json.read_text())
    settings = {(r["batch_size"], r["alternatives"]) for r in figures["rates"]}
    assert settings == {(512, 0), (2048, 0), (512, 4), (2048, 4)}
    assert all(r["items_per_s"] > 0 for r in figures["rates"])
    assert figures["codes_agree_with_cpu"] == {"items": 700, "share": 1.0, "level_shares": [1.0, 1.0, 1.0]}
    assert "batch   2,048  alternatives  4:" in out.stdout

    # The saved model is the trained one: its codes spread the synthetic items over many code tuples.
    base = make_catalog(CatalogSpec(n_items=1000, dim=48, seed=0)).embeddings
    assert len(np.unique(encode_array(load_checkpoint(model), base).codes, axis=0)) > 100


def test_a_model_of_another_width_is_refused_with_the_fix(tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    assert run("train_throughput.py", "--items", "600", "--dim", "16", "--epochs", "1", "--batch-size", "128",
               "--device", "cpu", "--save", str(model)).returncode == 0
    out = run("encode_device.py", "--items", "100", "--dim", "32", "--model", str(model), "--device", "cpu")
    assert out.returncode != 0 and "takes D = 16, not --dim 32: pass --dim 16" in out.stderr
