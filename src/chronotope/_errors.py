"""Warning and error classes shared across chronotope."""

from __future__ import annotations

__all__ = ["ChronotopeInputError", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at ``max_iter`` before reaching ``tol``."""


class ChronotopeInputError(ValueError):
    """Input data fail validation (missing keys, NaNs, negative counts, bad shapes).

    A subclass of :class:`ValueError`, so ``except ValueError`` catches it.
    """
