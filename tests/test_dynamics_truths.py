"""Known-truth helpers of the dynamics benchmark: the MISA drift (DiffusionOT ``True_v``)."""

from __future__ import annotations

import numpy as np
import torch

from chronotope.datasets import misa_velocity


def test_misa_velocity_known_values_and_types() -> None:
    x = np.array([[0.5, 0.5], [0.0, 0.0], [2.0, 0.0]])
    v = misa_velocity(x)
    # x = s: both Hill terms are 1/2 -> 0.7/2 + 0.8/2 - 0.5 = 0.25
    np.testing.assert_allclose(v[0], [0.25, 0.25])
    # origin: only the (un-inhibited) cross term b = 0.8 remains
    np.testing.assert_allclose(v[1], [0.8, 0.8])
    # x1 high, x2 = 0: x1 self-activated, x2 inhibited
    h = 2.0**4 / (0.5**4 + 2.0**4)
    np.testing.assert_allclose(v[2], [0.7 * h + 0.8 - 2.0, 0.8 * 0.5**4 / (0.5**4 + 16.0)])
    vt = misa_velocity(torch.as_tensor(x))
    assert isinstance(vt, torch.Tensor)
    np.testing.assert_allclose(vt.numpy(), v)


def test_misa_jacobian_signs_mutual_inhibition() -> None:
    xx = torch.tensor([[0.3, 0.9], [1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    v = misa_velocity(xx)
    rows = [torch.autograd.grad(v[:, i].sum(), xx, retain_graph=True)[0] for i in range(2)]
    jac = torch.stack(rows, 1)  # (cell, i, j) = d v_i / d x_j
    # mutual inhibition: off-diagonal entries negative at every point
    assert (jac[:, 0, 1] < 0).all() and (jac[:, 1, 0] < 0).all()
