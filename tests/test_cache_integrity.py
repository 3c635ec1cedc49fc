"""Every cache entry (features, pixels and tower statistics, expert buffers, forgetting statistics)
carries a checksum in its sidecar and is verified on every load: a changed, truncated or NaN-filled
file, a deleted or garbled sidecar, or an entry from before checksums is recomputed after one warning
line, and what comes back equals the clean entry (never the corrupted data).

Corruption happens in fresh ``tmp_path`` caches only: the session-wide ``cache`` stays valid."""
import io
import json
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from bench.protocol import build_protocol
from datasets import features as F
from datasets.encoders import get_encoder
from datasets.features import atomic_save_npy, cache_path, features, save_entry, sidecar
from datasets.pixels import pixel_cache_path, pixels, tower_stats
from datasets.registry import load_dataset
from methods import MethodContext
from methods import forgetting as fg
from methods.coreset_features import representative_captions
from methods.tm.experts import ExpertBuffer, ExpertConfig
from tests.test_coresets import toy_protocol

# corruptions every kind gets; the float kinds also get "nan" (NaN bytes over the data) and
# "nan_resealed" (NaNs written as a proper entry, checksum and all: caught by the finiteness check)
COMMON = ("garbage", "truncate", "no_sidecar", "garbled_sidecar", "wrong_digest", "old_format")
FLOAT = COMMON + ("nan", "nan_resealed")


# -- helpers ---------------------------------------------------------------------------------------

def warned(lines):
    return [m for m in lines if "recomputing" in m or "retraining" in m]


def data_span(path, member=None):
    """``(offset, length)`` of the array bytes in a cache file: an ``.npy``'s data, or the data of
    one stored member of a zip (``.npz``: the ``member`` array; torch ``.pt``: its largest record)."""
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        f = io.BytesIO(raw)
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell(), len(raw) - f.tell()
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if member is None or member in i.filename]
        info = max(infos, key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[h + 26:h + 30])
    start, size = h + 30 + name_len + extra_len, info.file_size
    if raw[start:start + 6] == b"\x93NUMPY":  # an .npz member: skip its own header
        f = io.BytesIO(raw[start:start + size])
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        start, size = start + f.tell(), size - f.tell()
    return start, size


