"""Which layers of a decoder-only causal LM are compressed, found from the model itself.

No list of families: any model transformers builds as a causal LM with a stack of decoder
blocks is handled the same way.

- Blocks: the ModuleList of ``num_hidden_layers`` modules in the decoder
  (``model.get_decoder()``).
- Projections: every ``nn.Linear`` inside a block. This covers q/k/v/o, gate/up/down, a fused
  ``qkv_proj`` or ``gate_up_proj`` (Phi-3), fc1/fc2. Embeddings, norms (q/k-norm and sandwich
  norms too) and the head lie outside the linears of the blocks and stay untouched.
- Shared inputs: a probe forward on a few tokens records what each projection reads.
  Projections of one block that read equal inputs share one Gram (q/k/v, gate/up), whatever
  they are called.
- Class, for per-class ε: ``"attn"`` when the projection's path inside the block names
  attention (``attn``/``attention``), else ``"mlp"``.

Refused, before any expensive step, with the model and the reason named:
- encoder-decoder, multimodal and mixture-of-experts configs (:func:`check_config`, which reads
  only the config);
- no block list, or blocks without ``nn.Linear`` (GPT-2's Conv1D): :func:`check_model_config`
  finds these on the architecture built on the meta device, before any weight is read;
- a projection that does not run in the probe, or runs more than once per forward
  (conditional or shared computation, which one Gram per projection cannot describe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pgsvd_rt.nn import LowRankLinear, LowRankLinearInt8

#: Config attributes that mean mixture of experts when > 1 (one Gram per expert is not built).
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_PROBE_TOKENS = 8


@dataclass(frozen=True)
class LinearSpec:
    """One compressible linear layer.

    Attributes:
        name: dotted module name, e.g. ``model.layers.3.self_attn.q_proj``.
        block: decoder block index. proj: the module's own name (``q_proj``, ``qkv_proj``...).
        cls: ``"attn"`` or ``"mlp"`` (for per-class ε).
        input_key: layers with the same key read the same input (q/k/v; gate/up) and share a Gram.
        out_features (N), in_features (M), bias.
    """

    name: str
    block: int
    proj: str
    cls: str
    input_key: str
    out_features: int
    in_features: int
    bias: bool


def check_config(config, where: str) -> None:
    """Raise ValueError, naming ``where``, unless ``config`` is a decoder-only causal LM's.

    Reads only the config: call it before dequantising or loading any weight.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{where}: model_type {model_type!r} is an encoder-decoder model; "
                         "pgsvd_rt compresses decoder-only causal LMs")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{where}: unsupported architecture {model_type!r}: transformers has no "
                         "causal LM for it (pgsvd_rt compresses decoder-only causal LMs)")
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(f"{where}: model_type {model_type!r} is multimodal (it has a vision "
                         "tower); pgsvd_rt compresses decoder-only text models and CLIP "
                         "(pgsvd_rt.compress.vlm)")
    for field in _EXPERT_FIELDS:
        n = getattr(config, field, None)
        if isinstance(n, int) and n > 1:
            raise ValueError(f"{where}: model_type {model_type!r} is a mixture of experts "
                             f"({field}={n}); pgsvd_rt compresses dense decoder blocks only")


def check_model_config(config, where: str) -> None:
    """:func:`check_config`, then the architecture built on the meta device (no memory, no
    weights) must have decoder blocks with linears: everything short of the probe forward."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_config(config, where)
    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for one cause
        raise ValueError(f"{where}: transformers cannot build model_type "
                         f"{getattr(config, 'model_type', None)!r}: {exc}") from exc
    try:
        block_linears(skeleton)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the decoder blocks. Raises ValueError if there are none."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config: not a transformers model")
    check_config(config, _describe(model))
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    n = getattr(config, "num_hidden_layers", None)
    lists = [] if backbone is None else [
        m for m in backbone.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise ValueError(f"{_describe(model)}: no single list of {n} decoder blocks found in "
                         "its decoder")
    names = {id(m): name for name, m in model.named_modules()}
    return names[id(lists[0])], lists[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_blocks(model)[1]


def block_linears(model: nn.Module) -> list[tuple[str, int, str, nn.Module]]:
    """``(name, block, path in block, module)`` of every linear inside a decoder block, in
    module order. Linear means ``nn.Linear`` or an already factored one (:class:`LowRankLinear`,
    :class:`LowRankLinearInt8`)."""
    prefix, blocks = decoder_blocks(model)
    out = []
    for i, block in enumerate(blocks):
        for path, mod in block.named_modules():
            if isinstance(mod, (nn.Linear, LowRankLinear, LowRankLinearInt8)):
                out.append((f"{prefix}.{i}.{path}", i, path, mod))
    if not out:
        kinds = sorted({type(m).__name__ for m in blocks[0].modules() if hasattr(m, "weight")})
        raise ValueError(f"{_describe(model)}: its decoder blocks hold no nn.Linear (their "
                         f"weighted layers are {kinds})")
    return out


def backbone_forward(model: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> None:
    """Run the decoder (no head: its logits would dominate memory), without a KV cache."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


@torch.no_grad()
def _probe(model: nn.Module, linears) -> dict[str, list[torch.Tensor]]:
    """Each linear's inputs during one forward on a few fixed tokens."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, *_ in linears}
    handles = []
    for name, _, _, mod in linears:
        def hook(_m, args, name=name):
            seen[name].append(args[0].detach().clone())
        handles.append(mod.register_forward_pre_hook(hook))
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, _PROBE_TOKENS), generator=g)
    try:
        backbone_forward(model, ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return seen


def linear_specs(model: nn.Module) -> list[LinearSpec]:
    """The compressible linears of every decoder block, with their shared-input groups.

    Works on dense models and on models whose linears were already replaced. Embeddings and
    lm_head are never listed. Runs one probe forward of :data:`_PROBE_TOKENS` tokens.
    """
    linears = block_linears(model)
    seen = _probe(model, linears)
    specs, groups = [], {}  # groups: block -> [(representative input, key)]
    for name, block, path, mod in linears:
        calls = seen[name]
        if len(calls) != 1:
            why = "does not run" if not calls else f"runs {len(calls)} times"
            raise ValueError(f"{_describe(model)}: {name} {why} in a forward; pgsvd_rt "
                             "compresses projections that run once per block "
                             "(no experts, no shared layers)")
        x = calls[0]
        key = next((k for rep, k in groups.get(block, [])
                    if rep.shape == x.shape and torch.equal(rep, x)), None)
        if key is None:
            key = f"{block}.{path}.in"
            groups.setdefault(block, []).append((x, key))
        parts = path.lower().split(".")
        cls = "attn" if any("attn" in p or "attention" in p for p in parts[:-1]) else "mlp"
        specs.append(LinearSpec(
            name=name, block=block, proj=path.rpartition(".")[2], cls=cls, input_key=key,
            out_features=mod.out_features, in_features=mod.in_features,
            bias=getattr(mod, "bias", None) is not None))
    return specs
