"""Weighted linear fits on standardised rows, shared by the pooled probe (``pooled.py``) and its
prompt term (``prompt_fit.py``): the rows' weighted moments (``Moments``: a fold subtracts its
source's moments from the pool's), closed-form ridge on any subset of their columns
(``ridge_fit``), the one-feature Platt scale (``platt``) and an L2 logistic regression
(``fit_logistic``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FITS", "Moments", "fit_logistic", "platt", "ridge_fit"]

FITS = ("ridge", "logistic")


def platt(z: np.ndarray, y: np.ndarray, weights: np.ndarray, steps: int = 50
          ) -> tuple[float, float]:
    """Weighted one-feature logistic regression ``sigmoid(a z + c)`` by Newton's method (a tiny
    L2 keeps it finite on separable rows)."""
    a, c = 1.0, 0.0
    wsum = weights.sum()
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * z + c, -50, 50)))
        g = weights * (p - y)
        h = weights * p * (1 - p)
        grad = np.array([(g * z).sum() / wsum + 1e-4 * a, g.sum() / wsum])
        hess = np.array([[(h * z * z).sum() / wsum + 1e-4, (h * z).sum() / wsum],
                         [(h * z).sum() / wsum, h.sum() / wsum + 1e-9]])
        step = np.linalg.solve(hess, grad)
        a, c = a - step[0], c - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return float(a), float(c)


@dataclass
class Moments:
    """Weighted sums of a row set: enough to fit ridge on any subset of its columns, and to
    subtract one source's rows from the pool's."""

    sw: float
    sx: np.ndarray
    sy: float
    sxx: np.ndarray
    sxy: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Moments:
        xw = x.astype(np.float64) * w[:, None]
        return cls(float(w.sum()), xw.sum(0), float((w * y).sum()), xw.T @ x.astype(np.float64),
                   xw.T @ y)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.sw - other.sw, self.sx - other.sx, self.sy - other.sy,
                       self.sxx - other.sxx, self.sxy - other.sxy)


def ridge_fit(m: Moments, columns: np.ndarray, ridges: Sequence[float]
              ) -> list[tuple[np.ndarray, float]]:
    """Weighted ridge on standardised ``columns`` for every strength in ``ridges``: raw-scale
    ``(w, b)`` each."""
    mu = m.sx[columns] / m.sw
    ybar = m.sy / m.sw
    cov = m.sxx[np.ix_(columns, columns)] / m.sw - np.outer(mu, mu)
    sd = np.sqrt(np.clip(np.diag(cov), 1e-12, None))
    corr = cov / np.outer(sd, sd)
    rhs = (m.sxy[columns] / m.sw - mu * ybar) / sd
    eye = np.eye(len(columns))
    out = []
    for lam in ridges:
        v = np.linalg.solve(corr + lam * eye, rhs)
        w = v / sd
        out.append((w, float(ybar - w @ mu)))
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, weights: np.ndarray, strength: float,
                 init: np.ndarray | None = None, steps: int = 150
                 ) -> tuple[np.ndarray, float, np.ndarray]:
    """Weighted logistic regression on standardised ``x`` with the penalty
    ``strength / 2 * mean(v ** 2)`` on the standardised weights ``v`` (L-BFGS); raw-scale
    ``(w, b)`` and the standardised solution (to start the next fold from)."""
    wn = weights / weights.sum()
    mu = wn @ x
    sd = np.sqrt(np.clip(wn @ (x.astype(np.float64) ** 2) - mu * mu, 1e-8, None))
    xt = torch.from_numpy(((x - mu) / sd).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.float32))
    wt = torch.from_numpy(wn.astype(np.float32))
    v = torch.zeros(x.shape[1] + 1, requires_grad=True)
    if init is not None:
        with torch.no_grad():
            v.copy_(torch.as_tensor(init, dtype=torch.float32))
    opt = torch.optim.LBFGS([v], lr=1, max_iter=steps, history_size=20, tolerance_grad=1e-6,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xt @ v[:-1] + v[-1]
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(
            z, yt, reduction="none")).sum() + 0.5 * strength * (v[:-1] ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    solution = v.detach().double().numpy()
    coef = solution[:-1] / sd
    return coef, float(solution[-1] - coef @ mu), solution
