"""`classifier.top_indices`: the first k of a stable descending sort, found without sorting all."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.classifier import top_indices


def stable_top(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-row, kind="stable")[: max(1, min(k, len(row)))]]


@pytest.mark.parametrize("k", [0, 1, 3, 5, 100, 1000, 2000])
def test_equal_to_the_stable_sort_on_random_scores(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(50):
        row = rng.random(1000, dtype=np.float32)
        assert [int(i) for i in top_indices(row, k)] == stable_top(row, k)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_ties_at_the_boundary_keep_index_order(k: int) -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        # few distinct values: ties everywhere, the k-th highest among them
        row = rng.integers(0, 4, size=200).astype(np.float32) / 4
        assert [int(i) for i in top_indices(row, k)] == stable_top(row, k)


def test_all_equal_scores_rank_by_index() -> None:
    row = np.full(1000, 0.001, dtype=np.float32)
    assert [int(i) for i in top_indices(row, 3)] == [0, 1, 2]


def test_nan_scores_rank_as_the_full_sort_ranks_them() -> None:
    row = np.full(100, np.nan, dtype=np.float32)
    row[40] = 0.5
    assert [int(i) for i in top_indices(row, 3)] == stable_top(row, 3)
    assert int(top_indices(row, 3)[0]) == 40
