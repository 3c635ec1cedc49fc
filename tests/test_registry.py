import pytest

from bench.errors import BenchError
from bench.registry import Registry


def make():
    r = Registry("method")
    r.register("random", object(), groups=("coreset",))
    r.register("herding", object(), groups=("coreset",))
    r.register("tm", object(), groups=("distill",))
    r.register("tm_image", object(), groups=("distill",))
    r.register("full", object(), groups=("reference",))
    r.register("test_tm", object(), groups=("test",))
    return r


def test_select_all_groups_globs_and_lists():
    r = make()
    assert r.select("all") == ["herding", "random", "tm", "tm_image"]  # no test, no reference
    assert r.select("coreset") == ["herding", "random"]
    assert r.select("tm*") == ["tm", "tm_image"]
    assert r.select("tm, random,tm") == ["tm", "random"]  # order kept, duplicates dropped
    assert r.select("TEST_TM") == ["test_tm"]  # names are lower-case; input is folded


def test_unknown_name_lists_what_exists():
    with pytest.raises(BenchError, match=r"unknown method 'nope'; available: full, herding, random"):
        make().select("nope")
    with pytest.raises(BenchError, match="no method matches 'x\\*'"):
        make().select("x*")


def test_duplicates_and_bad_names_refused():
    r = make()
    with pytest.raises(ValueError, match="already registered"):
        r.register("random", object())
    with pytest.raises(ValueError, match="lower-case"):
        r.register("Random", object())


def test_decorator_form_and_help():
    r = Registry("thing")

    @r.register("a_b", groups=("g",))
    class AB:
        """First line of help.

        More."""

    assert r.get("a_b") is AB and r.entry("a_b").help == "First line of help."
    assert r.names("a*") == ["a_b"]
