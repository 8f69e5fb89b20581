"""Collision-aware last level: items that would share a full code tuple take their next-best free
last-level code instead, so fewer of them need a uniquifying suffix.

The idea is LC-Rec's uniform last-level assignment and the "resolver" of the ``semantic-id``
package, restricted so that it never touches an item that does not collide: every tuple first keeps
its best-fitting item (lowest quantization error, then the tie-break key), and only the others move,
each to the nearest of its ranked alternatives (``encode_array(..., alternatives=k)``) that no item
in its prefix holds or is about to hold. An item with no free alternative keeps its code and is told
apart by the suffix as before. The prefix (levels 1..L-1) never changes, so coarse neighbourhoods are
exactly the model's.

Deterministic: the result depends on the items' codes, errors and tie-break keys only, not on their
order. Incremental runs pass the tuples already issued (``taken``): those are never handed out again,
so a new item neither moves a published one nor lands on its tuple when a free code is near.

Second chance: an item that found no free code among its ``k`` alternatives (a family of near-duplicates
has nearly the same ``k``) can be ranked again over all K last-level codes and spread once more with every
other item's tuple taken (:func:`not_keepers` names those items; the job does it in
``pipelines.uniquify.second_chance``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Spread(NamedTuple):
    """codes: int32 (N, L) after the move; quantization_error: float32 (N,) of the code each item now
    has; moved: bool (N,) items whose last-level code is not their nearest."""

    codes: np.ndarray
    quantization_error: np.ndarray
    moved: np.ndarray


def spread_last_level(codes: np.ndarray, errors: np.ndarray, alternatives: np.ndarray,
                      alternative_errors: np.ndarray, tiebreak: np.ndarray | None = None,
                      taken: np.ndarray | None = None, missing: np.ndarray | None = None) -> Spread:
    """Give colliding items free last-level codes from their ranked alternatives.

    Args:
        codes: (N, L) int codes from the model (last level = the nearest code).
        errors: (N,) quantization error of those codes.
        alternatives: (N, k) ranked last-level codes, nearest first (column 0 = ``codes[:, -1]``).
        alternative_errors: (N, k) the error each alternative gives.
        tiebreak: (N,) sortable keys (e.g. item ids) that order items of equal error; default row order.
        taken: (M, L) tuples already issued: their last-level codes are never given to these items.
        missing: (N,) bool, items whose error is unknown (a null in a table; ``errors`` holds anything there):
            they order after every known error, NaN included, as SQL's nulls-last order puts them.

    Returns: :class:`Spread`.
    """
    codes = np.asarray(codes)
    n, levels = codes.shape
    if np.shape(errors) != (n,) or np.ndim(alternatives) != 2 or len(alternatives) != n \
            or np.shape(alternative_errors) != np.shape(alternatives):
        raise ValueError(f"codes (N, L), errors (N,), alternatives and alternative_errors (N, k) must agree; got "
                         f"{codes.shape}, {np.shape(errors)}, {np.shape(alternatives)}, "
                         f"{np.shape(alternative_errors)}")
    if n and alternatives.shape[1] and not np.array_equal(alternatives[:, 0], codes[:, -1]):
        raise ValueError("alternatives[:, 0] must be each item's own last-level code (nearest first)")
    out_codes = codes.astype(np.int32, copy=True)
    out_errors = np.asarray(errors, dtype=np.float32).copy()
    moved = np.zeros(n, dtype=bool)
    if n == 0 or levels == 0:
        return Spread(out_codes, out_errors, moved)
    tie = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    unknown = np.zeros(n, dtype=bool) if missing is None else np.asarray(missing, dtype=bool)
    taken_rows = np.zeros((0, levels), dtype=codes.dtype) if taken is None else np.asarray(taken).reshape(-1, levels)
    # One id per prefix over the items and the issued tuples together.
    _, prefix = np.unique(np.concatenate([codes[:, :-1], taken_rows[:, :-1]]), axis=0, return_inverse=True)
    prefix = prefix.reshape(-1).astype(np.int64)
    width = int(max(codes[:, -1].max(), alternatives.max() if alternatives.size else 0,
                    taken_rows[:, -1].max() if len(taken_rows) else 0)) + 1
    full = prefix[:n] * width + codes[:, -1]
    claimed = set((prefix[n:] * width + taken_rows[:, -1]).tolist())
    # Pass 1: the best-fitting item of each tuple keeps it (unless the tuple is already issued).
    order = np.lexsort((tie, out_errors, unknown, full))
    first = np.ones(n, dtype=bool)
    first[1:] = full[order][1:] != full[order][:-1]
    keeps = np.zeros(n, dtype=bool)
    keeps[order[first]] = True
    keeps &= ~np.isin(full, np.fromiter(claimed, dtype=np.int64, count=len(claimed)))
    claimed.update(full[keeps].tolist())
    # Pass 2: the others, best fit first, take the nearest alternative nobody holds.
    losers = np.flatnonzero(~keeps)
    losers = losers[np.lexsort((tie[losers], out_errors[losers], unknown[losers]))]
    for i in losers.tolist():
        base = int(prefix[i]) * width
        for j in range(1, alternatives.shape[1]):
            key = base + int(alternatives[i, j])
            if key not in claimed:
                claimed.add(key)
                out_codes[i, -1] = alternatives[i, j]
                out_errors[i] = alternative_errors[i, j]
                moved[i] = True
                break
    return Spread(out_codes, out_errors, moved)


def not_keepers(codes: np.ndarray, errors: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Row numbers (ascending) of the items that share their full tuple with a better-fitting item: every item
    of a shared tuple but the one that keeps it (lowest error, then the lowest ``tiebreak`` key, default the row
    number), i.e. the items a uniquifying suffix of 1 or more tells apart (:func:`suffixes_in_tuples`). After
    :func:`spread_last_level` they are the items that found no free code."""
    n = len(codes)
    tie = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    return np.flatnonzero(suffixes_in_tuples(np.asarray(codes), np.asarray(errors), tie) >= 1).astype(np.int64)


