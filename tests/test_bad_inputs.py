"""Bad input, corrupted state and broken results folders: one clear line (exit 2) or a recomputation,
never a traceback, never a silently different number, and never a change to results already written.

The table drives every bad input through the CLI beside a finished results folder and checks that the
folder is byte-identical afterwards; the tests after it reproduce each defect the table cannot show
(a corrupt cell file, a changed image, a caption-less entry, an unwritable cell folder, ...).
"""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.cli import main
from bench.errors import BenchError
from datasets.registry import load_dataset

TINY = ["--limit", "80,30", "--set", "recipe.epochs=2", "--set", "recipe.batch_size=16"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """A finished results folder (a small grid with an artifact), and a place for bad files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    out = root / "runs"
    assert main(["run", "--out", str(out), "--cache-dir", str(cache), "--methods", "random", "--ipc", "5",
                 "--seeds", "1", *TINY]) == 0
    (root / "a_file").write_text("not a folder")
    art = next((out / "artifacts").rglob("*.pt"))
    side = json.loads(art.with_suffix(".json").read_text())
    torch.save(torch.zeros(3), root / "tensor.pt")
    (root / "tensor.json").write_text(json.dumps(side))
    torch.save(torch.load(art, weights_only=True), root / "nosidecar_ok.pt")
    (root / "emptyside.pt").write_bytes(art.read_bytes())
    (root / "emptyside.json").write_text("{}")
    (root / "garbage.pt").write_bytes(os.urandom(256))
    (root / "garbage_side.pt").write_bytes(os.urandom(256))
    (root / "garbage_side.json").write_text(json.dumps(side))
    (root / "badjson.pt").write_bytes(art.read_bytes())
    (root / "badjson.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    kinds = dict(side)
    torch.save({"kind": "weird"}, root / "weirdkind.pt")
    (root / "weirdkind.json").write_text(json.dumps(kinds))
    (root / "clash.py").write_text("from methods import register_method\n\n"
                                   "@register_method('herding', 'coreset')\nclass Mine:\n    pass\n")
    (root / "broken_plugin.py").write_text("import no_such_module_anywhere\n")
    # a Karpathy dataset whose second train entry has no captions
    kar = root / "karpathy"
    (kar / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(kar / "images" / f"{i}.jpg")
    kar_images = [{"filename": f"{i}.jpg", "split": "train" if i < 2 else "val",
                   "sentences": [] if i == 1 else [{"raw": f"caption {i}"}]} for i in range(3)]
    (kar / "dataset_flickr8k.json").write_text(json.dumps({"images": kar_images}))
    # a folder dataset whose captions.jsonl names an image that is not there
    fol = root / "folder"
    fol.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 90)).save(fol / "a.png")
    (fol / "captions.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["x"], "split": "train"}) + "\n"
                                        + json.dumps({"image": "gone.png", "captions": ["y"], "split": "val"}) + "\n")
    bad = root / "folder_bad_line"
    bad.mkdir()
    (bad / "captions.jsonl").write_text('{"image": "a.png", "captions": ["x"]}\n{"image": \n')
    emp = root / "folder_empty_caption"
    emp.mkdir()
    Image.new("RGB", (8, 8)).save(emp / "a.png")
    (emp / "captions.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["  "]}) + "\n")
    return root, out


RUN = ["run", "--out", "{out}", "--cache-dir", "{cache}", "--methods", "random", "--ipc", "5", "--seeds", "1", *TINY]
CASES = {  # name: (argv with {out} {root} {cache} placeholders, words the one error line must hold)
    "unknown method": (RUN + ["--methods", "nosuch"], "unknown method 'nosuch'; available:"),
    "budgets not numbers": (RUN + ["--ipc", "abc"], "comma-separated integers"),
    "budget below 2": (RUN + ["--ipc", "1"], "too small"),
    "budget above the data": (RUN + ["--ipc", "81"], "larger than the train split"),
    "zero seeds": (RUN + ["--seeds", "0"], "positive integer"),
    "negative eval seeds": (RUN + ["--eval-seeds", "-1"], "positive integer"),
    "zero epochs": (RUN + ["--set", "recipe.epochs=0"], "epochs must be >= 1"),
    "unknown batching": (RUN + ["--set", "recipe.batching=odd"], "unknown batching 'odd'"),
    "negative lr": (RUN + ["--set", "recipe.lr=-1"], "lr must be > 0"),
    "momentum of one": (RUN + ["--set", "recipe.momentum=1"], "momentum must be in [0, 1)"),
    "unknown recipe field": (RUN + ["--set", "recipe.nosuch=1"], "recipe has no field 'nosuch'"),
    "unknown student head": (RUN + ["--set", "student.head=nosuch"], "unknown student head 'nosuch'"),
    "dropout above one": (RUN + ["--set", "student.dropout=1.5"], "dropout must be in [0, 1)"),
    "zero temperature": (RUN + ["--set", "student.temperature=0"], "temperature must be > 0"),
    "cut through --set": (RUN + ["--set", "student.cut=pixels"], "--cut heads|pixels"),
    "pixel field on heads": (RUN + ["--set", "student.image_size=64"], "pixels and frozen-pixels cuts only"),
    "tiny pixel images": (RUN + ["--cut", "pixels", "--image-size", "4"], "at least 8 pixels"),
    "unknown method option": (RUN + ["--set", "random.nosuch=3"], "has no option 'nosuch'"),
    "bad option value": (RUN + ["--methods", "tm", "--set", "tm.iterations=abc"], "cannot read 'abc'"),
    "option of an unknown method": (RUN + ["--set", "nosuch.x=1"], "unknown method 'nosuch'"),
    "--set without =": (RUN + ["--set", "noequals"], "SCOPE.FIELD=VALUE"),
    "unknown dataset": (RUN + ["--dataset", "nosuch"], "unknown dataset 'nosuch'; available:"),
    "dataset without its root": (RUN + ["--dataset", "flickr8k"], "needs --data-root"),
    "data root that is not there": (RUN + ["--dataset", "flickr8k", "--data-root", "{root}/nope"], "data root not found"),
    "data root for the synthetic set": (RUN + ["--data-root", "{root}"], "synthetic dataset is generated"),
    "caption-less Karpathy entry": (RUN + ["--dataset", "flickr8k", "--data-root", "{root}/karpathy", "--test-split", "val"],
                                    "images[1] (1.jpg): no captions"),
    "image missing on disk": (RUN + ["--dataset", "folder", "--data-root", "{root}/folder", "--test-split", "val"],
                              "image file not found"),
    "malformed captions.jsonl": (RUN + ["--dataset", "folder", "--data-root", "{root}/folder_bad_line"], "malformed JSON"),
    "blank caption": (RUN + ["--dataset", "folder", "--data-root", "{root}/folder_empty_caption"], "caption 0 is empty"),
    "unknown test split": (RUN + ["--test-split", "train"], "invalid choice"),
    "unknown cut": (RUN + ["--cut", "nosuch"], "invalid choice"),
    "unknown image encoder": (RUN + ["--image-encoder", "nosuch"], "unknown encoder 'nosuch'"),
    "text encoder as image encoder": (RUN + ["--image-encoder", "minilm_l6"], "not a image encoder"),
    "unknown device": (RUN + ["--device", "tpu"], "unknown --device 'tpu'"),
    "limit of one number": (RUN + ["--limit", "5"], "N_TRAIN,N_EVAL"),
    "shard out of range": (RUN + ["--shard", "3/2"], "I/N"),
    "--out is a file": (RUN + ["--out", "{root}/a_file"], "is a file, not a folder"),
    "--out under a file": (RUN + ["--out", "{root}/a_file/sub"], "is not writable"),
    "--cache-dir is a file": (RUN + ["--cache-dir", "{root}/a_file"], "is a file, not a folder"),
    "unknown executor": (RUN + ["--executor", "nosuch"], "invalid choice"),
    "ray options without ray": (RUN + ["--ray-cpus", "2"], "need --executor ray"),
    "plugin file missing": (RUN + ["--plugin", "{root}/absent.py"], "plugin file not found"),
    "plugin name clash": (RUN + ["--plugin", "{root}/clash.py"], "'herding' is already registered"),
    "plugin that fails to import": (RUN + ["--plugin", "{root}/broken_plugin.py"], "No module named"),
    "artifact not there": (["evaluate", "--artifact", "{root}/absent.pt"], "artifact not found"),
    "artifact of a bare tensor": (["evaluate", "--artifact", "{root}/tensor.pt"], "holds a Tensor"),
    "artifact without a sidecar": (["evaluate", "--artifact", "{root}/nosidecar_ok.pt"], "has no sidecar"),
    "sidecar {}": (["evaluate", "--artifact", "{root}/emptyside.pt"], "no 'protocol_config'"),
    "artifact of random bytes": (["evaluate", "--artifact", "{root}/garbage_side.pt"], "cannot read artifact"),
    "random bytes without a sidecar": (["evaluate", "--artifact", "{root}/garbage.pt"], "has no sidecar"),
    "binary sidecar": (["evaluate", "--artifact", "{root}/badjson.pt"], "cannot read the sidecar"),
    "artifact of an unknown kind": (["evaluate", "--artifact", "{root}/weirdkind.pt"], "kind 'weird'"),
    "list of nothing known": (["list", "nosuch"], "invalid choice"),
    "report of an empty folder": (["report", "--out", "{root}/karpathy"], "no results under"),
    "status of an empty folder": (["status", "--out", "{root}/karpathy"], "no runs under"),
    "unknown regression config": (["regress", "--config", "nosuch"], "nosuch"),
    "experts for no distillation method": (["experts", "--cache-dir", "{cache}", "--methods", "random", *TINY],
                                           "nothing to build"),
}


def test_the_table_holds_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_results_alone(name, finished, cache, capsys):
    root, out = finished
    before = snapshot(out)
    argv, words = CASES[name]
    argv = [a.format(out=out, root=root, cache=cache) for a in argv]
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        from bench import plugins
        plugins.reset()
    cap = capsys.readouterr()
    lines = [line for line in cap.err.splitlines() if line.strip()]
    assert code == 2, (name, cap.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (name, lines)
    assert "Traceback" not in cap.out + cap.err
    assert snapshot(out) == before, name


# ------------------------------------------------------------------ corrupted results and state
@pytest.mark.parametrize("content", [b"\x80\x81\xfe\xff binary", b"[1, 2, 3]", b'{"key": 3}'])
def test_a_corrupt_cell_file_counts_as_missing_and_is_redone(content, tmp_path, cache, capsys):
    out = tmp_path / "runs"
    args = ["run", "--out", str(out), "--cache-dir", str(cache), "--methods", "random", "--ipc", "5", "--seeds", "2", *TINY]
    assert main(args) == 0
    cells = sorted((out / "cells").rglob("random/*.json"))
    good = json.loads(cells[1].read_text())
    cells[0].write_bytes(content)
    capsys.readouterr()
    assert main(["status", "--out", str(out)]) == 0  # a missing cell is not a failure
    status = capsys.readouterr()
    assert "Traceback" not in status.err and "1 missing" in status.out
    assert main(["report", "--out", str(out)]) == 0
    assert main(args) == 0
    log = capsys.readouterr()
    assert log.out.count("run   random") == 1 and "Traceback" not in log.err
    assert json.loads(cells[0].read_text())["status"] == "ok"
    assert json.loads(cells[1].read_text()) == good


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b'{"protocol_id": "x", "cells": 3}'])
def test_a_corrupt_grid_file_is_reported_and_rewritten(content, tmp_path, cache, capsys):
    out = tmp_path / "runs"
    args = ["run", "--out", str(out), "--cache-dir", str(cache), "--methods", "random", "--ipc", "5", "--seeds", "1", *TINY]
    assert main(args) == 0
    grid = next((out / "grids").glob("*.json"))
    grid.write_bytes(content)
    capsys.readouterr()
    assert main(["status", "--out", str(out)]) == 0
    assert "unreadable grid file" in capsys.readouterr().out
    assert main(args) == 0
    assert json.loads(grid.read_text())["cells"]


def test_an_unwritable_cell_folder_fails_that_cell_and_the_grid_goes_on(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    base = ["run", "--out", str(out), "--cache-dir", str(cache), "--ipc", "5", "--seeds", "1", *TINY]
    assert main(base + ["--methods", "random"]) == 0  # learn where the cells go
    pid_dir = next((out / "cells").iterdir())
    (pid_dir / "herding").write_text("a file where the method's cell folder belongs")
    capsys.readouterr()
    assert main(base + ["--methods", "herding,kcenter"]) == 1
    log = capsys.readouterr().out
    assert "FAIL  herding @ 5 (seed 0): cannot write the cell's result" in log
    assert json.loads((pid_dir / "kcenter" / "5_s0.json").read_text())["status"] == "ok"


def test_a_bad_protocol_field_writes_nothing(tmp_path, cache):
    out = tmp_path / "runs"
    assert main(["run", "--out", str(out), "--cache-dir", str(cache), "--set", "student.head=nosuch", *TINY]) == 2
    assert not out.exists()


# ------------------------------------------------------------------ the dataset's identity covers its images
def folder_dataset(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i % 256, 20, 200)).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [f"image {i}", f"picture {i}"],
                                 "split": "train" if i < n - 2 else "val"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_changed_image_changes_the_identity_and_a_copy_keeps_it(tmp_path):
    root = folder_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset("folder", root, "val", cache_dir=cache).identity
    assert load_dataset("folder", root, "val", cache_dir=cache).identity == first  # memoised: same
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "2.png")  # same name and size, other pixels
    changed = load_dataset("folder", root, "val", cache_dir=cache).identity
    assert changed != first
    os.utime(root / "3.png", (1, 1))  # a new timestamp alone changes nothing
    assert load_dataset("folder", root, "val", cache_dir=cache).identity == changed
    copy = folder_dataset(tmp_path / "copy")  # the same bytes elsewhere, without a memo
    Image.new("RGB", (16, 16), (1, 2, 3)).save(copy / "2.png")
    assert load_dataset("folder", copy, "val", cache_dir=tmp_path / "other-cache").identity == changed


def test_the_identity_is_the_same_through_a_symlinked_root(tmp_path):
    root = folder_dataset(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "data"
    link.symlink_to(root)
    assert (load_dataset("folder", link, "val", cache_dir=tmp_path / "c1").identity
            == load_dataset("folder", root, "val", cache_dir=tmp_path / "c2").identity)


def test_a_missing_image_is_an_error_before_any_work_even_with_a_warm_cache(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", n=12)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["run", "--dataset", "folder", "--data-root", str(root), "--test-split", "val", "--out", str(out),
            "--cache-dir", str(cache), "--methods", "random", "--ipc", "3", "--seeds", "1", "--set", "recipe.epochs=1"]
    assert main(args) == 0
    before = snapshot(out)
    (root / "4.png").unlink()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "image file not found" in err and "4.png" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_a_corrupt_image_with_a_warm_cache_is_noticed(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", n=12)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    args = ["run", "--dataset", "folder", "--data-root", str(root), "--test-split", "val", "--out", str(out),
            "--cache-dir", str(cache), "--methods", "random", "--ipc", "3", "--seeds", "1", "--set", "recipe.epochs=1"]
    assert main(args) == 0
    (root / "5.png").write_bytes(b"\x89PNG not really")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "5.png" in err


@pytest.mark.parametrize("fmt", ["karpathy", "coco", "folder"])
def test_every_reader_rejects_an_entry_without_captions(fmt, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "b.jpg")
    if fmt == "karpathy":
        imgs = [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]},
                {"filename": "b.jpg", "split": "test", "sentences": []}]
        (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": imgs}))
        name, match = "flickr8k", r"images\[1\] \(b.jpg\): no captions"
    elif fmt == "coco":
        (tmp_path / "captions_train2014.json").write_text(json.dumps(
            {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
             "annotations": [{"image_id": 1, "caption": "x"}]}))
        name, match = "coco-captions", r"image 2 \(b.jpg\): no captions"
    else:
        (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.jpg", "captions": ["x"]}) + "\n"
                                                 + json.dumps({"image": "b.jpg", "captions": []}) + "\n")
        name, match = "folder", "line 2: no captions"
    with pytest.raises(BenchError, match=match):
        load_dataset(name, tmp_path, cache_dir=tmp_path / "cache")
