import json

import pytest

from pgsvd_rt import models
from tests.conftest import tiny_model


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        models.resolve("no-such-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="neither config.json"):
        models.resolve(tmp_path)


def test_hf_directory_round_trip(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    assert models.resolve(tmp_path).kind == "hf"


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}.*'gpt2'.*no nn.Linear"):
        models.load(tmp_path)
    with pytest.raises(ValueError, match="no nn.Linear"):
        models.linear_specs(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_linear_specs_groups_shared_inputs():
    specs = models.linear_specs(tiny_model("qwen2"))
    assert len(specs) == 14
    by_key = {}
    for s in specs:
        by_key.setdefault(s.input_key, []).append(s.proj)
    assert by_key["0.self_attn.q_proj.in"] == ["q_proj", "k_proj", "v_proj"]
    assert by_key["0.mlp.gate_proj.in"] == ["gate_proj", "up_proj"]
    assert by_key["1.mlp.down_proj.in"] == ["down_proj"]
    k = next(s for s in specs if s.proj == "k_proj")
    assert (k.out_features, k.in_features, k.bias) == (32, 64, True)


def test_checkpoint_dir_is_recognised(tmp_path):
    (tmp_path / models.MANIFEST_NAME).write_text(json.dumps({}))
    assert models.resolve(tmp_path).kind == "factored"
