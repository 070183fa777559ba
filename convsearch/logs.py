"""One log format for every service: timestamp, level, component, message."""

import logging
import os


def setup_logging(component: str) -> logging.Logger:
    """Configures the root logger once (level from CONVSEARCH_LOG_LEVEL) and returns one for `component`."""
    level = os.environ.get("CONVSEARCH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    return logging.getLogger(component)
