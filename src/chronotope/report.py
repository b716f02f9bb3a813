"""A small, dependency-free HTML report: sections with text, PNG figures and metrics.

Example
-------
>>> from chronotope.report import Report
>>> rep = Report("My run")
>>> sec = rep.add_section("Data", text="Loaded 3 slices.", metrics={"n_obs": 3639})
>>> rep.write("out")  # doctest: +SKIP
PosixPath('out/report.html')

The report directory holds ``report.html``, ``metrics.json`` (every metric, machine
readable) and ``figures/*.png``. Every file is written to a temporary name first and
moved into place with :func:`os.replace`, so a reader never sees a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Report", "Section", "atomic_write"]

Status = Literal["ok", "not available", "failed"]

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --panel:#f6f8fa;
        --ok:#1a7f37; --na:#9a6700; --fail:#cf222e; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1100px; padding: 2rem 1.5rem;
       line-height: 1.5; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid var(--line); padding-bottom: .3rem;
       margin-top: 2.5rem; } h3 { margin-top: 1.5rem; }
.meta { color: var(--muted); font-size: .9rem; }
nav ol { columns: 2; padding-left: 1.2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid var(--line); padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th { background: var(--panel); } td.num { text-align: right;
         font-variant-numeric: tabular-nums; }
.status { font-weight: 600; font-size: .85rem; padding: .05rem .4rem; border-radius: .3rem;
          border: 1px solid currentColor; }
.status.ok { color: var(--ok); } .status.na { color: var(--na); }
.status.failed { color: var(--fail); }
figure { display: inline-block; margin: .6rem 1rem .6rem 0; vertical-align: top;
         max-width: 100%; }
figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .85rem; max-width: 640px; }
pre { background: var(--panel); padding: .6rem; overflow-x: auto; font-size: .8rem; }
"""


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + replace).

    Parameters
    ----------
    path
        Destination file; its parent folder is created if needed.
    data
        Bytes, or text (encoded as UTF-8).

    Returns
    -------
    The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "section"


def _fmt(value: Any) -> tuple[str, bool]:
    """Format a metric value; return (text, is_numeric)."""
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value), True
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}", True
        return f"{value:.4g}", True
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.generic):
            return _fmt(value.item())
    except ImportError:  # pragma: no cover
        pass
    return str(value), False


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return _jsonable(value.item())
    except ImportError:  # pragma: no cover
        pass
    return str(value)


@dataclass
class _Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    """One section of a :class:`Report`; build it with :meth:`Report.add_section`.

    Attributes
    ----------
    title
        Heading shown in the report.
    text
        Paragraphs (separated by blank lines), shown as plain text.
    metrics
        Mapping ``name -> value`` shown as a two-column table and gathered into the
        report-wide metrics table.
    rows
        Extra table as a list of dicts (one per row; columns are the union of keys).
    status
        ``"ok"``, ``"not available"`` (capability missing) or ``"failed"``.
    """

    title: str
    text: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: Status = "ok"
    detail: str = ""
    figures: list[_Figure] = field(default_factory=list)
    _report: Report | None = field(default=None, repr=False)

    def add_text(self, text: str) -> Section:
        """Append a paragraph."""
        self.text = f"{self.text}\n\n{text}" if self.text else text
        return self

    def add_metrics(self, metrics: Mapping[str, Any] | None = None, **kwargs: Any) -> Section:
        """Add metrics (later values replace earlier ones with the same name)."""
        self.metrics.update(metrics or {})
        self.metrics.update(kwargs)
        return self

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> Section:
        """Append rows to the section's table."""
        self.rows.extend(dict(r) for r in rows)
        return self

    def add_figure(self, fig: Figure | bytes, caption: str = "", *, close: bool = True) -> Section:
        """Render a matplotlib figure to PNG (or take PNG bytes) and attach it.

        Parameters
        ----------
        fig
            A :class:`matplotlib.figure.Figure`, or PNG bytes.
        caption
            Shown under the image.
        close
            Close the matplotlib figure after rendering, to free its memory.
        """
        if isinstance(fig, bytes | bytearray):
            png = bytes(fig)
        else:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            png = buf.getvalue()
            if close:
                import matplotlib.pyplot as plt

                plt.close(fig)
        index = self._report._next_figure_index() if self._report is not None else 0
        name = f"{index:02d}_{_slug(self.title)[:40]}.png"
        self.figures.append(_Figure(name=name, png=png, caption=caption))
        return self


