"""How images are embedded and compared: the configuration every client and service speaks of."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Configuration:
    """A model, its layers (empty: the model's featured layers), pooling and metric.

    pooling: avg, max or flatten. metric: cosine, euclidean, sqeuclidean, ip, manhattan,
    chebyshev or minkowski (with minkowski_p).
    """

    model: str = ""
    layers: tuple[str, ...] = ()
    pooling: str = "avg"
    metric: str = "cosine"
    minkowski_p: float = 2.0
