"""Hidden-state rows for the monitors' per-token maths, which runs in numpy: on one or a few
rows per token, torch's per-op dispatch costs more than the arithmetic."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["float32_rows"]


def float32_rows(x: Any) -> np.ndarray:
    """Rows (a torch tensor or anything array-like) as float32 numpy, without a copy when
    possible."""
    if isinstance(x, torch.Tensor):
        try:  # a CPU tensor without grad: shared memory (fewer checks than asking first)
            array = x.numpy()
        except (RuntimeError, TypeError):  # needs grad, on a GPU, or bfloat16
            return x.detach().cpu().float().numpy()
        return array if array.dtype == np.float32 else array.astype(np.float32)
    return np.asarray(x, dtype=np.float32)
