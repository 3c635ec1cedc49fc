"""The regression check's logic, against hand-made baselines and runs (the grid itself runs in CI
through `python -m bench regress`, see .ci/run)."""
import json

import pytest

from bench import regress
from bench.cli import main


def _summary(results, pid="p1", failed=()):
    return {"protocol_id": pid, "results": results, "failed": list(failed)}


BASE_RUN = {"full": {"full": [40.0]}, "random": {"10": [10.0, 11.0], "50": [20.0, 22.0]},
            "tm": {"10": [30.0, 31.0], "50": [35.0, 35.0]}, "tm_image": {"10": [15.0, 16.0], "50": [25.0, 26.0]},
            "tm_text": {"10": [14.0, 15.0], "50": [24.0, 23.0]}}
DISTILL = ["tm", "tm_image", "tm_text"]


@pytest.fixture
def baseline():
    cfg = regress.RegressConfig("toy", "synthetic", limit=(10, 10))
    return regress.make_baseline(cfg, _summary(BASE_RUN), {"git_commit": "x"})


def test_pooled_std_by_hand():
    # variances 0.5 (10, 11) and 2.0 (20, 22), one df each -> pooled var 1.25
    assert regress.pooled_std({"10": [10.0, 11.0], "50": [20.0, 22.0]}) == pytest.approx(1.25 ** 0.5)
    assert regress.pooled_std({"full": [40.0]}) == 0.0


def test_tolerance_from_seed_spread(baseline):
    assert baseline["methods"]["random"]["tolerance"] == pytest.approx(2.0 * 1.25 ** 0.5, abs=1e-3)
    # tm: variances 0.5 and 0 -> pooled 0.25 -> 2 x 0.5 = 1.0
    assert baseline["methods"]["tm"]["tolerance"] == pytest.approx(1.0)
    assert baseline["methods"]["full"]["tolerance"] == regress.MIN_TOL
    assert baseline["methods"]["tm"]["budgets"]["10"]["mean"] == 30.5


def test_same_run_passes(baseline):
    rows, findings = regress.check(_summary(BASE_RUN), baseline, DISTILL)
    text, passed = regress.report(rows, findings)
    assert passed, text
    assert text.endswith("regression check: PASSED")
    assert any(r.split()[:2] == ["tm", "50"] and r.split()[-1] == "ok" for r in rows)


def test_drop_beyond_tolerance_fails_with_readable_line(baseline):
    run = json.loads(json.dumps(BASE_RUN))
    run["tm"]["50"] = [33.5, 34.0]  # mean 33.75: 1.25 below 35 with tolerance 1.0
    rows, findings = regress.check(_summary(run), baseline, DISTILL)
    text, passed = regress.report(rows, findings)
    assert not passed
    assert "tm @ 50: 33.75 is 1.25 below the baseline 35.00 (tolerance 1.00)" in text
    assert any("REGRESSION" in r and r.startswith("tm ") for r in rows)


def test_drop_within_tolerance_passes(baseline):
    run = json.loads(json.dumps(BASE_RUN))
    run["tm"]["50"] = [34.5, 34.0]  # 0.75 below, tolerance 1.0
    assert regress.report(*regress.check(_summary(run), baseline, DISTILL))[1]


def test_broken_ordering_fails(baseline):
    run = json.loads(json.dumps(BASE_RUN))
    run["tm_text"]["10"] = [40.0, 40.0]  # an improvement for tm_text, but now above tm
    rows, findings = regress.check(_summary(run), baseline, DISTILL)
    text, passed = regress.report(rows, findings)
    assert not passed and "ordering tm > tm_text @ 10: 30.50 vs 40.00  BROKEN" in text
    run = json.loads(json.dumps(BASE_RUN))
    run["tm_image"]["50"] = [20.0, 20.0]  # below random at the largest budget
    text, passed = regress.report(*regress.check(_summary(run), baseline, DISTILL))
    assert not passed and "ordering tm_image > random @ 50: 20.00 vs 21.00  BROKEN" in text
    run = json.loads(json.dumps(BASE_RUN))
    run["tm_image"]["10"] = [9.0, 9.0]  # below random at 10 pairs: the level check fails, no ordering is checked there
    text, passed = regress.report(*regress.check(_summary(run), baseline, DISTILL))
    assert "ordering tm_image > random @ 10" not in text and "ordering tm_image > random @ 50: 25.50 vs 21.00" in text


