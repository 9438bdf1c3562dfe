"""pgsvd_rt: PGSVD low-rank compression of LLMs, served by fused kernels."""

from pgsvd_rt._version import __version__

__all__ = ["__version__"]
