"""pgsvd_rt.generation: the static-cache greedy loop (eager and compiled) decodes the tokens of
transformers' ``generate``, for dense and factored tiny models, and stops at EOS."""

import pytest
import torch

from pgsvd_rt.generation import MODES, StaticGreedy, greedy_generate
from tests.conftest import tiny_model


def _factored(model):
    from pgsvd_rt.compress.solvers import svd_factors
    from pgsvd_rt.nn import LowRankLinear, replace_linear

    repl = {}
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            A, B = svd_factors(mod.weight.detach().double(), min(mod.weight.shape) // 3)
            bias = None if mod.bias is None else mod.bias.detach()
            repl[f"model.layers.{name}"] = LowRankLinear.from_factors(A.float(), B.float(), bias)
    return replace_linear(model, repl)


def _hf_tokens(model, ids, T):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=T, min_new_tokens=T, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("factored", [False, True])
def test_static_loop_equals_generate(model_type, factored):
    model = tiny_model(model_type, seed=1).eval()
    if factored:
        _factored(model)
    ids = torch.randint(0, 272, (2, 7), generator=torch.Generator().manual_seed(3))
    want = _hf_tokens(model, ids, 6)
    got = greedy_generate(model, ids, 6, mode="static")
    assert torch.equal(got, want), (got, want)
    assert torch.equal(greedy_generate(model, ids, 6, mode="hf"), want)


def test_compiled_step_equals_eager():
    model = _factored(tiny_model("llama", seed=2).eval())
    ids = torch.randint(0, 272, (1, 5), generator=torch.Generator().manual_seed(4))
    eager = StaticGreedy(model, 12).generate(ids, 7)
    dec = StaticGreedy(model, 12, compile=True)
    assert torch.equal(dec.generate(ids, 7), eager)
    assert torch.equal(dec.generate(ids, 7), eager)  # the second call reuses the compiled step
    torch._dynamo.reset()


def test_stops_at_eos_and_pads_with_it():
    model = tiny_model("llama", seed=1).eval()
    ids = torch.randint(0, 272, (1, 7), generator=torch.Generator().manual_seed(3))
    full = greedy_generate(model, ids, 6, mode="static")
    eos = int(full[0, 2])
    got = greedy_generate(model, ids, 6, mode="static", eos_token_id=eos)
    first = int((full[0] == eos).nonzero()[0])
    assert got.shape[1] == first + 1 and torch.equal(got[0], full[0, :first + 1])


def test_bad_arguments_name_the_value():
    model = tiny_model("llama").eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="decode mode must be one of"):
        greedy_generate(model, ids, 2, mode="fast")
    with pytest.raises(ValueError, match="exceeds the cache length max_len=8"):
        StaticGreedy(model, 8).generate(ids, 5)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        StaticGreedy(model, 8).generate(ids, 0)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length >= 1\)"):
        StaticGreedy(model, 8).generate(ids[0], 2)
    assert set(MODES) == {"hf", "static", "compile"}
