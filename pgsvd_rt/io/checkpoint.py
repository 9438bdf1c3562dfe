"""The factored checkpoint: a self-contained directory, no pickle anywhere.

Layout::

    DIR/
      model.safetensors      every tensor the model needs: <module>.u, <module>.v, biases, and
                             the dense tensors (embeddings, norms, lm_head unless tied)
      pgsvd_manifest.json    format version, method, ε, ratios, per-module rank and shapes,
                             base model identity, calibration provenance, tensor checksums
      config.json            Hugging Face config + ``quantization_config`` (quant_method "pgsvd",
                             per-module ranks: pgsvd_rt.io.quant_config), so ``from_pretrained``
                             and vLLM load DIR too
      generation_config.json, tokenizer files   (Hugging Face, so DIR is complete)

Saving writes into a temporary sibling directory, fsyncs it, then renames it into place or, to
overwrite, swaps it atomically with the old one (pgsvd_rt.io.atomic): the path always holds the
old or the new checkpoint, whole. Loading checks
the manifest against the tensors (names, shapes, dtypes, sha256), builds the model skeleton on
the meta device, swaps in LowRankLinear modules, and loads with ``assign=True``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from pgsvd_rt._version import __version__
from pgsvd_rt.arch import block_linears, check_config
from pgsvd_rt.io import atomic, quant_config, validate
from pgsvd_rt.io.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    int8_names,
    read_manifest,
)
from pgsvd_rt.nn import LowRankLinear, LowRankLinearInt8, replace_linear

TENSOR_FILE = quant_config.TENSOR_FILE


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order)."""
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in state:
        state.pop("lm_head.weight")  # restored by tie_weights() on load
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_factored(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its LowRankLinear layers) as a factored checkpoint.

    Args:
        model: a (partly) factored HF causal LM.
        out_dir: target directory; must not exist unless ``overwrite``.
        tokenizer: saved alongside so the directory is self-contained.
        info: extra manifest fields (method, eps, ratios, base_model, calibration, config...).
        overwrite: replace an existing checkpoint (atomically, once the new one is whole).

    Returns:
        The directory path.
    """
    from safetensors.torch import save_file

    state = _state_to_save(model)
    validate.check_finite(state, "the model to save")
    modules = {
        name: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
               "bias": m.bias is not None}
        | ({"factors": "int8"} if isinstance(m, LowRankLinearInt8) else {})
        for name, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankLinearInt8))
    }
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pgsvd_rt_version": __version__,
        **(info or {}),
        "modules": modules,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                        "sha256": tensor_sha256(v)} for k, v in state.items()},
    }

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / TENSOR_FILE), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)  # the caller's model keeps its config
        config.architectures = [type(model).__name__]  # engines pick the model class by it
        config.quantization_config = quant_config.make(
            {name: m["rank"] for name, m in modules.items()}, int8_names(modules))
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    return atomic.publish(out_dir, fill, overwrite=overwrite,
                          replaceable=lambda p: (p / MANIFEST_NAME).exists())


def _read_tensors(directory: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / TENSOR_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {str(directory)!r} has no {TENSOR_FILE}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"corrupted or truncated tensor file {str(path)!r}: {exc}") from exc
    expected = manifest.get("tensors", {})
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:5]
        extra = sorted(set(state) - set(expected))[:5]
        raise ValueError(f"manifest disagrees with {TENSOR_FILE}: missing {missing}, "
                         f"unexpected {extra}")
    for name, t in state.items():
        meta = expected[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != meta["shape"] or dtype != meta["dtype"]:
            raise ValueError(f"tensor {name!r}: file has {list(t.shape)} {dtype}, manifest says "
                             f"{meta['shape']} {meta['dtype']}")
        if verify and tensor_sha256(t) != meta["sha256"]:
            raise ValueError(f"tensor {name!r}: checksum mismatch (corrupted checkpoint)")
    validate.check_one_float_dtype(state, str(path), {
        f"{m}.{key}" for m in int8_names(manifest["modules"]) for key in ("u", "vt")})
    validate.check_finite(state, str(path))
    return state


def load_factored(
    path: str | os.PathLike, dtype: torch.dtype | None = None, verify: bool = True
) -> tuple[nn.Module, object, dict]:
    """Load a factored checkpoint as ``(model, tokenizer_or_None, manifest)`` (CPU, eval mode).

    Args:
        path: checkpoint directory.
        dtype: cast floating tensors to this dtype (default: as stored).
        verify: check every tensor's sha256 against the manifest.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    manifest = read_manifest(directory)
    state = _read_tensors(directory, manifest, verify)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types
        raise ValueError(f"checkpoint {str(directory)!r}: invalid config.json: {exc}") from exc
    if config.model_type != "clip":
        check_config(config, f"checkpoint {str(directory)!r}")
    with init_empty_weights():  # parameters on meta; buffers (rotary) are built for real
        if config.model_type == "clip":  # two-tower VLM (pgsvd_rt.compress.vlm)
            from transformers import CLIPModel

            model = CLIPModel(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    # The rule compression follows (pgsvd_rt.arch): only linears inside decoder blocks.
    linears = (None if config.model_type == "clip"
               else {name: mod for name, _, _, mod in block_linears(model)})
    skeleton = {}
    for name, m in manifest["modules"].items():
        int8 = m.get("factors") == "int8"
        keys = ("u", "vt", "u_scale", "vt_scale") if int8 else ("u", "v")
        for key in keys + (("bias",) if m["bias"] else ()):
            if f"{name}.{key}" not in state:
                raise ValueError(f"manifest module {name!r} has no tensor {name}.{key}")
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            dense = None
        if not isinstance(dense, nn.Linear) or (linears is not None and name not in linears):
            raise ValueError(f"manifest module {name!r}: the {config.model_type} architecture "
                             "has no linear layer of that name inside its decoder blocks")
        if (dense.in_features, dense.out_features) != (m["in_features"], m["out_features"]):
            raise ValueError(f"manifest module {name!r} is {m['out_features']} x "
                             f"{m['in_features']} but the architecture's layer is "
                             f"{dense.out_features} x {dense.in_features}")
        cls = LowRankLinearInt8 if int8 else LowRankLinear
        skeleton[name] = cls(m["in_features"], m["out_features"], m["rank"], bias=m["bias"],
                             device="meta")
    replace_linear(model, skeleton)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches between manifest modules and tensors
        raise ValueError(f"checkpoint tensors do not fit the manifest's modules: {exc}") from exc
    missing = set(result.missing_keys)
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint tensors do not fit the architecture: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"parameter {name!r} was not loaded from the checkpoint")
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer, manifest