def test_failed_or_missing_cells_and_protocol_change_fail(baseline):
    run = json.loads(json.dumps(BASE_RUN))
    del run["tm_text"]["50"]
    text, passed = regress.report(*regress.check(_summary(run, failed=["tm_text @ 50 seed 0: boom"]), baseline, DISTILL))
    assert not passed and "cell failed: tm_text @ 50 seed 0: boom" in text and "tm_text @ 50: missing" in text
    text, passed = regress.report(*regress.check(_summary(BASE_RUN, pid="other"), baseline, DISTILL))
    assert not passed and "protocol changed" in text


def test_baseline_refuses_failed_run():
    cfg = regress.RegressConfig("toy", "synthetic", limit=(10, 10))
    with pytest.raises(regress.BenchError, match="failed cells"):
        regress.make_baseline(cfg, _summary(BASE_RUN, failed=["x"]), {})


def test_committed_baselines_are_valid():
    for name, cfg in regress.CONFIGS.items():
        b = regress.read_baseline(regress.baseline_path(name))
        assert b["config"] == cfg.describe(), f"{name}: baseline written for another configuration"
        assert {"random", "full", "tm", "tm_image", "tm_text"} <= set(b["methods"])
        for m in b["methods"].values():
            assert set(m["budgets"]) <= {"full", *map(str, cfg.budgets)}
        # the committed baseline satisfies its own orderings
        summ = _summary({k: {bb: v["runs"] for bb, v in m["budgets"].items()} for k, m in b["methods"].items()},
                        pid=b["protocol_id"])
        assert regress.report(*regress.check(summ, b, ["tm", "tm_image", "tm_text", "tm_lora"]))[1]


def test_cli_bad_config_and_missing_baseline(capsys, tmp_path, monkeypatch):
    assert main(["regress", "--config", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown regression configuration 'nope'" in err[0] and "synthetic-small" in err[0]
    with pytest.raises(regress.BenchError, match="no baseline"):
        regress.read_baseline(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(regress.BenchError, match="not a valid baseline"):
        regress.read_baseline(tmp_path / "bad.json")


def test_cli_update_then_check(monkeypatch, tmp_path, capsys):
    """`regress --update` writes the baseline; a rerun with the same numbers passes, a drop fails (exit 1)."""
    toy = regress.RegressConfig("toy", "synthetic", limit=(10, 10))
    monkeypatch.setitem(regress.CONFIGS, "toy", toy)
    monkeypatch.setattr(regress, "BASELINES", tmp_path / "baselines")
    runs = [_summary(BASE_RUN)]
    monkeypatch.setattr(regress, "run_grid", lambda cfg, out, cache_dir=None: runs[-1])
    out = tmp_path / "out"
    (out / "toy").mkdir(parents=True)
    assert main(["regress", "--config", "toy", "--update", "--out", str(out)]) == 0
    written = json.loads((tmp_path / "baselines" / "toy.json").read_text())
    assert written["methods"]["random"]["budgets"]["50"]["runs"] == [20.0, 22.0]
    assert main(["regress", "--config", "toy", "--out", str(out)]) == 0
    worse = json.loads(json.dumps(BASE_RUN))
    worse["random"]["10"] = [5.0, 5.0]
    runs.append(_summary(worse))
    capsys.readouterr()
    assert main(["regress", "--config", "toy", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "random @ 10: 5.00 is 5.50 below the baseline 10.50" in printed and "FAILED" in printed
    assert (out / "toy" / "regress.txt").read_text().strip().endswith("regression check: FAILED")
