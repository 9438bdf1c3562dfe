"""Checks a checkpoint must pass before anything is built from it: the manifest's schema, the
tensors' values and dtypes. Every failure is a ValueError that names the field or tensor.
"""

from __future__ import annotations

import math
import re

import torch

_DTYPES = {"float32", "float16", "bfloat16", "float64", "int8"}  # int8: factors of int8 modules


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _need(cond: bool, where: str, what: str, value) -> None:
    if not cond:
        text = repr(value)
        raise ValueError(f"{where}: {what}, got {text[:80] + '...' if len(text) > 80 else text}")


def check_manifest(manifest, where: str) -> dict:
    """The manifest's fields, typed as the loaders read them (FORMAT checks stay in checkpoint)."""
    _need(isinstance(manifest, dict), where, "the manifest must be a JSON object", manifest)
    modules = manifest.get("modules")
    _need(isinstance(modules, dict), where, "'modules' must be an object", modules)
    for name, m in modules.items():
        w = f"{where}: module {name!r}"
        _need(isinstance(m, dict), w, "must be an object", m)
        for key in ("rank", "in_features", "out_features"):
            _need(_is_int(m.get(key)) and m[key] >= 1, w, f"{key!r} must be an int >= 1",
                  m.get(key))
        _need(isinstance(m.get("bias"), bool), w, "'bias' must be true or false", m.get("bias"))
        _need(m.get("factors", "float") in ("float", "int8"), w,
              "'factors' must be 'float' or 'int8'", m.get("factors"))
    tensors = manifest.get("tensors")
    _need(isinstance(tensors, dict) and tensors, where, "'tensors' must be a non-empty object",
          tensors)
    for name, t in tensors.items():
        w = f"{where}: tensor {name!r}"
        _need(isinstance(t, dict), w, "must be an object", t)
        shape = t.get("shape")
        _need(isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape), w,
              "'shape' must be a list of ints >= 0", shape)
        _need(isinstance(t.get("dtype"), str) and t["dtype"] in _DTYPES, w,
              f"'dtype' must be one of {sorted(_DTYPES)}", t.get("dtype"))
        sha = t.get("sha256")
        _need(isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None, w,
              "'sha256' must be 64 hex digits", sha)
    for key in ("eps", "target_ratio", "achieved_ratio"):
        if manifest.get(key) is not None:
            _need(_is_num(manifest[key]), where, f"{key!r} must be a number or null", manifest[key])
    for key in ("dense_layers", "distinct_ranks"):
        if manifest.get(key) is not None:
            _need(_is_int(manifest[key]), where, f"{key!r} must be an int or null", manifest[key])
    for key in ("method",):
        if manifest.get(key) is not None:
            _need(isinstance(manifest[key], str), where, f"{key!r} must be a string",
                  manifest[key])
    for key in ("base_model", "calibration"):
        if manifest.get(key) is not None:
            _need(isinstance(manifest[key], dict), where, f"{key!r} must be an object",
                  manifest[key])
    if manifest.get("layers") is not None:
        layers = manifest["layers"]
        _need(isinstance(layers, list), where, "'layers' must be a list", layers)
        for x in layers:
            _need(isinstance(x, dict) and isinstance(x.get("name"), str)
                  and (x.get("rank") is None or _is_int(x.get("rank")))
                  and _is_int(x.get("out_features")) and _is_int(x.get("in_features")),
                  where, "every 'layers' entry needs name, rank, out_features, in_features", x)
    return manifest


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN / Inf in any floating tensor, naming the first one and how many values."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name!r} has {bad} non-finite value(s) "
                             f"(NaN or Inf) of {t.numel()}")


def check_one_float_dtype(state: dict[str, torch.Tensor], where: str,
                          int8: set[str] | frozenset = frozenset()) -> None:
    """Every tensor floating point and all of one dtype (a model is served in one dtype), but
    those named in ``int8``, which must be int8."""
    for name in int8:
        if name in state and state[name].dtype != torch.int8:
            raise ValueError(f"{where}: tensor {name!r} has dtype {state[name].dtype}, the "
                             "manifest says int8")
    state = {k: v for k, v in state.items() if k not in int8}
    first = None
    for name, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"{where}: tensor {name!r} has dtype {t.dtype}, not floating point")
        if first is None:
            first = (name, t.dtype)
        elif t.dtype != first[1]:
            raise ValueError(f"{where}: tensor {name!r} is {t.dtype} but {first[0]!r} is "
                             f"{first[1]}: mixed dtypes")
