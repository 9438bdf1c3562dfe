"""vLLM serves factored checkpoints: quant_method "pgsvd" as a vLLM quantization method.

``pip install`` registers the ``vllm.general_plugins`` entry point
(:func:`pgsvd_rt.integrations.register_vllm`), which vLLM runs in every process; a checkpoint
whose config.json says ``quantization_config.quant_method == "pgsvd"`` (written by
``save_factored``) then loads with no extra flag: ``vllm.LLM(model=ckpt)``, ``vllm serve ckpt``.

How a layer is served. vLLM merges projections that share an input (``qkv_proj`` holds q, k
and v; ``gate_up_proj`` holds gate and up). Each projection (a "shard") has its own rank, and
PGSVD leaves a projection dense past break-even, so one merged layer can mix both. Per layer:

- ``v``: (K_local, R_1 + ... + R_G) the right factors of the factored shards side by side,
- ``u``: the left factors (N_g,local, R_g) flattened one after another (viewed per shard after
  loading),
- ``weight``: the dense shards' rows (only when some shard is dense),

and :meth:`PGSVDLinearMethod.apply` calls ``pgsvd_rt.ops.lowrank_matmul`` (one factored
shard) or ``lowrank_matmul_merged`` (several: x is read once, the shards' outputs side by side in
one tensor; ``lowrank_matmul_grouped`` when a dense shard sits among them), so the Triton kernel
serves on CUDA (captured by vLLM's CUDA graphs) and the native CPU kernel on CPU.

Tensor parallelism (bytes read per rank, TP = t, dense W is N x K):

- column-parallel (qkv, gate_up): u's rows are sharded, v is replicated:
  ``(N/t + K) R`` per rank against ``N K / t`` dense; no communication of ours.
- row-parallel (o_proj, down_proj): v's rows are sharded, u is replicated:
  ``(K/t + N) R`` per rank. Default (``PGSVD_VLLM_TP_REDUCE=output``): each rank returns its
  partial (M, N) output and vLLM all-reduces it, as for a dense layer. The alternative
  (``PGSVD_VLLM_TP_REDUCE=rank``): all-reduce the (M, R) partial ``x @ v`` instead, then every
  rank applies the replicated u: R / N of the bytes on the wire, every rank computes the full
  ``t @ u.T``.

Errors are raised at load time, naming the module: ranks that disagree with the tensors
(checked against the safetensors header before any weight loads), a missing tensor, a merged
layer whose shards cannot be told apart (a projection fused on disk, like Phi-3's qkv_proj, that
vLLM splits), a model compression would refuse (:func:`pgsvd_rt.arch.check_model_config`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from pgsvd_rt import ops
from pgsvd_rt.arch import check_model_config
from pgsvd_rt.io import quant_config

TP_REDUCE_ENV = "PGSVD_VLLM_TP_REDUCE"
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def _tp_reduce_mode() -> str:
    mode = os.environ.get(TP_REDUCE_ENV, "output")
    if mode not in ("output", "rank"):
        raise ValueError(f"{TP_REDUCE_ENV}={mode!r}: expected 'output' or 'rank'")
    return mode


class PGSVDvLLMConfig(QuantizationConfig):
    """vLLM's view of a factored checkpoint's ``quantization_config``."""

    def __init__(self, ranks: dict[str, int]) -> None:
        super().__init__()
        self.ranks = ranks

    def get_name(self) -> str:
        return quant_config.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain loads and FMAs: any GPU Triton runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the entry lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PGSVDvLLMConfig:
        ranks = quant_config.parse_ranks(config, "quantization_config")
        int8 = quant_config.int8_modules(config, ranks, "quantization_config")
        if int8:
            raise ValueError(f"pgsvd: int8 factors (e.g. {sorted(int8)[0]!r}) are served by "
                             "load_factored and from_pretrained; the vLLM method serves float "
                             "factors only")
        return cls(ranks)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Rename modules where the vLLM model's names differ from the HF ones (not stacking)."""
        renamed = hf_to_vllm_mapper.apply_dict(self.ranks)
        if len(renamed) != len(self.ranks):
            dropped = sorted(set(self.ranks) - set(hf_to_vllm_mapper.apply_list(
                list(self.ranks))))
            raise ValueError(f"pgsvd: vLLM's weight mapper drops factored modules {dropped[:3]}")
        self.ranks = renamed

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Refuse, before any weight loads, what compression refuses too (pgsvd_rt.arch: not
        a dense decoder-only causal LM) and ranks that disagree with the tensors (read from the
        safetensors header)."""
        if hf_config is not None:
            check_model_config(hf_config, f"pgsvd: checkpoint {model_name!r}")
        if Path(model_name).is_dir():
            quant_config.check_tensors(self.ranks, quant_config.read_header(model_name),
                                       model_name)

    def _shard_names(self, prefix: str) -> list[str]:
        parent, _, leaf = prefix.rpartition(".")
        members = self.packed_modules_mapping.get(leaf, [leaf])
        return [f"{parent}.{m}" if parent else m for m in members]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the head stay dense
        names = self._shard_names(prefix)
        ranks = [self.ranks.get(n) for n in names]
        if all(r is None for r in ranks):
            return UnquantizedLinearMethod()
        return PGSVDLinearMethod(names, ranks)


class PGSVDLinearMethod(LinearMethodBase):
    """One (possibly merged) linear layer whose shards are factored or dense (module doc)."""

    def __init__(self, names: list[str], ranks: list[int | None]) -> None:
        self.names, self.ranks = names, ranks
        self.factored = [g for g, r in enumerate(ranks) if r is not None]
        self.dense = [g for g, r in enumerate(ranks) if r is None]

    # ---- weights ----------------------------------------------------------------------------
    def create_weights(self, layer, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        extra_weight_attrs.pop("weight_loader", None)
        if len(output_partition_sizes) != len(self.names):
            raise ValueError(
                f"pgsvd: layer {layer.prefix!r} holds {len(output_partition_sizes)} projections "
                f"but its checkpoint names {self.names}: a projection fused on disk (like Phi-3's "
                "qkv_proj) is served by load_factored and from_pretrained, not by vLLM")
        K, n_loc = input_size_per_partition, list(output_partition_sizes)
        layer.pgsvd_row_parallel = isinstance(layer, RowParallelLinear)
        layer.pgsvd_n_local = n_loc
        # Offsets of each factored shard in u (flat) and in v's columns, of each dense one in
        # weight's rows.
        layer.pgsvd_u_off, layer.pgsvd_v_off, layer.pgsvd_w_off = {}, {}, {}
        u_numel = r_sum = w_rows = 0
        for g in self.factored:
            layer.pgsvd_u_off[g], layer.pgsvd_v_off[g] = u_numel, r_sum
            u_numel += n_loc[g] * self.ranks[g]
            r_sum += self.ranks[g]
        for g in self.dense:
            layer.pgsvd_w_off[g] = w_rows
            w_rows += n_loc[g]
        kw = {"dtype": params_dtype}
        params = {"u": torch.empty(u_numel, **kw), "v": torch.empty(K, r_sum, **kw)}
        if self.dense:
            params["weight"] = torch.empty(w_rows, K, **kw)
        layer.pgsvd_loaded = set()
        for key, data in params.items():
            p = Parameter(data, requires_grad=False)
            p.weight_loader = self._loader(layer, key)
            layer.register_parameter(key, p)

    def _shard_index(self, layer, shard_id) -> int:
        if shard_id is None:
            if len(self.names) != 1:
                raise ValueError(f"pgsvd: layer {layer.prefix!r}: a tensor without shard id for "
                                 f"a merged layer of {self.names}")
            return 0
        g = _QKV_INDEX[shard_id] if isinstance(layer, QKVParallelLinear) else int(shard_id)
        if not 0 <= g < len(self.names):
            raise ValueError(f"pgsvd: layer {layer.prefix!r}: shard id {shard_id!r} out of range")
        return g

    def _rows(self, layer, g: int, t: torch.Tensor, what: str) -> torch.Tensor:
        """This rank's output rows of shard g (column-parallel), or all of them (row-parallel)."""
        n = layer.pgsvd_n_local[g]
        total, chunks = t.shape[0], max(t.shape[0] // n, 1)
        if chunks * n != total or layer.tp_size % chunks and chunks % layer.tp_size:
            raise ValueError(f"pgsvd: {what} has {total} rows; layer {layer.prefix!r} expects "
                             f"{n} per rank at tensor parallel size {layer.tp_size}")
        i = layer.tp_rank * chunks // layer.tp_size
        return t[i * n:(i + 1) * n]

    def _cols(self, layer, t: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        """This rank's slice of the input dim (row-parallel), or all of it (column-parallel)."""
        K = layer.input_size_per_partition
        if not layer.pgsvd_row_parallel:
            if t.shape[dim] != K:
                raise ValueError(f"pgsvd: {what} has in_features {t.shape[dim]}, layer "
                                 f"{layer.prefix!r} expects {K}")
            return t
        if t.shape[dim] != K * layer.tp_size:
            raise ValueError(f"pgsvd: {what} has in_features {t.shape[dim]}, layer "
                             f"{layer.prefix!r} expects {K * layer.tp_size}")
        return t.narrow(dim, layer.tp_rank * K, K)

    def _loader(self, layer, key: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            g = self._shard_index(layer, shard_id)
            name, r = self.names[g], self.ranks[g]
            what = f"tensor {name}.{key}"
            if (key == "weight") != (r is None):
                kind = "dense" if r is None else f"factored at rank {r}"
                raise ValueError(f"pgsvd: {what} found, but module {name!r} is {kind}")
            if key == "weight":
                part = self._cols(layer, self._rows(layer, g, loaded, what), 1, what)
                off = layer.pgsvd_w_off[g]
                param.data[off:off + part.shape[0]].copy_(part)
            else:
                if loaded.dim() != 2 or loaded.shape[1] != r:
                    raise ValueError(f"pgsvd: {what} has shape {list(loaded.shape)}, expected "
                                     f"rank {r} columns")
                if key == "u":
                    part = loaded if layer.pgsvd_row_parallel else self._rows(layer, g, loaded,
                                                                              what)
                    if layer.pgsvd_row_parallel and part.shape[0] != layer.pgsvd_n_local[g]:
                        raise ValueError(f"pgsvd: {what} has {part.shape[0]} rows, layer "
                                         f"{layer.prefix!r} expects {layer.pgsvd_n_local[g]}")
                    off = layer.pgsvd_u_off[g]
                    param.data[off:off + part.numel()].copy_(part.reshape(-1))
                else:
                    part = self._cols(layer, loaded, 0, what)
                    off = layer.pgsvd_v_off[g]
                    param.data[:, off:off + r].copy_(part)
            layer.pgsvd_loaded.add((g, key))
        return load

    def process_weights_after_loading(self, layer) -> None:
        for g, name in enumerate(self.names):
            for key in ("weight",) if self.ranks[g] is None else ("u", "v"):
                if (g, key) not in layer.pgsvd_loaded:
                    raise ValueError(f"pgsvd: tensor {name}.{key} is missing from the checkpoint "
                                     f"(layer {layer.prefix!r})")
        n_loc = layer.pgsvd_n_local
        layer.pgsvd_us = [
            layer.u.data[layer.pgsvd_u_off[g]:layer.pgsvd_u_off[g] + n_loc[g] * self.ranks[g]]
            .view(n_loc[g], self.ranks[g]) for g in self.factored]
        # "rank" reduce: this layer all-reduces its (M, R) partial itself, so vLLM must not
        # reduce the (M, N) output again.
        layer.pgsvd_reduce_rank = (layer.pgsvd_row_parallel and layer.tp_size > 1
                                   and _tp_reduce_mode() == "rank")
        if layer.pgsvd_reduce_rank:
            layer.reduce_results = False
        # Packed once for the CPU kernels where this machine has them (every M: decode, batches,
        # prefill); u and v are then dropped. Elsewhere v.T where the decode kernels read it so.
        layer.pgsvd_packed = None if layer.pgsvd_reduce_rank else ops.pack_factors(
            layer.pgsvd_us, layer.v.data)
        if layer.pgsvd_packed is not None:
            w = Parameter(layer.pgsvd_packed.w, requires_grad=False)
            layer.register_parameter("pgsvd_w", w)
            layer.pgsvd_packed = ops.PackedFactors(w, layer.pgsvd_packed.ns,
                                                   layer.pgsvd_packed.rs)
            layer.u.data, layer.v.data, layer.pgsvd_us = layer.u.data[:0], layer.v.data[:0], None
        else:
            layer.v.data = ops.decode_layout(layer.v.data)

    # ---- compute ----------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.pgsvd_reduce_rank:
            from vllm.distributed import tensor_model_parallel_all_reduce

            t = tensor_model_parallel_all_reduce(x @ layer.v)
            full_bias = None if layer.skip_bias_add else layer.bias
            y = t @ layer.pgsvd_us[0].t()
            return y if full_bias is None else y + full_bias
        packed = layer.pgsvd_packed
        if not self.dense:
            if packed is not None:
                return ops.lowrank_matmul_packed(x, packed, bias)
            if len(self.factored) == 1:
                return ops.lowrank_matmul(x, layer.pgsvd_us[0], layer.v, bias)
            return ops.lowrank_matmul_merged(x, layer.pgsvd_us, layer.v, bias)
        outs: dict[int, torch.Tensor] = {}
        if packed is not None:
            outs.update(zip(self.factored,
                            ops.lowrank_matmul_packed(x, packed).split(list(packed.ns), -1),
                            strict=True))
        elif len(self.factored) == 1:
            outs[self.factored[0]] = ops.lowrank_matmul(x, layer.pgsvd_us[0], layer.v)
        elif self.factored:
            outs.update(zip(self.factored,
                            ops.lowrank_matmul_grouped(x, layer.pgsvd_us, layer.v), strict=True))
        dense = torch.nn.functional.linear(x, layer.weight)
        for g in self.dense:
            off = layer.pgsvd_w_off[g]
            outs[g] = dense[..., off:off + layer.pgsvd_n_local[g]]
        y = torch.cat([outs[g] for g in range(len(self.names))], -1)
        return y if bias is None else y + bias


def register() -> None:
    """Register quant_method "pgsvd" with vLLM (safe to call more than once)."""
    register_quantization_config(quant_config.QUANT_METHOD)(PGSVDvLLMConfig)