def spread_again(spread: Spread, left: np.ndarray, codes: np.ndarray, errors: np.ndarray, alternatives: np.ndarray,
                 alternative_errors: np.ndarray, tiebreak: np.ndarray | None = None) -> Spread:
    """The second chance: rows ``left`` of ``spread`` (:func:`not_keepers`), ranked again over (usually) every
    last-level code, given the nearest free code of their prefix in that order, every tuple of ``spread``
    taken. ``codes``, ``errors``, ``alternatives`` and ``alternative_errors`` are the new ranking of the
    ``left`` rows, in their order (``encode_array(model, x[left], alternatives=K)``); a row whose ``codes``
    differ from the ones it holds is left as it is. ``tiebreak``: (N,) keys of all rows (default the row
    number). Returns the whole :class:`Spread`, ``moved`` set for the rows that moved either time."""
    tie = np.arange(len(spread.codes)) if tiebreak is None else np.asarray(tiebreak)
    left = np.asarray(left, dtype=np.int64)
    same = (np.asarray(codes) == spread.codes[left]).all(axis=1)
    rows = np.flatnonzero(same)
    again = spread_last_level(np.asarray(codes)[rows], np.asarray(errors)[rows], np.asarray(alternatives)[rows],
                              np.asarray(alternative_errors)[rows], tiebreak=tie[left[rows]], taken=spread.codes)
    out_codes, out_errors, moved = spread.codes.copy(), spread.quantization_error.copy(), spread.moved.copy()
    out_codes[left[rows]], out_errors[left[rows]] = again.codes, again.quantization_error
    moved[left[rows]] |= again.moved
    return Spread(out_codes, out_errors, moved)


def suffixes_in_tuples(codes: np.ndarray, errors: np.ndarray, tiebreak: np.ndarray,
                       missing: np.ndarray | None = None) -> np.ndarray:
    """int32 (N,) uniquifying suffixes: 0..n-1 within each group of n items sharing a full code tuple,
    ordered by error ascending (NaN after every number), then by the tie-break key (the item id).

    The rule of ``pipelines.uniquify.assign_suffixes`` on NumPy arrays; like it, the result does not
    depend on the row order.

    Args:
        codes: (N, L) int codes.
        errors: (N,) float quantization errors.
        tiebreak: (N,) sortable keys, unique (item ids, or their ranks).
        missing: (N,) bool, items whose error is unknown (a null): after every known error, NaN included.
    """
    codes = np.asarray(codes)
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    unknown = np.zeros(n, dtype=bool) if missing is None else np.asarray(missing, dtype=bool)
    order = np.lexsort((np.asarray(tiebreak), np.asarray(errors), unknown,
                        *[codes[:, level] for level in reversed(range(codes.shape[1]))]))
    ordered = codes[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    out = np.empty(n, dtype=np.int32)
    out[order] = np.arange(n) - first
    return out
