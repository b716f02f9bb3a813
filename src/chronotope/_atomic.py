"""Atomic writes of model files: a temporary file in the target folder, then ``os.replace``.

A reader never sees a half-written file, and a failed write leaves the old file in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_state_dict(module: torch.nn.Module, path: Path) -> None:
    """Write ``module``'s state dict (tensors moved to CPU) to ``path`` atomically."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save(state, tmp)
    os.replace(tmp.name, path)


def save_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(obj, tmp, indent=1)
    os.replace(tmp.name, path)
