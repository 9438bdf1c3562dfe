"""Two-tower PGSVD on a tiny randomly initialised CLIP (no CLIP weights are reachable)."""

from __future__ import annotations

import pytest
import torch

from pgsvd_rt.compress.vlm import clip_linear_specs, compress_clip_, tower_ratios
from pgsvd_rt.nn import LowRankLinear


def tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=2)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, image_size=16, patch_size=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():  # decaying spectra, different per layer, so ranks differ
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 2 and ("proj" in name or "fc" in name) and "encoder" in name:
                N, M = p.shape
                k = min(N, M)
                U, _ = torch.linalg.qr(torch.randn(N, k))
                V, _ = torch.linalg.qr(torch.randn(M, k))
                s = torch.arange(1, k + 1, dtype=torch.float32).pow(-(0.4 + 0.15 * (i % 5)))
                p.copy_((U * s) @ V.t())
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(1)
    px = torch.randn(3, 3, 16, 16, generator=g)
    ids = torch.randint(3, 100, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return px, ids, mask


def test_specs_cover_both_towers():
    specs = clip_linear_specs(tiny_clip())
    assert len(specs) == 2 * 2 * 6
    assert {s.cls for s in specs} == {"vision", "text"}
    q, k, v = specs[:3]
    assert q.input_key == k.input_key == v.input_key == "vision.0.attn_in"


def test_tower_ratios_split_the_removed_parameters():
    dense = {"vision": 300, "text": 100}
    r = tower_ratios(dense, 0.2, 0.5)  # removed 80: 40 each
    assert r == pytest.approx({"vision": 40 / 300, "text": 40 / 100})
    with pytest.raises(ValueError, match="text tower"):
        tower_ratios(dense, 0.5, 0.1)  # text would need 180/100


def test_compress_clip_ranks_split_round_trip(tmp_path):
    from pgsvd_rt.io import load_factored, save_factored

    model = tiny_clip()
    px, ids, mask = batch()
    dense_logits = model(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
    rep = compress_clip_(model, 0.3, px, ids, mask, splits=(0.3, 0.5, 0.7), als_iters=3)
    # one ε per tower, each bisected to its share: every tower meets its own target ratio
    assert set(rep.eps) == {"vision", "text"} and rep.eps["vision"] != rep.eps["text"]
    assert rep.achieved_ratio >= 0.3 - 1e-9, rep.achieved_ratio
    dense = {"vision": 2 * (4 * 48 * 48 + 2 * 48 * 96), "text": 2 * (4 * 32 * 32 + 2 * 32 * 64)}
    target = tower_ratios(dense, 0.3, rep.split)
    for t in ("vision", "text"):
        assert rep.tower_ratio[t] >= target[t] - 1e-9, (t, rep.tower_ratio, target)
    # the chosen split is the grid point with the smallest calibration metric
    assert [r["split"] for r in rep.search] == [0.3, 0.5, 0.7]
    assert rep.split == min(rep.search, key=lambda r: r["metric"])["split"]
    ranks = {r for r in rep.ranks.values() if r is not None}
    assert len(ranks) > 2  # heterogeneous ranks
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == sum(r is not None for r in rep.ranks.values())
    assert model.visual_projection.__class__.__name__ == "Linear"  # projections stay dense
    out = model(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
    assert torch.isfinite(out).all() and out.shape == dense_logits.shape
    # save / load round trip through the factored checkpoint
    path = save_factored(model, tmp_path / "clip", info={"vlm": rep.to_dict()})
    loaded, tok, manifest = load_factored(path)
    assert tok is None and manifest["vlm"]["split"] == rep.split
    again = loaded(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_compress_clip_rejects_infeasible_and_compressed():
    model = tiny_clip()
    px, ids, mask = batch()
    with pytest.raises(ValueError, match="no split"):
        compress_clip_(model, 0.7, px, ids, mask, splits=(0.01,), als_iters=1)
    compress_clip_(model, 0.2, px, ids, mask, splits=(0.5,), als_iters=1)
    with pytest.raises(ValueError, match="already compressed"):
        compress_clip_(model, 0.2, px, ids, mask, splits=(0.5,), als_iters=1)
