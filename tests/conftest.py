"""Shared fixtures: tiny randomly initialised LLaMA-layout models (fast unit tests).

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


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=272,
              max_position_embeddings=256, tie_word_embeddings=True)
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[model_type]
    return cls(**kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny causal LM with a decaying weight spectrum (so ranks differ per layer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 2 and "proj" in name:
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



def tiny_tokenizer():
    """Byte-level tokenizer with no merges: 256 byte tokens + an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Qwen2 (GQA + bias) saved as a Hugging Face directory with a tokenizer."""
    path = tmp_path / "tiny-hf"
    tiny_model("qwen2", seed=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
