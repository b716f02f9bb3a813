r"""Velocity, growth and landscape from time-series snapshots, trained without simulation.

The population is modelled as a stochastic process with growth (regularised unbalanced
OT / Schrödinger bridge with mass):

.. math::

    dX = \big(v(X,t) + D\,\nabla\log p_t(X)\big)\,dt + \sigma\,dW, \qquad
    \frac{dw}{dt} = g(X,t)\,w, \qquad D = \sigma^2/2,

where :math:`v` is the probability-flow (ODE) velocity, :math:`\nabla \log p_t` the score
of the (mass-normalised) density, and :math:`w` the mass of a particle. Three networks
are learned, all taking ``(x, t)``:

* ``v``: the velocity;
* ``g``: the growth rate;
* ``U``: a scalar potential with score :math:`s = -\nabla_x U`, so the score field is
  curl-free by construction and :math:`U(x,t)` *is* the landscape
  (:math:`-\log p_t(x)` up to a constant in time).

**Training (simulation-free).** :func:`~chronotope.dynamics.snapshot_couplings` couples
consecutive snapshots once (unbalanced entropic OT with :math:`\varepsilon_k = 2\sigma^2
\Delta t_k`) and draws pairs :math:`(x_0, x_1)` from the plans. For a pair and
:math:`s \sim U(0,1)`, :math:`t = t_k + s\Delta t`, the Brownian bridge of :math:`\sigma\,dW`
pinned at both ends has

.. math::

    x_t = (1-s)x_0 + s x_1 + \sigma_t\,\xi,\quad \sigma_t^2 = \sigma^2 \Delta t\, s(1-s),
    \quad \xi \sim N(0, I),

conditional probability-flow velocity
:math:`u_t = (x_1 - x_0)/\Delta t + \frac{1-2s}{2 s(1-s)\Delta t}(x_t - \mu_t)` and
conditional score :math:`-\xi/\sigma_t`. The losses (SF2M, Tong et al. 2024) are

.. math::

    \|v(x_t,t) - u_t\|^2 + \lambda_s\|\sigma_t\, s(x_t,t) + \xi\|^2
    + \lambda_g\,(g(x_t,t) - g_i)^2,

with :math:`g_i` the growth target of the source cell (the log ratio of the mass the plan
sends from it to the mass it has, per unit time). Because the plan is the static
Schrödinger bridge for the same :math:`\sigma`, the marginals of the mixture of bridges
are those of the dynamic bridge (the entropic consistency :math:`\varepsilon = \sigma^2\Delta
t` for the cost :math:`\tfrac12|x-y|^2`).

Networks work in standardised units (cells centred, divided by one scalar scale; time
mapped to ``[0, 1]``); every public method takes and returns representation units and
real time.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import tempfile
import time as _time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from chronotope import _ddp
from chronotope._atomic import save_json, save_state_dict
from chronotope._errors import ChronotopeInputError
from chronotope._settings import resolve_device
from chronotope.dynamics._validate import MIN_CELLS, check_snapshots
from chronotope.dynamics.couplings import SnapshotCouplings, snapshot_couplings
from chronotope.dynamics.genemaps import NeuralGeneMap
from chronotope.dynamics.paths import SplineMeans, linear_mass_rate, path_mass_weight
from chronotope.parallel import Scheduler

__all__ = [
    "EXTRAPOLATE_MODES",
    "JACOBIAN_WEIGHTS",
    "DynamicsModel",
    "DynamicsParams",
    "GeneMap",
    "SimulationResult",
]

#: Continuations outside the training time range (``DynamicsModel.simulate``).
EXTRAPOLATE_MODES = ("landscape", "rest", "continue", "damped")
#: Weights of the Jacobian penalty that ``jacobian_weight="auto"`` tries.
JACOBIAN_WEIGHTS = (0.0, 0.03, 0.1, 0.3)

logger = logging.getLogger("chronotope")

_WEIGHTS = "weights.pt"
_CONFIG = "config.json"
_GENES = "gene_map.npz"
_FORMAT = 1
# Bridge times are drawn from [_S_MIN, 1 - _S_MIN]: the conditional velocity grows as
# 1/sqrt(s) at the ends.
_S_MIN = 1e-3
# start and target cells per time point of the in-sample score of jacobian_weight="auto"
_N_SELECT = 2000


@dataclass(frozen=True)
class DynamicsParams:
    """Hyperparameters of :class:`DynamicsModel`.

    Parameters
    ----------
    hidden
        Width of the hidden layers of each network.
    n_layers
        Hidden layers per network.
    n_steps
        Optimisation steps.
    batch_size
        Bridge samples per step (split evenly between the intervals).
    learning_rate
        Adam learning rate (cosine decay to 5 % of it over ``n_steps``).
    score_weight, growth_weight
        Weights of the score-matching and growth losses against flow matching.
    epsilon
        Entropic regularisation as a fraction of each interval's mean squared distance,
        used to set ``sigma`` when ``sigma`` is ``None``.
    sigma
        Diffusion coefficient in representation units per square root of time;
        ``epsilon_k = 2 sigma^2 dt_k``.
    tau_a, tau_b
        Unbalancedness of the couplings (source relaxed, target kept by default).
    growth_neighbors
        Neighbours of the regression that turns the other intervals' growth (by cell
        state) into a growth prior for each interval, which is then solved again around it
        (:func:`~chronotope.dynamics.couplings.snapshot_couplings`; two or more training
        intervals, no ``growth_prior``); ``None`` or 0: growth from each interval's own
        relaxed plan alone.
    coupling_batch_size
        Largest block (cells per side) of a coupling solve.
    n_rounds
        Random block splits per interval beyond ``coupling_batch_size`` cells.
    n_pairs
        Pairs drawn from each plan (``None``: ``max(20000, 4 max(n_k, n_{k+1}))``).
    min_cells
        Fewest cells a time point may have.
    seed
        Seed of the couplings, the weight initialisation and the training samples.
    paths
        Mean of the conditional (Brownian-bridge) paths: ``"spline"`` (default), a
        Catmull-Rom cubic through the pair and its chained neighbours in the adjacent
        plans (:mod:`chronotope.dynamics.paths`; the straight line when there are two
        time points); ``"linear"``, the straight line between the pair (the behaviour
        before the spline paths).
    growth_path
        How a conditional path's mass goes from its source cell's mass ``c`` to the mass
        ``r`` the plan sends from it: ``"linear"`` (default), ``m(s) = (1 - s) c + s r``,
        so the growth target at bridge time ``s`` is ``(rho - 1) / (dt (1 + s (rho - 1)))``
        with ``rho = r / c``; ``"exponential"``, a constant rate ``log(rho) / dt`` over the
        interval (the behaviour before). Both give the same mass at the interval's ends.
    path_weight
        Which measure the bridge losses average over at bridge time ``s``: ``"plan"``
        (default), the pairs as the plan draws them (each weighted by the mass ``r`` its
        source sends, i.e. the balanced flow from the plan's row sums to the target);
        ``"mass"``, each pair weighted by its path's mass at ``s`` over ``r``
        (``m(s) / r``, by ``growth_path``), the measure that weighted particles started
        from the observed source cells follow under the unbalanced continuity equation
        ``d_t mu + div(mu v) = g mu``. Velocity, score and growth losses are weighted
        alike; the two agree where growth is uniform.
    extrapolate
        The model's continuation outside the training times (the default of
        :meth:`DynamicsModel.simulate`): ``"auto"`` (default), chosen during ``fit`` by
        :func:`~chronotope.dynamics.extrapolation.backtest_extrapolation` among the
        others (the last training time point held out and predicted under each,
        ``"damped"`` at several relaxation times; one more, smaller fit that reuses the
        couplings; ``"landscape"`` with fewer than three time points); or one of them:
        ``"landscape"``, ``"rest"``, ``"continue"``, ``"damped"`` (the last fields'
        transport decays with relaxation time ``relaxation``, their growth goes on). Name
        one to skip the backtest when only the training time range matters.
    relaxation
        Relaxation time of ``extrapolate="damped"``, in units of the training interval at
        that end (the last one forward, the first one backward): past the end the
        velocity of the end is multiplied by ``exp(-d / (relaxation * dt))`` at distance
        ``d`` from it; the growth rates of the end go on acting (``damped_growth``).
        Large values approach ``"continue"``, small ones ``"landscape"`` with growth.
    damped_growth
        Whether the growth rates of the end act in ``"damped"`` (default) or growth
        stops there; with ``"auto"`` the backtest chooses, by the total mass it predicts
        for the held-out time point against the masses.
    jacobian_weight
        Weight of a penalty on the squared Frobenius norm of the velocity's Jacobian
        ``||dv/dz||_F^2`` at the bridge samples (a Hutchinson estimate, as in RNODE, Finlay
        et al. 2020), in the model's normalised units. 0 (default): none. A smoother field
        carries errors less far when cells are pushed through many intervals. It also holds
        back flows that really expand or split fast. ``docs/dynamics.md`` (*Session 18*)
        shows where it helps and where it hurts. ``"auto"``: train once at each weight of
        ``JACOBIAN_WEIGHTS`` on the same couplings and keep the one whose push of the
        first time point's cells (SDE) is closest to the training snapshots (mean
        Sinkhorn divergence over the later time points; the training data only, no
        held-out point). Costs one training per weight.
    """

    hidden: int = 128
    n_layers: int = 3
    n_steps: int = 3000
    batch_size: int = 512
    learning_rate: float = 1e-3
    score_weight: float = 1.0
    growth_weight: float = 1.0
    epsilon: float = 0.01
    sigma: float | None = None
    tau_a: float = 0.998
    tau_b: float = 1.0
    growth_neighbors: int | None = 50
    coupling_batch_size: int = 4096
    n_rounds: int = 1
    n_pairs: int | None = None
    min_cells: int = MIN_CELLS
    seed: int = 0
    paths: str = "spline"
    growth_path: str = "linear"
    path_weight: str = "plan"
    extrapolate: str = "auto"
    relaxation: float = 1.0
    damped_growth: bool = True
    jacobian_weight: float | str = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.relaxation < math.inf):
            raise ChronotopeInputError(
                f"relaxation must be a positive finite number, got {self.relaxation}."
            )
        if self.extrapolate not in (*EXTRAPOLATE_MODES, "auto"):
            raise ChronotopeInputError(
                f"extrapolate must be one of {', '.join(EXTRAPOLATE_MODES)} or auto, got "
                f"{self.extrapolate!r}."
            )
        if self.growth_path not in ("linear", "exponential"):
            raise ChronotopeInputError(
                f"growth_path must be 'linear' or 'exponential', got {self.growth_path!r}."
            )
        if self.path_weight not in ("plan", "mass"):
            raise ChronotopeInputError(
                f"path_weight must be 'plan' or 'mass', got {self.path_weight!r}."
            )
        if self.paths not in ("spline", "linear"):
            raise ChronotopeInputError(f"paths must be 'spline' or 'linear', got {self.paths!r}.")
        for name in ("hidden", "n_layers", "n_steps", "batch_size", "n_rounds"):
            if int(getattr(self, name)) < 1:
                raise ChronotopeInputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("learning_rate", "epsilon"):
            if not getattr(self, name) > 0:
                raise ChronotopeInputError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.score_weight < 0 or self.growth_weight < 0:
            raise ChronotopeInputError("score_weight and growth_weight must be >= 0.")
        jw = self.jacobian_weight
        number = isinstance(jw, numbers.Real) and not isinstance(jw, bool)
        if not (jw == "auto" if isinstance(jw, str) else number and 0 <= jw < math.inf):
            raise ChronotopeInputError(
                f"jacobian_weight must be a finite number >= 0 or 'auto', got {jw!r}."
            )
        if self.sigma is not None and not self.sigma > 0:
            raise ChronotopeInputError(f"sigma must be > 0, got {self.sigma}.")
        if self.growth_neighbors is not None and int(self.growth_neighbors) < 0:
            raise ChronotopeInputError(
                f"growth_neighbors must be >= 0 (or None), got {self.growth_neighbors}."
            )


@dataclass(frozen=True)
class GeneMap:
    """Linear map between the representation and genes: ``genes = x @ loadings.T + center``.

    Parameters
    ----------
    loadings
        ``(n_genes, d)``, e.g. ``adata.varm["PCs"]``.
    center
        ``(n_genes,)`` gene means removed before the projection (``None``: zeros).
    var_names
        Gene names, ``n_genes`` of them.
    """

    loadings: np.ndarray
    center: np.ndarray | None = None
    var_names: list[str] | None = None

    def __post_init__(self) -> None:
        w = np.asarray(self.loadings, dtype=np.float64)
        if w.ndim != 2 or not np.isfinite(w).all():
            raise ChronotopeInputError("loadings must be a finite 2-D array (genes x d).")
        object.__setattr__(self, "loadings", w)
        if self.center is not None:
            c = np.asarray(self.center, dtype=np.float64).ravel()
            if c.shape[0] != w.shape[0]:
                raise ChronotopeInputError(
                    f"center has {c.shape[0]} genes but loadings have {w.shape[0]}."
                )
            object.__setattr__(self, "center", c)
        if self.var_names is not None:
            names = [str(v) for v in self.var_names]
            if len(names) != w.shape[0]:
                raise ChronotopeInputError(
                    f"{len(names)} var_names for {w.shape[0]} rows of loadings."
                )
            object.__setattr__(self, "var_names", names)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self.loadings.shape[0]

    @property
    def dim(self) -> int:
        """Dimension of the representation."""
        return self.loadings.shape[1]

    def to_genes(self, x: np.ndarray) -> np.ndarray:
        """Map ``(n, d)`` points to ``(n, n_genes)`` expression."""
        out = np.asarray(x, dtype=np.float64) @ self.loadings.T
        return out if self.center is None else out + self.center

    def to_rep(self, genes: np.ndarray) -> np.ndarray:
        """Project ``(n, n_genes)`` expression to the representation (least squares)."""
        g = np.asarray(genes, dtype=np.float64)
        if self.center is not None:
            g = g - self.center
        return np.linalg.lstsq(self.loadings, g.T, rcond=None)[0].T

    def vectors_to_genes(self, v: np.ndarray) -> np.ndarray:
        """Map tangent vectors (velocities) ``(n, d)`` to genes (no centre)."""
        return np.asarray(v, dtype=np.float64) @ self.loadings.T


@dataclass(frozen=True)
class SimulationResult:
    """Weighted particles at the requested times.

    Attributes
    ----------
    times
        ``(k,)`` times, in the direction of the simulation.
    x
        ``(k, n, d)`` particle positions in the representation.
    weights
        ``(k, n)`` particle masses (growth applied along each path).
    """

    times: np.ndarray
    x: np.ndarray
    weights: np.ndarray

    @property
    def final(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions and masses at the last time."""
        return self.x[-1], self.weights[-1]