def corrupt(path, how, dtype, member=None):
    """Damage a cache entry in place (``how``: one of FLOAT, except ``nan_resealed``)."""
    side = sidecar(path)
    if how in ("garbage", "nan"):  # same size: a few values in the middle of the data
        dt = np.dtype(dtype)
        off, n = data_span(path, member)
        k = max(1, min(8, n // dt.itemsize // 2))
        at = off + (n // 2 // dt.itemsize) * dt.itemsize
        raw = bytearray(path.read_bytes())
        rng = np.random.default_rng(0)
        if how == "nan":
            vals = np.full(k, np.nan, dtype=dt)
        elif dt.kind == "f":
            vals = rng.uniform(-4, 4, k).astype(dt)  # finite
        elif dt.kind == "b":
            vals = ~np.frombuffer(bytes(raw[at:at + k]), dtype=bool)
        else:
            vals = rng.integers(0, 256, k).astype(dt)
        new = vals.tobytes()
        assert raw[at:at + len(new)] != new
        raw[at:at + len(new)] = new
        size = path.stat().st_size
        path.write_bytes(bytes(raw))
        assert path.stat().st_size == size
    elif how == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "no_sidecar":
        side.unlink()
    elif how == "garbled_sidecar":
        side.write_bytes(b'{"checksum": {"algo": "sha2\x00\xff')
    elif how == "wrong_digest":
        meta = json.loads(side.read_text())
        meta["checksum"]["digest"] = "0" * len(meta["checksum"]["digest"])
        side.write_text(json.dumps(meta))
    elif how == "old_format":  # a sidecar as written before checksums were kept
        meta = json.loads(side.read_text())
        del meta["checksum"]
        side.write_text(json.dumps(meta))
    else:
        raise AssertionError(how)


def reseal_npy_with_nan(path):
    arr = np.load(path)
    arr.flat[arr.size // 2] = np.nan
    meta = {k: v for k, v in json.loads(sidecar(path).read_text()).items() if k != "checksum"}
    atomic_save_npy(path, arr, meta)


def exercise(load, computed, path, how, dtype, member=None, reseal=None, equal=np.array_equal):
    """Build a clean entry, check a verified hit, damage it, and check the next load recomputes it
    (one warning naming it; the clean values), after which it is a silent, checksummed hit again.
    ``path``: the entry's data file, or a function giving it once the entry is built."""
    logs = []
    clean = load(logs.append)
    path = path() if callable(path) else path
    assert computed() == 1 and warned(logs) == []
    assert json.loads(sidecar(path).read_text())["checksum"]["algo"] == F.CHECKSUM
    logs.clear()
    assert equal(load(logs.append), clean) and computed() == 1 and warned(logs) == []  # a verified hit

    if how == "nan_resealed":
        reseal(path)
    else:
        corrupt(path, how, dtype, member)
    logs.clear()
    again = load(logs.append)
    assert equal(again, clean), "returned the corrupted entry, or recomputed different numbers"
    assert computed() == 2
    w = warned(logs)
    assert len(w) == 1 and path.name in w[0], logs

    logs.clear()
    assert equal(load(logs.append), clean) and computed() == 2 and warned(logs) == []  # repaired once
    assert "checksum" in json.loads(sidecar(path).read_text())
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]
    return w[0]


class FakeText:
    """A text encoder without a model: a fixed function of each caption, counting its calls."""
    name, key, modality = "fake-text", "fake-text-v1", "text"

    def __init__(self):
        self.calls = 0

    def encode(self, texts, desc=None, device=None, log=None):
        self.calls += 1
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(24).astype(np.float32)
                         for t in texts])


@pytest.fixture(scope="module")
def small_ds():
    return load_dataset("synthetic", limit=(6, 3))


# -- the entry format ------------------------------------------------------------------------------

def test_data_is_written_before_its_sidecar_and_both_atomically(tmp_path, monkeypatch):
    order = []
    real = F.os.replace

    def spy(src, dst):
        assert str(src).endswith(".tmp")
        order.append(dst)
        real(src, dst)

    monkeypatch.setattr(F.os, "replace", spy)
    path = tmp_path / "x" / "entry.npy"
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    meta = atomic_save_npy(path, arr, {"what": "test"})
    assert order == [path, sidecar(path)]
    assert meta["checksum"] == F.file_checksum(path) and meta["shape"] == [3, 4] and meta["what"] == "test"
    got, why = F.load_npy(path)
    assert why is None and np.array_equal(got, arr) and got.flags.writeable
    assert F.load_npy(tmp_path / "absent.npy") == (None, None)  # absent: no warning to give


def test_all_finite_sees_every_non_finite_value():
    for dt in (np.float16, np.float32, np.float64):
        a = np.random.default_rng(0).standard_normal(3_000_001).astype(dt)
        assert F.all_finite(a)
        for bad in (np.nan, np.inf, -np.inf):
            for at in (0, 1_500_000, len(a) - 1):
                b = a.copy()
                b[at] = bad
                assert not F.all_finite(b)
    assert F.all_finite(np.zeros((2, 3), dtype=np.uint8)) and F.all_finite(np.ones(4, dtype=bool))


# -- frozen features -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", FLOAT)
def test_feature_entry_is_recomputed_when_it_fails(tmp_path, small_ds, how):
    enc = FakeText()
    path = cache_path(tmp_path, small_ds, "train", enc)
    load = lambda log: features(small_ds, "train", enc, tmp_path, log=log)  # noqa: E731
    exercise(load, lambda: enc.calls, path, how, np.float16, reseal=reseal_npy_with_nan)
    # the checksum is metadata only: the stored numbers are the encoder's, as before
    assert np.array_equal(np.load(path), FakeText().encode(small_ds.split("train").captions).astype(np.float16))


def test_same_size_finite_garbage_is_an_array_the_unverified_loader_would_use(tmp_path, small_ds):
    enc = FakeText()
    clean = features(small_ds, "train", enc, tmp_path, log=None)
    path = cache_path(tmp_path, small_ds, "train", enc)
    corrupt(path, "garbage", np.float16)
    bad = np.load(path)
    assert bad.shape == clean.shape and np.isfinite(bad).all() and not np.array_equal(bad, clean)
    logs = []
    assert np.array_equal(features(small_ds, "train", enc, tmp_path, log=logs.append), clean)
    assert len(warned(logs)) == 1 and "does not match its checksum" in warned(logs)[0]


def test_feature_warning_goes_to_stderr_without_a_log(tmp_path, small_ds, capsys):
    enc = FakeText()
    first = features(small_ds, "train", enc, tmp_path, log=None)
    path = cache_path(tmp_path, small_ds, "train", enc)
    corrupt(path, "truncate", np.float16)
    assert np.array_equal(features(small_ds, "train", enc, tmp_path, log=None), first) and enc.calls == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0] and "recomputing" in err[0]


def test_fresh_non_finite_features_are_refused_not_cached(tmp_path, small_ds):
    enc = FakeText()
    enc.encode = lambda texts, desc=None, device=None, log=None: np.full((len(texts), 4), np.nan, dtype=np.float32)
    with pytest.raises(RuntimeError, match="non-finite"):
        features(small_ds, "train", enc, tmp_path, log=None)
    assert not cache_path(tmp_path, small_ds, "train", enc).exists()


def test_a_damaged_feature_entry_no_longer_changes_the_protocol(tmp_path, tiny_protocol, cache):
    """The issue's case end to end: one changed value in a cached feature file, same size and
    finite; the protocol rebuilt on that cache recomputes it and holds the clean features."""
    shutil.copytree(cache / "features", tmp_path / "features")
    c = tiny_protocol.cfg
    ds = load_dataset(c.dataset, c.data_root, c.test_split, c.limit)
    path = cache_path(tmp_path, ds, "train", get_encoder(c.image_encoder, "image"))
    assert path.exists()
    corrupt(path, "garbage", np.float16)
    logs = []
    p = build_protocol(tiny_protocol.cfg, cache_dir=tmp_path, log=logs.append)
    assert len(warned(logs)) == 1 and path.name in warned(logs)[0]
    assert p.id == tiny_protocol.id
    assert torch.equal(p.train.image, tiny_protocol.train.image) and torch.equal(p.train.text, tiny_protocol.train.text)


