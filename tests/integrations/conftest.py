"""Factored checkpoints for the engine tests: tiny random models of each family, and the
embedded SmolLM2-135M compressed with PGSVD (real weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgsvd_rt.compress import collect_stats, compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.io import save_factored
from pgsvd_rt.models import linear_specs
from pgsvd_rt.nn import LowRankLinear, replace_linear
from tests.conftest import random_ids, tiny_model, tiny_tokenizer

# vLLM's CPU attention needs head_dim in {32, 64, ...}: 128 / 4 heads; GQA 4 / 2.
VLLM_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, head_dim=32)
#: Families vLLM serves (tests/integrations/test_vllm.py), each with its own features
#: (tests/conftest.py FAMILY_CONFIG).
VLLM_FAMILIES = ("llama", "qwen2", "mistral", "llama3", "qwen3", "gemma3_text", "olmo2")
# Kept dense after compression so that merged layers mix dense and factored projections.
DENSE = ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj")


def factored_tiny(model_type: str, path, seed: int = 0, dense=DENSE):
    """A tiny random ``model_type`` model, PGSVD-compressed, ``dense`` modules left dense."""
    model = tiny_model(model_type, seed=seed, **VLLM_TINY)
    stats = collect_stats(model, linear_specs(model), random_ids(4, 32), progress=False)
    compress_(model, CompressConfig(method="pgsvd", ratio=0.3), stats=stats, progress=False)
    back = {}
    for name in dense:
        m = model.get_submodule(name)
        if isinstance(m, LowRankLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dense_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            back[name] = lin
    replace_linear(model, back)
    return save_factored(model, path, tokenizer=tiny_tokenizer(), info={"method": "pgsvd"})


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-ckpts")
    return {t: factored_tiny(t, root / t, seed=i) for i, t in enumerate(VLLM_FAMILIES)}


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
    """SmolLM2-135M (the embedded real model) compressed by PGSVD at ratio 0.4."""
    from pgsvd_rt import models

    model, tok, source = models.load("smollm2-135m")
    config = CompressConfig(method="pgsvd", ratio=0.4, calib=CalibConfig(samples=4, seq_len=128))
    report = compress_(model, config, tokenizer=tok, progress=False)
    return save_factored(model, tmp_path_factory.mktemp("smollm2") / "pgsvd-40", tokenizer=tok,
                         info=report.manifest_info(source, config))
