"""scikit-learn's logistic regression, solved in torch on the run's device.

The default head minimises exactly what `make_pipeline(StandardScaler(),
LogisticRegression(C, class_weight=...))` minimises: for each fold, its own standardisation,
(1/S)·Σ s_i·loss_i + ‖W‖²/(2·C·S) with S = Σ s_i (scikit-learn's scaling of
C·Σ s_i·loss_i + ½‖W‖², so its gradient tolerance means the same here), the intercept
unpenalised; binary is one sigmoid row, more classes a multinomial softmax. scikit-learn stays
the reference in the tests.

Why not scikit-learn itself: it solves each (C, fold) alone, in float64, on the CPU. Here the
features are standardised once into one float32 copy on the device and every fold is solved
at once: a fold's own standardisation is an affine map of the shared copy folded into its
weights, and its training rows are a sample weight (0 elsewhere), so one pass over the
features serves all folds. C ascends with warm starts, as along a regularisation path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

TOL = 1e-4  # scikit-learn's: the largest gradient entry of the scaled objective
MAX_ITER = 1000  # L-BFGS iterations per solve; warm-started solves need far fewer
CHUNK = 8192  # rows per float64 pass of the statistics (memory stays at a chunk's size)


class Interrupted(Exception):
    """The stop flag was seen between two evaluations of a solve."""


@dataclass
class Problem:
    """The shared standardised features and what each fold (a column) trains on."""

    x: torch.Tensor  # (n, d) float32 on the device, standardised over all rows
    y: torch.Tensor  # (n,) class indices
    mean: np.ndarray  # (d,) float64: x = (raw - mean) / scale
    scale: np.ndarray
    n_classes: int
    weight: torch.Tensor | None = None  # (n, F) sample weights, 0 off a fold's training rows
    total: torch.Tensor | None = None  # (F,) their sums
    mu: torch.Tensor | None = None  # (F, d) each fold's standardisation in x's units
    sd: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # (F, K) -inf-like for a class absent from a fold

    @property
    def width(self) -> int:  # logits per fold: one sigmoid row for two classes
        return 1 if self.n_classes == 2 else self.n_classes


def _chunks(parts, device):
    for part in parts:
        t = torch.as_tensor(part)
        for i in range(0, len(t), CHUNK):
            yield t[i : i + CHUNK].to(device, torch.float64)


def standardise(parts: list, y: np.ndarray, n_classes: int, device) -> Problem:
    """Rows of `parts` (arrays or tensors, any float dtype) stacked into one float32 copy
    on `device`, standardised as StandardScaler does (a constant feature keeps scale 1);
    statistics in float64 chunk by chunk, so no float64 copy of the features is made."""
    device = torch.device(device)
    n = sum(len(p) for p in parts)
    d = torch.as_tensor(parts[0]).shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for c in _chunks(parts, device):
        total += c.sum(0)
    mean = total / n
    sq = torch.zeros_like(mean)
    for c in _chunks(parts, device):
        sq += ((c - mean) ** 2).sum(0)
    scale = torch.sqrt(sq / n)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    x = torch.empty(n, d, dtype=torch.float32, device=device)
    at = 0
    for c in _chunks(parts, device):
        x[at : at + len(c)] = (c - mean) / scale
        at += len(c)
    y_t = torch.tensor(np.asarray(y), dtype=torch.long, device=device)
    return Problem(x, y_t, mean.cpu().numpy(), scale.cpu().numpy(), n_classes)


def set_folds(p: Problem, train: np.ndarray, balanced: bool) -> Problem:
    """`train` (F, n) bool: each fold's training rows. Their 'balanced' class weights are
    scikit-learn's (over the classes present in the fold), their standardisation the one a
    pipeline's StandardScaler fits on them (a feature constant there keeps scale 1)."""
    from sklearn.utils.class_weight import compute_class_weight

    y = p.y.cpu().numpy()
    weight = np.zeros((len(y), len(train)))
    offset = np.zeros((len(train), p.n_classes))
    for f, rows in enumerate(train):
        cw = np.ones(p.n_classes)
        if balanced:  # over the classes present, as LogisticRegression(class_weight=...)
            present = np.unique(y[rows])
            cw[present] = compute_class_weight("balanced", classes=present, y=y[rows])
        weight[rows, f] = cw[y[rows]]
        offset[f, np.setdiff1d(np.arange(p.n_classes), y[rows])] = -1e30
    dev = p.x.device
    mask = torch.as_tensor(train.T, dtype=torch.float64, device=dev)
    s1 = torch.zeros(p.x.shape[1], len(train), dtype=torch.float64, device=dev)
    s2 = torch.zeros_like(s1)
    for i in range(0, len(p.x), CHUNK):
        c, m = p.x[i : i + CHUNK].double(), mask[i : i + CHUNK]
        s1 += c.T @ m
        s2 += (c * c).T @ m
    count = mask.sum(0)
    mu = (s1 / count).T
    sd = torch.sqrt(torch.clamp(s2.T / count[:, None] - mu**2, min=0))
    sd[sd < 1e-6] = 1.0  # x is standardised: only a feature constant in the fold is this small
    p.weight = torch.as_tensor(weight, dtype=torch.float64, device=dev)
    p.total = p.weight.sum(0)
    p.mu, p.sd = mu.float(), sd.float()
    p.offset = torch.as_tensor(offset, dtype=torch.float64, device=dev)
    return p


