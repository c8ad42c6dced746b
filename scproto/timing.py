"""Timing of pipeline steps, logged and kept for the run's records."""

import logging
import time
from contextlib import contextmanager


@contextmanager
def timed(step: str, timings: dict[str, float], log: logging.Logger):
    """Store the seconds the block took in ``timings[step]`` and log them."""
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start
    log.info("%s: %.2f s", step, timings[step])
