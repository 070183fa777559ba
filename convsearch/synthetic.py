"""Synthetic vectors shaped like CNN features, for tests and benchmarks of the index."""

import numpy as np


def clustered_vectors(n: int, dim: int, clusters: int = 50, seed: int = 0, intrinsic: int = 24,
                      membership: np.ndarray | None = None) -> np.ndarray:
    """Gaussian clusters around random centres, spread along an `intrinsic`-dimensional subspace
    (CNN features have a low intrinsic dimension) plus a little isotropic noise. The centres and
    the subspace are the same for every seed, so queries drawn with another seed match the data.
    `membership` gives each row's cluster (default: drawn at random)."""
    centres = np.random.default_rng(1234).normal(size=(clusters, dim))
    basis = np.random.default_rng(4321).normal(size=(intrinsic, dim)) / np.sqrt(intrinsic)
    rng = np.random.default_rng(seed)
    spread = rng.normal(size=(n, intrinsic)) @ basis + 0.05 * rng.normal(size=(n, dim))
    if membership is None:
        membership = rng.integers(0, clusters, n)
    return (centres[membership] + spread).astype(np.float32)
