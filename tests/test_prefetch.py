"""medcl.sampling.loader.prefetch against plain iteration: same items in the same order, the
snapshot taken between an item and the next, errors raised at their item, early exits that stop
the producer and close the generator."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from medcl.sampling.loader import IndexBatchLoader, prefetch


def _loader() -> IndexBatchLoader:
    return IndexBatchLoader(20, 4, lambda idx, rng: (idx.copy(), rng.random(3)), seed=3)


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetched_batches_and_states_equal_plain_iteration(enabled):
    plain, states = _loader(), []
    expected = []
    for batch in plain.epoch_batches(1, start=1):
        expected.append(batch)
        states.append(plain.state_dict())  # what a checkpoint after this batch's step records
    loader = _loader()
    with prefetch(loader.epoch_batches(1, start=1), loader.state_dict, enabled=enabled) as batches:
        got = list(batches)
    assert len(got) == len(expected) == 4
    for (batch, state), (idx, draws), want in zip(got, expected, states):
        np.testing.assert_array_equal(batch[0], idx)
        np.testing.assert_array_equal(batch[1], draws)
        assert state == want


def test_the_producer_runs_ahead_while_the_consumer_waits():
    made = []
    ready = threading.Event()

    def items():
        for i in range(3):
            made.append(i)
            if i == 1:
                ready.set()
            yield i

    with prefetch(items()) as batches:
        assert next(batches)[0] == 0
        assert ready.wait(5)  # item 1 is made before the consumer asks for it
        assert made[:2] == [0, 1]
        assert [i for i, _ in batches] == [1, 2]


def test_an_error_while_making_an_item_is_raised_at_that_item():
    def items():
        yield 0
        yield 1
        raise ValueError("frames/v7.npy: cannot read")

    seen = []
    with pytest.raises(ValueError, match=r"v7.npy: cannot read"), prefetch(items()) as batches:
        for item, _ in batches:
            seen.append(item)
    assert seen == [0, 1]


def test_leaving_early_stops_the_producer_and_closes_the_generator():
    closed = threading.Event()

    def items():
        try:
            for i in range(1000):
                yield i
        finally:
            closed.set()

    before = threading.active_count()
    with prefetch(items(), depth=2) as batches:
        for item, _ in batches:
            if item == 2:
                break
    assert closed.is_set()  # the generator's ``finally`` ran (e.g. the streamed loader's buffer release)
    assert threading.active_count() == before
