"""Any decoder-only family, from the model itself: tiny random models of each family, end to end.

Each family: its HF directory (with a tokenizer that adds BOS where the family's does) loads
through ``models.load`` (the config and the meta-device skeleton are checked first), is
compressed by pgsvd and svd-llm with calibration on the real corpus, saved, reloaded by
``load_factored`` and by ``from_pretrained`` with identical logits, and generates the same
tokens as the model in memory.
"""

from __future__ import annotations

import pytest
import torch

from pgsvd_rt import arch, data, models
from pgsvd_rt.compress import compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.generation import greedy_generate
from pgsvd_rt.io import load_factored, save_factored
from pgsvd_rt.nn import LowRankLinear
from tests.conftest import random_ids, tiny_model, tiny_tokenizer

#: family -> (tokenizer adds BOS, projections per block)
FAMILIES = {
    "llama": (False, 7),
    "mistral": (False, 7),
    "qwen2": (False, 7),
    "llama3": (True, 7),
    "qwen3": (False, 7),
    "gemma3_text": (True, 7),
    "phi3": (False, 4),  # qkv_proj, o_proj, gate_up_proj, down_proj
    "olmo2": (False, 7),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    out = {}
    for family, (bos, _) in FAMILIES.items():
        path = tmp_path_factory.mktemp(family)
        tiny_model(family, seed=7).save_pretrained(path)
        tiny_tokenizer(bos=bos).save_pretrained(path)
        out[family] = path
    return out


@pytest.mark.parametrize("method", ["pgsvd", "svd-llm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compress_save_reload_generate(family, method, family_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    bos, per_block = FAMILIES[family]
    model, tok, _ = models.load(family_dirs[family])
    specs = arch.linear_specs(model)
    assert len(specs) == 2 * per_block
    config = CompressConfig(method=method, ratio=0.3,
                            calib=CalibConfig(samples=4, seq_len=32, batch_size=2))
    report = compress_(model, config, tokenizer=tok, progress=False)
    assert report.calibration["bos"] is bos
    n_factored = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n_factored == len(specs) - report.dense_layers > 0
    out = save_factored(model, tmp_path / "ckpt", tokenizer=tok,
                        info={"method": method, "achieved_ratio": report.achieved_ratio})

    loaded, loaded_tok, _ = load_factored(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = random_ids(2, 16, vocab=256, seed=4)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.isfinite(want).all()
        assert torch.equal(loaded(ids).logits, want)
        assert torch.equal(hf(ids).logits, want)
    prompt = loaded_tok("The tower", return_tensors="pt")["input_ids"]
    assert bool(prompt[0, 0] == loaded_tok.bos_token_id) is bos
    a = greedy_generate(model, prompt, 8, mode="hf")  # transformers' generate, its own cache
    assert a.shape == (1, 8)
    assert torch.equal(greedy_generate(loaded, prompt, 8, mode="hf"), a)
    assert torch.equal(greedy_generate(loaded, prompt, 8), a)  # our static-cache decoder


def test_shared_inputs_found_by_what_they_read():
    """Phi-3's fused projections each read their own input; q/k/v of the others share one."""
    phi3 = {s.proj: s for s in arch.linear_specs(tiny_model("phi3")) if s.block == 1}
    assert len({s.input_key for s in phi3.values()}) == 4
    assert (phi3["qkv_proj"].cls, phi3["gate_up_proj"].cls) == ("attn", "mlp")
    gemma = [s for s in arch.linear_specs(tiny_model("gemma3_text")) if s.block == 0]
    keys = {s.proj: s.input_key for s in gemma}
    assert keys["q_proj"] == keys["k_proj"] == keys["v_proj"] != keys["o_proj"]
    assert keys["gate_proj"] == keys["up_proj"] != keys["down_proj"]


def test_calibration_and_windows_start_with_bos():
    tok = tiny_tokenizer(bos=True)
    assert data.bos_id(tok) == tok.bos_token_id == 257
    assert data.bos_id(tiny_tokenizer()) is None  # no BOS token at all
    assert data.bos_id(tok, "never") is None
    ids = data.calibration_ids(tok, 3, 16)
    assert ids.shape == (3, 16) and (ids[:, 0] == 257).all() and (ids[:, 1:] < 256).all()
    plain = data.calibration_ids(tok, 3, 16, bos="never")
    assert torch.equal(ids[0, 1:], plain[0, :15])  # the same stream, shifted by the BOS
    with pytest.raises(ValueError, match="has no BOS token"):
        data.bos_id(tiny_tokenizer(), "always")
    with pytest.raises(ValueError, match="got 'sometimes'"):
        data.bos_id(tok, "sometimes")


def test_refused_before_any_weight_is_read(tmp_path):
    from transformers import GPT2Config, MixtralConfig, T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        arch.check_model_config(T5Config(num_layers=1, d_model=16), "t5 here")
    with pytest.raises(ValueError, match=r"mixture of experts \(num_local_experts=4\)"):
        arch.check_model_config(MixtralConfig(num_local_experts=4, num_hidden_layers=1), "moe")
    with pytest.raises(ValueError, match=r"'gpt2'.*no nn.Linear.*Conv1D"):
        arch.check_model_config(GPT2Config(n_layer=1, n_embd=32, n_head=2), "gpt2 here")
    # A directory whose weights would not even load is refused from its config alone.
    T5Config(num_layers=1, d_model=16).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=f"{tmp_path}.*encoder-decoder"):
        models.load(tmp_path)


def _tiny_gguf(path, arch_name: str, **fields):
    """A GGUF header of ``arch_name`` with one tensor: enough for transformers' config reader."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    for key, value in fields.items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_refused_from_its_header_before_dequantising(tmp_path, monkeypatch):
    """The user's file is named, and nothing is dequantised or left in the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PGSVD_CACHE", str(cache))
    moe = _tiny_gguf(tmp_path / "my-moe.gguf", "qwen2moe", expert_count=4, expert_used_count=2)
    with pytest.raises(ValueError, match=r"my-moe.gguf.*'qwen2_moe' is a mixture of experts"):
        models.load(moe)
    unknown = _tiny_gguf(tmp_path / "my-rwkv.gguf", "rwkv7")
    with pytest.raises(ValueError, match=r"my-rwkv.gguf: cannot read its model config.*rwkv7"):
        models.load(unknown)
    assert not cache.exists() or not any(cache.iterdir())
