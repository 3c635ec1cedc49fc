"""Methods from outside the repository: README's example, written to a temporary directory, runs in
a grid from the CLI (locally and under Ray), is listed, is recorded with its file's hash, and an
edited plugin file redoes its cells; a clash with a registered name is one clear line."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plugins
from bench.cli import main
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--limit", "80,30", "--set", "recipe.epochs=2", "--set", "recipe.batch_size=16"]


def readme_example() -> str:
    """The python block of README's "Add a method" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Add a method", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's 'Add a method' section holds one python block"
    return blocks[0]


@pytest.fixture
def plugin_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("elsewhere") / "kmeans_coreset.py"
    path.write_text(readme_example())
    yield path
    plugins.reset()


def cells(out, method):
    return [json.loads(f.read_text()) for f in sorted(Path(out, "cells").rglob(f"{method}/*.json"))]


def test_readme_example_is_complete_and_short():
    code = readme_example()
    assert len(code.splitlines()) < 40
    compile(code, "kmeans_coreset.py", "exec")


def test_a_plugin_file_runs_in_a_grid_and_its_cells_record_it(plugin_file, tmp_path, cache, capsys):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(plugin_file), "--methods", "kmeans,random", "--ipc", "5,10", "--seeds", "2",
            "--out", str(out), "--cache-dir", str(cache), *TINY]
    assert main(args) == 0
    recs = cells(out, "kmeans")
    assert len(recs) == 4 and all(r["status"] == "ok" and r["n_pairs"] == r["budget"] for r in recs)
    sha = hashlib.sha256(plugin_file.read_bytes()).hexdigest()
    for r in recs:
        assert r["plugin"]["sha256"] == sha and r["plugin"]["file"] == str(plugin_file.resolve())
        assert r["method_group"] == "coreset" and r["method_config"] == {"n_init": 1, "max_iter": 100}
        assert [p["sha256"] for p in r["manifest"]["plugins"]] == [sha]
    assert "plugin" not in cells(out, "random")[0]  # built-in cells are recorded (and keyed) as before
    # the same seed selects the same pairs; another seed, other pairs
    arts = {(r["budget"], r["selection_seed"]): r["artifact"] for r in recs}
    import torch
    idx = {k: torch.load(v, weights_only=True)["indices"].tolist() for k, v in arts.items()}
    assert idx[(10, 0)] != idx[(10, 1)]

    # a rerun of the same command skips every cell
    plugins.reset()
    capsys.readouterr()
    assert main(args) == 0
    assert "run   kmeans" not in capsys.readouterr().out
    # an edited plugin file redoes the plugin's cells, and only those
    plugins.reset()
    plugin_file.write_text(plugin_file.read_text() + "\n# edited\n")
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("run   kmeans") == 4 and "run   random" not in log
    assert {r["plugin"]["sha256"] for r in cells(out, "kmeans")} == {hashlib.sha256(plugin_file.read_bytes()).hexdigest()}


def test_a_plugin_method_is_selected_by_its_group_and_by_all(plugin_file):
    plugins.load_plugins([str(plugin_file)])
    assert "kmeans" in METHODS.select("coreset") and "kmeans" in METHODS.select("all")
    assert plugins.origin("method", "kmeans")["module"].startswith("vlbench_plugin_kmeans_coreset_")
    plugins.reset()
    assert "kmeans" not in METHODS


def test_a_name_clash_and_a_missing_plugin_are_one_line(tmp_path, capsys):
    clash = tmp_path / "clash.py"
    clash.write_text("from methods import register_method\n\n"
                     "@register_method('random', 'coreset')\nclass Mine:\n    pass\n")
    try:
        assert main(["list", "methods", "--plugin", str(clash)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "method 'random' is already registered (by methods.random_subset)" in err and "clash.py" in err
        assert main(["list", "methods", "--plugin", str(tmp_path / "absent.py")]) == 2
        assert "plugin file not found" in capsys.readouterr().err
        assert main(["list", "methods", "--plugin", "no_such_plugin_module"]) == 2
        assert "plugin module 'no_such_plugin_module' not found" in capsys.readouterr().err
    finally:
        plugins.reset()
    assert METHODS.entry("random").obj.__module__ == "methods.random_subset"


def test_env_plugins_are_listed_in_a_fresh_process(plugin_file):
    env = {**os.environ, "VLBENCH_PLUGINS": str(plugin_file)}
    res = subprocess.run([sys.executable, "-m", "bench", "list", "methods", "k*"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert [line.split()[:2] for line in res.stdout.splitlines()] == [["kcenter", "coreset"], ["kmeans", "coreset"]]


def test_ray_workers_import_the_plugin_too(plugin_file, tmp_path, cache):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        base = ["run", "--plugin", str(plugin_file), "--methods", "kmeans", "--ipc", "5", "--seeds", "2",
                "--cache-dir", str(cache), *TINY]
        assert main(base + ["--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    finally:
        ray.shutdown()
    assert main(base + ["--out", str(tmp_path / "local")]) == 0
    remote, local = cells(tmp_path / "ray", "kmeans"), cells(tmp_path / "local", "kmeans")
    assert len(remote) == 2 and [r["status"] for r in remote] == ["ok", "ok"]
    assert [r["key"] for r in remote] == [r["key"] for r in local]
    assert [r["metrics_mean"] for r in remote] == [r["metrics_mean"] for r in local]


def test_an_installed_package_registers_through_its_entry_point(tmp_path, monkeypatch):
    """A distribution on sys.path whose entry point in the group vlbench.methods names its module."""
    (tmp_path / "vlb_ep_demo.py").write_text(
        "from dataclasses import dataclass\nfrom methods import Artifact, register_method\n"
        "from methods.random_subset import random_pairs\nimport numpy as np\n\n"
        "@register_method('ep_demo', 'coreset')\nclass Demo:\n"
        "    @dataclass(frozen=True)\n    class Config:\n        pass\n\n"
        "    def __init__(self, config):\n        self.config = config\n\n"
        "    def build(self, ctx, budget, seed):\n"
        "        cap = ctx.protocol.train.caption_image.numpy()\n"
        "        return Artifact('selected', indices=random_pairs(cap, budget, np.random.default_rng(seed)))\n")
    info = tmp_path / "vlb_ep_demo-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlb-ep-demo\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[vlbench.methods]\ndemo = vlb_ep_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins.load_plugins([])
        rec = plugins.origin("method", "ep_demo")
        assert rec["module"] == "vlb_ep_demo" and rec["version"] == "1.2.3"
        assert rec["sha256"] == hashlib.sha256((tmp_path / "vlb_ep_demo.py").read_bytes()).hexdigest()
        assert "ep_demo" in METHODS.select("coreset")
    finally:
        plugins.reset()
        sys.modules.pop("vlb_ep_demo", None)
    assert "ep_demo" not in METHODS
