"""rqvae: a pure PyTorch + NumPy RQ-VAE that turns item embeddings into hierarchical semantic IDs.

Imports only torch, numpy and the standard library. Typical use::

    from rqvae import ModelConfig, TrainConfig, fit, encode_array
    result = fit(x, ModelConfig(input_dim=x.shape[1]), TrainConfig(epochs=50))
    r = encode_array(result.model, x)    # r.codes int32 (N, L), r.quantization_error float32 (N,)
"""
from rqvae.baseline import RQKMeans, RQKMeansConfig
from rqvae.callbacks import Callback, ProgressPrinter
from rqvae.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint, save_checkpoint
from rqvae.config import ModelConfig, TrainConfig
from rqvae.encode import EncodeResult, encode_array, issue_codes, reconstruct_array
from rqvae.model import RQVAE
from rqvae.train import FitResult, fit, select_device

__all__ = [
    "RQVAE", "Callback", "CheckpointError", "EncodeResult", "FitResult", "ModelConfig", "ProgressPrinter",
    "RQKMeans", "RQKMeansConfig", "TrainConfig", "checkpoint_bytes", "encode_array", "fit",
    "issue_codes", "load_checkpoint", "reconstruct_array", "save_checkpoint", "select_device",
]
__version__ = "0.1.0"
