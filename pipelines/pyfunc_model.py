"""MLflow pyfunc wrapper of a semantic-ID tokenizer (imports no pyspark: it loads anywhere).

``mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)`` takes a pandas DataFrame with an
``embedding`` column (lists/arrays of floats) and returns ``codes`` (list of L ints) and
``quantization_error`` per row, as the encode stage computes them (the same bits when torch runs
1 or a power-of-two threads, see ``rqvae.encode``). Each call is at least one full-size model call
(2048 rows on CPU: about 40 ms on one thread at D = 768), so score rows in batches, not one by one.

This file is the registered model's code (MLflow's "models from code", ``pipelines.registry.log_and_register``):
MLflow stores it beside the checkpoint and runs it when the model loads, so it imports nothing of this project
at the top (rqvae travels with the model as code) and ends by naming its model with ``set_model``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

CHECKPOINT_ARTIFACT = "checkpoint"


class SemanticIdModel(PythonModel):
    """Loads the rqvae checkpoint artifact once; ``predict`` encodes a batch of embeddings."""

    def load_context(self, context: Any) -> None:
        from rqvae.checkpoint import load_checkpoint

        self.model = load_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]).read_bytes())

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from rqvae.encode import encode_array

        dim = int(self.model.config.input_dim)
        rows = [None if v is None else np.asarray(v, dtype=np.float32).ravel() for v in model_input["embedding"]]
        wrong = [i for i, v in enumerate(rows) if v is None or v.shape[0] != dim]
        if wrong:  # a clear error, not the model's matrix-shape failure
            shown = ", ".join(f"row {i}: {'no embedding' if rows[i] is None else f'length {rows[i].shape[0]}'}"
                              for i in wrong[:5])
            more = ", ..." if len(wrong) > 5 else ""
            raise ValueError(f"this model encodes embeddings of length {dim} (the D of the catalog it was trained "
                             f"on); {len(wrong)} of {len(rows)} rows are not ({shown}{more}). Pass the same "
                             "embeddings the catalog holds")
        x = np.stack(rows) if rows else np.zeros((0, dim), "f4")
        result = encode_array(self.model, x)
        return pd.DataFrame({"codes": [row.tolist() for row in result.codes],
                             "quantization_error": result.quantization_error})


def signature() -> Any:
    """Input: ``embedding`` array<double>; output: ``codes`` array<int>, ``quantization_error`` float."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(
        # double, not float: plain Python/JSON lists must pass; predict() casts to float32 itself.
        inputs=Schema([ColSpec(Array(DataType.double), "embedding")]),
        outputs=Schema([ColSpec(Array(DataType.integer), "codes"), ColSpec(DataType.float, "quantization_error")]),
    )


if __name__ != "pipelines.pyfunc_model":  # run by MLflow as the model's code, not imported by this project
    set_model(SemanticIdModel())  # the model MLflow loads from this file
