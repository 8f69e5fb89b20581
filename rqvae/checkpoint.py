"""One-file checkpoints: format version + kind + config + state_dict, loadable with weights_only.

The file is a plain ``torch.save`` dict, so ``torch.load(path, weights_only=True)`` reads it; the
model is rebuilt from its config (nanoGPT's ``model_args`` pattern).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rqvae.baseline import RQKMeans, RQKMeansConfig
from rqvae.config import ModelConfig
from rqvae.model import RQVAE

FORMAT = "catalog-semantic-ids/rqvae-checkpoint"
FORMAT_VERSION = 1
_KINDS: dict[str, tuple[type[Any], type[Any]]] = {
    "rqvae": (RQVAE, ModelConfig),
    "rqkmeans": (RQKMeans, RQKMeansConfig),
}


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, of another format or version, or does not match its config."""


def _kind_of(model: nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"cannot checkpoint a {type(model).__name__}; expected RQVAE or RQKMeans")


def to_payload(model: RQVAE | RQKMeans) -> dict[str, Any]:
    """The checkpoint dict. State is taken from the uncompiled module (no ``_orig_mod.`` keys)."""
    module = getattr(model, "_orig_mod", model)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": _kind_of(module),
            "config": module.config.to_dict(), "state_dict": state}


def save_checkpoint(model: RQVAE | RQKMeans, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_payload(model), path)
    return path


def checkpoint_bytes(model: RQVAE | RQKMeans) -> bytes:
    """The checkpoint as bytes, e.g. to ship to Spark workers inside a UDF closure."""
    buf = io.BytesIO()
    torch.save(to_payload(model), buf)
    return buf.getvalue()


def load_checkpoint(source: str | Path | bytes, map_location: str | torch.device = "cpu") -> RQVAE | RQKMeans:
    """Rebuild a model from a checkpoint path or bytes; raises CheckpointError with the reason."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        payload = torch.load(handle, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{name} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    return model_from_payload(payload, name)


def model_from_payload(payload: Any, name: str = "<payload>") -> RQVAE | RQKMeans:
    """Validate a loaded checkpoint dict and build its model in eval mode."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a catalog-semantic-ids checkpoint (format tag missing)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{name} has format version {payload.get('format_version')}, "
                              f"this code reads version {FORMAT_VERSION}; re-export it or upgrade")
    if payload.get("kind") not in _KINDS:
        raise CheckpointError(f"{name} holds an unknown model kind {payload.get('kind')!r}")
    model_cls, config_cls = _KINDS[payload["kind"]]
    try:
        model = model_cls(config_cls.from_dict(payload["config"]))
        state = dict(payload["state_dict"])
        if isinstance(model, RQVAE) and model.balances_prefixes and "anchor_offsets" not in state:
            # Written before the 2-prefix offsets existed: its level 2 was the nearest centroid.
            state["anchor_offsets"] = torch.zeros_like(model.anchor_offsets)
        if isinstance(model, RQVAE) and model.refines_first_level and "anchor_recon" not in state and "anchor" in state:
            # Written before level 1's reconstruction codewords were refined: they were its centroids.
            state["anchor_recon"] = state["anchor"].clone()
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{name}: state_dict does not match its config ({e})") from e
    return model.eval()
