"""Tests for the command-line interface."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from chronotope import demo as demo_mod
from chronotope.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out.out, out.err


def test_console_script_help():
    exe = shutil.which("chronotope")
    cmd = [exe] if exe else [sys.executable, "-m", "chronotope.cli"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for word in ("info", "demo", "--quiet", "--verbose", "--version"):
        assert word in res.stdout


def test_version(capsys):
    from chronotope import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"chronotope {__version__}"


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    for key in ("chronotope", "python", "torch", "numpy", "scipy", "anndata", "cuda", "device"):
        assert key in out
    assert f"torch threads  {torch.get_num_threads()}" in out
    assert "data dir" in out


def _assert_one_line_error(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("error: "), err
    assert fragment in lines[-1], err
    assert "Traceback" not in err


def test_demo_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    code, _, err = run(capsys, "-q", "demo", "--out", str(target))
    assert code == 1
    _assert_one_line_error(err, "is not a folder")


def test_demo_unknown_section(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--out", str(tmp_path), "--only", "nope")
    assert code == 1
    _assert_one_line_error(err, "unknown demo section(s) nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_cuda_unavailable(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--out", str(tmp_path), "--device", "cuda")
    assert code == 1
    _assert_one_line_error(err, "CUDA is not available")


def test_verbose_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "-v", "demo", "--out", str(tmp_path), "--only", "nope")
    assert code == 1
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_usage_errors_exit_nonzero(capsys):
    code, _, err = run(capsys, "demo")
    assert code == 2
    assert "--out" in err
    code, _, _ = run(capsys, "-q", "-v", "info")
    assert code == 2


def test_demo_end_to_end(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "-q", "demo", "--out", str(out))
    assert code == 0, err
    assert stdout == ""  # -q: nothing but warnings and errors
    html = (out / "report.html").read_text()
    meta = json.loads((out / "metrics.json").read_text())
    status = {s["title"]: s["status"] for s in meta["sections"]}
    assert len(status) == len(demo_mod.SECTIONS)
    for sec in demo_mod.SECTIONS:
        # every section whose capability is installed must run, none may fail
        expected = "not available" if sec.missing() else "ok"
        assert status[sec.title] == expected, (sec.name, status[sec.title])
        assert sec.title in html
    for s in meta["sections"]:
        for fig in s["figures"]:
            assert (out / fig).read_bytes()[:4] == b"\x89PNG"
    if not demo_mod.SECTIONS[0].missing():
        assert meta["sections"][0]["figures"], "the data section draws figures"


def test_read_input_and_write_output(tmp_path):
    import anndata as ad
    import numpy as np

    from chronotope.cli import read_input, write_output

    with pytest.raises(FileNotFoundError, match="not found"):
        read_input(tmp_path / "missing.h5ad")
    with pytest.raises(ValueError, match=r"\.h5ad"):
        write_output(ad.AnnData(np.ones((2, 2), dtype=np.float32)), tmp_path / "x.txt")
    a = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    path = write_output(a, tmp_path / "sub" / "out.h5ad")
    assert read_input(path).shape == (3, 2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.h5ad"]


def test_failed_demo_section_exits_nonzero_after_writing_report(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_mod, "SECTIONS", [])

    def _boom(report, ctx):
        raise KeyError("X_pca")

    demo_mod.register_section("boom", "Boom", func=_boom)
    code, _, err = run(capsys, "-q", "demo", "--out", str(tmp_path))
    assert code == 1
    _assert_one_line_error(err, "demo section(s) failed (boom: KeyError: 'X_pca')")
    assert (tmp_path / "report.html").is_file()


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(
    ("verbosity", "tty", "shown"),
    [(0, True, True), (0, False, False), (1, False, True), (-1, True, False)],
)
def test_progress_bars_only_on_a_terminal_unless_verbose(
    monkeypatch, verbosity: int, tty: bool, shown: bool
) -> None:
    from chronotope import cli

    monkeypatch.setitem(cli._state, "verbosity", verbosity)
    monkeypatch.setattr(cli.sys, "stderr", _Stream(tty))
    assert cli.show_progress() is shown
