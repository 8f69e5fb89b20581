"""The rqvae package imports torch, numpy and the standard library only (checked in fresh interpreters)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import rqvae

FORBIDDEN = ("pyspark", "mlflow", "pandas", "pyarrow", "pipelines")
PACKAGE_DIR = Path(rqvae.__file__).parent
ROOT = PACKAGE_DIR.parent


def run_python(code: str) -> Any:
    """Run code in a fresh interpreter and parse the JSON on its last output line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_package_and_every_submodule_import_no_heavy_dependencies() -> None:
    code = f"""
import importlib, json, pkgutil, sys
import torch
before = (torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
          torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
import rqvae
names = sorted(m.name for m in pkgutil.iter_modules(rqvae.__path__))
for name in names:
    importlib.import_module("rqvae." + name)
after = (torch.get_num_threads(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
         torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({FORBIDDEN!r}))
print(json.dumps({{"names": names, "loaded": loaded, "same_torch_settings": str(before) == str(after)}}))
"""
    out = run_python(code)
    assert {"model", "quantizer", "train", "checkpoint", "encode", "metrics", "synthetic"} <= set(out["names"])
    assert out["loaded"] == []
    assert out["same_torch_settings"]  # no global torch settings changed at import time


def test_metrics_and_synthetic_need_numpy_only() -> None:
    code = f"""
import importlib.util, json, sys
for name in ("metrics", "synthetic"):
    spec = importlib.util.spec_from_file_location("standalone_" + name, {str(PACKAGE_DIR)!r} + "/" + name + ".py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
top = {{m.split(".")[0] for m in sys.modules}}
print(json.dumps(sorted(top & {{"torch", "rqvae", *{FORBIDDEN!r}}})))
"""
    assert run_python(code) == []