class Report:
    """Collect sections and write them as a self-contained HTML page.

    Parameters
    ----------
    title
        Page title.
    subtitle
        Short line under the title (e.g. command line, versions).
    """

    def __init__(self, title: str, *, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []
        self.created = _dt.datetime.now().astimezone()
        self._n_figures = 0

    def _next_figure_index(self) -> int:
        self._n_figures += 1
        return self._n_figures

    def add_section(
        self,
        title: str,
        *,
        text: str = "",
        figures: Sequence[Figure | bytes | tuple[Figure | bytes, str]] = (),
        metrics: Mapping[str, Any] | None = None,
        rows: Iterable[Mapping[str, Any]] = (),
        status: Status = "ok",
        detail: str = "",
    ) -> Section:
        """Add a section and return it (more content can be added to it later).

        Parameters
        ----------
        title
            Section heading.
        text
            Plain text; blank lines separate paragraphs.
        figures
            Matplotlib figures or PNG bytes, optionally as ``(figure, caption)`` pairs.
        metrics
            ``name -> value`` pairs for the metrics table.
        rows
            Table rows (dicts).
        status
            ``"ok"``, ``"not available"`` or ``"failed"``.
        detail
            Preformatted detail shown in a collapsed block (e.g. a traceback).
        """
        sec = Section(title=title, text=text, status=status, detail=detail, _report=self)
        sec.add_metrics(metrics)
        sec.add_rows(rows)
        for item in figures:
            if isinstance(item, tuple):
                sec.add_figure(item[0], item[1])
            else:
                sec.add_figure(item)
        self.sections.append(sec)
        return sec

    def metrics(self) -> list[dict[str, Any]]:
        """All metrics as rows ``{"section", "metric", "value"}``."""
        return [
            {"section": s.title, "metric": k, "value": v}
            for s in self.sections
            for k, v in s.metrics.items()
        ]

    # -- rendering -----------------------------------------------------------------

    @staticmethod
    def _table(rows: Sequence[Mapping[str, Any]]) -> str:
        cols: list[str] = []
        for r in rows:
            cols.extend(k for k in r if k not in cols)
        out = ["<table><thead><tr>"]
        out += [f"<th>{html.escape(str(c))}</th>" for c in cols]
        out.append("</tr></thead><tbody>")
        for r in rows:
            out.append("<tr>")
            for c in cols:
                text, numeric = _fmt(r.get(c, ""))
                cls = ' class="num"' if numeric else ""
                out.append(f"<td{cls}>{html.escape(text)}</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
        return "".join(out)

    @staticmethod
    def _status(status: str) -> str:
        cls = {"ok": "ok", "not available": "na", "failed": "failed"}.get(status, "na")
        return f'<span class="status {cls}">{html.escape(status)}</span>'

    def to_html(self) -> str:
        """Render the page (figures are referenced as ``figures/NAME.png``)."""
        esc = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
            f'<p class="meta">{esc(self.subtitle)}'
            f"{' · ' if self.subtitle else ''}{esc(self.created.strftime('%Y-%m-%d %H:%M %Z'))}"
            "</p>",
        ]
        if self.sections:
            parts.append("<nav><ol>")
            for i, s in enumerate(self.sections):
                parts.append(
                    f'<li><a href="#s{i}-{_slug(s.title)}">{esc(s.title)}</a> '
                    f"{self._status(s.status)}</li>"
                )
            parts.append("</ol></nav>")
        summary = self.metrics()
        if summary:
            parts.append('<h2 id="metrics">Metrics</h2>')
            parts.append(self._table(summary))
        for i, s in enumerate(self.sections):
            parts.append(
                f'<h2 id="s{i}-{_slug(s.title)}">{esc(s.title)} {self._status(s.status)}</h2>'
            )
            for para in (p.strip() for p in s.text.split("\n\n")):
                if para:
                    parts.append(f"<p>{esc(para)}</p>")
            if s.detail:
                parts.append(
                    f"<details><summary>details</summary><pre>{esc(s.detail)}</pre></details>"
                )
            if s.metrics:
                parts.append(self._table([{"metric": k, "value": v} for k, v in s.metrics.items()]))
            if s.rows:
                parts.append(self._table(s.rows))
            for f in s.figures:
                parts.append(
                    f'<figure><img src="figures/{esc(f.name)}" alt="{esc(f.caption or f.name)}">'
                    f"<figcaption>{esc(f.caption)}</figcaption></figure>"
                )
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``report.html``, ``metrics.json`` and ``figures/*.png`` under ``out_dir``.

        Parameters
        ----------
        out_dir
            Output folder (created if missing). Existing files of the same names are
            replaced atomically; other files are left alone.

        Returns
        -------
        Path of ``report.html``.
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"report output {str(out)!r} exists and is not a folder.")
        for s in self.sections:
            for f in s.figures:
                atomic_write(out / "figures" / f.name, f.png)
        payload = {
            "title": self.title,
            "created": self.created.isoformat(),
            "sections": [
                {
                    "title": s.title,
                    "status": s.status,
                    "metrics": {k: _jsonable(v) for k, v in s.metrics.items()},
                    "figures": [f"figures/{f.name}" for f in s.figures],
                }
                for s in self.sections
            ],
        }
        atomic_write(out / "metrics.json", json.dumps(payload, indent=2) + "\n")
        return atomic_write(out / "report.html", self.to_html())