# -- pixel cache and tower statistics --------------------------------------------------------------

@pytest.mark.parametrize("how", COMMON)
def test_pixel_entry_is_recomputed_when_it_fails(tmp_path, small_ds, how):
    seen = []

    def load(log):
        return pixels(small_ds, "train", 16, tmp_path, log=lambda m: (seen.append(m), log(m)))

    computed = lambda: sum(m.startswith("cached pixels") for m in seen)  # noqa: E731
    exercise(load, computed, pixel_cache_path(tmp_path, small_ds, "train", 16), how, np.uint8)


class FakeTower:
    key = "fake-tower-v1"

    def __init__(self):
        self.calls = 0

    def feature_stats(self, px):
        self.calls += 1
        x = px.float()
        return x.mean((0, 2, 3)), x.std((0, 2, 3))


@pytest.mark.parametrize("how", FLOAT)
def test_tower_statistics_are_recomputed_when_they_fail(tmp_path, small_ds, how):
    px = pixels(small_ds, "train", 16, tmp_path, log=None)
    tower = FakeTower()
    load = lambda log: torch.stack(tower_stats(small_ds, tower, px, tmp_path, log=log))  # noqa: E731
    path = lambda: next((tmp_path / "pixels").glob("*-stats-*.npy"))  # noqa: E731
    exercise(load, lambda: tower.calls, path, how, np.float32, reseal=reseal_npy_with_nan, equal=torch.equal)
    assert torch.equal(load(None), torch.stack(FakeTower().feature_stats(torch.from_numpy(px))))


# -- expert buffers --------------------------------------------------------------------------------

def _same_experts(a, b):
    return len(a) == len(b) and all(torch.equal(x.params, y.params) and (x.base is None) == (y.base is None)
                                    and (x.base is None or torch.equal(x.base, y.base)) for x, y in zip(a, b))


def _reseal_expert_with_nan(path):
    f = torch.load(path, weights_only=True)
    f["params"][1, :3] = float("nan")
    meta = {k: v for k, v in json.loads(sidecar(path).read_text()).items() if k != "checksum"}
    save_entry(path, lambda tmp: torch.save(f, tmp), meta)


@pytest.mark.parametrize("how", FLOAT)
def test_expert_is_retrained_when_it_fails(tmp_path, tiny_protocol, how):
    cfg = ExpertConfig(n_experts=1, epochs=2)
    seen = []

    def load(log):
        return ExpertBuffer(tiny_protocol, cfg, tmp_path).build(lambda m: (seen.append(m), log(m))).load()

    computed = lambda: sum(m.startswith("expert 1/1: 2 epochs in") for m in seen)  # noqa: E731
    path = ExpertBuffer(tiny_protocol, cfg, tmp_path).path(0)
    exercise(load, computed, path, how, np.float16, reseal=_reseal_expert_with_nan, equal=_same_experts)


def test_expert_load_alone_verifies_and_missing_counts_failing_experts(tmp_path, tiny_protocol):
    cfg = ExpertConfig(n_experts=2, epochs=2)
    buf = ExpertBuffer(tiny_protocol, cfg, tmp_path).build(log=lambda m: None)
    clean = buf.load()
    corrupt(buf.path(1), "garbage", np.float16)
    fresh = ExpertBuffer(tiny_protocol, cfg, tmp_path)
    assert fresh.missing() == [1]  # present only when data and sidecar agree
    logs = []
    got = fresh.load(log=logs.append)  # no build(): load itself verifies, retrains, warns once
    assert _same_experts(got, clean) and len(warned(logs)) == 1 and "expert_001.pt" in warned(logs)[0]
    assert fresh.missing() == [] and fresh.spec() == torch.load(buf.path(0), weights_only=True)["spec"]
    sidecar(buf.path(0)).unlink()
    sidecar(buf.path(1)).unlink()
    buf.path(1).unlink()
    with pytest.raises(RuntimeError, match="incomplete"):  # never built: build() first, as before
        ExpertBuffer(tiny_protocol, cfg, tmp_path).load()


# -- forgetting statistics -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def forgetting_setup():
    p = toy_protocol(n_images=20, epochs=2)
    return p, representative_captions(p.train.text, p.train.caption_image, 20)


@pytest.mark.parametrize("how", COMMON)
def test_forgetting_statistics_are_recomputed_when_they_fail(tmp_path, forgetting_setup, how):
    p, caps = forgetting_setup
    method = fg.Forgetting(fg.Forgetting.Config())
    runs = []

    def load(log):
        learned, cached = method.learned_matrix(MethodContext(p, tmp_path, log=log), caps)
        runs.append(not cached)
        return learned

    path = method.cache_path(MethodContext(p, tmp_path, log=None))
    exercise(load, lambda: sum(runs), path, how, bool, member="learned")
