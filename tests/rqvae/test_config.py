"""Tests of rqvae.config: dict round trips (through JSON) and validation."""
from __future__ import annotations

import dataclasses
import json

import pytest

from rqvae.config import ModelConfig, TrainConfig


def through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))  # tuples come back as lists, as from MLflow or a checkpoint


def test_model_config_round_trip_restores_tuples() -> None:
    config = ModelConfig(input_dim=48, hidden_dims=(64, 32), latent_dim=8, num_levels=2, codebook_size=16,
                         shared_codebook=True, estimator="rotation", normalize_inputs=False, dropout=0.1)
    data = through_json(config.to_dict())
    assert data["hidden_dims"] == [64, 32]
    back = ModelConfig.from_dict(data)
    assert back == config and back.hidden_dims == (64, 32) and isinstance(back.hidden_dims, tuple)
    assert hash(back) == hash(config)  # frozen dataclasses with tuples stay hashable


def test_train_config_round_trip() -> None:
    config = TrainConfig(epochs=7, batch_size=64, lr=3e-4, reconstruction_loss="cosine", patience=0, seed=11,
                         taxonomy_weight=0.01, device="cpu", bf16=True)
    assert TrainConfig.from_dict(through_json(config.to_dict())) == config
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_to_dict_names_every_field() -> None:
    assert set(ModelConfig(input_dim=4).to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(TrainConfig().to_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("cls, data", [(ModelConfig, {"input_dim": 4, "n_heads": 2}),
                                       (TrainConfig, {"epochs": 3, "learning_rate": 0.1, "zz": 1})])
def test_unknown_fields_are_rejected_by_name(cls: type, data: dict) -> None:
    extra = sorted(set(data) - {"input_dim", "epochs"})
    with pytest.raises(ValueError, match=str(extra).replace("[", r"\[").replace("]", r"\]")):
        cls.from_dict(data)


@pytest.mark.parametrize("estimator", ["STE", "gumbel", ""])
def test_invalid_estimator(estimator: str) -> None:
    with pytest.raises(ValueError, match="estimator"):
        ModelConfig(input_dim=4, estimator=estimator)
    with pytest.raises(ValueError, match="estimator"):
        ModelConfig.from_dict({"input_dim": 4, "estimator": estimator})


@pytest.mark.parametrize("loss", ["l1", "MSE", "cos"])
def test_invalid_reconstruction_loss(loss: str) -> None:
    with pytest.raises(ValueError, match="reconstruction_loss"):
        TrainConfig(reconstruction_loss=loss)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        TrainConfig.from_dict({"reconstruction_loss": loss})


@pytest.mark.parametrize("field", ["input_dim", "latent_dim", "num_levels", "codebook_size"])
def test_model_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{"input_dim": 4, field: 0})


@pytest.mark.parametrize("changes", [{"holdout_fraction": 1.0}, {"holdout_fraction": -0.1}, {"epochs": 0},
                                     {"batch_size": 1}, {"kmeans_iters": 0}, {"kmeans_tol": 1.0},
                                     {"kmeans_tol": -0.01}])
def test_train_config_ranges(changes: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**changes)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig(input_dim=4).latent_dim = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 1  # type: ignore[misc]
