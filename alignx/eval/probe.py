"""Language-identity linear probe: how much language identity a layer's sentence vectors carry.

Multinomial logistic regression on uncentred mean-pooled vectors (centring per language would remove exactly the
signal the probe measures), standardised with the training set's mean and standard deviation:
``p(c | x) = softmax(W z + b)_c`` with ``z = (x - mu) / sigma``, trained by full-batch L-BFGS on
``mean CE + lambda * ||W||^2``. Trained on one split (dev) and scored on another (test): accuracy per layer is the
"align-then-diverge" curve — low in the middle layers of a well-aligned model, high near the input and output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The probe's matrices are small (hundreds x D): with several intra-op threads the L-BFGS loop spends its time
    # handing work between threads (measured 10 ms with one thread vs seconds on a busy 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe_accuracy(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> float:
    """Test accuracy of a linear probe trained on ``x_train [N, D]`` with integer labels ``y_train [N]``.

    Labels are ``0..C-1``; a class absent from training can never be predicted. Deterministic for a given seed.
    """
    if x_train.dim() != 2 or x_test.dim() != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(x_train.shape)}, {tuple(x_test.shape)}")
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise ValueError("one label per row is needed")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("the probe needs non-empty training and test sets")
    classes = int(max(y_train.max().item(), y_test.max().item())) + 1
    x_train, x_test = x_train.double(), x_test.double()
    mu = x_train.mean(0)
    sigma = x_train.std(0, unbiased=False).clamp_min(1e-6)
    z_train, z_test = (x_train - mu) / sigma, (x_test - mu) / sigma
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(z_train.shape[1], classes, generator=gen, dtype=torch.float64) * 1e-3).requires_grad_()
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    labels = y_train.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z_train @ w + b, labels) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _one_thread():
        opt.step(closure)
    with torch.no_grad():
        pred = (z_test @ w + b).argmax(1)
    return (pred == y_test.long()).double().mean().item()
