"""How images are embedded and compared: the configuration every client and service speaks of."""

import dataclasses
import math

from convsearch.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class Configuration:
    """A model, its layers (empty: the model's featured layers), pooling and metric.

    pooling: avg, max or flatten. metric: cosine, euclidean, sqeuclidean, ip, manhattan,
    chebyshev or minkowski (with minkowski_p). minkowski_p is unset (0.0) unless given: other
    metrics ignore it, and minkowski without it is refused (INVALID_ARGUMENT), never a silent 2.
    """

    model: str = ""
    layers: tuple[str, ...] = ()
    pooling: str = "avg"
    metric: str = "cosine"
    minkowski_p: float = 0.0

    def __post_init__(self):
        if isinstance(self.layers, str):  # one layer given alone is that layer, not its characters
            object.__setattr__(self, "layers", (self.layers,))


MAX_K = 1000
"""The most results a search returns and the largest k of an evaluation (Search's and Evaluate's k)."""


MAX_MINKOWSKI_P = 100.0
"""Beyond this p, minkowski ranks as chebyshev, its p = inf limit, does: use that."""


def minkowski_p_of(metric: str, p: float, field: str = "configuration.minkowski_p") -> float:
    """The p a configuration uses. For minkowski, the p sent, which must be a finite number from
    1 to MAX_MINKOWSKI_P: 0 (proto3's unset) is an error rather than a silent 2, so a client
    that forgets p learns it. For every other metric p means nothing and is 2.0 whatever was sent.

    Raises InvalidArgument.
    """
    if metric != "minkowski":
        return 2.0
    if not math.isfinite(p) or not 1.0 <= p <= MAX_MINKOWSKI_P:
        hint = "; minkowski needs minkowski_p set (it is 0, unset)" if p == 0 else ""
        raise InvalidArgument(f"minkowski p must be >= 1 and <= {MAX_MINKOWSKI_P:g}, got {p:g}{hint}; "
                              "use chebyshev for p = infinity", reason="MINKOWSKI_P_OUT_OF_RANGE", field=field,
                              metadata={"minkowski_p": f"{p:g}"})
    return float(p)
