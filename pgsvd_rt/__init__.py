"""pgsvd_rt: PGSVD low-rank compression of LLMs, served by fused kernels.

The public API::

    model, tokenizer, source = load_model("smollm2-135m")
    config = CompressConfig(method="pgsvd", ratio=0.2)
    report = compress_(model, config, tokenizer=tokenizer)
    save_factored(model, "ckpt", tokenizer=tokenizer, info=report.manifest_info(source, config))
    model, tokenizer, manifest = load_factored("ckpt")
"""

from pgsvd_rt._version import __version__
from pgsvd_rt.compress import CompressionReport, calibrate, compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.eval import perplexity
from pgsvd_rt.io import load_factored, read_manifest, save_factored
from pgsvd_rt.models import generate_text
from pgsvd_rt.models import load as load_model
from pgsvd_rt.nn import LowRankLinear, replace_linear

__all__ = [
    "CalibConfig",
    "CompressConfig",
    "CompressionReport",
    "LowRankLinear",
    "__version__",
    "calibrate",
    "compress_",
    "generate_text",
    "load_factored",
    "load_model",
    "perplexity",
    "read_manifest",
    "replace_linear",
    "save_factored",
]

from pgsvd_rt.integrations import hf as _hf  # noqa: E402  (from_pretrained for "pgsvd")

_hf.register_on_import()
