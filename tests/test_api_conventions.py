"""Scanpy-style signature rules for the public AnnData API (``pp``, ``tl``, ``pl``).

Every public function takes ``adata`` first, has at most three positional parameters,
and everything else is keyword-only (``*, key_added=..., copy=False``). No ``*args``.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable

import pytest

MODULES = ("chronotope.pp", "chronotope.tl", "chronotope.pl")
MAX_POSITIONAL = 3


def signature_problems(func: Callable[..., object]) -> list[str]:
    """Return the rule violations of ``func`` (empty list when it follows the rules)."""
    params = list(inspect.signature(func).parameters.values())
    problems = []
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if not positional or positional[0].name != "adata":
        problems.append("first parameter must be 'adata'")
    if len(positional) > MAX_POSITIONAL:
        names = ", ".join(p.name for p in positional[MAX_POSITIONAL:])
        problems.append(
            f"{len(positional)} positional parameters (max {MAX_POSITIONAL}); "
            f"make keyword-only: {names}"
        )
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        problems.append("*args is not allowed")
    return problems


def public_functions(module: types.ModuleType) -> dict[str, Callable[..., object]]:
    """Public functions of ``module``: its ``__all__`` (or non-underscore names)."""
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    out = {}
    for name in names:
        obj = getattr(module, name)
        if inspect.isfunction(obj) and (obj.__module__ or "").startswith("chronotope"):
            out[f"{module.__name__}.{name}"] = obj
    return out


def _collect() -> dict[str, Callable[..., object]]:
    funcs: dict[str, Callable[..., object]] = {}
    for modname in MODULES:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:  # the module exists but an import inside it is broken
                raise
            continue
        funcs.update(public_functions(module))
    return funcs


PUBLIC = _collect()


def test_some_public_functions_are_checked():
    assert "chronotope.pl.spatial" in PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_signature(name):
    problems = signature_problems(PUBLIC[name])
    assert not problems, f"{name}: " + "; ".join(problems)


def _good(adata, color=None, *, key_added="x", copy=False):
    return None


def _too_many_positional(adata, a, b, c):
    return None


def _wrong_first(data, *, key="x"):
    return None


def _star_args(adata, *args, key="x"):
    return None


def test_checker_accepts_good_signature():
    assert signature_problems(_good) == []


@pytest.mark.parametrize(
    ("func", "fragment"),
    [
        (_too_many_positional, "4 positional parameters"),
        (_wrong_first, "first parameter must be 'adata'"),
        (_star_args, "*args"),
    ],
)
def test_checker_flags_violations(func, fragment):
    problems = signature_problems(func)
    assert any(fragment in p for p in problems), problems


def test_checker_walks_module_and_flags_violation():
    fake = types.ModuleType("chronotope.tl_fake")
    exec("def bad(adata, a, b, c):\n    return None", fake.__dict__)
    fake.bad.__module__ = "chronotope.tl_fake"
    fake.__all__ = ["bad"]
    found = public_functions(fake)
    assert list(found) == ["chronotope.tl_fake.bad"]
    assert signature_problems(found["chronotope.tl_fake.bad"])
