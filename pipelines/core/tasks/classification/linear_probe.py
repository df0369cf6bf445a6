"""The linear probe: a multinomial logistic regression on standardized frozen embeddings, fitted in torch.

It is the same model and objective as scikit-learn's `StandardScaler` + `LogisticRegression(C=...)` with its
default L-BFGS solver (mean cross-entropy + ||W||^2 / (2 C n), the intercept not penalized, tolerance 1e-4 on the
gradient; for two classes the two softmax rows are the halves of scikit-learn's one), fitted with torch's L-BFGS on
the device training uses. One deliberate difference: a feature constant up to the rounding of the input's precision
is left unscaled, where scikit-learn divides it by its spread (MiniLM's dead dimensions, spread 1e-32, became
weights of 6e30 in the head folded from its scaler). scikit-learn's fit ran its matrix products in
numpy's BLAS, whose own thread pool competes with torch's in the same process (slow on a many-core machine:
benchmarks/linear_probe.py compares the two); in torch the products use the threads (or the GPU) the rest of the
step uses.

The probe is the starting point of the LP-FT head, the `linear_probe` baseline of evaluation, selection's probe
and the data doctor's out-of-fold label check.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class LinearProbe:
    """A fitted probe. `mean_` and `scale_` standardize the features; `coef_` (classes x features, over standardized
    features) and `intercept_` give one score per class of `classes_` (the labels seen in training, sorted)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 classes: np.ndarray, iterations: int) -> None:
        self.mean_, self.scale_, self.coef_, self.intercept_ = mean, scale, coef, intercept
        self.classes_, self.n_iter_ = classes, iterations

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """One score per row and class (rows x classes)."""
        return ((np.asarray(x, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        scores = self.decision_function(x)
        scores -= scores.max(1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on (x, y)."""
        return float((self.predict(x) == np.asarray(y)).mean()) if len(y) else 0.0


def fit_probe(x: np.ndarray, y: np.ndarray, c: float = 1.0, device: str = "cpu", max_iter: int = 2000,
              tol: float = 1e-4) -> LinearProbe:
    """Fit a probe on features `x` (rows x features) and labels `y` (any sortable values, at least two distinct),
    regularized by `c` as scikit-learn's C (smaller: stronger)."""
    given = np.asarray(x)
    eps = np.finfo(given.dtype if np.issubdtype(given.dtype, np.floating) else np.float64).eps
    x = given.astype(np.float64)  # one copy, standardized in place below
    classes, targets = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least two classes in its training rows; got {len(classes)}")
    mean = x.mean(0)
    scale = x.std(0)
    # A constant feature stays as it is, as in scikit-learn, but judged at the precision the features came in: a
    # float32 feature whose spread is within its values' rounding (relative to its mean, or to the features'
    # overall size for one near zero) is constant, not blown up to unit variance.
    size = np.maximum(np.abs(mean), np.sqrt(np.mean(mean ** 2 + scale ** 2)) if len(mean) else 0.0)
    scale[scale <= 10 * eps * size] = 1.0
    scale[scale == 0] = 1.0
    x -= mean
    x /= scale
    features = torch.as_tensor(x, dtype=torch.float64, device=device)
    labels = torch.as_tensor(targets, dtype=torch.long, device=device)
    weight = torch.zeros(len(classes), x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, device=device, requires_grad=True)
    # With two classes scikit-learn fits one row w (the second class's logit minus the first's) under ||w||^2; two
    # softmax rows reach it as w / 2 and -w / 2, whose squares sum to ||w||^2 / 2: twice the strength gives the
    # same fit, and so C means what it means there.
    l2 = (2.0 if len(classes) == 2 else 1.0) / (c * len(x))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=10,
                                  tolerance_grad=tol, tolerance_change=64 * float(np.finfo(np.float64).eps),
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LinearProbe(mean, scale, weight.detach().cpu().numpy(), bias.detach().cpu().numpy(), classes, iterations)
