"""Offline compression: calibration Grams, rank allocation, solvers, the ``compress_`` verb."""

from pgsvd_rt.compress.calibration import InputStats, collect_stats
from pgsvd_rt.compress.pipeline import CompressionReport, LayerResult, calibrate, compress_

__all__ = ["CompressionReport", "InputStats", "LayerResult", "calibrate", "collect_stats",
           "compress_"]
