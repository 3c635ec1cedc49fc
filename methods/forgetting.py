"""``forgetting``: forgetting events (Toneva et al. 2019) adapted to image-text pairs.

Definition used here.

* **Probe pairs**: every train image once, with its representative caption (the caption nearest the
  mean of the image's captions; see ``methods/coreset_features.py``). Candidates for selection are
  the probe pairs, so selected pairs have distinct images.
* **Probe galleries**: the probe pairs are split once, by a fixed permutation from ``train_seed``,
  into galleries of ``probe_size`` pairs (default 100, about a training batch: the analogue of a
  classification problem with 100 classes). Each pair is judged within its own fixed gallery.
  (With one gallery of all 6,000 Flickr8k images, strict top-1 is so hard that most pairs are never
  learned and the selection degenerates to random among them; ``probe_size=0`` gives that variant.)
* **Training run**: one student, ``protocol.fresh_student(train_seed)``, trained on the *full* train
  split (every caption) with the protocol's recipe (``epochs`` overrides the recipe's epoch count
  when > 0), via ``bench.protocol.training.train_student`` with ``seed=train_seed``; the global torch RNG (used
  by dropout in ``mlp`` heads) is also seeded with ``train_seed`` for the run. ``train_seed`` is fixed
  by the config, not by the selection seed, so every budget and selection seed shares one run.
  Under the ``pixels`` cut this is the pixels student (pretrained tower + heads, trained on the
  images): the statistics describe the model the protocol trains, at the cost of one full-data
  training run of the tower (cached per protocol id, like the heads cut's); the cell's info says
  which (``stats_student``).
* **Learned**: after each epoch ``e = 1..E`` (not before training), with the student's embeddings
  of the probe pairs, pair ``i`` is *learned* when image ``i`` retrieves caption ``i`` at top-1 among
  the captions of its gallery AND caption ``i`` retrieves image ``i`` at top-1 among its gallery's
  images. Ties count against the pair (as in ``bench/protocol/retrieval.py``): the positive's similarity must
  be strictly greater than every other gallery item's.
* **Forgetting event**: learned at epoch ``e`` and not learned at epoch ``e+1``
  (``count_forgetting_events``).
* **Order** (most forgotten first, the first ``budget`` are kept): pairs never learned at any epoch
  first (Toneva et al. count them as forgotten infinitely often); then more forgetting events first;
  then fewer epochs learned first; remaining ties in a random order from
  ``numpy.random.default_rng(seed)``.

Randomness: the tie-break order only (selections differ across seeds where ties exist, e.g. among
never-learned pairs).

The learned/not-learned matrix ``[E, n_images]`` is cached on disk under
``<cache_dir>/forgetting/`` with a key covering the protocol id, the candidate rule and the
statistics-defining options (``epochs`` resolved, ``train_seed``), as a checksummed cache entry
(``datasets.features.save_entry``: the ``.npz`` and a ``.json`` sidecar with its checksum), verified
on every load; an entry that fails (changed bytes, truncated, no or a garbled sidecar, an older
entry without a checksum) is recomputed after one log line.
"""
from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.protocol.training import embed, train_student
from datasets.base import identity_hash
from datasets.features import default_cache_dir, read_verified, save_entry
from methods.base import Artifact, MethodContext, register_method
from methods.coreset_features import CANDIDATE_RULE, check_budget, representative_captions

STATS_VERSION = "forgetting-stats-v1"
PROBE_CHUNK = 1024  # gallery rows per similarity block


def count_forgetting_events(learned) -> np.ndarray:
    """Forgetting events per pair from a learned matrix ``[epochs, n]`` (bool): the number of
    epochs ``e`` with ``learned[e]`` true and ``learned[e + 1]`` false."""
    lr = np.asarray(learned, dtype=bool)
    if lr.ndim != 2:
        raise ValueError(f"learned must be [epochs, n], got shape {lr.shape}")
    return (lr[:-1] & ~lr[1:]).sum(0).astype(np.int64)


def forgetting_order(learned, rng: np.random.Generator) -> np.ndarray:
    """Pair indices, most forgotten first: never learned, then most events, then fewest epochs
    learned, then the random order ``rng.permutation(n)``."""
    lr = np.asarray(learned, dtype=bool)
    events = count_forgetting_events(lr)
    epochs_learned = lr.sum(0)
    ever = epochs_learned > 0
    tie = np.empty(lr.shape[1], dtype=np.int64)
    tie[rng.permutation(lr.shape[1])] = np.arange(lr.shape[1])  # position in the random order
    return np.lexsort((tie, epochs_learned, -events, ever))  # last key is the primary one


@torch.no_grad()
def retrieved_both_ways(img_emb: torch.Tensor, txt_emb: torch.Tensor, chunk: int = PROBE_CHUNK) -> np.ndarray:
    """For aligned embeddings (row i of each side is pair i): whether image i's strict top-1 caption
    is i and caption i's strict top-1 image is i. One similarity block of ``chunk`` rows at a time."""
    n = len(img_emb)
    row_ok = torch.zeros(n, dtype=torch.bool)
    diag = torch.empty(n, dtype=img_emb.dtype)
    col_max = torch.full((n,), -torch.inf, dtype=img_emb.dtype)  # best other image for each caption
    for s in range(0, n, chunk):
        blk = img_emb[s:s + chunk] @ txt_emb.T  # images s.. x captions
        r = torch.arange(len(blk))
        d = blk[r, s + r].clone()
        diag[s:s + len(blk)] = d
        blk[r, s + r] = -torch.inf
        row_ok[s:s + len(blk)] = d > blk.max(1).values
        col_max = torch.maximum(col_max, blk.max(0).values)
    return (row_ok & (diag > col_max)).numpy()


