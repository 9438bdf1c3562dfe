"""Shared fixtures: tiny randomly initialised models of each family (fast unit tests).

Real-model tests use the embedded SmolLM2-135M and are marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Kernels run under the Triton interpreter without a GPU (the Makefile sets this too); it must be
# set before anything imports triton, so here rather than in tests/kernels/conftest.py alone.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

WIKITEXT_TEST = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


#: Per family, what its tiny config sets beyond the shared sizes: each family's own features
#: (q/k-norm, sandwich norms, GeGLU, sliding windows, partial rotary, fused qkv, rope scaling).
FAMILY_CONFIG = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {}),
    # Llama-3: GQA + llama3 rope scaling
    "llama3": ("LlamaConfig", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),  # q/k-norm
    # GeGLU, sandwich norms, q/k-norm, sliding + global layers, scaled embeddings
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8,
                                             query_pre_attn_scalar=16)),
    # fused qkv_proj and gate_up_proj, partial rotary
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=256,
                                eos_token_id=256)),
    "olmo2": ("Olmo2Config", dict(pad_token_id=0, bos_token_id=256, eos_token_id=256)),  # q/k-norm,
}                                                                    # post-norm blocks


def tiny_config(model_type: str = "llama", **overrides):
    import transformers

    cls_name, family = FAMILY_CONFIG[model_type]
    kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=272,
              max_position_embeddings=256, tie_word_embeddings=True)
    kw.update(family)
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny causal LM with a decaying weight spectrum (so ranks differ per layer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 2 and "proj" in name:  # every family's block linears are *_proj
                N, M = p.shape
                k = min(N, M)
                U, _ = torch.linalg.qr(torch.randn(N, k))
                V, _ = torch.linalg.qr(torch.randn(M, k))
                decay = 0.5 + 0.1 * (i % 7)  # a different spectrum for each layer
                s = torch.arange(1, k + 1, dtype=torch.float32).pow(-decay)
                p.copy_((U * s) @ V.t())
    return model.eval()


def random_ids(samples: int = 4, seq_len: int = 32, vocab: int = 256, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (samples, seq_len), generator=g)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def qwen2():
    return tiny_model("qwen2", seed=3)



def tiny_tokenizer(bos: bool = False):
    """Byte-level tokenizer with no merges: 256 byte tokens + an end-of-text token (256).

    ``bos``: also a ``<bos>`` token (257) that encoding puts first, as Llama-3's and Gemma's do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    if bos:
        vocab["<bos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<bos>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Qwen2 (GQA + bias) saved as a Hugging Face directory with a tokenizer."""
    path = tmp_path / "tiny-hf"
    tiny_model("qwen2", seed=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
