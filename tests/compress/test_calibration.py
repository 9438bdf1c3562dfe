import pytest
import torch

from pgsvd_rt.compress import collect_stats
from pgsvd_rt.models import linear_specs
from tests.conftest import random_ids


def _captured_inputs(model, ids):
    """Inputs of every distinct linear input, captured the slow obvious way."""
    specs = linear_specs(model)
    seen, store, handles = set(), {}, []
    for s in specs:
        if s.input_key in seen:
            continue
        seen.add(s.input_key)

        def hook(_m, args, key=s.input_key):
            store.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

        handles.append(model.get_submodule(s.name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def test_grams_match_direct_products(llama):
    ids = random_ids(4, 16)
    stats = collect_stats(llama, linear_specs(llama), ids, batch_size=3, progress=False)
    captured = _captured_inputs(llama, ids)
    # q/k/v share one input and gate/up share one: 4 distinct inputs per block
    assert len(stats) == 4 * llama.config.num_hidden_layers
    for key, X in captured.items():
        st = stats[key]
        assert st.gram.dtype == torch.float64 and st.tokens == ids.numel()
        ref = X.t() @ X
        err = (st.gram - ref).norm() / ref.norm()
        assert err < 1e-6, f"{key}: relative Gram error {err:.2e} (fp32 batch products)"
        assert torch.allclose(st.abs_mean, X.abs().mean(0), rtol=1e-5)


def test_padding_is_excluded(llama):
    ids = random_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[0, 16:] = 0  # right padding: earlier tokens are unaffected under causal attention
    stats = collect_stats(llama, linear_specs(llama), ids, attention_mask=mask, progress=False)
    ref_a = collect_stats(llama, linear_specs(llama), ids[:1, :16], progress=False)
    ref_b = collect_stats(llama, linear_specs(llama), ids[1:], progress=False)
    for key, st in stats.items():
        assert st.tokens == 16 + 24
        ref = ref_a[key].gram + ref_b[key].gram
        assert (st.gram - ref).norm() / ref.norm() < 1e-5


def test_blocks_per_pass_gives_same_grams(llama):
    ids = random_ids(2, 16)
    full = collect_stats(llama, linear_specs(llama), ids, progress=False)
    parts = collect_stats(llama, linear_specs(llama), ids, blocks_per_pass=1, progress=False)
    assert full.keys() == parts.keys()
    for key in full:
        assert torch.equal(full[key].gram, parts[key].gram)


def test_passes_run_each_block_once(llama):
    """Pass by pass, a block computes once per batch: later passes start from the hidden state
    the previous pass left, not from the embedding (and every block gets its own forward back)."""
    layers = llama.model.layers
    assert len(layers) >= 2
    specs = linear_specs(llama)  # (its probe forward runs before counting)
    calls = [0] * len(layers)
    handles = [layer.mlp.register_forward_hook(
        lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
    try:
        collect_stats(llama, specs, random_ids(3, 16), batch_size=2,
                      blocks_per_pass=1, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [2] * len(layers)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_empty_calibration_input(llama):
    with pytest.raises(ValueError, match="non-empty"):
        collect_stats(llama, linear_specs(llama), torch.zeros(0, 8, dtype=torch.long))


def test_nan_weights_give_nan_gram_error(llama):
    with torch.no_grad():
        llama.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        collect_stats(llama, linear_specs(llama), random_ids(1, 8), progress=False)
