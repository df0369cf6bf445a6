"""The linear probe fitted in torch is scikit-learn's standardized logistic regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.core.tasks.classification.linear_probe import fit_probe


def blobs(rows: int, classes: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    centres = rng.normal(size=(classes, features)) * 1.5
    scale = np.exp(rng.normal(size=features) * 2)  # dimensions of very different sizes, as decoders' states
    return ((centres[y] + rng.normal(size=(rows, features))) * scale + 4.0).astype(np.float32), y


@pytest.mark.parametrize("classes,c", [(2, 1.0), (5, 0.1), (5, 1.0), (7, 0.01)])
def test_probe_matches_scikit_learns_logistic_regression(classes: int, c: float) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = blobs(600, classes, 24, seed=classes)
    test_x = blobs(300, classes, 24, seed=classes + 100)[0]
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=c, tol=1e-8, max_iter=10_000)).fit(x, y)
    probe = fit_probe(x, y, c, tol=1e-8, max_iter=10_000)
    assert list(probe.classes_) == list(reference[-1].classes_)
    assert np.allclose(probe.mean_, reference[0].mean_) and np.allclose(probe.scale_, reference[0].scale_)
    # The same minimum of the same objective (for two classes scikit-learn keeps one row of weights, of which the
    # probe's two rows are the halves).
    standardized = (x - probe.mean_) / probe.scale_
    if classes > 2:
        found = objective(probe.coef_, probe.intercept_, standardized, y, c)
        assert found <= objective(reference[-1].coef_, reference[-1].intercept_, standardized, y, c) + 1e-7
    else:
        assert np.allclose(probe.coef_[1] - probe.coef_[0], reference[-1].coef_[0], rtol=1e-3, atol=1e-3)
    assert np.abs(probe.predict_proba(test_x) - reference.predict_proba(test_x)).max() < 0.05
    assert (probe.predict(test_x) == reference.predict(test_x)).mean() > 0.99


def objective(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, c: float) -> float:
    """scikit-learn's: mean cross-entropy + ||W||^2 / (2 C n)."""
    scores = x @ weight.T + bias
    scores -= scores.max(1, keepdims=True)
    log_p = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean() + (weight ** 2).sum() / (2 * c * len(y)))


def test_probe_keeps_label_values_and_scores_accuracy() -> None:
    x, y = blobs(400, 3, 8, seed=3)
    labels = np.array(["billing", "account", "shipping"])[y]
    probe = fit_probe(x, labels, 1.0)
    assert list(probe.classes_) == ["account", "billing", "shipping"]
    assert set(probe.predict(x)) <= set(labels)
    assert probe.score(x, labels) == pytest.approx((probe.predict(x) == labels).mean())
    assert probe.score(x, labels) > 0.8
    assert np.allclose(probe.predict_proba(x).sum(1), 1)


def test_a_feature_that_is_constant_up_to_float32_rounding_is_not_blown_up() -> None:
    """scikit-learn divides such a feature by its spread of ~1e-9 and so feeds rounding noise at unit variance to
    the regression; the probe leaves it unscaled."""
    x, y = blobs(300, 3, 6, seed=4)
    x[:, 2] = np.float32(0.123456789) + (np.arange(300) % 2) * np.float32(1e-9)
    x[:, 3] = np.float32(1e-33) * (np.arange(300) % 3)  # a dead dimension: denormal noise around zero
    x[:, 4] = x[:, 4] * np.float32(1e-4)  # small, but a real spread: scaled as usual
    probe = fit_probe(x, y, 1.0)
    assert probe.scale_[2] == 1.0 and probe.scale_[3] == 1.0
    assert probe.scale_[0] != 1.0 and probe.scale_[4] == pytest.approx(x[:, 4].astype(np.float64).std())
    assert np.abs(probe.coef_).max() < 50


def test_one_class_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(np.ones((10, 3)), np.zeros(10), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_probe_fitted_on_a_gpu_matches_the_cpu() -> None:
    x, y = blobs(500, 4, 16, seed=5)
    cpu, gpu = fit_probe(x, y, 0.1), fit_probe(x, y, 0.1, device="cuda")
    assert np.abs(cpu.predict_proba(x) - gpu.predict_proba(x)).max() < 1e-4
