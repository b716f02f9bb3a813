"""Tests for the demo section registry and runner (fast: fake sections only)."""

from __future__ import annotations

import json

import pytest

from chronotope import demo as demo_mod
from chronotope.demo import register_section, run_demo


@pytest.fixture
def registry(monkeypatch):
    """An empty registry for the duration of a test."""
    monkeypatch.setattr(demo_mod, "SECTIONS", [])
    return demo_mod.SECTIONS


def test_runner_records_ok_not_available_and_failed(registry, tmp_path):
    seen = {}

    @register_section("one", "First", requires=("chronotope.report:Report",))
    def _one(report, ctx):
        seen["ctx"] = ctx
        with ctx.timer() as t:
            pass
        report.add_section("First", text="hello", metrics={"value": 1, "t": t.seconds})

    register_section("two", "Second", requires=("chronotope.not_there:thing",), func=_one)

    @register_section("three", "Third")
    def _three(report, ctx):
        report.add_section("Third", text="partial")
        raise ValueError("boom\nsecond line")

    @register_section("four", "Fourth")
    def _four(report, ctx):
        pass  # adds nothing: the runner still shows the section

    res = run_demo(tmp_path / "out", seed=3, progress=False)
    assert res.status == {"one": "ok", "two": "not available", "three": "failed", "four": "ok"}
    assert res.failed == ["three"]
    assert res.errors["three"] == "ValueError: boom"
    assert "chronotope.not_there:thing" in res.errors["two"]
    assert seen["ctx"].seed == 3 and seen["ctx"].device == "cpu"

    meta = json.loads((tmp_path / "out" / "metrics.json").read_text())
    titles = [s["title"] for s in meta["sections"]]
    assert titles == ["First", "Second", "Third", "Fourth"]  # the partial Third was replaced
    assert meta["sections"][0]["metrics"]["value"] == 1
    assert "section time (s)" in meta["sections"][0]["metrics"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Traceback" in html and "boom" in html


def test_only_selects_sections_and_lazy_targets(registry, tmp_path):
    register_section("a", "A", func="chronotope.demo:_noop_for_tests")
    register_section("b", "B", func=lambda report, ctx: report.add_section("B"))
    demo_mod._noop_for_tests = lambda report, ctx: report.add_section("A", text="lazy")
    try:
        res = run_demo(tmp_path, only=["a"], progress=False)
    finally:
        del demo_mod._noop_for_tests
    assert res.status == {"a": "ok"}


def test_register_same_name_replaces(registry):
    register_section("a", "A", func=lambda r, c: None)
    register_section("a", "A2", func=lambda r, c: None)
    assert [s.title for s in registry] == ["A2"]


def test_builtin_sections_are_registered():
    names = [s.name for s in demo_mod.SECTIONS]
    assert names[:2] == ["data", "graph"]
    assert len(names) == len(set(names))
