"""The grid's ETA and `run --dry-run`: estimates from measured cells (same method and budget, else
the same method scaled by budget, else the 2-core prior), and a plan printed with nothing computed."""
from __future__ import annotations

import pytest

from bench.cli import main
from bench.progress import BUDGET_SCALE, FROZEN_PIXELS_FACTOR, PRIOR_S_AT_100, GridClock, cut_factor, duration


def test_estimates_come_from_measured_cells_then_the_prior():
    clock = GridClock([("tm", 100, 100.0), ("tm", 100, 120.0), ("random", 100, 0.5)])
    assert clock.estimate("tm", "distill", 100) == pytest.approx(110.0)  # measured here: their mean
    # another budget of a measured method: its nearest measured budget, scaled as tm's cells scale
    assert clock.estimate("tm", "distill", 1000) == pytest.approx(110.0 * BUDGET_SCALE[1000])
    # an unmeasured method: the 2-core prior; an unknown one: its group's
    assert clock.estimate("mdm", "distill", 200) == pytest.approx(PRIOR_S_AT_100["mdm"] * BUDGET_SCALE[200])
    assert clock.estimate("mine", "coreset", 500) == 2.0
    clock.add("mdm", 200, 30.0)
    assert clock.estimate("mdm", "distill", 200) == 30.0
    assert clock.eta([("tm", "distill", 100), ("mdm", "distill", 200)]) == pytest.approx(140.0)
    assert [duration(s) for s in (7, 250, 3900)] == ["7s", "4m 10s", "1h 05m"]


def test_dry_run_prints_the_plan_and_computes_nothing(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "runs"
    assert main(["run", "--dry-run", "--methods", "test_tm", "--ipc", "10,20", "--seeds", "2", "--limit", "80,30",
                 "--cache-dir", str(cache), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("protocol ") and "7 cells" not in lines[0] and "10 cells" in lines[0]
    # test_tm plus the random cells the gain-over-random view needs, and the two reference rows
    rows = {tuple(line.split()[:2]) for line in lines[2:-1]}
    assert {("test_tm", "10"), ("test_tm", "20"), ("random", "10"), ("random", "20"), ("full", "full")} <= rows
    assert lines[-1].startswith("total: 10 cells to run and 0 to score under more eval seeds, estimated ")
    assert not out.exists() and not cache.exists()


def test_another_config_of_a_method_is_timed_on_its_own():
    clock = GridClock([("tm~1234abcd", 100, 20.0)])
    assert clock.estimate("tm~1234abcd", "distill", 100) == 20.0
    assert clock.estimate("tm", "distill", 100) == PRIOR_S_AT_100["tm"]  # the default's prior, not the small config's
    assert clock.estimate("lors~99", "distill", 100) == PRIOR_S_AT_100["lors"]


def test_the_prior_grows_for_distillations_under_frozen_pixels():
    assert cut_factor("heads") == 1.0 and cut_factor("frozen-pixels", 112) == FROZEN_PIXELS_FACTOR[112]
    f64, f90, f112 = (cut_factor("frozen-pixels", s) for s in (64, 90, 112))
    assert f64 < f90 < f112  # between measured sizes: interpolated
    clock = GridClock(factor=f64)
    assert clock.estimate("tm", "distill", 100) == pytest.approx(PRIOR_S_AT_100["tm"] * f64)
    assert clock.estimate("herding", "coreset", 100) == PRIOR_S_AT_100["herding"]  # selection is as under heads
    assert clock.estimate("full", "reference", None) == PRIOR_S_AT_100["full"]
    clock.add("tm", 100, 700.0)  # a measured cell of the cut's own protocol is taken as it is
    assert clock.estimate("tm", "distill", 100) == 700.0


def test_dry_run_of_a_frozen_pixels_grid_estimates_more_than_heads(tmp_path, capsys):
    def tm_row(*extra):
        assert main(["run", "--dry-run", "--methods", "tm", "--ipc", "100", "--seeds", "1", "--limit", "200,30",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), *extra]) == 0
        return next(line.split()[-2:] for line in capsys.readouterr().out.splitlines() if line.startswith("tm "))

    assert tm_row() == ["3m", "50s"]  # the 230 s prior
    assert tm_row("--cut", "frozen-pixels", "--image-size", "64") == ["17m", "38s"]  # 230 s x 4.6
