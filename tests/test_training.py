"""The protocol's training recipe: how an epoch of pairs is cut into batches, and what that changes."""
import pytest
import torch

from bench.errors import BenchError
from bench.protocol.training import PairSet, Recipe, train_student


@pytest.mark.parametrize("n, batching, sizes", [
    (200, "even", [50, 50, 50, 50]),
    (200, "ragged", [64, 64, 64, 8]),  # the paper's DataLoader: an 8-pair contrastive batch every epoch
    (100, "even", [50, 50]),
    (500, "even", [63, 63, 63, 63, 62, 62, 62, 62]),
    (65, "even", [33, 32]),
    (65, "ragged", [64, 1]),
    (64, "even", [64]),
    (10, "even", [10]),
    (10, "ragged", [10]),
    (0, "even", []),
])
def test_an_epoch_is_cut_into_batches_as_batching_says(n, batching, sizes):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    got = Recipe(batch_size=64, batching=batching).batches(order)
    assert [len(b) for b in got] == sizes
    if n:
        assert torch.equal(torch.cat(got), order)  # every pair once per epoch, in the drawn order


def test_bad_recipe_values_are_one_clear_error():
    with pytest.raises(BenchError, match="unknown batching 'drop_last'; available: even, ragged"):
        Recipe(batching="drop_last")
    with pytest.raises(BenchError, match="batch_size and epochs must be >= 1"):
        Recipe(batch_size=0)


def _student_after(protocol, n, recipe, seed=0):
    tr = protocol.train
    pairs = PairSet(tr.image, tr.text[:n], tr.caption_image[:n])
    student = protocol.fresh_student(seed)
    train_student(student, pairs, recipe, seed)
    return {k: v.clone() for k, v in student.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_even_batching_is_ragged_batching_at_the_even_size_and_changes_only_uneven_sets(tiny_protocol):
    even = lambda n, bs: _student_after(tiny_protocol, n, Recipe(epochs=2, batch_size=bs, lr=0.05, batching="even"))
    ragged = lambda n, bs: _student_after(tiny_protocol, n, Recipe(epochs=2, batch_size=bs, lr=0.05, batching="ragged"))
    assert Recipe().batching == "even"  # the default
    # 48 pairs at batch 20: even cuts 3 x 16, which is what ragged batches of 16 are (same permutation)
    assert _same(even(48, 20), ragged(48, 16))
    assert not _same(even(48, 20), ragged(48, 20))  # ragged at 20: 20, 20, 8
    # a set that divides evenly, or fits in one batch, trains identically either way
    assert _same(even(32, 16), ragged(32, 16))
    assert _same(even(12, 16), ragged(12, 16))
