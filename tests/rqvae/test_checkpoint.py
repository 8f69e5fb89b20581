"""Tests of rqvae.checkpoint: round trips, weights_only loading, and every rejected file."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rqvae import RQVAE, CheckpointError, ModelConfig, RQKMeans, RQKMeansConfig
from rqvae.checkpoint import FORMAT, FORMAT_VERSION, checkpoint_bytes, load_checkpoint, save_checkpoint, to_payload

D = 6
X = np.random.default_rng(0).normal(size=(40, D)).astype(np.float32)


def rqvae_model(estimator: str = "ste", shared: bool = False) -> RQVAE:
    torch.manual_seed(0)
    model = RQVAE(ModelConfig(input_dim=D, hidden_dims=(8,), latent_dim=3, num_levels=2, codebook_size=4,
                              shared_codebook=shared, estimator=estimator))
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encode_latent(torch.from_numpy(X)), iters=5)
    model.quantizer.steps_unused[0, 1] = 7  # a non-trivial buffer travels too
    return model.eval()


def rqkmeans_model() -> RQKMeans:
    return RQKMeans.fit(X, RQKMeansConfig(input_dim=D, num_levels=2, codebook_size=4), iters=5)


MODELS = {
    "rqvae-ste-independent": lambda: rqvae_model("ste", False),
    "rqvae-ste-shared": lambda: rqvae_model("ste", True),
    "rqvae-rotation-independent": lambda: rqvae_model("rotation", False),
    "rqvae-rotation-shared": lambda: rqvae_model("rotation", True),
    "rqkmeans": rqkmeans_model,
}


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    assert type(a) is type(b) and a.config == b.config and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.from_numpy(X)
    qa, qb = a.quantize(x), b.quantize(x)
    assert len(torch.unique(qa.codes, dim=0)) > 1  # codes that can differ
    assert torch.equal(qa.codes, qb.codes)
    assert torch.equal(qa.error, qb.error)


@pytest.mark.parametrize("name", list(MODELS))
def test_file_round_trip(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    path = save_checkpoint(model, tmp_path / "nested" / "dir" / "model.pt")
    assert path == tmp_path / "nested" / "dir" / "model.pt" and path.is_file()
    assert_same_model(model, load_checkpoint(path))
    assert_same_model(model, load_checkpoint(str(path)))


@pytest.mark.parametrize("name", list(MODELS))
def test_bytes_round_trip(name: str) -> None:
    model = MODELS[name]()
    blob = checkpoint_bytes(model)
    assert isinstance(blob, bytes)
    assert_same_model(model, load_checkpoint(blob))


@pytest.mark.parametrize("name", ["rqvae-rotation-shared", "rqkmeans"])
def test_file_is_plain_weights_only_dict(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    payload = torch.load(save_checkpoint(model, tmp_path / "m.pt"), weights_only=True)
    assert set(payload) == {"format", "format_version", "kind", "config", "state_dict"}
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    assert payload["kind"] == ("rqkmeans" if name == "rqkmeans" else "rqvae")
    assert payload["config"] == model.config.to_dict()
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())


def test_compiled_wrapper_is_saved_without_orig_mod_prefix() -> None:
    model = rqvae_model()
    wrapper = nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert all(k.startswith("_orig_mod.") for k in wrapper.state_dict())  # the trap being avoided
    payload = to_payload(wrapper)
    assert payload["kind"] == "rqvae"
    assert list(payload["state_dict"]) == list(model.state_dict())
    buf = io.BytesIO()
    torch.save(payload, buf)
    assert_same_model(model, load_checkpoint(buf.getvalue()))


def test_unsupported_model_type() -> None:
    with pytest.raises(TypeError, match="Linear"):
        to_payload(nn.Linear(2, 2))  # type: ignore[arg-type]


def saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def edited_payload(**changes: object) -> bytes:
    payload = to_payload(rqvae_model())
    payload.update(changes)
    return saved(payload)


def test_truncated_file(tmp_path: Path) -> None:
    blob = checkpoint_bytes(rqvae_model())
    path = tmp_path / "cut.pt"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable checkpoint"):
        load_checkpoint(path)


def test_garbage_bytes() -> None:
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(b"definitely not a zip archive")


def test_missing_file_is_not_hidden(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("obj", [{"weights": torch.zeros(3)}, [1, 2], {"format": "other", "format_version": 1}])
def test_foreign_torch_file(obj: object) -> None:
    with pytest.raises(CheckpointError, match="format tag missing"):
        load_checkpoint(saved(obj))


def test_pickled_object_is_refused_by_weights_only() -> None:
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(saved(rqvae_model()))  # a whole module needs unpickling: refused


@pytest.mark.parametrize("version", [0, 2, None])
def test_wrong_format_version(version: object) -> None:
    with pytest.raises(CheckpointError, match=f"format version {version}"):
        load_checkpoint(edited_payload(format_version=version))


def test_unknown_kind() -> None:
    with pytest.raises(CheckpointError, match="unknown model kind 'gpt'"):
        load_checkpoint(edited_payload(kind="gpt"))


def test_state_dict_of_another_shape() -> None:
    config = rqvae_model().config.to_dict() | {"latent_dim": 5}
    with pytest.raises(CheckpointError, match="state_dict does not match its config"):
        load_checkpoint(edited_payload(config=config))


def test_state_dict_with_missing_key() -> None:
    state = to_payload(rqvae_model())["state_dict"]
    state.pop("quantizer.steps_unused")
    with pytest.raises(CheckpointError, match="steps_unused"):
        load_checkpoint(edited_payload(state_dict=state))


def test_config_with_unknown_field() -> None:
    config = rqvae_model().config.to_dict() | {"heads": 4}
    with pytest.raises(CheckpointError, match="heads"):
        load_checkpoint(edited_payload(config=config))


def test_kind_and_config_of_different_models() -> None:
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(edited_payload(kind="rqkmeans"))
