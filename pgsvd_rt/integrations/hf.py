"""``from_pretrained`` for factored checkpoints: a transformers quantizer for quant_method "pgsvd".

``import pgsvd_rt`` calls :func:`register_on_import`; from then on::

    model = AutoModelForCausalLM.from_pretrained("ckpt")   # LowRankLinear where factored

Transformers reads ``quantization_config`` from config.json (written by ``save_factored``, see
:mod:`pgsvd_rt.io.quant_config`), builds the skeleton on the meta device, and calls
:meth:`PGSVDQuantizer._process_model_before_weight_loading`, which swaps each factored
``nn.Linear`` for a :class:`~pgsvd_rt.nn.LowRankLinear` of the recorded rank; the tensors
``<module>.u`` / ``.v`` / ``.bias`` then load by name like any other parameter. No
trust_remote_code, no pickles. The ranks are checked against the tensor file's header first,
so a config that disagrees with its tensors is refused naming the module.

Registering needs transformers' quantizer registry (``transformers.quantizers``), whose import
loads every quantizer transformers ships, and through its torchao one, torchao itself when it is
installed (3 s here, and torchao's own load warnings). Transformers imports that registry before
it builds any model, so :func:`register_on_import` registers at that moment: ``import pgsvd_rt``,
``pgsvd --help`` or ``pgsvd info`` never load it, and ``from_pretrained`` always finds "pgsvd".
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
from pathlib import Path

from torch import nn

from pgsvd_rt.io import quant_config, validate
from pgsvd_rt.nn import LowRankLinear, LowRankLinearInt8, replace_linear

log = logging.getLogger("pgsvd_rt")
_REGISTERED = False
_REGISTRY = "transformers.quantizers"  # the package that holds AUTO_QUANTIZER_MAPPING


def register() -> bool:
    """Register the config class and the quantizer with transformers (idempotent).

    Returns False, logging why, when this transformers has no quantizer registry.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as exc:  # pragma: no cover - transformers without quantizers
        log.warning("pgsvd_rt: from_pretrained integration unavailable: %s", exc)
        return False

    class PGSVDConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a factored checkpoint (per-module ranks)."""

        def __init__(self, ranks=None, format_version=quant_config.QUANT_FORMAT_VERSION,
                     quant_method=quant_config.QUANT_METHOD, **extra):
            self.quant_method = quant_config.QUANT_METHOD
            self.format_version = format_version
            entry = {"quant_method": quant_method, "format_version": format_version,
                     "ranks": ranks if ranks is not None else {},
                     "int8": extra.get("int8", [])}
            self.ranks = quant_config.parse_ranks(entry, "quantization_config")
            self.int8 = quant_config.int8_modules(entry, self.ranks, "quantization_config")

        def to_dict(self) -> dict:
            return quant_config.make(self.ranks, self.int8)

    class PGSVDQuantizer(HfQuantizer):
        """Builds LowRankLinear modules where the config says a layer is factored."""

        requires_calibration = True  # factors come from compression, not from loading

        def _process_model_before_weight_loading(self, model, **kwargs):
            ranks, int8 = self.quantization_config.ranks, self.quantization_config.int8
            where = str(getattr(model.config, "_name_or_path", "") or "checkpoint")
            files = kwargs.get("checkpoint_files") or []
            if len(files) == 1 and Path(files[0]).name == quant_config.TENSOR_FILE:
                quant_config.check_tensors(ranks, quant_config.read_header(
                    Path(files[0]).parent), where, int8)
            skeleton = {}
            for name, r in ranks.items():
                try:
                    lin = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"{where}: quantization_config names module {name!r}, "
                                     f"which {type(model).__name__} does not have") from None
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"{where}: module {name!r} is a {type(lin).__name__}, "
                                     "not an nn.Linear")
                cls = LowRankLinearInt8 if name in int8 else LowRankLinear
                skeleton[name] = cls(lin.in_features, lin.out_features, r,
                                     bias=lin.bias is not None, device="meta",
                                     dtype=lin.weight.dtype)
            replace_linear(model, skeleton)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            where = str(getattr(model.config, "_name_or_path", "") or "checkpoint")
            validate.check_finite(dict(model.named_parameters()), where)
            return model

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    if quant_config.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(quant_config.QUANT_METHOD)(PGSVDConfig)
        register_quantizer(quant_config.QUANT_METHOD)(PGSVDQuantizer)
    _REGISTERED = True
    return True


#: Loggers that speak while transformers' registry imports its torchao quantizer (torchao itself,
#: where installed): "Failed to load" for its CUDA libraries on a CPU machine, and torch's
#: deprecation notes on how torchao registers its enums. Nothing a user can act on; quiet during
#: that import only (errors still pass).
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``transformers.quantizers`` as the path finder does and runs :func:`register` right
    after the package has executed; then leaves ``sys.meta_path`` and the module as they were."""

    def __init__(self) -> None:
        self._inner: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY or self._inner is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        self._inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        inner, module.__loader__ = self._inner, self._inner
        module.__spec__.loader = inner  # the module keeps transformers' own loader
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        with _quiet(_IMPORT_NOISE):
            inner.exec_module(module)
        try:
            register()
        except Exception as exc:  # noqa: BLE001 - never break transformers' own import
            log.warning("pgsvd_rt: from_pretrained integration unavailable: %r", exc)


def register_on_import() -> None:
    """:func:`register` now if transformers' quantizer registry is loaded, else the moment
    transformers imports it (before it builds any model). Idempotent."""
    if _REGISTERED:
        return
    if _REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
