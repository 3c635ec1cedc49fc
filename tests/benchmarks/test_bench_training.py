"""Speed of one evaluation training (``bench.protocol.training.train_student``, the default ``Recipe``: SGD
momentum 0.9, batch 64, heads cut, linear student 1280->512 / 384->512): a 1000-pair set for the
recipe's 20 epochs, and one epoch over full-data size (6,000 images x 5 captions = 30,000 pairs).
Texts are a fixed random projection of their image plus noise, so the loss has something to learn.
"""
import pytest
import torch

from bench.protocol.student import StudentConfig, build_student, contrastive_loss
from bench.protocol.training import PairSet, Recipe, train_student

D_IMG, D_TXT = 1280, 384


def make_pairs(n_images: int, captions_per_image: int) -> PairSet:
    g = torch.Generator().manual_seed(n_images)
    image = torch.randn(n_images, D_IMG, generator=g)
    pair_image = torch.arange(n_images).repeat_interleave(captions_per_image)
    proj = torch.randn(D_IMG, D_TXT, generator=g) / D_IMG ** 0.5
    text = image[pair_image] @ proj + 0.5 * torch.randn(len(pair_image), D_TXT, generator=g)
    return PairSet(image, text, pair_image)


def probe_loss(student, pairs: PairSet, n: int = 512) -> float:
    with torch.no_grad():
        student.eval()
        img, txt = student(pairs.image[pairs.pair_image[:n]], pairs.text[:n])
        return contrastive_loss(img, txt, student.cfg.temperature).item()


@pytest.mark.benchmark(group="training")
@pytest.mark.parametrize("n_images,captions,epochs", [(1000, 1, 20), (6000, 5, 1)], ids=["1000pairs-20ep", "30000pairs-1ep"])
def test_bench_train_student(benchmark, n_images, captions, epochs):
    pairs, recipe = make_pairs(n_images, captions), Recipe(epochs=epochs)
    assert recipe.epochs == epochs and recipe.batch_size == Recipe().batch_size  # the default recipe but epochs
    fresh = build_student(StudentConfig(), D_IMG, D_TXT, seed=0)
    before, trained = probe_loss(fresh, pairs), {}

    def setup():  # a fresh student per round (train_student trains in place)
        trained["student"] = build_student(StudentConfig(), D_IMG, D_TXT, seed=0)
        return (trained["student"], pairs, recipe, 0), {}

    lr = benchmark.pedantic(train_student, setup=setup, rounds=3, iterations=1, warmup_rounds=1)
    student = trained["student"]
    assert lr == Recipe().lr
    assert all(torch.isfinite(p).all() for p in student.parameters())
    after = probe_loss(student, pairs)
    assert after < before  # it trained
