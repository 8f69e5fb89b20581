"""Category paths -> the hierarchical integer ids the regularizer and the taxonomy metrics use."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def category_ids_from_paths(paths: Sequence[Sequence[str] | None], depth: int | None = None) -> np.ndarray:
    """int64 (N, T) ids: column t identifies the path prefix of depth t+1; -1 where unknown.

    Two items get the same id in column t exactly when their paths agree on the first t+1 names.
    ``depth`` defaults to the longest path.
    """
    depth = depth if depth is not None else max((len(p) for p in paths if p), default=0)
    out = np.full((len(paths), depth), -1, dtype=np.int64)
    ids: list[dict[tuple[str, ...], int]] = [{} for _ in range(depth)]
    for row, path in enumerate(paths):
        for t in range(min(depth, len(path or ()))):
            key = tuple(path[: t + 1])  # type: ignore[index]
            out[row, t] = ids[t].setdefault(key, len(ids[t]))
    return out
