r"""Read-outs of a fitted :class:`~chronotope.dynamics.DynamicsModel` (arrays in, arrays out).

- :func:`cell_fields` -- velocity, growth and landscape on cells, each at its own time.
- :func:`trajectories` -- weighted particle paths on a time grid.
- :func:`landscape_grid` -- the learned landscape ``U(x, t)`` on a 2-D grid.
- :func:`fate_probabilities` -- forward stochastic trajectory analysis (STA): several SDE
  particles per start cell, a kNN vote on a labelled snapshot, weighted by particle mass,
  bootstrap intervals over particles.
- :func:`ancestor_distribution` -- backward STA: reverse-time SDE from chosen cells to an
  earlier snapshot, distribution over its labels and its cells.
- :func:`perturb_fate` -- in-silico knock-out / over-expression of a gene through the
  :class:`~chronotope.dynamics.GeneMap`, change of the fate distribution.
- :func:`mean_jacobian`, :func:`gene_jacobian`, :func:`grn_edges` -- the cell-averaged
  Jacobian of the velocity (autograd) in the representation and in gene space, signed edges.
- :func:`growth_genes` -- ``dg/dgene`` averaged over cells.
- :func:`time_correlated_genes` -- correlation of each gene with time along trajectories.
- :func:`embed_velocity` -- velocities projected onto a non-linear view (UMAP, t-SNE) by
  scVelo's transition-kernel projection, for streamlines.

Gene space. With ``genes = x L^T + c`` (``L = GeneMap.loadings``, ``G x d``) and its
left inverse ``P = pinv(L)`` (``d x G``; ``P = L^T`` for orthonormal loadings such as
PCA), the gene-space velocity is ``L v`` and its Jacobian with respect to genes is
``J_gene = L J P`` (``L J L^T`` for PCA), computed from the ``d x d`` cell average of
``J = dv/dx``; no per-cell ``G x G`` matrix is ever formed. ``J_gene[a, b] =
d v_a / d gene_b``: gene ``b`` acting on the velocity of gene ``a`` (edge ``b -> a``).

With a user-supplied non-linear :class:`~chronotope.dynamics.NeuralGeneMap` the same
quantities use the chain rule per cell (``mean_c D_c J_c E_c``, see its module), which
needs the cells (``x``, ``time``) and is computed for a chosen gene subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from chronotope._errors import ChronotopeInputError
from chronotope.dynamics.genemaps import NeuralGeneMap
from chronotope.dynamics.model import DynamicsModel, GeneMap, SimulationResult

__all__ = [
    "AncestryResult",
    "FateResult",
    "GRNEdges",
    "PerturbationResult",
    "ancestor_distribution",
    "cell_fields",
    "embed_velocity",
    "fate_probabilities",
    "gene_jacobian",
    "grn_edges",
    "growth_genes",
    "landscape_grid",
    "mean_jacobian",
    "perturb_fate",
    "time_correlated_genes",
    "trajectories",
]

_CHUNK = 4096


# --------------------------------------------------------------------------- helpers
def _times_per_cell(t: float | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(t, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    arr = arr.ravel()
    if arr.shape[0] != n or not np.isfinite(arr).all():
        raise ChronotopeInputError(f"time must be a number or {n} finite values, one per cell.")
    return arr


def _labels(labels: Sequence[object] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(classes, codes)`` of reference labels; errors on missing labels."""
    lab = np.asarray(labels, dtype=object).ravel()
    if lab.shape[0] != n:
        raise ChronotopeInputError(f"{lab.shape[0]} labels for {n} reference cells.")
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in lab])
    if missing.any():
        raise ChronotopeInputError(f"{int(missing.sum())} reference cell(s) have no label.")
    classes, codes = np.unique(lab.astype(str), return_inverse=True)
    return classes, codes


def _check_ref(model: DynamicsModel, x_ref: np.ndarray, n_neighbors: int) -> np.ndarray:
    ref = model._points(x_ref)
    if ref.shape[0] == 0:
        raise ChronotopeInputError("the reference snapshot has no cells.")
    if n_neighbors < 1:
        raise ChronotopeInputError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    return ref


