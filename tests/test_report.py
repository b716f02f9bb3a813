"""Tests for the HTML report builder."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from chronotope.report import Report, atomic_write


def _fig() -> plt.Figure:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    return fig


def test_report_writes_html_figures_and_metrics(tmp_path):
    rep = Report("Test <run>", subtitle="unit")
    sec = rep.add_section(
        "Data & graph",
        text="First paragraph.\n\nSecond <b>not bold</b>.",
        figures=[(_fig(), "a line")],
        metrics={"n_obs": 3639, "time (s)": 0.1234, "tiny": np.float32(1e-6)},
        rows=[{"name": "a", "value": 1}, {"name": "b", "extra": "x"}],
    )
    sec.add_figure(_fig(), "second")
    rep.add_section("Missing", text="Not there.", status="not available")
    path = rep.write(tmp_path / "out")

    assert path == tmp_path / "out" / "report.html"
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "Test &lt;run&gt;" in html
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html  # text is escaped, never raw HTML
    assert html.count("<p>") >= 2
    assert "3,639" in html and "0.1234" in html and "1.000e-06" in html
    assert 'class="status na"' in html
    figs = sorted((tmp_path / "out" / "figures").iterdir())
    assert len(figs) == 2
    for f in figs:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="figures/{f.name}"' in html

    meta = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [s["status"] for s in meta["sections"]] == ["ok", "not available"]
    assert meta["sections"][0]["metrics"]["n_obs"] == 3639
    assert meta["sections"][0]["metrics"]["tiny"] == pytest.approx(1e-6)
    assert rep.metrics()[0] == {"section": "Data & graph", "metric": "n_obs", "value": 3639}
    # no temporary files left behind
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


def test_add_figure_closes_pyplot_figures():
    rep = Report("t")
    fig = _fig()
    rep.add_section("s", figures=[fig])
    assert not plt.fignum_exists(fig.number)


def test_write_into_a_file_path_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(FileExistsError):
        Report("t").write(target)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write(p, "one")
    atomic_write(p, b"two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["a.txt"]
