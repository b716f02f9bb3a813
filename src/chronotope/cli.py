"""Command-line interface: ``chronotope [-q|-v] COMMAND ...``.

The CLI only parses options and calls library functions; no algorithm lives here.

Adding a command
----------------
A single command is a function decorated with ``@app.command()``. A family of
commands (``chronotope dynamics fit ...``) is a sub-app::

    dynamics_app = typer.Typer(help="Fit and query population dynamics.")
    app.add_typer(dynamics_app, name="dynamics")

    @dynamics_app.command("fit")
    def dynamics_fit(data: Path = typer.Argument(...), ...) -> None:
        adata = read_input(data)
        chronotope.tl.fit_dynamics(adata, ...)   # the library does the work
        write_output(adata, out)

Library errors (``ValueError``, ``KeyError``, ``FileNotFoundError`` and other
``OSError``) are turned into one line ``error: ...`` and exit status 1 by
:func:`main`; with ``-v`` the traceback is printed as well. Use :func:`show_progress`
for the ``progress=`` argument of library calls, so that ``-q`` silences them (and a
log file gets no bars unless ``-v``).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from chronotope._version import __version__

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["app", "main", "read_input", "show_progress", "write_output"]

app = typer.Typer(
    name="chronotope",
    help="Optimal transport for spatial and temporal transcriptomics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Verbosity chosen on the command line: -1 quiet, 0 default, >= 1 verbose.
_state = {"verbosity": 0}


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log handler that writes through tqdm, so messages do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    log = logging.getLogger("chronotope")
    for h in list(log.handlers):
        if getattr(h, "_chronotope_cli", False):
            log.removeHandler(h)
    handler = _TqdmHandler()
    handler._chronotope_cli = True  # type: ignore[attr-defined]
    fmt = "%(levelname)s %(name)s: %(message)s" if verbosity > 0 else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(handler)
    log.setLevel(level)


def show_progress() -> bool:
    """Whether progress bars should be shown.

    ``False`` under ``-q``, and by default when standard error is not a terminal (a
    cluster job's log file, a pipe), where each redraw of a bar would be written as one
    more line; ``-v`` shows them there too.
    """
    verbosity = _state["verbosity"]
    if verbosity < 0:
        return False
    if verbosity > 0:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"chronotope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            show_default=False,
            help="More logging (debug), full tracebacks, and progress bars even when "
            "standard error is not a terminal.",
        ),
    ] = 0,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Optimal transport for spatial and temporal transcriptomics."""
    if quiet and verbose:
        raise typer.BadParameter("use either -q or -v, not both.", param_hint="-q/-v")
    _state["verbosity"] = -1 if quiet else verbose
    _configure_logging(_state["verbosity"])
    import matplotlib

    matplotlib.use("Agg")


# --------------------------------------------------------------------------- helpers
class _CommandError(RuntimeError):
    """A command finished but must exit non-zero with the given one-line reason."""


def read_input(path: Path, **kwargs: Any) -> AnnData:
    """Read and validate an ``.h5ad`` input (:func:`chronotope.io.read_h5ad`)."""
    from chronotope.io import read_h5ad

    return read_h5ad(path, **kwargs)


def write_output(adata: AnnData, path: Path) -> Path:
    """Write ``adata`` to ``path`` (.h5ad) atomically: temporary file, then replace."""
    if path.suffix != ".h5ad":
        raise ValueError(f"output {str(path)!r} must end in .h5ad.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- commands
@app.command()
def info() -> None:
    """Print versions, the compute device, threads and where the data are."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def _version(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    cuda = torch.cuda.is_available()
    rows = [
        ("chronotope", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("numpy", _version("numpy")),
        ("scipy", _version("scipy")),
        ("anndata", _version("anndata")),
        ("cuda", "available" if cuda else "not available"),
    ]
    if cuda:
        rows.append(("device", f"cuda:0 ({torch.cuda.get_device_name(0)})"))
    else:
        rows.append(("device", f"cpu ({platform.processor() or platform.machine()})"))
    rows.append(("torch threads", str(torch.get_num_threads())))
    rows.append(("cpu cores", str(os.cpu_count())))
    rows.append(("data dir", _data_dir_line()))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _data_dir_line() -> str:
    """Describe the folder of public datasets (``CHRONOTOPE_DATA`` or ``../shared/data``)."""
    try:
        from chronotope.datasets import get_data_dir
    except ImportError:
        return "unknown (chronotope.datasets not installed)"
    try:
        return f"{get_data_dir()} (found)"
    except (FileNotFoundError, ValueError) as exc:
        return f"not found: {' '.join(str(exc).split())}"


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder for report.html and figures.")
    ],
    device: Annotated[
        str, typer.Option(help="Torch device for the solvers: cpu, cuda, cuda:N or auto.")
    ] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed for every random step.")] = 0,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only this section (repeatable), e.g. --only graph."),
    ] = None,
) -> None:
    """Run every capability on the embedded demo data and write OUT/report.html."""
    from chronotope.demo import run_demo

    result = run_demo(out, device=device, seed=seed, only=only, progress=show_progress())
    n_ok = sum(v == "ok" for v in result.status.values())
    n_na = sum(v == "not available" for v in result.status.values())
    if _state["verbosity"] >= 0:
        typer.echo(
            f"wrote {result.report_path} ({n_ok} sections ok, {n_na} not available, "
            f"{len(result.failed)} failed, {result.seconds:.1f} s)"
        )
    if result.failed:
        reasons = "; ".join(f"{k}: {result.errors[k]}" for k in result.failed)
        raise _CommandError(f"demo section(s) failed ({reasons}); see {result.report_path}")


_SCHEDULER_HELP = (
    "Where independent tasks run: none (in-process), local:N (a local Dask cluster of N "
    "workers) or a Dask scheduler address (tcp://host:8786) or scheduler-file path."
)


def _scheduler(text: str) -> str | None:
    """``--scheduler`` text to the library's ``scheduler=`` (``"none"`` -> ``None``)."""
    from chronotope.parallel import check_scheduler

    value = None if text.strip().lower() in ("", "none") else text.strip()
    try:
        check_scheduler(value)
    except ValueError as err:
        raise _CommandError(f"--scheduler: {err}") from None
    return value


@app.command()
def domains(
    data: Annotated[Path, typer.Argument(help="Input .h5ad: raw counts in .X, obsm['spatial'].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad (obs['domain']).")],
    n_domains: Annotated[int, typer.Option("--n-domains", "-k", help="Number of domains.")] = 7,
    batch_key: Annotated[
        str | None, typer.Option(help="obs column naming the slice of each spot.")
    ] = None,
    spatial_key: Annotated[str, typer.Option(help="obsm key of the coordinates.")] = "spatial",
    method: Annotated[str, typer.Option(help="Clustering: gmm, kmeans or leiden.")] = "gmm",
    refine: Annotated[bool, typer.Option(help="Spatial majority-vote refinement.")] = True,
    labels_key: Annotated[
        str | None, typer.Option(help="obs column with reference labels for the figure.")
    ] = None,
    figures: Annotated[
        Path | None, typer.Option(help="Folder for domains.png and gene_importance.png.")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the model and the clustering.")] = 0,
    scheduler: Annotated[str, typer.Option(help=_SCHEDULER_HELP)] = "none",
) -> None:
    """Find spatial domains (graph contrastive encoder + clustering); writes obs['domain']."""
    import chronotope as ct

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")
    adata = read_input(data)
    ct.tl.spatial_domains(
        adata,
        n_domains,
        spatial_key=spatial_key,
        batch_key=batch_key,
        method=method,  # type: ignore[arg-type]
        refine=refine,
        seed=seed,
        device=None if device == "auto" else device,
        scheduler=_scheduler(scheduler),
        progress=show_progress(),
    )
    write_output(adata, out)
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        figures.mkdir(parents=True, exist_ok=True)
        for name, fig in (
            ("domains.png", ct.pl.domains(adata, labels_key=labels_key, spatial_key=spatial_key)),
            ("gene_importance.png", ct.pl.gene_importance(adata)),
        ):
            fig.savefig(figures / name, dpi=120)
    if _state["verbosity"] >= 0:
        counts = adata.obs["domain"].value_counts().sort_index()
        typer.echo(
            f"wrote {out}: {adata.n_obs} spots in {len(counts)} domains "
            f"({', '.join(f'{k}:{v}' for k, v in counts.items())}), "
            f"{adata.uns['domain']['seconds']:.1f} s"
        )


@app.command()
def align(
    a: Annotated[Path, typer.Argument(help="Reference slice .h5ad: counts, obsm['spatial'].")],
    b: Annotated[Path, typer.Argument(help="Moving slice .h5ad (genes matched by name).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Plan .npz (scipy sparse; rows = A, cols = B).")
    ],
    aligned_out: Annotated[
        Path | None,
        typer.Option(help="Folder for both slices with obsm['spatial_aligned'] (A.h5ad, B.h5ad)."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Weight of spatial structure vs expression.")] = 0.1,
    mass: Annotated[
        float | None, typer.Option(help="Partial alignment: expected overlap fraction.")
    ] = None,
    allow_reflection: Annotated[bool, typer.Option(help="Allow a mirrored slice.")] = False,
    nonrigid: Annotated[
        float | None,
        typer.Option(help="Add a smooth displacement field (smoothness in spot spacings, e.g. 2)."),
    ] = None,
    spatial_key: Annotated[str, typer.Option(help="obsm key of the coordinates.")] = "spatial",
    figures: Annotated[Path | None, typer.Option(help="Folder for alignment.png.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed (PCA, spatial patches).")] = 0,
    scheduler: Annotated[str, typer.Option(help=_SCHEDULER_HELP)] = "none",
) -> None:
    """Align slice B onto slice A; writes the spot-to-spot plan as a sparse .npz."""
    import numpy as np
    import scipy.sparse as sp

    import chronotope as ct

    if out.suffix != ".npz":
        raise _CommandError(f"output {str(out)!r} must end in .npz")
    ref, mov = read_input(a), read_input(b)
    (plan,) = ct.tl.align_slices(
        [ref, mov],
        spatial_key=spatial_key,
        alpha=alpha,
        mass=mass,
        allow_reflection=allow_reflection,
        nonrigid=nonrigid,
        seed=seed,
        device=device,
        scheduler=_scheduler(scheduler),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.npz")
    try:
        sp.save_npz(tmp, sp.csr_matrix(plan), compressed=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if aligned_out is not None:
        write_output(ref, aligned_out / f"{a.stem}.h5ad")
        write_output(mov, aligned_out / f"{b.stem}.h5ad")
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        figures.mkdir(parents=True, exist_ok=True)
        ct.pl.alignment(ref, mov, plan, spatial_key=spatial_key).savefig(
            figures / "alignment.png", dpi=120
        )
    if _state["verbosity"] >= 0:
        t = mov.uns["alignment"]["transform"]
        rot = np.asarray(t["rotation"])
        turn = ""
        if rot.shape == (2, 2):
            angle = float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0])))
            turn = f"; B rotated {angle:.1f} deg" + (" (mirrored)" if t["reflected"] else "")
        typer.echo(
            f"wrote {out}: plan {plan.shape[0]} x {plan.shape[1]}, {plan.nnz} entries, "
            f"mass {plan.sum():.3f}{turn}"
        )


@app.command()
def integrate(
    slices: Annotated[
        list[Path],
        typer.Argument(help="Two or more slice .h5ad files: counts, obsm['spatial'].", min=2),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad (all spots).")],
    n_domains: Annotated[int, typer.Option(help="Number of joint domains.")] = 7,
    reference: Annotated[int, typer.Option(help="Index of the slice whose frame is kept.")] = 0,
    scaling: Annotated[
        bool, typer.Option(help="Fit a scale between slices (coordinates in other units).")
    ] = True,
    center_slices: Annotated[
        bool, typer.Option(help="Centre and scale each gene within each slice.")
    ] = True,
    allow_reflection: Annotated[bool, typer.Option(help="Allow a mirrored slice.")] = False,
    spatial_key: Annotated[str, typer.Option(help="obsm key of the coordinates.")] = "spatial",
    figures: Annotated[Path | None, typer.Option(help="Folder for integration.png.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Integrate slices (other platforms welcome): one frame, one embedding, joint domains."""
    import chronotope as ct

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")
    if len({p.stem for p in slices}) != len(slices):
        raise _CommandError("slice files must have distinct names (their stems name slices)")
    adatas = [read_input(p) for p in slices]
    joint = ct.tl.integrate_slices(
        adatas,
        names=[p.stem for p in slices],
        n_domains=n_domains,
        reference=reference,
        scaling=scaling,
        center_slices=center_slices,
        allow_reflection=allow_reflection,
        spatial_key=spatial_key,
        seed=seed,
        device=device,
        progress=show_progress(),
    )
    write_output(joint, out)
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        figures.mkdir(parents=True, exist_ok=True)
        ct.pl.integration(joint).savefig(figures / "integration.png", dpi=120)
    if _state["verbosity"] >= 0:
        info = joint.uns["integration"]
        typer.echo(
            f"wrote {out}: {joint.n_obs} spots of {len(slices)} slices, "
            f"{info['n_shared_genes']} shared genes, {n_domains} joint domains, "
            f"{info['seconds']:.1f} s"
        )


@app.command()
def interpolate(
    a: Annotated[Path, typer.Argument(help="First slice .h5ad: counts, obsm['spatial'].")],
    b: Annotated[Path, typer.Argument(help="Second slice .h5ad (genes matched by name).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Generated slice .h5ad.")],
    t: Annotated[float, typer.Option("--t", help="Position in [0, 1]: 0 is A, 1 is B.")] = 0.5,
    labels_key: Annotated[
        str | None, typer.Option(help="obs column of labels to carry over.")
    ] = None,
    tau: Annotated[
        float, typer.Option(help="Unbalancedness (< 1 when the tissue grows or shrinks).")
    ] = 1.0,
    spatial_key: Annotated[str, typer.Option(help="obsm key of the coordinates.")] = "spatial",
    figures: Annotated[Path | None, typer.Option(help="Folder for interpolation.png.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed (PCA, spatial patches).")] = 0,
) -> None:
    """Generate the slice at --t between A and B (its own spots; log-normalised .X)."""
    import chronotope as ct

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")
    first, second = read_input(a), read_input(b)
    gen = ct.tl.interpolate_slices(
        first,
        second,
        t=t,
        spatial_key=spatial_key,
        labels_key=labels_key,
        tau=tau,
        seed=seed,
        device=device,
    )
    write_output(gen, out)
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        figures.mkdir(parents=True, exist_ok=True)
        # both inputs in the generated slice's frame (copies: the inputs are not written)
        first, second = first.copy(), second.copy()
        ct.tl.align_slices([first, second], spatial_key=spatial_key, tau=tau, seed=seed)
        ct.pl.interpolation(first, gen, second, spatial_key=spatial_key).savefig(
            figures / "interpolation.png", dpi=120
        )
    if _state["verbosity"] >= 0:
        typer.echo(f"wrote {out}: {gen.n_obs} generated spots x {gen.n_vars} genes at t={t:g}")


@app.command()
def undiffuse(
    data: Annotated[
        Path,
        typer.Argument(
            help="Input .h5ad: raw counts in .X (all spots), obsm['spatial'], obs['in_tissue']."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output .h5ad with layers['undiffused'].")
    ],
    sigma: Annotated[
        str, typer.Option(help="Kernel width in spot spacings, or 'auto' (estimated).")
    ] = "auto",
    bleed: Annotated[str, typer.Option(help="Share of molecules that move, or 'auto'.")] = "auto",
    background: Annotated[
        str, typer.Option(help="Share of moved molecules spread uniformly, or 'auto'.")
    ] = "auto",
    n_iter: Annotated[
        str, typer.Option(help="EM iterations, or 'auto' (held-out likelihood).")
    ] = "auto",
    method: Annotated[str, typer.Option(help="lowrank or pergene.")] = "lowrank",
    rank: Annotated[int, typer.Option(help="Free components of the low-rank model.")] = 30,
    kernel: Annotated[str, typer.Option(help="Kernel profile: gaussian or student.")] = "gaussian",
    tissue_key: Annotated[
        str,
        typer.Option(
            help="obs column of the in-tissue flag; 'none': estimate the tissue (H&E image "
            "in uns['spatial'], else a learned cut on total counts)."
        ),
    ] = "in_tissue",
    spatial_key: Annotated[str, typer.Option(help="obsm key of the coordinates.")] = "spatial",
    round_counts: Annotated[
        bool, typer.Option("--round", help="Round to integers that keep each gene's total.")
    ] = False,
    sigma_modules: Annotated[
        int, typer.Option(help="Gene modules with their own sigma multiplier (0: one sigma).")
    ] = 0,
    figures: Annotated[
        Path | None, typer.Option(help="Folder for undiffuse.png and out_of_tissue.png.")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the thinning and initialisation.")] = 0,
    scheduler: Annotated[str, typer.Option(help=_SCHEDULER_HELP)] = "none",
    image_prior: Annotated[
        str,
        typer.Option(
            help="H&E image of uns['spatial'] as a prior on spot total densities: 'auto' "
            "(strength by held-out likelihood when there is an image, else off), 'on' "
            "(the same, image required), 'off', or a strength >= 1."
        ),
    ] = "auto",
) -> None:
    """Undo lateral mRNA diffusion; writes layers['undiffused'] (same spots and genes)."""
    import chronotope as ct

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")

    def _num(v: str, name: str, cast: type = float) -> Any:
        if v == "auto":
            return v
        try:
            return cast(v)
        except ValueError:
            raise _CommandError(f"--{name} must be a number or 'auto', got {v!r}") from None

    ip = image_prior.strip().lower()
    prior_arg: bool | float | str
    if ip in ("auto", "on", "true", "off", "false"):
        prior_arg = {"auto": "auto", "on": True, "true": True}.get(ip, False)
    else:
        try:
            prior_arg = float(ip)
        except ValueError:
            raise _CommandError(
                f"--image-prior must be auto, on, off or a number, got {image_prior!r}"
            ) from None
    adata = read_input(data)
    ct.tl.undiffuse(
        adata,
        image_prior=prior_arg,
        spatial_key=spatial_key,
        tissue_key=None if tissue_key.lower() == "none" else tissue_key,
        kernel=kernel,  # type: ignore[arg-type]
        sigma=_num(sigma, "sigma"),
        bleed=_num(bleed, "bleed"),
        background=_num(background, "background"),
        n_iter=_num(n_iter, "n-iter", int),
        method=method,  # type: ignore[arg-type]
        rank=rank,
        round_counts=round_counts,
        seed=seed,
        device=device,
        scheduler=_scheduler(scheduler),
        progress=show_progress(),
        sigma_modules=sigma_modules or None,
    )
    write_output(adata, out)
    if figures is not None:
        import matplotlib

        matplotlib.use("Agg")
        figures.mkdir(parents=True, exist_ok=True)
        ct.pl.undiffuse(adata, spatial_key=spatial_key).savefig(figures / "undiffuse.png", dpi=120)
        tkey = "undiffuse_tissue" if "undiffuse_tissue" in adata.obs else tissue_key
        ct.pl.out_of_tissue(adata, spatial_key=spatial_key, tissue_key=tkey).savefig(
            figures / "out_of_tissue.png", dpi=120
        )
    if _state["verbosity"] >= 0:
        u = adata.uns["undiffused"]
        d = u.get("diagnostics", {})
        typer.echo(
            f"wrote {out}: {adata.n_obs} spots x {adata.n_vars} genes; sigma {u['sigma']:.3g} "
            f"spacings, bleed {u['bleed']:.3g}, background {u['background']:.3g}; "
            f"out-of-tissue UMI fraction {d.get('out_of_tissue_fraction_before', float('nan')):.4f}"
            f" -> {d.get('out_of_tissue_fraction_after', float('nan')):.4f}; {u['seconds']:.1f} s"
        )


# --------------------------------------------------------------------------- rank
rank_app = typer.Typer(
    help="Expression from histology features with STRank losses (features, fit, predict, "
    "evaluate).",
    no_args_is_help=True,
)
app.add_typer(rank_app, name="rank")


@rank_app.command("features")
def rank_features(
    data: Annotated[Path, typer.Argument(help="Input .h5ad: spot pixel coordinates in obsm.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad with obsm[KEY].")],
    image: Annotated[
        Path | None,
        typer.Option(help="Full-resolution H&E image; default the hires image in uns['spatial']."),
    ] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option(help="Precomputed embeddings .npy (one row per spot) instead of an image."),
    ] = None,
    key: Annotated[str, typer.Option(help="obsm key to write.")] = "X_histology",
    patch_size: Annotated[
        int | None, typer.Option(help="Patch side in full-resolution pixels.")
    ] = None,
    spatial_key: Annotated[str, typer.Option(help="obsm key of the pixel coordinates.")] = (
        "spatial"
    ),
) -> None:
    """Per-spot features: built-in H&E statistics of image patches, or stored embeddings."""
    import chronotope as ct

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")
    adata = read_input(data)
    if embeddings is not None:
        ct.tl.load_embeddings(adata, embeddings, key_added=key)
    else:
        ct.tl.histology_features(
            adata, image, spatial_key=spatial_key, patch_size=patch_size, key_added=key,
            progress=show_progress(),
        )
    write_output(adata, out)
    if _state["verbosity"] >= 0:
        typer.echo(f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape}")


@rank_app.command("fit")
def rank_fit(
    data: Annotated[
        Path, typer.Argument(help="Training .h5ad: raw counts in .X, features in obsm[KEY].")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    features: Annotated[str, typer.Option(help="obsm key of the per-spot features.")] = (
        "X_histology"
    ),
    batch_key: Annotated[
        str | None, typer.Option(help="obs column naming the slide of each spot.")
    ] = None,
    loss: Annotated[
        str, typer.Option(help="list, pair, mse, poisson, nb, margin, pcc or pcc_slide.")
    ] = "list",
    n_genes: Annotated[
        int | None,
        typer.Option(help="Model the N most variable genes (on the training slides); default all."),
    ] = None,
    validation: Annotated[
        list[str] | None,
        typer.Option(help="Slide (obs[batch-key]) held out for model selection (repeatable)."),
    ] = None,
    head: Annotated[str, typer.Option(help="linear or mlp.")] = "linear",
    batching: Annotated[str, typer.Option(help="mixed, slide or balanced.")] = "mixed",
    max_epochs: Annotated[int, typer.Option(help="Training epochs.")] = 200,
    overwrite: Annotated[bool, typer.Option(help="Overwrite a non-empty model folder.")] = False,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Fit a model predicting expression from features; writes MODEL_DIR."""
    import chronotope as ct

    if out.exists() and not out.is_dir():
        raise _CommandError(f"output {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise _CommandError(f"output folder {str(out)!r} is not empty; pass --overwrite")
    adata = read_input(data)
    model = ct.tl.rank_fit(
        adata,
        features,
        batch_key,
        genes=n_genes,
        loss=loss,
        validation=validation or None,
        head=head,
        batching=batching,
        max_epochs=max_epochs,
        seed=seed,
        device=None if device == "auto" else device,
        progress=show_progress(),
    )
    model.save(out, overwrite=overwrite)
    if _state["verbosity"] >= 0:
        typer.echo(
            f"wrote {out}: {loss} loss, {head} head, {len(model.var_names)} genes, "
            f"{adata.n_obs} spots, best epoch {model.best_epoch_}"
        )


@rank_app.command("predict")
def rank_predict(
    model_dir: Annotated[Path, typer.Argument(help="Model folder from 'chronotope rank fit'.")],
    data: Annotated[Path, typer.Argument(help="Test .h5ad with the same features in obsm.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output .h5ad: layers['predicted'], model genes.")
    ],
    features: Annotated[
        str | None, typer.Option(help="obsm key of the features (default: the model's).")
    ] = None,
) -> None:
    """Predict scores per spot and model gene; writes layers['predicted']."""
    import chronotope as ct
    from chronotope.rank import RankModel

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")
    model = RankModel.load(model_dir)
    adata = read_input(data)
    pred = ct.tl.rank_predict(adata, model, features=features)
    write_output(pred, out)
    if _state["verbosity"] >= 0:
        typer.echo(f"wrote {out}: {pred.n_obs} spots x {pred.n_vars} model genes")


@rank_app.command("evaluate")
def rank_evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model folder from 'chronotope rank fit'.")],
    data: Annotated[Path, typer.Argument(help="Test .h5ad: raw counts in .X, features.")],
    batch_key: Annotated[
        str | None, typer.Option(help="obs column of the slides (correlations within each).")
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="obsm key of the features (default: the model's).")
    ] = None,
    truth_layer: Annotated[
        str | None, typer.Option(help="Layer with the truth instead of log-normalised counts.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="CSV of per-slide x per-gene correlations.")
    ] = None,
) -> None:
    """Within-slide Pearson and Spearman correlation per gene; prints the means."""
    import chronotope as ct
    from chronotope.rank import RankModel, summarize

    model = RankModel.load(model_dir)
    adata = read_input(data)
    table = ct.tl.rank_evaluate(
        adata, model, batch_key=batch_key, features=features, truth_layer=truth_layer
    )
    if out is not None:
        if out.suffix != ".csv":
            raise _CommandError(f"output {str(out)!r} must end in .csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    s = summarize(table)
    typer.echo(
        f"{model.params.loss}: mean within-slide pearson {s['pearson']:.4f}, "
        f"spearman {s['spearman']:.4f} ({s['n_genes']} genes, {s['n_slides']} slide(s))"
    )


# --------------------------------------------------------------------------- dynamics
dynamics_app = typer.Typer(
    help="Fit population dynamics (velocity, growth, landscape) and predict snapshots.",
    no_args_is_help=True,
)
app.add_typer(dynamics_app, name="dynamics")


@dynamics_app.command("fit")
def dynamics_fit(
    data: Annotated[Path, typer.Argument(help="Input .h5ad with all time points.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the model.")],
    time_key: Annotated[str, typer.Option(help="obs column with numeric times.")] = "time",
    use_rep: Annotated[
        str, typer.Option(help="obsm key of the representation, or X for a low-dimensional .X.")
    ] = "X_pca",
    holdout: Annotated[
        list[float] | None,
        typer.Option(help="Time point left out of training (repeatable)."),
    ] = None,
    n_steps: Annotated[int, typer.Option(help="Training steps.")] = 3000,
    sigma: Annotated[
        float | None, typer.Option(help="Diffusion coefficient (default: from --epsilon).")
    ] = None,
    epsilon: Annotated[
        float, typer.Option(help="Entropic regularisation, fraction of the mean cost.")
    ] = 0.01,
    growth_prior_key: Annotated[
        str | None, typer.Option(help="obs column with a prior growth rate per cell.")
    ] = None,
    masses: Annotated[
        str,
        typer.Option(
            help="Relative population size per training time point: counts (the cell "
            "counts), equal (counts are numbers of cells measured, not population sizes), "
            "or comma-separated numbers in time order."
        ),
    ] = "counts",
    path_weight: Annotated[
        str,
        typer.Option(
            help="Measure of the training losses: plan (pairs as the plan draws them) or "
            "mass (the unbalanced path measure; for strong differential growth)."
        ),
    ] = "plan",
    growth_neighbors: Annotated[
        int,
        typer.Option(
            help="Neighbours of the growth prior each interval takes from the other "
            "intervals' growth (by cell state); 0: each interval's own relaxed plan only."
        ),
    ] = 50,
    extrapolate: Annotated[
        str,
        typer.Option(
            help="The model's continuation past its training times: auto (chosen by "
            "backtesting on the last training time point, damped at several relaxation "
            "times; one more, smaller fit), landscape, rest, continue, or damped (the last "
            "fields' transport decays with --relaxation, growth goes on)."
        ),
    ] = "auto",
    relaxation: Annotated[
        float,
        typer.Option(help="Relaxation time of --extrapolate damped, in last intervals."),
    ] = 1.0,
    damped_growth: Annotated[
        bool,
        typer.Option(
            help="Whether the end's growth rates act in --extrapolate damped (auto chooses)."
        ),
    ] = True,
    jacobian_weight: Annotated[
        str,
        typer.Option(
            help="Penalty on the velocity's Jacobian (0: none; a number >= 0, or auto to "
            "choose it from the training data); for long chains of intervals, see "
            "docs/dynamics.md."
        ),
    ] = "0",
    finetune_steps: Annotated[
        int, typer.Option(help="Optional rollout fine-tune steps (Sinkhorn + WFR action).")
    ] = 0,
    finetune_rollouts: Annotated[
        str,
        typer.Option(
            help="Rollouts of the fine-tune: intervals (each from its own cells) or chained "
            "(from the first time point across every interval)."
        ),
    ] = "intervals",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the couplings and the training.")] = 0,
    scheduler: Annotated[str, typer.Option(help=_SCHEDULER_HELP)] = "none",
) -> None:
    """Fit velocity, growth and landscape to time snapshots; save the model to OUT."""
    import chronotope as ct

    if out.exists() and not out.is_dir():
        raise _CommandError(f"output {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _CommandError(f"output folder {str(out)!r} is not empty; pass --overwrite")
    mass_arg: str | list[float] = masses
    if masses not in ("counts", "equal"):
        try:
            mass_arg = [float(v) for v in masses.split(",")]
        except ValueError:
            raise _CommandError(
                f"--masses must be counts, equal or comma-separated numbers, got {masses!r}"
            ) from None
    jacobian_arg: float | str = jacobian_weight
    if jacobian_weight != "auto":
        try:
            jacobian_arg = float(jacobian_weight)
        except ValueError:
            raise _CommandError(
                f"--jacobian-weight must be a number >= 0 or auto, got {jacobian_weight!r}"
            ) from None
    from chronotope.dynamics.finetune import ROLLOUTS

    if finetune_rollouts not in ROLLOUTS:
        raise _CommandError(
            f"--finetune-rollouts must be intervals or chained, got {finetune_rollouts!r}"
        )
    adata = read_input(data, check_nonnegative=False)  # a representation, not counts
    model = ct.tl.fit_dynamics(
        adata,
        time_key,
        use_rep,
        holdout=holdout or None,
        masses=mass_arg,  # type: ignore[arg-type]
        growth_prior_key=growth_prior_key,
        n_steps=n_steps,
        sigma=sigma,
        epsilon=epsilon,
        path_weight=path_weight,
        growth_neighbors=growth_neighbors,
        extrapolate=extrapolate,
        relaxation=relaxation,
        damped_growth=damped_growth,
        jacobian_weight=jacobian_arg,
        finetune_steps=finetune_steps,
        finetune_rollouts=finetune_rollouts,
        seed=seed,
        device=None if device == "auto" else device,
        scheduler=_scheduler(scheduler),
        progress=show_progress(),
    )
    model.save(out, overwrite=overwrite)
    if _state["verbosity"] >= 0:
        rec = adata.uns["dynamics"]
        held = ", ".join(f"{v:g}" for v in rec["params"].get("holdout", [])) or "none"
        phases = ", ".join(
            f"{k.replace('_', ' ')} {v:.1f} s" for k, v in rec.get("timings", {}).items()
        )
        jac = ""
        if model.jacobian_scores_:  # chosen by --jacobian-weight auto
            scores = ", ".join(f"{k} {v:.3g}" for k, v in model.jacobian_scores_.items())
            jac = f"jacobian weight {model.jacobian_weight_:g} (auto; in-sample {scores}), "
        elif model.jacobian_weight_ > 0:
            jac = f"jacobian weight {model.jacobian_weight_:g}, "
        typer.echo(
            f"wrote {out}: {use_rep} ({model.dim}-D), times "
            f"{', '.join(f'{v:g}' for v in rec['times'])} (held out: {held}), "
            f"sigma {rec['sigma']:.3g}, extrapolation {model.continuation}, {jac}"
            f"{rec['seconds']:.1f} s ({phases})"
        )


@dynamics_app.command("predict")
def dynamics_predict(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by 'dynamics fit'.")],
    data: Annotated[Path, typer.Argument(help="Input .h5ad (its first time point is pushed).")],
    time: Annotated[float, typer.Option("--time", help="Target time.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad of the particles.")],
    time_key: Annotated[
        str | None, typer.Option(help="obs column with times (default: the model's).")
    ] = None,
    method: Annotated[str, typer.Option(help="sde or ode (probability flow).")] = "sde",
    n_particles: Annotated[int, typer.Option(help="Particles per start cell.")] = 4,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the SDE noise.")] = 0,
    extrapolate: Annotated[
        str,
        typer.Option(
            help="Outside the training times: the model's own continuation (default; set "
            "by 'dynamics fit --extrapolate'), or landscape (no transport or growth; cells "
            "diffuse in the landscape frozen at the last training time), rest (zero drift "
            "and growth, diffusion only), continue (the last fields keep acting), damped "
            "(they act with a decaying transport; growth goes on)."
        ),
    ] = "model",
    relaxation: Annotated[
        float | None,
        typer.Option(help="Relaxation time of damped (default: the model's own)."),
    ] = None,
) -> None:
    """Push the cells of the first time point to --time; write particles and masses."""
    import chronotope as ct

    if out.suffix != ".h5ad":
        raise _CommandError(f"output {str(out)!r} must end in .h5ad")
    if method not in ("ode", "sde"):
        raise _CommandError(f"--method must be ode or sde, got {method!r}")
    from chronotope.dynamics.model import EXTRAPOLATE_MODES

    if extrapolate not in (*EXTRAPOLATE_MODES, "model"):
        raise _CommandError(
            f"--extrapolate must be model or one of {', '.join(EXTRAPOLATE_MODES)}, got "
            f"{extrapolate!r}"
        )
    adata = read_input(data, check_nonnegative=False)
    pred = ct.tl.predict_dynamics(
        adata,
        str(model_dir),
        time,
        time_key=time_key,
        method=method,  # type: ignore[arg-type]
        n_particles=n_particles,
        seed=seed,
        device=None if device == "auto" else device,
        extrapolate=None if extrapolate == "model" else extrapolate,  # type: ignore[arg-type]
        relaxation=relaxation,
    )
    write_output(pred, out)
    if _state["verbosity"] >= 0:
        rec = pred.uns["dynamics_prediction"]
        typer.echo(
            f"wrote {out}: {pred.n_obs} particles in obsm[{rec['params']['use_rep']!r}] at "
            f"t={time:g} from t={rec['params']['start_time']:g}, total mass "
            f"{rec['total_mass']:.3f}"
        )


# --------------------------------------------------------------------------- entry point
def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        msg = f"missing key {exc.args[0]!r}" if isinstance(exc.args[0], str) else str(exc)
    else:
        msg = str(exc) or type(exc).__name__
    msg = " ".join(msg.split())
    return msg


def main(argv: list[str] | None = None) -> None:
    """Run the CLI (the ``chronotope`` console script).

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` when ``None``.
    """
    _state["verbosity"] = 0
    try:
        app(args=argv, prog_name="chronotope")
    except (_CommandError, ValueError, KeyError, OSError) as exc:
        if _state["verbosity"] > 0:
            traceback.print_exc(file=sys.stderr)
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