def _knn(ref: np.ndarray, pts: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k = min(k, ref.shape[0])
    nn = NearestNeighbors(n_neighbors=k).fit(ref)
    return nn.kneighbors(pts, return_distance=False)


def _class_votes(idx: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """``(m, C)`` fraction of each particle's neighbours in each class."""
    votes = np.zeros((idx.shape[0], n_classes))
    lab = codes[idx]
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    np.add.at(votes, (rows, lab.ravel()), 1.0)
    return votes / idx.shape[1]


def _weighted_mean(
    w: np.ndarray, votes: np.ndarray, n: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    wr = w.reshape(n, p)
    vr = votes.reshape(n, p, -1)
    tot = wr.sum(1)
    probs = (wr[:, :, None] * vr).sum(1) / np.maximum(tot, 1e-300)[:, None]
    return probs, tot


def _bootstrap(
    w: np.ndarray,
    votes: np.ndarray,
    n: int,
    p: int,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals of the per-cell fate over resampled particles."""
    wr = w.reshape(n, p)
    vr = votes.reshape(n, p, -1)
    c = vr.shape[2]
    lo = np.empty((n, c))
    hi = np.empty((n, c))
    q = [50 * (1 - ci), 50 * (1 + ci)]
    # one bootstrap block holds at most ~4 M floats per array (~100 MB in all)
    step = max(1, int(4e6 // max(1, n_boot * p * c)))
    for s in range(0, n, step):
        e = min(n, s + step)
        idx = rng.integers(0, p, size=(n_boot, e - s, p))
        rows = np.arange(s, e)[None, :, None]
        wb = wr[rows, idx]
        pb = (wb[..., None] * vr[rows, idx]).sum(2) / np.maximum(wb.sum(2), 1e-300)[..., None]
        lo[s:e], hi[s:e] = np.percentile(pb, q, axis=0)
    return lo, hi


def _gene_index(gm: GeneMap | NeuralGeneMap, gene: str | int) -> int:
    if isinstance(gene, (int, np.integer)):
        if not 0 <= int(gene) < gm.n_genes:
            raise ChronotopeInputError(f"gene index {gene} out of range (0..{gm.n_genes - 1}).")
        return int(gene)
    if gm.var_names is None:
        raise ChronotopeInputError("the gene map has no gene names; pass an index.")
    try:
        return gm.var_names.index(str(gene))
    except ValueError:
        raise ChronotopeInputError(f"gene {gene!r} is not in the model's gene map.") from None


def _require_gene_map(model: DynamicsModel) -> GeneMap | NeuralGeneMap:
    if model.gene_map is None:
        raise ChronotopeInputError(
            f"the model has no gene map (representation {model.use_rep!r}); fit it with a "
            "GeneMap (e.g. PCA loadings) to read out genes."
        )
    return model.gene_map


def _chunks(
    model: DynamicsModel, x: np.ndarray, time: float | np.ndarray, *, standardise: bool = True
):
    """``(rows, points, tau)`` per chunk of cells on the model's device (float32): points
    standardised (``z``) or in representation units, ``tau`` the network time column."""
    _, frame = model._require_fit()
    x = model._points(x)
    t = _times_per_cell(time, x.shape[0])
    dev = model.device
    for s in range(0, x.shape[0], _CHUNK):
        pts = frame.z(x[s : s + _CHUNK]) if standardise else x[s : s + _CHUNK]
        tau = (t[s : s + _CHUNK] - frame.t_min) / frame.t_span
        yield (
            slice(s, s + pts.shape[0]),
            torch.as_tensor(pts, dtype=torch.float32, device=dev),
            torch.as_tensor(tau, dtype=torch.float32, device=dev)[:, None],
        )


def _growth_gradients(model: DynamicsModel, x: np.ndarray, time: float | np.ndarray):
    """Chunks ``(rows, (c, d) growth gradients d g / d x)`` in representation units."""
    nets, frame = model._require_fit()
    for rows, z, tau in _chunks(model, x, time):
        with torch.enable_grad():
            z = z.requires_grad_(True)
            (g,) = torch.autograd.grad(nets.g(z, tau).sum(), z)
        yield rows, g.detach() / (frame.scale * frame.t_span)


def _gene_velocity_jacobians(
    model: DynamicsModel, gm: NeuralGeneMap, x: np.ndarray, time: float | np.ndarray
):
    """Chunks of ``(d u / d x, d x / d genes)`` per cell, float64 on the CPU.

    ``u(x) = D(x) v(x)`` is the gene-space velocity (the decoder's Jacobian applied to
    the velocity); its Jacobian ``(c, G, d)`` holds ``D J`` and the decoder's curvature
    along the flow, by nested forward-mode differentiation. Times ``E`` it is the
    Jacobian of the velocity with respect to genes on the decoder's manifold.
    """
    nets, frame = model._require_fit()
    shift = torch.as_tensor(frame.shift, dtype=torch.float32, device=model.device)
    for _, xc, tau in _chunks(model, x, time, standardise=False):

        def u_of_x(xx: torch.Tensor, tau: torch.Tensor = tau) -> torch.Tensor:
            v = nets.v((xx - shift) / frame.scale, tau) * (frame.scale / frame.t_span)
            gx = xx.to(gm._dev, gm._dt)
            return torch.func.jvp(gm.decoder, (gx,), (v.to(gm._dev, gm._dt),))[1]

        cols = []
        for k in range(xc.shape[1]):
            e = torch.zeros_like(xc)
            e[:, k] = 1.0
            cols.append(torch.func.jvp(u_of_x, (xc,), (e,))[1].detach())
        ju = torch.stack(cols, dim=2).double().cpu()
        with torch.no_grad():
            ec = gm.encoder_jacobian(xc).double().cpu()
        yield ju, ec


def _pinv(gm: GeneMap) -> np.ndarray:
    """Left inverse ``P`` (``d x G``) of the loadings: ``x = (genes - c) P^T``."""
    return np.linalg.pinv(gm.loadings)


# --------------------------------------------------------------------------- fields
def cell_fields(
    model: DynamicsModel, x: np.ndarray, time: float | np.ndarray
) -> dict[str, np.ndarray]:
    """Velocity, growth, potential and SDE drift on cells, each at its own time.

    Parameters
    ----------
    model
        A fitted model.
    x
        ``(n, d)`` cells in the model's representation.
    time
        One time for all cells, or ``(n,)`` times (e.g. each cell's snapshot time).

    Returns
    -------
    dict
        ``velocity`` ``(n, d)``, ``drift`` ``(n, d)`` (``v + D * score``), ``growth``
        ``(n,)`` per unit time, ``potential`` ``(n,)`` (the landscape ``U``; comparable
        between cells of one time only, it is ``-log p_t`` up to a constant per time).
    """
    x = model._points(x)
    t = _times_per_cell(time, x.shape[0])
    out = {
        "velocity": np.empty_like(x),
        "drift": np.empty_like(x),
        "growth": np.empty(x.shape[0]),
        "potential": np.empty(x.shape[0]),
    }
    for tv in np.unique(t):
        m = t == tv
        out["velocity"][m] = model.velocity(x[m], tv)
        out["drift"][m] = model.drift(x[m], tv)
        out["growth"][m] = model.growth(x[m], tv)
        out["potential"][m] = model.potential(x[m], tv)
    return out


def trajectories(
    model: DynamicsModel,
    x0: np.ndarray,
    t0: float,
    t1: float,
    *,
    n_times: int = 20,
    method: Literal["ode", "sde"] = "ode",
    seed: int | None = 0,
) -> SimulationResult:
    """Weighted particle paths from ``t0`` to ``t1`` recorded at ``n_times`` even times."""
    if n_times < 2:
        raise ChronotopeInputError(f"n_times must be >= 2, got {n_times}.")
    grid = np.linspace(float(t0), float(t1), int(n_times))
    return model.simulate(x0, t0, t1, method=method, t_eval=grid, seed=seed)


def landscape_grid(
    model: DynamicsModel,
    times: float | Sequence[float],
    x_ref: np.ndarray,
    *,
    dims: tuple[int, int] = (0, 1),
    n_grid: int = 60,
    margin: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landscape ``U(x, t)`` on a regular grid over two dimensions of the representation.

    Parameters
    ----------
    model
        A fitted model.
    times
        One time or several.
    x_ref
        ``(n, d)`` cells that set the extent of the grid (and, beyond two dimensions, the
        value of the other coordinates: their mean).
    dims
        The two dimensions spanned by the grid.
    n_grid
        Grid points per axis.
    margin
        Extra extent on each side, as a fraction of the range.

    Returns
    -------
    gx, gy
        ``(n_grid,)`` grid coordinates along ``dims[0]`` and ``dims[1]``.
    u
        ``(n_times, n_grid, n_grid)``, ``u[k, j, i]`` at ``(gx[i], gy[j])``; each time is
        shifted so that its minimum on the grid is 0 (``U`` is defined up to a constant
        per time).
    """
    ref = model._points(x_ref)
    i, j = (int(v) for v in dims)
    if i == j or not (0 <= i < ref.shape[1] and 0 <= j < ref.shape[1]):
        raise ChronotopeInputError(f"dims must be two distinct dimensions of {ref.shape[1]}.")
    if n_grid < 2:
        raise ChronotopeInputError(f"n_grid must be >= 2, got {n_grid}.")
    lo, hi = ref.min(0), ref.max(0)
    pad = margin * (hi - lo)
    gx = np.linspace(lo[i] - pad[i], hi[i] + pad[i], n_grid)
    gy = np.linspace(lo[j] - pad[j], hi[j] + pad[j], n_grid)
    xx, yy = np.meshgrid(gx, gy)
    pts = np.tile(ref.mean(0), (xx.size, 1))
    pts[:, i], pts[:, j] = xx.ravel(), yy.ravel()
    ts = np.atleast_1d(np.asarray(times, dtype=np.float64))
    u = np.stack([model.potential(pts, tv).reshape(n_grid, n_grid) for tv in ts])
    u -= u.reshape(len(ts), -1).min(1)[:, None, None]
    return gx, gy, u


# --------------------------------------------------------------------------- STA
@dataclass(frozen=True)
class FateResult:
    """Forward STA: fate probabilities of start cells over the classes of a snapshot.

    Attributes
    ----------
    classes
        ``(C,)`` label names (sorted).
    probabilities
        ``(n, C)`` per start cell, rows sum to 1 (particles weighted by their mass).
    lower, upper
        ``(n, C)`` bootstrap percentile interval over the particles of each cell.
    mass
        ``(n,)`` total mass of each cell's particles at the target time, relative to its
        start mass (``exp`` of the integrated growth).
    """

    classes: np.ndarray
    probabilities: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    mass: np.ndarray

    @property
    def distribution(self) -> np.ndarray:
        """``(C,)`` population fate distribution (start cells weighted by their mass)."""
        w = self.mass / max(self.mass.sum(), 1e-300)
        return w @ self.probabilities


def _push(
    model: DynamicsModel,
    x0: np.ndarray,
    t0: float,
    t1: float,
    n_particles: int,
    method: str,
    step_size: float | None,
    seed: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    if n_particles < 1:
        raise ChronotopeInputError(f"n_particles must be >= 1, got {n_particles}.")
    n = x0.shape[0]
    xs = np.repeat(x0, n_particles, axis=0)
    res = model.simulate(
        xs,
        t0,
        t1,
        method=method,  # type: ignore[arg-type]
        weights=np.full(n * n_particles, 1.0 / n_particles),
        step_size=step_size,
        seed=seed,
    )
    return res.final


def fate_probabilities(
    model: DynamicsModel,
    x0: np.ndarray,
    t0: float,
    t1: float,
    x_ref: np.ndarray,
    labels_ref: Sequence[object] | np.ndarray,
    *,
    n_particles: int = 10,
    n_neighbors: int = 15,
    method: Literal["ode", "sde"] = "sde",
    n_boot: int = 100,
    ci: float = 0.9,
    step_size: float | None = None,
    seed: int | None = 0,
) -> FateResult:
    """Fate of each start cell: where its stochastic trajectories land among labelled cells.

    ``n_particles`` SDE paths per start cell run from ``t0`` to ``t1`` (the full drift
    ``v + D * score``, masses grown by ``g``). Each particle takes the label fractions of
    its ``n_neighbors`` nearest cells of the labelled snapshot ``x_ref`` (observed at
    ``t1``); a cell's fate is the mass-weighted mean over its particles. The interval is
    the bootstrap percentile interval (``ci``) over the particles of each cell.

    Parameters
    ----------
    model
        A fitted model.
    x0
        ``(n, d)`` start cells at time ``t0``.
    t0, t1
        Start time and target time (``t1 > t0`` for fate; any order works).
    x_ref, labels_ref
        ``(m, d)`` labelled cells of the target snapshot and their ``(m,)`` labels.
    n_particles
        Paths per start cell.
    n_neighbors
        Neighbours in the kNN vote.
    method
        ``"sde"`` (stochastic trajectories) or ``"ode"`` (one deterministic path each;
        use ``n_particles=1``).
    n_boot, ci
        Bootstrap resamples and coverage of the interval.
    step_size
        Integration step (default: the model's).
    seed
        Seed of the SDE noise and of the bootstrap.

    Returns
    -------
    FateResult
    """
    x = model._points(x0)
    ref = _check_ref(model, x_ref, n_neighbors)
    classes, codes = _labels(labels_ref, ref.shape[0])
    if not 0 < ci < 1:
        raise ChronotopeInputError(f"ci must be in (0, 1), got {ci}.")
    xp, wp = _push(model, x, t0, t1, n_particles, method, step_size, seed)
    votes = _class_votes(_knn(ref, xp, n_neighbors), codes, len(classes))
    n = x.shape[0]
    probs, mass = _weighted_mean(wp, votes, n, n_particles)
    if n_boot > 0 and n_particles > 1:
        rng = np.random.default_rng(None if seed is None else seed + 1)
        lo, hi = _bootstrap(wp, votes, n, n_particles, n_boot, ci, rng)
    else:
        lo, hi = probs.copy(), probs.copy()
    return FateResult(classes=classes, probabilities=probs, lower=lo, upper=hi, mass=mass)


@dataclass(frozen=True)
class AncestryResult:
    """Backward STA: where the ancestors of chosen cells were at an earlier time.

    Attributes
    ----------
    classes
        ``(C,)`` labels of the earlier snapshot (empty without labels).
    probabilities
        ``(n, C)`` per end cell, the distribution of its ancestors over the labels.
    cell_weights
        ``(m,)`` share of the ancestral mass near each cell of the earlier snapshot
        (sums to 1 over the snapshot).
    mass
        ``(n,)`` total ancestral mass of each end cell's particles (growth divided out).
    """

    classes: np.ndarray
    probabilities: np.ndarray
    cell_weights: np.ndarray
    mass: np.ndarray

    @property
    def distribution(self) -> np.ndarray:
        """``(C,)`` ancestor distribution of all the chosen cells together (mass-weighted)."""
        w = self.mass / max(self.mass.sum(), 1e-300)
        return w @ self.probabilities


def ancestor_distribution(
    model: DynamicsModel,
    x1: np.ndarray,
    t1: float,
    t0: float,
    x_ref: np.ndarray,
    labels_ref: Sequence[object] | np.ndarray | None = None,
    *,
    n_particles: int = 10,
    n_neighbors: int = 15,
    method: Literal["ode", "sde"] = "sde",
    step_size: float | None = None,
    seed: int | None = 0,
) -> AncestryResult:
    """Ancestors of cells at ``t1`` in the snapshot at ``t0 < t1`` (reverse-time SDE).

    Parameters
    ----------
    model
        A fitted model.
    x1
        ``(n, d)`` chosen cells at time ``t1``.
    t1, t0
        End time and the earlier time.
    x_ref
        ``(m, d)`` cells of the earlier snapshot.
    labels_ref
        ``(m,)`` their labels (optional).
    n_particles, n_neighbors, method, step_size, seed
        As in :func:`fate_probabilities`; each particle spreads its mass evenly over its
        ``n_neighbors`` nearest earlier cells.

    Returns
    -------
    AncestryResult
    """
    x = model._points(x1)
    ref = _check_ref(model, x_ref, n_neighbors)
    if not float(t0) < float(t1):
        raise ChronotopeInputError(f"the ancestor time t0={t0} must be before t1={t1}.")
    xp, wp = _push(model, x, t1, t0, n_particles, method, step_size, seed)
    idx = _knn(ref, xp, n_neighbors)
    cw = np.zeros(ref.shape[0])
    np.add.at(cw, idx.ravel(), np.repeat(wp / idx.shape[1], idx.shape[1]))
    cw /= max(cw.sum(), 1e-300)
    n = x.shape[0]
    if labels_ref is not None:
        classes, codes = _labels(labels_ref, ref.shape[0])
        votes = _class_votes(idx, codes, len(classes))
        probs, mass = _weighted_mean(wp, votes, n, n_particles)
    else:
        classes = np.array([], dtype=str)
        probs = np.zeros((n, 0))
        mass = wp.reshape(n, n_particles).sum(1)
    return AncestryResult(classes=classes, probabilities=probs, cell_weights=cw, mass=mass)


# --------------------------------------------------------------------------- perturbation
@dataclass(frozen=True)
class PerturbationResult:
    """Change of fate after editing one gene in the start cells.

    Attributes
    ----------
    gene, mode, value
        The edited gene, ``"knockout"`` or ``"overexpress"``, and the level it was set to.
    classes
        ``(C,)`` fate classes.
    baseline, perturbed
        :class:`FateResult` without and with the edit (same particles' noise).
    displacement
        ``(n,)`` distance moved by each start cell in the representation by the edit.
    achieved
        Mean change of the gene after re-projection divided by the change asked for
        (1 when the gene lies in the span of the representation, below 1 otherwise).
    """

    gene: str
    mode: str
    value: float
    classes: np.ndarray
    baseline: FateResult
    perturbed: FateResult
    displacement: np.ndarray
    achieved: float

    @property
    def shift(self) -> np.ndarray:
        """``(C,)`` change of the population fate distribution (perturbed - baseline)."""
        return self.perturbed.distribution - self.baseline.distribution


def perturb_fate(
    model: DynamicsModel,
    x0: np.ndarray,
    t0: float,
    t1: float,
    x_ref: np.ndarray,
    labels_ref: Sequence[object] | np.ndarray,
    *,
    gene: str | int,
    mode: Literal["knockout", "overexpress"] = "knockout",
    value: float | None = None,
    n_particles: int = 10,
    n_neighbors: int = 15,
    method: Literal["ode", "sde"] = "sde",
    n_boot: int = 100,
    step_size: float | None = None,
    seed: int | None = 0,
) -> PerturbationResult:
    """In-silico knock-out or over-expression of ``gene``, and the change in fate.

    The start cells are mapped to genes (``x L^T + c``), ``gene`` is set to ``value``
    (default: 0 for a knock-out, the highest level among the start cells for an
    over-expression), and the cells are re-projected by least squares, which moves them
    by ``(value - gene) * P[:, gene]`` (a :class:`~chronotope.dynamics.NeuralGeneMap`:
    decoded, edited and encoded, see :meth:`~chronotope.dynamics.NeuralGeneMap.edit_gene`).
    Both the original and the edited cells are then
    pushed with the same noise (same ``seed``), so the shift is not simulation noise.

    Parameters
    ----------
    model
        A fitted model with a :class:`~chronotope.dynamics.GeneMap`.
    x0, t0, t1, x_ref, labels_ref
        As in :func:`fate_probabilities`.
    gene
        Gene name (in ``gene_map.var_names``) or index.
    mode
        ``"knockout"`` or ``"overexpress"``.
    value
        Level to set the gene to, in the units of the gene map.
    n_particles, n_neighbors, method, n_boot, step_size, seed
        As in :func:`fate_probabilities`.

    Returns
    -------
    PerturbationResult
    """
    gm = _require_gene_map(model)
    if mode not in ("knockout", "overexpress"):
        raise ChronotopeInputError(f"mode must be 'knockout' or 'overexpress', got {mode!r}.")
    x = model._points(x0)
    gi = _gene_index(gm, gene)
    if isinstance(gm, NeuralGeneMap):
        level = gm.gene_level(x, gi)
    else:
        level = x @ gm.loadings[gi] + (0.0 if gm.center is None else gm.center[gi])
    if value is None:
        value = 0.0 if mode == "knockout" else float(level.max())
    if not np.isfinite(value):
        raise ChronotopeInputError(f"value must be finite, got {value}.")
    delta = float(value) - level
    if isinstance(gm, NeuralGeneMap):
        x_new = gm.edit_gene(x, gi, float(value))
        moved = gm.gene_level(x_new, gi) - level
    else:
        col = _pinv(gm)[:, gi]
        x_new = x + delta[:, None] * col[None, :]
        moved = (x_new - x) @ gm.loadings[gi]
    asked = np.abs(delta).sum()
    achieved = float(np.abs(moved).sum() / asked) if asked > 0 else 1.0
    kw = {
        "n_particles": n_particles,
        "n_neighbors": n_neighbors,
        "method": method,
        "n_boot": n_boot,
        "step_size": step_size,
        "seed": seed,
    }
    base = fate_probabilities(model, x, t0, t1, x_ref, labels_ref, **kw)  # type: ignore[arg-type]
    pert = fate_probabilities(model, x_new, t0, t1, x_ref, labels_ref, **kw)  # type: ignore[arg-type]
    name = gm.var_names[gi] if gm.var_names is not None else str(gi)
    return PerturbationResult(
        gene=name,
        mode=mode,
        value=float(value),
        classes=base.classes,
        baseline=base,
        perturbed=pert,
        displacement=np.linalg.norm(x_new - x, axis=1),
        achieved=achieved,
    )


# --------------------------------------------------------------------------- Jacobians
def _grad_rows(
    model: DynamicsModel, x: np.ndarray, time: float | np.ndarray, what: str
) -> np.ndarray:
    """Cell-summed derivatives in standardised units: ``(d, d)`` for v, ``(d,)`` for g."""
    nets, _ = model._require_fit()
    dev = model.device
    dim = model._points(x).shape[1]
    acc = torch.zeros((dim, dim) if what == "v" else (dim,), dtype=torch.float64, device=dev)
    for _, z, tau in _chunks(model, x, time):
        with torch.enable_grad():
            z = z.requires_grad_(True)
            if what == "v":
                out = nets.v(z, tau)
                for i in range(dim):
                    (g,) = torch.autograd.grad(out[:, i].sum(), z, retain_graph=i < dim - 1)
                    acc[i] += g.sum(0).double()
            else:
                (g,) = torch.autograd.grad(nets.g(z, tau).sum(), z)
                acc += g.sum(0).double()
    return acc.cpu().numpy()


def mean_jacobian(model: DynamicsModel, x: np.ndarray, time: float | np.ndarray) -> np.ndarray:
    """Cell average of the velocity Jacobian ``J[i, k] = d v_i / d x_k``, ``(d, d)``.

    Parameters
    ----------
    model
        A fitted model.
    x
        ``(n, d)`` cells (representation units).
    time
        One time or ``(n,)`` times (each cell at its own time).

    Returns
    -------
    numpy.ndarray
        ``(d, d)`` in representation units (per unit time), by autograd of ``v``.
    """
    frame = model._require_frame()
    n = model._points(x).shape[0]
    if n == 0:
        raise ChronotopeInputError("no cells to average the Jacobian over.")
    # v_rep = v_net * scale / t_span and z = (x - shift) / scale: dv/dx = dv_net/dz / t_span
    return _grad_rows(model, x, time, "v") / (n * frame.t_span)


def _gene_subset(
    gm: GeneMap | NeuralGeneMap, genes: Sequence[str] | Sequence[int] | None) -> np.ndarray:
    if genes is None:
        return np.arange(gm.n_genes)
    idx = np.array([_gene_index(gm, g) for g in genes], dtype=np.int64)
    if idx.size == 0:
        raise ChronotopeInputError("genes is empty.")
    return idx


def gene_jacobian(
    model: DynamicsModel,
    jacobian: np.ndarray | None,
    *,
    genes: Sequence[str] | Sequence[int] | None = None,
    x: np.ndarray | None = None,
    time: float | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gene-space Jacobian ``L J P`` (``L J L^T`` for PCA loadings) on a set of genes.

    Parameters
    ----------
    model
        A model with a :class:`~chronotope.dynamics.GeneMap`.
    jacobian
        ``(d, d)`` cell-averaged Jacobian in the representation (:func:`mean_jacobian`).
        Not used with a :class:`~chronotope.dynamics.NeuralGeneMap` (pass ``None``).
    genes
        Names or indices of the genes to keep (default: all; the result is ``G x G``).
    x, time
        The cells and their times; required with a
        :class:`~chronotope.dynamics.NeuralGeneMap`, whose chain rule is per cell:
        ``mean_c (d u / d x)_c E_c`` restricted to ``genes``, with ``u = D v`` the
        gene-space velocity (``D_c J_c E_c`` plus the decoder's curvature along the flow).

    Returns
    -------
    idx
        ``(G',)`` indices of the genes in the gene map.
    j_gene
        ``(G', G')``, ``j_gene[a, b] = d v_a / d gene_b``.
    """
    gm = _require_gene_map(model)
    if isinstance(gm, NeuralGeneMap):
        if x is None or time is None:
            raise ChronotopeInputError("a NeuralGeneMap needs the cells: pass x= and time=.")
        idx = _gene_subset(gm, genes)
        n = model._points(x).shape[0]
        if n == 0:
            raise ChronotopeInputError("no cells to average the Jacobian over.")
        acc = np.zeros((idx.size, idx.size))
        for ju, ec in _gene_velocity_jacobians(model, gm, x, time):
            acc += torch.einsum("cgd,cdh->gh", ju[:, idx], ec[:, :, idx]).numpy()
        return idx, acc / n
    j = np.asarray(jacobian, dtype=np.float64)
    if j.shape != (gm.dim, gm.dim):
        raise ChronotopeInputError(f"jacobian must be {gm.dim} x {gm.dim}, got {j.shape}.")
    idx = _gene_subset(gm, genes)
    p = _pinv(gm)
    return idx, gm.loadings[idx] @ j @ p[:, idx]


@dataclass(frozen=True)
class GRNEdges:
    """Signed regulatory edges ``source -> target`` with weight ``J_gene[target, source]``."""

    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray


def grn_edges(
    j_gene: np.ndarray,
    names: Sequence[str],
    *,
    n_edges: int = 50,
    self_loops: bool = False,
) -> GRNEdges:
    """The ``n_edges`` largest ``|J_gene|`` entries as signed edges, strongest first."""
    j = np.asarray(j_gene, dtype=np.float64)
    names = np.asarray([str(v) for v in names])
    if j.ndim != 2 or j.shape[0] != j.shape[1] or j.shape[0] != names.shape[0]:
        raise ChronotopeInputError("j_gene must be square with one name per gene.")
    a = np.abs(j).copy()
    if not self_loops:
        np.fill_diagonal(a, -np.inf)
    k = int(min(n_edges, np.isfinite(a).sum()))
    flat = np.argsort(-a, axis=None, kind="stable")[:k]
    tgt, src = np.unravel_index(flat, j.shape)
    return GRNEdges(source=names[src], target=names[tgt], weight=j[tgt, src])


def growth_genes(
    model: DynamicsModel, x: np.ndarray, time: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cell-averaged gradient of the growth rate, in the representation and per gene.

    Returns
    -------
    grad_rep
        ``(d,)`` mean ``d g / d x`` (per unit time per representation unit).
    grad_genes
        ``(G,)`` mean ``d g / d gene`` (``grad_rep @ P``; ``L grad_rep`` for PCA loadings;
        ``mean_c grad_c E_c`` for a :class:`~chronotope.dynamics.NeuralGeneMap`).
    """
    gm = _require_gene_map(model)
    frame = model._require_frame()
    n = model._points(x).shape[0]
    if n == 0:
        raise ChronotopeInputError("no cells to average the growth gradient over.")
    if isinstance(gm, NeuralGeneMap):
        grad_rep = np.zeros(gm.dim)
        grad_genes = np.zeros(gm.n_genes)
        for rows, gc in _growth_gradients(model, x, time):
            xc = torch.as_tensor(np.asarray(x, dtype=np.float64)[rows])
            with torch.no_grad():
                ec = gm.encoder_jacobian(xc).double().cpu()
            gc = gc.double().cpu()
            grad_rep += gc.sum(0).numpy()
            grad_genes += torch.einsum("cd,cdg->g", gc, ec).numpy()
        return grad_rep / n, grad_genes / n
    # g_rep = g_net / t_span: dg/dx = dg_net/dz / (scale * t_span)
    grad = _grad_rows(model, x, time, "g") / (n * frame.scale * frame.t_span)
    return grad, grad @ _pinv(gm)


def time_correlated_genes(
    model: DynamicsModel,
    x0: np.ndarray,
    t0: float,
    t1: float,
    *,
    n_times: int = 20,
    method: Literal["ode", "sde"] = "ode",
    seed: int | None = 0,
) -> np.ndarray:
    """Pearson correlation of each gene with time along simulated trajectories.

    The samples are all (particle, time) pairs of :func:`trajectories`, weighted by
    particle mass. Genes are linear in ``x``, so the correlation comes from the ``d x d``
    covariance of the particles and their ``(d,)`` covariance with time, without
    forming a genes x samples matrix.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` correlations in ``[-1, 1]`` (0 for a gene that does not vary).
    """
    gm = _require_gene_map(model)
    res = trajectories(model, x0, t0, t1, n_times=n_times, method=method, seed=seed)
    k, n, d = res.x.shape
    xs = res.x.reshape(k * n, d)
    w = res.weights.reshape(-1)
    w = w / max(w.sum(), 1e-300)
    ts = np.repeat(res.times, n)
    if isinstance(gm, NeuralGeneMap):
        return _weighted_corr_decoded(gm, xs, w, ts)
    mx = w @ xs
    mt = float(w @ ts)
    xc = xs - mx
    cov_xt = (w * (ts - mt)) @ xc
    cov_xx = (xc * w[:, None]).T @ xc
    var_t = float(w @ (ts - mt) ** 2)
    num = gm.loadings @ cov_xt
    var_g = np.einsum("gi,ij,gj->g", gm.loadings, cov_xx, gm.loadings)
    den = np.sqrt(np.maximum(var_g, 0.0) * var_t)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 1e-12 * max(den.max(), 1e-300), num / den, 0.0)
    return np.clip(r, -1.0, 1.0)


def _weighted_corr_decoded(
    gm: NeuralGeneMap, xs: np.ndarray, w: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """Weighted Pearson correlation of decoded genes with time, accumulated in chunks."""
    mt = float(w @ ts)
    tc = ts - mt
    var_t = float(w @ tc**2)
    s1 = np.zeros(gm.n_genes)
    s2 = np.zeros(gm.n_genes)
    st = np.zeros(gm.n_genes)
    for s in range(0, xs.shape[0], 8192):
        g = gm.to_genes(xs[s : s + 8192])
        ws = w[s : s + 8192]
        s1 += ws @ g
        s2 += ws @ g**2
        st += (ws * tc[s : s + 8192]) @ g
    var_g = np.maximum(s2 - s1**2, 0.0)
    den = np.sqrt(var_g * var_t)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 1e-12 * max(den.max(), 1e-300), st / den, 0.0)
    return np.clip(r, -1.0, 1.0)


def embed_velocity(
    x: np.ndarray,
    velocity: np.ndarray,
    embedding: np.ndarray,
    *,
    n_neighbors: int = 30,
    kernel_scale: float = 10.0,
    chunk_size: int = 8192,
) -> np.ndarray:
    r"""Project velocities from the representation onto a 2-D (or any) embedding.

    For a view that is not a linear function of the representation (a UMAP or t-SNE of a
    PCA), the velocity has no exact image; the transition-kernel projection of scVelo
    (Bergen et al. 2020) and CellRank is used. For each cell :math:`i` and its
    ``n_neighbors`` nearest neighbours :math:`j` in the representation, the cosine
    :math:`c_{ij}` between :math:`v_i` and the displacement :math:`x_j - x_i` gives the
    transition probabilities :math:`\pi_{ij} \propto \exp(\kappa c_{ij})`; the embedded
    velocity is :math:`\sum_j \pi_{ij}\hat e_{ij} - \frac1k \sum_j \hat e_{ij}`, with
    :math:`\hat e_{ij}` the unit displacement in the embedding. The uniform term removes
    the drift that the neighbourhood's shape alone would give. The result is a direction
    field (its length is at most 2, larger where the velocity points consistently towards
    some neighbours); it is a visual read-out, not a quantity in the representation's units.

    Parameters
    ----------
    x
        ``(n, d)`` cells in the representation the velocity lives in.
    velocity
        ``(n, d)`` velocity of each cell in the representation.
    embedding
        ``(n, e)`` coordinates of the same cells in the view.
    n_neighbors
        Neighbours per cell (kNN in the representation; no ``n x n`` matrix).
    kernel_scale
        :math:`\kappa`; larger values concentrate the transitions on the neighbours the
        velocity points to (scVelo's default is 10).
    chunk_size
        Cells per chunk.

    Returns
    -------
    numpy.ndarray
        ``(n, e)`` velocity in the embedding.
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float64)
    v = np.asarray(velocity, dtype=np.float64)
    e = np.asarray(embedding, dtype=np.float64)
    if x.ndim != 2 or v.shape != x.shape:
        raise ChronotopeInputError(
            f"x {x.shape} and velocity {v.shape} must be 2-D arrays of the same shape."
        )
    if e.ndim != 2 or e.shape[0] != x.shape[0]:
        raise ChronotopeInputError(
            f"embedding must hold one row per cell ({x.shape[0]}), got shape {e.shape}."
        )
    if x.shape[0] < 2:
        raise ChronotopeInputError("embedding a velocity needs at least two cells.")
    if n_neighbors < 1:
        raise ChronotopeInputError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    if not (np.isfinite(x).all() and np.isfinite(v).all() and np.isfinite(e).all()):
        raise ChronotopeInputError("x, velocity and embedding must be finite.")
    k = min(n_neighbors, x.shape[0] - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    out = np.empty((x.shape[0], e.shape[1]))
    for s in range(0, x.shape[0], chunk_size):
        rows = np.arange(s, min(s + chunk_size, x.shape[0]))
        idx = nn.kneighbors(x[rows], return_distance=False)
        # drop each cell itself (or, among duplicates, the first hit) and keep k others
        own = idx == rows[:, None]
        drop = np.where(own.any(1), own.argmax(1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(rows.size), drop] = False
        idx = idx[keep].reshape(rows.size, k)
        dx = x[idx] - x[rows, None, :]
        vr = v[rows, None, :]
        den = np.linalg.norm(dx, axis=2) * np.linalg.norm(vr, axis=2)
        cos = np.where(den > 0, (dx * vr).sum(2) / np.maximum(den, 1e-300), 0.0)
        logit = kernel_scale * cos
        pi = np.exp(logit - logit.max(1, keepdims=True))
        pi /= pi.sum(1, keepdims=True)
        de = e[idx] - e[rows, None, :]
        nrm = np.linalg.norm(de, axis=2, keepdims=True)
        de = np.where(nrm > 0, de / np.maximum(nrm, 1e-300), 0.0)
        out[rows] = (pi[:, :, None] * de).sum(1) - de.mean(1)
    return out