def _unpack(p: Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    folds, d, m = len(p.mu), p.x.shape[1], p.width
    return theta[: folds * d * m].view(folds, d, m), theta[folds * d * m :].view(folds, m)


def logits(p: Problem, theta: torch.Tensor) -> torch.Tensor:
    """(n, F, width) float64: each fold's weights on its own standardisation of every row."""
    w, b = _unpack(p, theta)
    folds, d, m = w.shape
    w_x = w / p.sd[:, :, None]  # the fold's weights on x
    b_x = b - torch.einsum("fd,fdm->fm", p.mu / p.sd, w)
    # (weights^T @ x^T)^T, not x @ weights: the same product, but MKL's skinny-matrix kernels
    # on AMD CPUs are 4-10x slower on the latter's shape and its gradient's (x^T @ dz)
    z = (w_x.permute(1, 0, 2).reshape(d, folds * m).T @ p.x.T).T.reshape(-1, folds, m)
    return z.double() + b_x.double()


def objective(p: Problem, theta: torch.Tensor, c: float) -> torch.Tensor:
    """The sum over folds of scikit-learn's scaled objective (the folds are independent)."""
    z = logits(p, theta)
    if p.width == 1:
        t = (p.y == 1).double()[:, None]
        loss = F.softplus(z[..., 0]) - t * z[..., 0]
    else:
        logp = torch.log_softmax(z + p.offset, -1)
        pick = p.y[:, None, None].expand(-1, z.shape[1], 1)
        loss = -logp.gather(-1, pick)[..., 0] * (p.weight > 0)  # 0, not nan, off the fold
    w, _ = _unpack(p, theta)
    penalty = (w.double() ** 2).sum((1, 2)) / (2 * c * p.total)
    return ((loss * p.weight).sum(0) / p.total + penalty).sum()


def probabilities(p: Problem, theta: torch.Tensor) -> np.ndarray:
    """(n, F, K) float64 class probabilities of every row under each fold's model."""
    with torch.no_grad():
        z = logits(p, theta)
        if p.width == 1:
            p1 = torch.sigmoid(z)
            return torch.cat([1 - p1, p1], -1).cpu().numpy()
        return torch.softmax(z + p.offset, -1).cpu().numpy()


def zeros(p: Problem) -> torch.Tensor:
    return torch.zeros(len(p.mu) * (p.x.shape[1] + 1) * p.width, device=p.x.device)


def solve(p: Problem, c: float, theta0: torch.Tensor, should_stop=None,
          tol: float = TOL, max_iter: int = MAX_ITER) -> tuple[torch.Tensor, int]:  # fmt: skip
    """L-BFGS (strong Wolfe line search, scikit-learn's history of 10) from `theta0` until
    no gradient entry exceeds `tol` (or the objective stops moving in float32). Returns the
    solution and the iterations taken. `should_stop` is polled before every evaluation: a
    Ctrl-C need not wait for a solve to end (`Interrupted`)."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, max_eval=max_iter * 5 // 4,
                            tolerance_grad=tol, tolerance_change=1e-12, history_size=10,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        if should_stop is not None and should_stop():
            raise Interrupted
        opt.zero_grad()
        loss = objective(p, theta, c)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach(), int(opt.state[theta].get("n_iter", 0))


def fold_linear(p: Problem, theta: torch.Tensor, f: int) -> tuple[np.ndarray, ...]:
    """Fold `f`'s model as scikit-learn's pipeline holds it: (coef (width, d), intercept,
    the scaler's mean and scale) in the raw features' units."""
    w, b = _unpack(p, theta)
    mu, sd = p.mu[f].double().cpu().numpy(), p.sd[f].double().cpu().numpy()
    coef = w[f].double().cpu().numpy().T
    return coef, b[f].double().cpu().numpy(), p.mean + p.scale * mu, p.scale * sd


def fold_mean(p: Problem, theta: torch.Tensor) -> torch.Tensor:
    """The folds' solutions averaged into one: a warm start for the refit on all rows."""
    w, b = _unpack(p, theta)
    return torch.cat([w.mean(0).flatten(), b.mean(0).flatten()])
