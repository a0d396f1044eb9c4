"""Centered kernel alignment (CKA) between layer representations, accumulated over minibatches.

Linear CKA (Kornblith et al. 2019, https://arxiv.org/abs/1905.00414) compares two representations of
the same ``n`` examples, ``X`` (``(n, p1)``) and ``Y`` (``(n, p2)``), through their Gram matrices
``K = X X^T`` and ``L = Y Y^T``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

It is invariant to orthogonal transforms and isotropic scaling of either representation, but not to
arbitrary invertible linear maps. Nguyen, Raghu & Kornblith 2021 ("Do wide and deep networks learn the
same things?", https://arxiv.org/abs/2010.15327, eq. 2-3) estimate it over ``k`` minibatches with the
unbiased HSIC estimator of Song et al. 2012 (``HSIC_1``, below), so only one minibatch of activations is
ever held in memory::

    CKA_minibatch = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i))

With one minibatch holding all examples this is the full-data debiased CKA of Kornblith et al.
:class:`MinibatchCKA` accumulates ``HSIC_1`` for every pair of layers (of one or several networks)
at once: each layer's Gram matrix is formed once per minibatch, and the HSIC of all pairs comes from
two matrix products over the stacked Gram matrices.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from nnssl.analysis.cka_options import DEFAULT_BATCH_SIZE, KERNELS

Kernel = Literal["linear", "rbf"]
MIN_BATCH = 4  # HSIC_1 divides by n (n - 3): a minibatch needs at least 4 examples


def gram_linear(x: Tensor) -> Tensor:
    """Linear-kernel Gram matrix ``X X^T`` (``(n, n)``, float64) of features ``x`` (``(n, p)``)."""
    x = x.reshape(x.shape[0], -1).double()
    return x @ x.T


def gram_rbf(x: Tensor, sigma: float = 0.8) -> Tensor:
    """RBF-kernel Gram matrix ``exp(-|x_i - x_j|^2 / (2 s^2))`` (``(n, n)``, float64) of ``x`` (``(n, p)``).

    The bandwidth ``s`` is ``sigma`` times the median distance between the examples of ``x``, as in
    Kornblith et al. 2019 (section 3; they report fractions 0.2-0.8). Within a minibatch estimate the
    median is the minibatch's own.
    """
    dot = gram_linear(x)
    sq_norms = dot.diagonal()
    sq_distances = (sq_norms[:, None] + sq_norms[None, :] - 2 * dot).clamp_min(0)
    sq_median = sq_distances.median()
    if sq_median <= 0:  # all examples identical: every pair at distance 0, kernel constant 1
        return torch.ones_like(dot)
    return torch.exp(-sq_distances / (2 * sigma**2 * sq_median))


def gram(x: Tensor, kernel: Kernel = "linear", rbf_sigma: float = 0.8) -> Tensor:
    """Gram matrix of ``x`` (``(n, ...)``, flattened per example) for ``kernel`` ("linear" or "rbf")."""
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x.reshape(x.shape[0], -1), rbf_sigma)
    raise ValueError(f"Unknown CKA kernel {kernel!r}; use one of {KERNELS}.")


def hsic1(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC of two ``(n, n)`` Gram matrices, ``n >= 4`` (Song et al. 2012, eq. 5)::

        HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~ L~1] / (n (n-3))

    ``K~``, ``L~`` are ``K``, ``L`` with their diagonals set to zero. A literal transcription; one pair.
    """
    n = k.shape[0]
    if n < MIN_BATCH:
        raise ValueError(f"HSIC_1 needs at least {MIN_BATCH} examples, got {n}")
    k, l = _zero_diagonal(k.double()), _zero_diagonal(l.double())
    ones = torch.ones(n, dtype=k.dtype, device=k.device)
    trace = torch.trace(k @ l)
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = ones @ k @ l @ ones * 2 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def hsic1_all_pairs(grams: Tensor) -> Tensor:
    """``HSIC_1`` for every pair of a stack of Gram matrices: ``(L, n, n)`` -> ``(L, L)`` (float64).

    The same estimator as :func:`hsic1`, with each term for all pairs at once (Gram matrices are
    symmetric): ``tr(K~_a K~_b) = <vec K~_a, vec K~_b>`` and ``1'K~_a K~_b 1 = <K~_a 1, K~_b 1>``.
    """
    num, n = grams.shape[0], grams.shape[-1]
    if n < MIN_BATCH:
        raise ValueError(f"HSIC_1 needs at least {MIN_BATCH} examples, got {n}")
    g = _zero_diagonal(grams.double())
    flat = g.reshape(num, n * n)
    traces = flat @ flat.T  # (L, L)
    row_sums = g.sum(dim=2)  # (L, n): K~ 1
    totals = row_sums.sum(dim=1)  # (L,): 1'K~ 1
    cross = row_sums @ row_sums.T  # (L, L): 1'K~_a K~_b 1
    return (traces + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - cross * 2 / (n - 2)) / (n * (n - 3))


