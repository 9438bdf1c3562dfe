"""Factored checkpoints: safetensors + JSON manifest, atomic writes, validated loads."""

from pgsvd_rt.io.checkpoint import load_factored, read_manifest, save_factored

__all__ = ["load_factored", "read_manifest", "save_factored"]