def _named_masses(
    masses: np.ndarray | list[float] | str | None, n_times: int
) -> np.ndarray | list[float] | None:
    """``"counts"`` -> ``None`` (the counts), ``"equal"`` -> ones; numbers pass through."""
    if isinstance(masses, str):
        if masses == "counts":
            return None
        if masses == "equal":
            return [1.0] * n_times
        raise ChronotopeInputError(
            f"masses must be 'counts', 'equal' or one number per time point, got {masses!r}."
        )
    return masses


def _mlp(d_in: int, d_out: int, hidden: int, n_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


class _Networks(nn.Module):
    """Velocity, growth and potential networks on ``(z, tau)`` (standardised units)."""

    def __init__(self, dim: int, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.velocity = _mlp(dim + 1, dim, hidden, n_layers)
        self.growth = _mlp(dim + 1, 1, hidden, n_layers)
        self.potential = _mlp(dim + 1, 1, hidden, n_layers)

    @staticmethod
    def _cat(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, tau.expand(z.shape[0], 1)], 1)

    def v(self, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.velocity(self._cat(z, tau))

    def g(self, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.growth(self._cat(z, tau))[:, 0]

    def u(self, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.potential(self._cat(z, tau))[:, 0]

    def score(
        self, z: torch.Tensor, tau: torch.Tensor, *, create_graph: bool = False
    ) -> torch.Tensor:
        """``-grad_z U``; works under ``no_grad`` too."""
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            pot = self.u(zz, tau)
            (grad,) = torch.autograd.grad(pot.sum(), zz, create_graph=create_graph)
        return -grad


@dataclass
class _Frame:
    """Standardisation: ``z = (x - shift) / scale``, ``tau = (t - t_min) / t_span``."""

    shift: np.ndarray
    scale: float
    t_min: float
    t_span: float

    def z(self, x: np.ndarray) -> np.ndarray:
        return (x - self.shift) / self.scale

    def x(self, z: np.ndarray) -> np.ndarray:
        return z * self.scale + self.shift

    def tau(self, t: float) -> float:
        return (t - self.t_min) / self.t_span


def _mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values``, or of ``values * weight`` (weights of mean 1 over the batch)."""
    return values.mean() if weight is None else (values * weight).mean()


def _clamp_tau(tau: float) -> float:
    """Network time input, held at the ends of the training range ``[0, 1]``.

    Outside the time range it was trained on, a network's time input is an
    extrapolation with no data behind it; the fields there are those at the nearest
    training end (the last interval's drift and growth continue).
    """
    return min(max(tau, 0.0), 1.0)


@dataclass
class _History:
    loss: list[float] = field(default_factory=list)
    flow: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    growth: list[float] = field(default_factory=list)


class DynamicsModel:
    """Velocity, growth and potential (landscape) learned from time-series snapshots.

    Parameters
    ----------
    params
        Hyperparameters; keyword arguments override single fields
        (``DynamicsModel(n_steps=1000)``).
    use_rep
        Name of the representation the model works in (an ``obsm`` key or ``"X"``);
        recorded and checked on :meth:`load`.
    gene_map
        Optional map back to genes: a linear :class:`GeneMap` (e.g. PCA loadings) or a
        user-supplied non-linear :class:`~chronotope.dynamics.NeuralGeneMap` (decoder,
        optional encoder).
    time_key
        Name of the time column the model was trained on (``obs`` key), recorded for
        readers of the saved model (e.g. the CLI's ``predict``).
    device
        Torch device for training and simulation (``None``: CUDA if available).
    **overrides
        Fields of :class:`DynamicsParams`.

    Examples
    --------
    >>> model = DynamicsModel(use_rep="X_pca").fit(x, time)
    >>> res = model.simulate(x[time == 0], 0.0, 2.0, method="sde", seed=0)
    >>> x2, w2 = res.final
    """

    def __init__(
        self,
        params: DynamicsParams | None = None,
        *,
        use_rep: str = "X",
        gene_map: GeneMap | NeuralGeneMap | None = None,
        time_key: str | None = None,
        device: str | torch.device | None = "cpu",
        **overrides: object,
    ) -> None:
        base = params or DynamicsParams()
        self.params = DynamicsParams(**{**asdict(base), **overrides}) if overrides else base
        self.use_rep = str(use_rep)
        self.gene_map = gene_map
        self.time_key = time_key
        self.device = resolve_device(device)
        self.networks: _Networks | None = None
        self.dim: int | None = None
        self.sigma_: float | None = None
        self.times_: np.ndarray | None = None
        self.masses_: np.ndarray | None = None
        self.couplings_: SnapshotCouplings | None = None
        self.history_: dict[str, np.ndarray] = {}
        self.timings_: dict[str, float] = {}
        self.extrapolate_: str = "landscape"
        self.relaxation_: float = self.params.relaxation
        self.damped_growth_: bool = self.params.damped_growth
        self.extrapolation_scores_: dict[str, float] = {}
        self.jacobian_weight_: float = 0.0
        self.jacobian_scores_: dict[str, float] = {}
        self._frame: _Frame | None = None

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        x: np.ndarray,
        time: np.ndarray,
        *,
        masses: np.ndarray | list[float] | Literal["counts", "equal"] | None = None,
        growth_prior: np.ndarray | None = None,
        progress: bool = False,
        scheduler: Scheduler = None,
        couplings: SnapshotCouplings | None = None,
    ) -> DynamicsModel:
        """Couple consecutive snapshots and train the three networks.

        Parameters
        ----------
        x
            ``(n, d)`` cells in the representation ``use_rep``.
        time
            ``(n,)`` numeric time of each cell.
        masses
            Relative population size per time point. ``None`` or ``"counts"`` (default):
            the cell counts. ``"equal"``: the same at every time point, for counts that
            are numbers of cells measured rather than population sizes (the fit warns
            when the counts swing down and up).
        growth_prior
            ``(n,)`` prior growth rate per cell (see
            :func:`~chronotope.dynamics.snapshot_couplings`).
        progress
            Show a progress bar over the optimisation steps.
        scheduler
            Where the per-interval couplings are solved: ``None`` (in-process),
            ``"local:N"``, a Dask scheduler address or a ``distributed.Client`` (see
            :func:`~chronotope.dynamics.snapshot_couplings`); training stays here.
        couplings
            Couplings of these cells solved before (by
            :func:`~chronotope.dynamics.snapshot_couplings` with this model's parameters,
            or :meth:`SnapshotCouplings.drop_last`), used instead of solving them again;
            ``masses``, ``growth_prior`` and ``scheduler`` then play no part in them.

        Returns
        -------
        DynamicsModel
            ``self``, fitted.
        """
        p = self.params
        x, t, times = check_snapshots(
            x, time, min_cells=p.min_cells, name=f"representation {self.use_rep!r}"
        )
        if self.gene_map is not None and self.gene_map.dim != x.shape[1]:
            raise ChronotopeInputError(
                f"gene_map has {self.gene_map.dim} components but {self.use_rep!r} has "
                f"{x.shape[1]} dimensions."
            )
        masses = _named_masses(masses, times.size)
        tic = _time.perf_counter()
        if couplings is not None:
            if couplings.growth.shape != t.shape or not np.array_equal(couplings.times, times):
                raise ChronotopeInputError(
                    f"couplings are of {couplings.growth.size} cells at times "
                    f"{list(couplings.times)}, not of these {t.size} cells at {list(times)}."
                )
            cpl = couplings
        else:
            cpl = snapshot_couplings(
                x,
                t,
                masses=masses,
                growth_prior=growth_prior,
                epsilon=p.epsilon,
                sigma=p.sigma,
                tau_a=p.tau_a,
                tau_b=p.tau_b,
                growth_neighbors=p.growth_neighbors,
                batch_size=p.coupling_batch_size,
                n_rounds=p.n_rounds,
                n_pairs=p.n_pairs,
                min_cells=p.min_cells,
                seed=p.seed,
                device=self.device,
                scheduler=scheduler,
            )
        self.timings_ = {"couplings": _time.perf_counter() - tic}
        tic = _time.perf_counter()
        shift = x.mean(0)
        scale = float(np.sqrt(((x - shift) ** 2).sum(1).mean() / x.shape[1])) or 1.0
        frame = _Frame(shift, scale, float(times[0]), float(times[-1] - times[0]))
        self._frame, self.dim = frame, x.shape[1]
        self.sigma_, self.times_, self.masses_ = cpl.sigma, times, cpl.masses
        self.couplings_ = cpl
        if p.jacobian_weight == "auto":
            self._choose_jacobian_weight(frame.z(x), x, t, times, cpl, progress)
        else:
            self.jacobian_weight_, self.jacobian_scores_ = float(p.jacobian_weight), {}
            self._train(frame.z(x), cpl, progress, self.jacobian_weight_)
        self.timings_["training"] = _time.perf_counter() - tic
        self._choose_extrapolation(x, t, times, masses, growth_prior, scheduler, progress)
        return self

    def _choose_jacobian_weight(
        self,
        z: np.ndarray,
        x: np.ndarray,
        t: np.ndarray,
        times: np.ndarray,
        cpl: SnapshotCouplings,
        progress: bool,
    ) -> None:
        """Train at each of ``JACOBIAN_WEIGHTS``; keep the best in-sample chained push."""
        from chronotope.dynamics.extrapolation import divergence_w1

        p = self.params
        rng = np.random.default_rng(p.seed)

        def sub(cells: np.ndarray) -> np.ndarray:
            n = min(_N_SELECT, cells.shape[0])
            return cells[np.sort(rng.choice(cells.shape[0], n, replace=False))]

        start = sub(x[t == times[0]])
        targets = [sub(x[t == tk]) for tk in times[1:]]
        scores: dict[str, float] = {}
        best: tuple[float, float, _Networks, dict[str, np.ndarray]] | None = None
        for lam in JACOBIAN_WEIGHTS:
            self._train(z, cpl, progress, lam)
            res = self.simulate(
                start,
                float(times[0]),
                float(times[-1]),
                method="sde",
                t_eval=times[1:],
                seed=p.seed,
                extrapolate="landscape",
            )
            score = float(
                np.mean(
                    [
                        divergence_w1(xp, y, wp, device=self.device)
                        for xp, wp, y in zip(res.x, res.weights, targets, strict=True)
                    ]
                )
            )
            scores[f"{lam:g}"] = score
            if best is None or score < best[1]:
                assert self.networks is not None
                best = (lam, score, self.networks, self.history_)
        assert best is not None
        self.jacobian_weight_, _, self.networks, self.history_ = best
        self.jacobian_scores_ = scores
        logger.info(
            "jacobian_weight='auto' (in-sample push of t=%g to the training time points): "
            "%s -> %g",
            times[0],
            ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
            self.jacobian_weight_,
        )

    def _choose_extrapolation(
        self,
        x: np.ndarray,
        t: np.ndarray,
        times: np.ndarray,
        masses: np.ndarray | list[float] | None,
        growth_prior: np.ndarray | None,
        scheduler: Scheduler,
        progress: bool = False,
    ) -> None:
        self.extrapolation_scores_ = {}
        self.relaxation_ = self.params.relaxation
        self.damped_growth_ = self.params.damped_growth
        if self.params.extrapolate != "auto":
            self.extrapolate_ = self.params.extrapolate
            return
        if times.size < 3:
            # the default: a note, not a warning, for every fit on two time points
            logger.info(
                "extrapolate='auto' needs three or more time points to backtest; "
                "using 'landscape'."
            )
            self.extrapolate_ = "landscape"
            return
        from chronotope.dynamics.extrapolation import backtest_extrapolation

        bt = backtest_extrapolation(
            x,
            t,
            params=replace(self.params, jacobian_weight=self.jacobian_weight_),
            masses=masses,
            growth_prior=growth_prior,
            device=self.device,
            scheduler=scheduler,
            couplings=self.couplings_,
            progress=progress,
        )
        self.extrapolate_ = bt.choice
        if bt.relaxation is not None:
            self.relaxation_ = bt.relaxation
        if bt.damped_growth is not None:
            self.damped_growth_ = bt.damped_growth
        self.extrapolation_scores_ = dict(bt.scores)
        self.timings_["extrapolation_backtest"] = bt.seconds

    def _train(
        self, z_np: np.ndarray, cpl: SnapshotCouplings, progress: bool, jacobian_weight: float
    ) -> None:
        p, frame, dev = self.params, self._require_frame(), self.device
        lam = float(jacobian_weight)
        dim = z_np.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            nets = _Networks(dim, p.hidden, p.n_layers).to(dev)
        gen = torch.Generator(device="cpu").manual_seed(p.seed + 1)
        z_all = torch.as_tensor(z_np, dtype=torch.float32, device=dev)
        g_all = torch.as_tensor(
            np.nan_to_num(cpl.growth) * frame.t_span, dtype=torch.float32, device=dev
        )
        sig_z = cpl.sigma * math.sqrt(frame.t_span) / frame.scale
        pools = [torch.as_tensor(iv.pairs, device=dev) for iv in cpl.intervals]
        tau0 = torch.tensor(
            [frame.tau(iv.t0) for iv in cpl.intervals], dtype=torch.float32, device=dev
        )
        dtau = torch.tensor(
            [iv.dt / frame.t_span for iv in cpl.intervals], dtype=torch.float32, device=dev
        )
        n_int = len(pools)
        per = max(1, p.batch_size // n_int)
        # torch.distributed (torchrun): all processes draw the same global batch, each
        # trains on its rows of it and the gradients are summed (see chronotope._ddp)
        rank, world = _ddp.world()
        rows, frac = None, 1.0
        if world > 1:
            _ddp.broadcast_module(nets)
            mine = _ddp.shard(np.arange(n_int * per), rank, world)
            rows, frac = torch.as_tensor(mine, device=dev), len(mine) / (n_int * per)
        opt = torch.optim.Adam(nets.parameters(), lr=p.learning_rate)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=p.n_steps, eta_min=0.05 * p.learning_rate
        )
        hist = _History()
        which_all = torch.arange(n_int, device=dev).repeat_interleave(per)
        which = which_all if rows is None else which_all[rows]
        spline = SplineMeans(pools, tau0, dtau) if p.paths == "spline" and n_int > 1 else None
        bar = tqdm(range(p.n_steps), desc="dynamics", disable=not progress or rank > 0, leave=False)
        for _ in bar:
            idx = torch.cat(
                [
                    pool[torch.randint(pool.shape[0], (per,), generator=gen).to(dev)]
                    for pool in pools
                ]
            )
            z0, z1 = z_all[idx[:, 0]], z_all[idx[:, 1]]
            s = (torch.rand(idx.shape[0], 1, generator=gen) * (1 - 2 * _S_MIN) + _S_MIN).to(dev)
            xi = torch.randn(z0.shape, generator=gen).to(dev)
            # probe of the Jacobian penalty, drawn for the global batch (none without it:
            # the default draws stay as they were)
            probe = (
                torch.randn(z0.shape, generator=gen).to(dev) if lam > 0 else None
            )
            # path means on the whole global batch (the spline draws from ``gen``: every
            # process draws the same numbers), then this process's share of it
            mu, dmu = ((1 - s) * z0 + s * z1, (z1 - z0) / dtau[which_all][:, None])
            if spline is not None:
                mu, dmu = spline.mean(z_all, idx, which_all, s, gen)
            w = None
            if p.path_weight == "mass":  # normalised over the global batch
                w = path_mass_weight(
                    g_all[idx[:, 0]], s[:, 0], dtau[which_all], p.growth_path
                )
                w = w / w.mean()
            if rows is not None:  # this process's share of the global batch
                idx, z0, z1, s, xi = idx[rows], z0[rows], z1[rows], s[rows], xi[rows]
                probe = None if probe is None else probe[rows]
                mu, dmu = mu[rows], dmu[rows]
                w = None if w is None else w[rows]
            dt = dtau[which][:, None]
            std = sig_z * torch.sqrt(s * (1 - s) * dt)
            zt = mu + std * xi
            tau = tau0[which][:, None] + s * dt
            target_v = dmu + sig_z * (1 - 2 * s) / (2 * torch.sqrt(s * (1 - s) * dt)) * xi
            inp = torch.cat([zt, tau], 1).requires_grad_(
                p.score_weight > 0 or lam > 0
            )
            v_pred = nets.velocity(inp)
            loss_v = _mean(((v_pred - target_v) ** 2).sum(1), w)
            loss = loss_v
            if probe is not None:
                # Hutchinson: E ||eps^T dv/dz||^2 = ||dv/dz||_F^2 for eps ~ N(0, I)
                (vjp,) = torch.autograd.grad((v_pred * probe).sum(), inp, create_graph=True)
                loss = loss + lam * _mean((vjp[:, :dim] ** 2).sum(1), w)
            loss_s = torch.zeros((), device=dev)
            if p.score_weight > 0:
                pot = nets.potential(inp)[:, 0]
                (grad,) = torch.autograd.grad(pot.sum(), inp, create_graph=True)
                loss_s = _mean(((std * (-grad[:, :dim]) + xi) ** 2).sum(1), w)
                loss = loss + p.score_weight * loss_s
            g_target = g_all[idx[:, 0]]
            if p.growth_path == "linear":
                g_target = linear_mass_rate(g_target, s[:, 0], dt[:, 0])
            loss_g = _mean((nets.growth(inp.detach())[:, 0] - g_target) ** 2, w)
            loss = loss + p.growth_weight * loss_g
            opt.zero_grad(set_to_none=True)
            if rows is None:
                loss.backward()
            else:
                (loss * frac).backward()
                _ddp.all_reduce_grads(nets.parameters())
            opt.step()
            sched.step()
            parts = [float(v.detach()) for v in (loss, loss_v, loss_s, loss_g)]
            if rows is not None:
                parts = list(_ddp.all_reduce_sum(np.asarray(parts) * frac, dev))
            hist.loss.append(parts[0])
            hist.flow.append(parts[1])
            hist.score.append(parts[2])
            hist.growth.append(parts[3])
        nets.eval()
        self.networks = nets
        self.history_ = {k: np.asarray(v) for k, v in asdict(hist).items()}

    # ------------------------------------------------------------------ fields
    def _require_frame(self) -> _Frame:
        if self._frame is None:
            raise RuntimeError("the model is not fitted; call fit() or DynamicsModel.load().")
        return self._frame

    def _require_fit(self) -> tuple[_Networks, _Frame]:
        frame = self._require_frame()
        if self.networks is None:
            raise RuntimeError("the model is not fitted; call fit() or DynamicsModel.load().")
        return self.networks, frame

    def _points(self, x: np.ndarray) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ChronotopeInputError(
                f"points must have shape (n, {self.dim}) in representation {self.use_rep!r}, "
                f"got {tuple(arr.shape)}."
            )
        if not np.isfinite(arr).all():
            raise ChronotopeInputError("points contain NaN or infinite values.")
        return arr

    def _field(self, x: np.ndarray, t: float, what: str, chunk: int = 65536) -> np.ndarray:
        nets, frame = self._require_fit()
        z = torch.as_tensor(frame.z(self._points(x)), dtype=torch.float32, device=self.device)
        tau = torch.tensor(
            [[_clamp_tau(frame.tau(float(t)))]], dtype=torch.float32, device=self.device
        )
        outs = []
        for start in range(0, z.shape[0], chunk):
            zb = z[start : start + chunk]
            with torch.no_grad():
                if what == "v":
                    o = nets.v(zb, tau) * (frame.scale / frame.t_span)
                elif what == "g":
                    o = nets.g(zb, tau) / frame.t_span
                elif what == "u":
                    o = nets.u(zb, tau)
                else:
                    o = nets.score(zb, tau) / frame.scale
            outs.append(o.cpu().numpy().astype(np.float64))
        return np.concatenate(outs)

    @property
    def continuation(self) -> str:
        """The model's own continuation past its data, e.g. ``"damped(0.25, no growth)"``."""
        if self.extrapolate_ != "damped":
            return self.extrapolate_
        return f"damped({self.relaxation_:g}{'' if self.damped_growth_ else ', no growth'})"

    def velocity(self, x: np.ndarray, t: float) -> np.ndarray:
        """Probability-flow velocity ``v(x, t)``, ``(n, d)``, representation units per time."""
        return self._field(x, t, "v")

    def growth(self, x: np.ndarray, t: float) -> np.ndarray:
        """Growth rate ``g(x, t)`` per unit time, ``(n,)``."""
        return self._field(x, t, "g")

    def score(self, x: np.ndarray, t: float) -> np.ndarray:
        """Score ``grad log p_t(x) = -grad U(x, t)``, ``(n, d)``."""
        return self._field(x, t, "s")

    def potential(self, x: np.ndarray, t: float) -> np.ndarray:
        """Landscape ``U(x, t)`` (``-log p_t(x)`` up to a constant in ``x``), ``(n,)``."""
        return self._field(x, t, "u")

    def drift(self, x: np.ndarray, t: float) -> np.ndarray:
        """Full SDE drift ``v + D * score`` with ``D = sigma^2 / 2``, ``(n, d)``."""
        return self.velocity(x, t) + 0.5 * float(self.sigma_ or 0.0) ** 2 * self.score(x, t)

    # ------------------------------------------------------------------ simulation
    def simulate(
        self,
        x0: np.ndarray,
        t0: float,
        t1: float,
        *,
        method: Literal["ode", "sde"] = "ode",
        weights: np.ndarray | None = None,
        t_eval: np.ndarray | list[float] | None = None,
        step_size: float | None = None,
        seed: int | None = 0,
        extrapolate: Literal["landscape", "rest", "continue", "damped"] | None = None,
        relaxation: float | None = None,
        damped_growth: bool | None = None,
    ) -> SimulationResult:
        """Push weighted particles from ``t0`` to ``t1`` (backward when ``t1 < t0``).

        Parameters
        ----------
        x0
            ``(n, d)`` start positions in the representation.
        t0, t1
            Start and end times (real units). ``t1 < t0`` runs backward in time:
            the ODE integrates ``-v``, the SDE is the reverse-time SDE (drift
            ``-v + D * score``), and masses are divided by their growth (ancestry).
        method
            ``"ode"``: probability flow, RK4 (deterministic). ``"sde"``:
            Euler-Maruyama with drift ``v + D * score`` and noise ``sigma dW``.
        weights
            ``(n,)`` start masses; default ``1 / n`` each, so that the total mass at
            ``t1`` estimates the population size relative to ``t0``.
        t_eval
            Times at which to record the particles (between ``t0`` and ``t1``);
            default ``[t0, t1]``.
        step_size
            Integration step in real time; default 1/100 of the training time span.
        seed
            Seed of the SDE noise.
        extrapolate
            What happens outside the training time range (past the last or before the
            first training time), where no snapshot constrains the dynamics; growth is
            zero in the first two modes. ``None`` (default): the model's own,
            ``extrapolate_`` (``DynamicsParams.extrapolate``, or the winner of the
            backtest with ``"auto"``). ``"landscape"``: the landscape is
            frozen at the nearest training end and cells stop being transported
            (``v = 0``) but keep diffusing in it: the SDE is the Langevin dynamics
            ``dX = D * score(X, t_end) dt + sigma dW``, for which ``p_{t_end}`` is
            stationary, and the ODE (its probability flow) leaves particles in place.
            ``"rest"``: zero drift, diffusion only (the reference process of the
            regularised unbalanced OT problem, its least-action solution without an end
            constraint; cells spread without bound); the ODE then moves by ``-D *
            score``. ``"continue"``: the fields at the nearest training end go on
            acting (drift and growth of the last interval). ``"damped"``: the same
            fields with the transport decaying, ``v`` times ``exp(-d / (relaxation *
            dt))`` at distance ``d`` past the end (``dt`` the training interval at that
            end), the score and the growth rates of the end acting undamped (a damped
            trend: cells slow down and settle, and the states they settle in keep
            their division and death rates; ``"continue"`` as the relaxation grows,
            ``"landscape"`` with growth as it goes to 0). ``docs/dynamics.md`` compares them.
        relaxation
            Relaxation time of ``"damped"`` in units of the end interval; default the
            model's own (``relaxation_``: ``DynamicsParams.relaxation``, or the backtest's
            choice with ``"auto"``).
        damped_growth
            Whether the end's growth rates act in ``"damped"``; default the model's own
            (``damped_growth_``).

        Returns
        -------
        SimulationResult
        """
        nets, frame = self._require_fit()
        if method not in ("ode", "sde"):
            raise ChronotopeInputError(f"method must be 'ode' or 'sde', got {method!r}.")
        if extrapolate is None:
            extrapolate = self.extrapolate_  # type: ignore[assignment]
        if extrapolate not in EXTRAPOLATE_MODES:
            raise ChronotopeInputError(
                f"extrapolate must be one of {', '.join(EXTRAPOLATE_MODES)}, got {extrapolate!r}."
            )
        relax = self.relaxation_ if relaxation is None else float(relaxation)
        if not (0 < relax < math.inf):
            raise ChronotopeInputError(f"relaxation must be a positive finite number, got {relax}.")
        x = self._points(x0)
        n = x.shape[0]
        if weights is None:
            w = np.full(n, 1.0 / n)
        else:
            w = np.asarray(weights, dtype=np.float64).ravel()
            if w.shape[0] != n or not np.isfinite(w).all() or (w < 0).any():
                raise ChronotopeInputError(f"weights must be {n} finite non-negative values.")
        t0, t1 = float(t0), float(t1)
        grid = np.array([t0, t1]) if t_eval is None else np.asarray(t_eval, dtype=np.float64)
        lo, hi = min(t0, t1), max(t0, t1)
        if grid.ndim != 1 or ((grid < lo - 1e-12) | (grid > hi + 1e-12)).any():
            raise ChronotopeInputError(f"t_eval must lie between t0={t0} and t1={t1}.")
        grid = np.sort(grid) if t1 >= t0 else np.sort(grid)[::-1]
        h_real = step_size if step_size is not None else frame.t_span / 100.0
        if not h_real > 0:
            raise ChronotopeInputError(f"step_size must be > 0, got {step_size}.")
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        dev = self.device
        z = torch.as_tensor(frame.z(x), dtype=torch.float32, device=dev)
        logw = torch.as_tensor(np.log(np.maximum(w, 1e-300)), dtype=torch.float64, device=dev)
        zero = torch.as_tensor(w == 0, device=dev)
        diff_z = 0.5 * (float(self.sigma_) * math.sqrt(frame.t_span) / frame.scale) ** 2
        sig_z = math.sqrt(2.0 * diff_z)
        xs, ws, t_now = [], [], t0
        t_lo, t_hi = frame.t_min, frame.t_min + frame.t_span
        damping = self._damping(relax)
        keep_growth = self.damped_growth_ if damped_growth is None else bool(damped_growth)
        for t_target in grid:
            # steps never straddle an end of the training range: outside it the fields
            # may change (extrapolate)
            cuts = [c for c in (t_lo, t_hi) if min(t_now, t_target) < c < max(t_now, t_target)]
            stops = [*sorted(cuts, reverse=bool(t_target < t_now)), float(t_target)]
            for t_stop in stops:
                span = t_stop - t_now
                n_steps = math.ceil(abs(span) / h_real - 1e-9) if span != 0 else 0
                mid = frame.tau(t_now + 0.5 * span)
                mode = extrapolate if not 0.0 <= mid <= 1.0 else "continue"
                if mode == "landscape" and method == "ode":
                    n_steps = 0  # the probability flow of a stationary Langevin: no motion
                if n_steps:
                    h = (span / n_steps) / frame.t_span
                    tau = frame.tau(t_now)
                    damp = damping if mode == "damped" else None
                    grow = keep_growth or mode != "damped"
                    for _ in range(n_steps):
                        if method == "ode":
                            z, dlogw = self._rk4(
                                nets, z, tau, h, diff_z if mode == "rest" else None, damp, grow
                            )
                        else:
                            z, dlogw = self._em(
                                nets,
                                z,
                                tau,
                                h,
                                diff_z,
                                sig_z,
                                gen,
                                mode=mode,
                                damping=damp,
                                growth=grow,
                            )
                        logw = logw + dlogw.double()
                        tau += h
                t_now = t_stop
            xs.append(frame.x(z.cpu().numpy().astype(np.float64)))
            wt = torch.exp(logw).masked_fill(zero, 0.0)
            ws.append(wt.cpu().numpy())
        return SimulationResult(times=grid.copy(), x=np.stack(xs), weights=np.stack(ws))

    def _damping(self, relaxation: float) -> Callable[[float], float]:
        """``tau -> exp(-d / (relaxation * dt_end))`` outside ``[0, 1]`` (network time)."""
        times = np.asarray(self.times_, dtype=np.float64)
        span = self._require_frame().t_span
        dt_first = (times[1] - times[0]) / span if times.size > 1 else 1.0
        dt_last = (times[-1] - times[-2]) / span if times.size > 1 else 1.0

        def factor(tau: float) -> float:
            if tau > 1.0:
                return math.exp(-(tau - 1.0) / (relaxation * dt_last))
            if tau < 0.0:
                return math.exp(tau / (relaxation * dt_first))
            return 1.0

        return factor

    @staticmethod
    def _rk4(
        nets: _Networks,
        z: torch.Tensor,
        tau: float,
        h: float,
        rest_diffusion: float | None,
        damping: Callable[[float], float] | None = None,
        growth: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One RK4 step; ``rest_diffusion`` (``D``): the zero-drift, zero-growth rest
        process outside the training range, whose probability flow is ``-D * score``;
        ``damping``: ``tau -> factor`` on the velocity (``"damped"``); ``growth=False``:
        no growth."""

        def f(zz: torch.Tensor, tt: float) -> tuple[torch.Tensor, torch.Tensor]:
            tt_t = torch.tensor([[_clamp_tau(tt)]], dtype=zz.dtype, device=zz.device)
            if rest_diffusion is not None:
                s = nets.score(zz, tt_t).detach()
                return -rest_diffusion * s, torch.zeros_like(zz[:, 0])
            lam = 1.0 if damping is None else damping(tt)
            g = nets.g(zz, tt_t) if growth else torch.zeros_like(zz[:, 0])
            return lam * nets.v(zz, tt_t), g

        with torch.no_grad():
            k1, g1 = f(z, tau)
            k2, g2 = f(z + 0.5 * h * k1, tau + 0.5 * h)
            k3, g3 = f(z + 0.5 * h * k2, tau + 0.5 * h)
            k4, g4 = f(z + h * k3, tau + h)
        z_new = z + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        return z_new, h / 6.0 * (g1 + 2 * g2 + 2 * g3 + g4)

    @staticmethod
    def _em(
        nets: _Networks,
        z: torch.Tensor,
        tau: float,
        h: float,
        diff_z: float,
        sig_z: float,
        gen: torch.Generator,
        *,
        mode: str = "continue",
        damping: Callable[[float], float] | None = None,
        growth: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Euler-Maruyama step (``growth=False``: no growth). ``mode`` (outside the
        training range): ``"rest"``, zero drift (``v = -D * score``) and zero growth;
        ``"landscape"``, zero velocity and growth, the score of the nearest training end
        (Langevin in the frozen landscape, the same in both time directions);
        ``"continue"``: the fields; ``"damped"``: the fields with the velocity times
        ``damping(tau)``."""
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        if mode == "rest" and h > 0:  # forward at rest: the drift v + D s is zero, noise only
            return z + sig_z * math.sqrt(h) * noise, torch.zeros_like(z[:, 0])
        tt = torch.tensor([[_clamp_tau(tau)]], dtype=z.dtype, device=z.device)
        s = nets.score(z, tt).detach()
        if mode in ("rest", "landscape"):
            v = -diff_z * s if mode == "rest" else torch.zeros_like(z)
            g = torch.zeros_like(z[:, 0])
        else:
            lam = 1.0 if damping is None else damping(tau)
            with torch.no_grad():
                v = lam * nets.v(z, tt)
                g = nets.g(z, tt) if growth else torch.zeros_like(z[:, 0])
        # forward (h > 0): v + D s; reverse time (h < 0): -v + D s, with |h| as the step.
        z_new = z + h * v + abs(h) * diff_z * s + sig_z * math.sqrt(abs(h)) * noise
        return z_new, h * g

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save the weights, hyperparameters, representation and gene map to folder ``path``."""
        nets, frame = self._require_fit()
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True.")
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format": _FORMAT,
            "params": asdict(self.params),
            "use_rep": self.use_rep,
            "time_key": self.time_key,
            "dim": int(self.dim or 0),
            "sigma": float(self.sigma_ or 0.0),
            "times": [float(v) for v in np.asarray(self.times_)],
            "masses": [float(v) for v in np.asarray(self.masses_)],
            "shift": [float(v) for v in frame.shift],
            "scale": frame.scale,
            "t_min": frame.t_min,
            "t_span": frame.t_span,
            "timings": self.timings_,
            "extrapolate": self.extrapolate_,
            "relaxation": self.relaxation_,
            "damped_growth": self.damped_growth_,
            "extrapolation_scores": self.extrapolation_scores_,
            "jacobian_weight": self.jacobian_weight_,
            "jacobian_scores": self.jacobian_scores_,
            "has_gene_map": isinstance(self.gene_map, GeneMap),
            "neural_gene_map": isinstance(self.gene_map, NeuralGeneMap),
        }
        save_state_dict(nets, path / _WEIGHTS)
        if isinstance(self.gene_map, NeuralGeneMap):
            logger.warning(
                "DynamicsModel.save: the NeuralGeneMap (user code) is not saved; pass it "
                "again as DynamicsModel.load(..., gene_map=...)."
            )
        elif self.gene_map is not None:
            gm = self.gene_map
            arrays: dict[str, np.ndarray] = {"loadings": gm.loadings}
            if gm.center is not None:
                arrays["center"] = gm.center
            if gm.var_names is not None:
                arrays["var_names"] = np.asarray(gm.var_names, dtype=str)
            with tempfile.NamedTemporaryFile(dir=path, delete=False, suffix=".npz") as tmp:
                np.savez(tmp, **arrays)
            os.replace(tmp.name, path / _GENES)
        save_json(config, path / _CONFIG)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        dim: int | None = None,
        use_rep: str | None = None,
        device: str | torch.device | None = "cpu",
        gene_map: GeneMap | NeuralGeneMap | None = None,
    ) -> DynamicsModel:
        """Load a model saved by :meth:`save`.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        dim
            Dimension of the data the model will be applied to; must match training.
        use_rep
            Representation of that data; must match the training representation.
        device
            Device for the weights.
        gene_map
            A gene map to attach instead of the saved one (the way back for a
            :class:`~chronotope.dynamics.NeuralGeneMap`, which is not saved).
        """
        path = Path(path)
        for name in (_WEIGHTS, _CONFIG):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a saved DynamicsModel.")
        cfg = json.loads((path / _CONFIG).read_text())
        if cfg.get("format") != _FORMAT:
            raise ChronotopeInputError(f"unknown DynamicsModel format {cfg.get('format')!r}.")
        if use_rep is not None and str(use_rep) != cfg["use_rep"]:
            raise ChronotopeInputError(
                f"the model was trained on representation {cfg['use_rep']!r}, not {use_rep!r}."
            )
        if dim is not None and int(dim) != cfg["dim"]:
            raise ChronotopeInputError(
                f"the model was trained in {cfg['dim']} dimensions ({cfg['use_rep']!r}); "
                f"the data have {dim}."
            )
        if gene_map is not None and int(gene_map.dim) != int(cfg["dim"]):
            raise ChronotopeInputError(
                f"gene_map has {gene_map.dim} components but the model {cfg['dim']}."
            )
        if gene_map is None and cfg.get("neural_gene_map"):
            logger.warning(
                "DynamicsModel.load: the model was saved with a NeuralGeneMap, which is not "
                "stored; pass gene_map= to use gene-space read-outs."
            )
        if gene_map is None and cfg.get("has_gene_map"):
            with np.load(path / _GENES, allow_pickle=False) as z:
                gene_map = GeneMap(
                    z["loadings"],
                    z["center"] if "center" in z else None,
                    z["var_names"].tolist() if "var_names" in z else None,
                )
        model = cls(
            DynamicsParams(**cfg["params"]),
            use_rep=cfg["use_rep"],
            gene_map=gene_map,
            time_key=cfg.get("time_key"),
            device=device,
        )
        nets = _Networks(cfg["dim"], model.params.hidden, model.params.n_layers)
        state = torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True)
        nets.load_state_dict(state)
        model.networks = nets.to(model.device).eval()
        model.dim = cfg["dim"]
        model.sigma_ = cfg["sigma"]
        model.times_ = np.asarray(cfg["times"])
        model.masses_ = np.asarray(cfg["masses"])
        model.timings_ = dict(cfg.get("timings", {}))
        model.extrapolate_ = str(cfg.get("extrapolate", "landscape"))
        model.relaxation_ = float(cfg.get("relaxation", model.params.relaxation))
        model.damped_growth_ = bool(cfg.get("damped_growth", model.params.damped_growth))
        model.extrapolation_scores_ = dict(cfg.get("extrapolation_scores", {}))
        jw = model.params.jacobian_weight
        model.jacobian_weight_ = float(cfg.get("jacobian_weight", 0.0 if jw == "auto" else jw))
        model.jacobian_scores_ = dict(cfg.get("jacobian_scores", {}))
        model._frame = _Frame(
            np.asarray(cfg["shift"]), float(cfg["scale"]), cfg["t_min"], cfg["t_span"]
        )
        return model