def cka(x: Tensor, y: Tensor, kernel: Kernel = "linear", rbf_sigma: float = 0.8) -> float:
    """CKA of two representations of the same ``n`` examples (``(n, p1)``, ``(n, p2)``), one minibatch."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: x has {x.shape[0]} rows, y has {y.shape[0]}")
    k, l = gram(x, kernel, rbf_sigma), gram(y, kernel, rbf_sigma)
    return float(hsic1(k, l) / torch.sqrt(hsic1(k, k) * hsic1(l, l)))


def minibatch_sizes(num_examples: int, batch_size: int) -> list[int]:
    """Split ``num_examples`` into ``max(1, num_examples // batch_size)`` near-equal consecutive minibatches
    (each between ``batch_size`` and ``2 * batch_size - 1`` examples when there are more than ``batch_size``)."""
    count = max(1, num_examples // batch_size)
    return [num_examples // count + (i < num_examples % count) for i in range(count)]


class MinibatchCKA:
    """Streaming CKA between every pair of ``num_layers`` representations (Nguyen et al. 2021, eq. 3).

    Feed each minibatch with :meth:`update` (one ``(n, ...)`` tensor per layer, the same ``n`` examples
    in the same order; ``n >= 4``, may differ between minibatches); :meth:`result` gives the
    ``(num_layers, num_layers)`` CKA matrix. Memory is one minibatch's Gram matrices plus two
    ``(num_layers, num_layers)`` float64 sums, whatever the number of examples.

    Example::

        >>> acc = MinibatchCKA(num_layers=2)
        >>> for x in torch.randn(3, 8, 5).unbind():
        ...     acc.update([x, 2 * x])
        >>> torch.allclose(acc.result(), torch.ones(2, 2, dtype=torch.float64))
        True
    """

    def __init__(self, num_layers: int, kernel: Kernel = "linear", rbf_sigma: float = 0.8):
        if kernel not in KERNELS:
            raise ValueError(f"Unknown CKA kernel {kernel!r}; use one of {KERNELS}.")
        if rbf_sigma <= 0:
            raise ValueError(f"rbf_sigma must be positive (a fraction of the median distance), got {rbf_sigma}")
        self.num_layers = num_layers
        self.kernel: Kernel = kernel
        self.rbf_sigma = rbf_sigma
        self.hsic_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.num_batches = 0
        self.num_examples = 0

    def update(self, features: Sequence[Tensor]) -> None:
        if len(features) != self.num_layers:
            raise ValueError(f"expected features of {self.num_layers} layers, got {len(features)}")
        sizes = {f.shape[0] for f in features}
        if len(sizes) != 1:
            raise ValueError(f"every layer needs the same examples; got batch sizes {sorted(sizes)}")
        grams = torch.stack([gram(f, self.kernel, self.rbf_sigma) for f in features])
        self.hsic_sum += hsic1_all_pairs(grams).cpu()
        self.num_batches += 1
        self.num_examples += sizes.pop()

    def result(self) -> Tensor:
        """``(num_layers, num_layers)`` float64 CKA matrix (NaN where a layer's self-HSIC is not positive)."""
        if self.num_batches == 0:
            raise ValueError("MinibatchCKA.result() before any update()")
        diagonal = self.hsic_sum.diagonal()
        scale = torch.sqrt(torch.outer(diagonal, diagonal))
        return torch.where(scale > 0, self.hsic_sum / scale, torch.full_like(scale, float("nan")))


def _zero_diagonal(matrix: Tensor) -> Tensor:
    return matrix - torch.diag_embed(matrix.diagonal(dim1=-2, dim2=-1))