def _atomic_savez(path: Path, **arrays) -> None:
    """Write ``arrays`` as a checksummed ``.npz`` cache entry (data, then its sidecar)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    save_entry(path, lambda tmp: tmp.write_bytes(buf.getvalue()),
               {"arrays": {k: [str(np.asarray(v).dtype), list(np.shape(v))] for k, v in arrays.items()}})


@register_method("forgetting", "coreset", help="most-forgotten pairs during one full-data training run (Toneva 2019)")
class Forgetting:
    @dataclass(frozen=True)
    class Config:
        epochs: int = 0  # epochs of the training run; 0 = the protocol recipe's
        train_seed: int = 0  # seed of the one training run (init, batch order, dropout); shared by all selection seeds
        probe_size: int = 100  # pairs per fixed probe gallery; 0 = one gallery of all train images

    def __init__(self, config: "Forgetting.Config"):
        self.config = config

    def _epochs(self, protocol) -> int:
        e = self.config.epochs or protocol.cfg.recipe.epochs
        if e < 2:
            raise ValueError(f"forgetting needs at least 2 epochs to see an event, got {e}")
        return e

    def cache_path(self, ctx: MethodContext) -> Path:
        p = ctx.protocol
        key = identity_hash(STATS_VERSION, p.id, CANDIDATE_RULE, self._epochs(p), self.config.train_seed,
                            self.config.probe_size, len(p.train.image), len(p.train.text))
        return Path(ctx.cache_dir or default_cache_dir()) / "forgetting" / f"{p.id}-{key}.npz"

    def learned_matrix(self, ctx: MethodContext, probe_caps: np.ndarray) -> tuple[np.ndarray, bool]:
        """``([E, n_images] bool, from_cache)``: the cached matrix, or one training run."""
        path = self.cache_path(ctx)
        epochs, n = self._epochs(ctx.protocol), len(probe_caps)
        blob, _, why = read_verified(path)
        if blob is not None:
            try:
                with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                    learned, caps = z["learned"], z["probe_captions"]
            except Exception as e:  # checksummed yet unreadable: written by something else
                why = f"cannot be read ({type(e).__name__}: {e})"
            else:
                if learned.shape == (epochs, n) and np.array_equal(caps, probe_caps):
                    return learned.astype(bool), True
                why = "does not match this split"
        if why:
            ctx.log(f"forgetting: cached statistics entry {path.name} {why}; recomputing")
        learned = self._train_and_probe(ctx, probe_caps, epochs)
        _atomic_savez(path, learned=learned, probe_captions=probe_caps)
        return learned, False

    def _train_and_probe(self, ctx: MethodContext, probe_caps: np.ndarray, epochs: int) -> np.ndarray:
        p, tr = ctx.protocol, ctx.protocol.train
        probe_img, probe_txt = tr.image, tr.text[torch.as_tensor(probe_caps)]
        learned = np.zeros((epochs, len(probe_caps)), dtype=bool)
        every = max(1, epochs // 5)
        n, size = len(probe_caps), self.config.probe_size or len(probe_caps)
        perm = torch.as_tensor(np.random.default_rng(self.config.train_seed).permutation(n))
        galleries = [perm[s:s + size] for s in range(0, n, size)]
        if len(galleries) > 1 and len(galleries[-1]) < 2:  # a one-pair gallery is trivially "learned"
            galleries[-2] = torch.cat(galleries[-2:])
            galleries.pop()
        t0 = time.time()

        def on_epoch(e, student):
            if e == 0:
                return
            was_training = student.training
            ie, te = embed(student, probe_img, probe_txt)  # embed() switches the student to eval mode
            student.train(was_training)
            for g in galleries:
                learned[e - 1, g] = retrieved_both_ways(ie[g], te[g])
            if e % every == 0 or e == epochs:
                ctx.log(f"forgetting: epoch {e}/{epochs}: {learned[e - 1].mean():.1%} of probe pairs learned "
                        f"({time.time() - t0:.0f} s)")

        recipe = dataclasses.replace(p.cfg.recipe, epochs=epochs)
        seed = self.config.train_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = p.fresh_student(seed)
            train_student(student, tr.all_pairs(), recipe, seed, on_epoch=on_epoch)
        return learned

    def prepare(self, ctx: MethodContext) -> None:
        """Compute (or find) the cached statistics once, before any cell: cells then only read them."""
        tr = ctx.protocol.train
        self.learned_matrix(ctx, representative_captions(tr.text, tr.caption_image, len(tr.image)))

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        t0 = time.time()
        tr = ctx.protocol.train
        probe_caps = representative_captions(tr.text, tr.caption_image, len(tr.image))
        check_budget(budget, len(probe_caps), "forgetting")
        learned, cached = self.learned_matrix(ctx, probe_caps)
        order = forgetting_order(learned, np.random.default_rng(seed))
        sel = order[:budget]
        events, ever = count_forgetting_events(learned), learned.any(0)
        return Artifact("selected", indices=probe_caps[sel], info={
            "epochs": int(learned.shape[0]), "stats_cached": cached, "stats_student": ctx.protocol.cfg.student.cut,
            "n_never_learned": int((~ever).sum()), "n_forgotten": int((events > 0).sum()),
            "max_events": int(events.max()), "selected_never_learned": int((~ever[sel]).sum()),
            "selected_mean_events": float(events[sel].mean()), "select_s": round(time.time() - t0, 2)})
