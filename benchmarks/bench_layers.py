"""The linear layers of one model step, as an engine calls them: our op against dense (CPU).

    python benchmarks/bench_layers.py --ckpt DIR [--dtype bfloat16] [--m 1 4] [--rounds 30] \\
        [--out benchmarks/results]

Loads a factored checkpoint (``load_factored``), groups q/k/v and gate/up as vLLM merges them
(``pgsvd_rt.nn.group_projections_``) and times one pass over every factored linear of the model
in forward order: the linear part of one model step of M tokens (a batch of decodes, or a
prompt), weights cold as in a real step (a model's layers do not fit in the last-level cache; a
64 MiB read between rounds makes sure). The ideal is the same at every M: factored and dense
differ by the number of weights, which sets both the bytes read (decode) and the FLOPs
(prefill). Providers, interleaved round by round:

- ``op``: exactly what the vLLM method's ``apply`` calls: ``pgsvd::lowrank_matmul_packed`` on
  the layer's factors packed once (``ops.pack_factors``) where this CPU has packed kernels, else
  ``lowrank_matmul_merged`` / ``lowrank_matmul`` with v laid out by ``ops.decode_layout``;
- ``op-unpacked``: where ``op`` is packed, the unpacked op as ``load_factored`` and
  ``from_pretrained`` models call it (v as ``ops.decode_layout`` lays it out);
- ``two-matmul``: ``(x @ v) @ u.T`` in torch (per projection of a merged layer), the naive
  version;
- ``dense``: ``F.linear`` on dense weights of the merged shapes (random values: latency does
  not depend on them);
- ``dense-vllm``: what vLLM's dense layers call on this CPU, the peer inside vLLM, when vLLM is
  installed (``dispatch_cpu_unquantized_gemm``: prepacked oneDNN where it builds the primitive,
  which bf16 needs AVX-512 for, else torch's linear). Reports before 2026-12-04 called it
  ``dense-onednn`` (oneDNN on an AVX512-BF16 CPU).

``--isa avx2`` measures an AVX2-only CPU (AMD Zen 2/3) on an AVX-512 one: the script restarts
itself with ``benchlib.AVX2_ENV`` set (our kernels' AVX2 sets forced, oneDNN and MKL capped
at AVX2), the file named ``...-as-avx2``.

On a CPU with AMX (and bf16), ``op-amx`` is ``op`` with every packed call on the AMX tiles
(csrc/packed_amx.h) at any M: beside ``op`` (AVX-512 tiles), the measurement behind the number of
rows from which AMX serves (``pgsvd_rt._C.packed_amx``'s ``min_rows``).

Per layer kind (qkv, o, gate/up, down): median ms per step, bytes per step and GB/s; for the
whole step the time ratio of each dense provider to ``op`` beside the bytes ratio (the ideal), and
the fraction of it reached. Runs inside a decode step of vLLM add the engine's own work around
these calls (``benchmarks/profile_vllm.py``); this isolates the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from pgsvd_rt import ops  # noqa: E402
from pgsvd_rt.io.checkpoint import load_factored  # noqa: E402
from pgsvd_rt.nn import GroupedLowRankLinear, LowRankLinear, group_projections_  # noqa: E402
from pgsvd_rt.ops import _native  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Providers that read the factors (the rest read dense weights).
FACTORED = ("op", "op-amx", "op-unpacked", "two-matmul")
# Providers run with the AMX tiles serving every packed call (pgsvd_rt._C.packed_amx).
AMX = ("op-amx",)
KINDS = {"qkv_group": "qkv", "gate_up_group": "gate/up", "o_proj": "o", "down_proj": "down"}


def step_layers(ckpt: str, dtype: torch.dtype) -> list[dict]:
    """Every factored linear call of one forward, merged as vLLM merges them."""
    model, _, _ = load_factored(ckpt, dtype=dtype)
    group_projections_(model)
    layers = []
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(m, GroupedLowRankLinear):
            us, v, b = [u.detach() for u in m.us], m.v_cat.detach(), m.bias_cat
        elif isinstance(m, LowRankLinear):
            us, v, b = [m.u.detach()], m.v.detach(), m.bias
        else:
            continue
        b = None if b is None else b.detach()
        v = v.contiguous()
        N, K = sum(u.shape[0] for u in us), v.shape[0]
        layers.append({"kind": KINDS.get(leaf, leaf), "us": us, "v": ops.decode_layout(v),
                       "bias": b, "packed": ops.pack_factors(us, v),
                       "N": N, "K": K, "W": torch.randn(N, K, dtype=dtype),
                       "factor_bytes": (sum(u.numel() for u in us) + v.numel())
                       * v.element_size(), "dense_bytes": N * K * v.element_size()})
    return layers


def providers(layers: list[dict]) -> dict:
    """name -> fn(layer, x): one call of that layer."""
    def unpacked(ly, x):
        if len(ly["us"]) == 1:
            return ops.lowrank_matmul(x, ly["us"][0], ly["v"], ly["bias"])
        return ops.lowrank_matmul_merged(x, ly["us"], ly["v"], ly["bias"])

    def op(ly, x):  # as the vLLM method's apply
        if ly["packed"] is not None:
            return ops.lowrank_matmul_packed(x, ly["packed"], ly["bias"])
        return unpacked(ly, x)

    def two_matmul(ly, x):  # the naive version: torch's own two matmuls per projection
        t, ys, r0 = x @ ly["v"], [], 0
        for u in ly["us"]:
            ys.append(t[:, r0:r0 + u.shape[1]] @ u.t())
            r0 += u.shape[1]
        y = torch.cat(ys, -1) if len(ys) > 1 else ys[0]
        return y if ly["bias"] is None else y + ly["bias"]

    out = {"op": op, "two-matmul": two_matmul,
           "dense": lambda ly, x: torch.nn.functional.linear(x, ly["W"], ly["bias"])}
    if any(ly["packed"] is not None for ly in layers):
        out["op-unpacked"] = unpacked
        if (layers[0]["v"].dtype == torch.bfloat16 and ops.native_available()
                and _native.module.amx_available()):
            out["op-amx"] = op  # run() turns the AMX tiles on around it
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError:
        return out
    for ly in layers:  # what vLLM's dense layers call on this CPU
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(ly["W"], requires_grad=False)
        m.bias = None if ly["bias"] is None else torch.nn.Parameter(ly["bias"].clone(),
                                                                    requires_grad=False)
        dispatch_cpu_unquantized_gemm(m, remove_weight=False)
        ly["vllm"] = m
    out["dense-vllm"] = lambda ly, x: ly["vllm"].cpu_linear(x, ly["vllm"].weight, ly["vllm"].bias)
    return out


def run(a) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[a.dtype]
    layers = step_layers(a.ckpt, dtype)
    provs = providers(layers)
    flush = torch.empty(64 * 2**20 // 4)
    kinds = list(dict.fromkeys(ly["kind"] for ly in layers))
    res = {"meta": {"device": benchlib.device_name("cpu"), "date": benchlib.today(),
                    "ckpt": os.path.basename(os.path.normpath(a.ckpt)), "dtype": a.dtype,
                    "threads": torch.get_num_threads(), "rounds": a.rounds, "layers": len(layers),
                    "native": ops.native_available(), "isa": a.isa, "command": a.command,
                    **({"isa_env": benchlib.AVX2_ENV} if a.isa == "avx2" else {}),
                    **benchlib.versions()},
           "bytes": {k: {"op": sum(ly["factor_bytes"] for ly in layers if ly["kind"] == k),
                         "dense": sum(ly["dense_bytes"] for ly in layers if ly["kind"] == k)}
                     for k in kinds},
           "results": {}}
    with torch.inference_mode():
        for M in a.m:
            xs = {K: torch.randn(M, K, dtype=dtype) for K in {ly["K"] for ly in layers}}
            times = {p: {k: [] for k in kinds} for p in provs}
            for r in range(a.rounds):
                for p, fn in provs.items():
                    flush.add_(1.0)  # evict the previous provider's weights
                    acc = dict.fromkeys(kinds, 0)
                    if p in AMX:
                        _native.module.packed_amx("on", 1)
                    try:
                        for ly in layers:
                            x = xs[ly["K"]]
                            t0 = time.perf_counter_ns()
                            fn(ly, x)
                            acc[ly["kind"]] += time.perf_counter_ns() - t0
                    finally:
                        if p in AMX:
                            _native.module.packed_amx("off")
                    if r >= a.warmup:
                        for k in kinds:
                            times[p][k].append(acc[k] / 1e6)
            res["results"][str(M)] = {p: {k: statistics.median(v) for k, v in t.items()}
                                      for p, t in times.items()}
    return res


def render(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Linear layers of one decode step: {m['ckpt']}, {m['dtype']} ({m['date']})", "",
             f"- {m['device']}"
             + (" as an AVX2-only CPU (our AVX2 kernels forced; oneDNN and MKL capped at AVX2)"
                if m.get("isa") == "avx2" else "")
             + f", torch {m['torch']}, {m['threads']} threads, CPU numbers; "
             f"{m['layers']} calls per step (q/k/v and gate/up merged as vLLM merges them), "
             f"weights cold, providers interleaved, median of {m['rounds']} rounds",
             "- ideal = dense bytes / factored bytes; frac ideal = (dense ms / op ms) / ideal"]
    lines += [f"- command: `{m['command']}`", ""] if m.get("command") else [""]
    kinds = list(res["bytes"])
    for M, per in res["results"].items():
        lines += [f"## M = {M}", "", "| layers | bytes/step factored (dense) | "
                  + " | ".join(f"{p} ms (GB/s)" for p in per) + " |",
                  "|---|---|" + "---|" * len(per)]
        rows = kinds + ["all"]
        for k in rows:
            b = (res["bytes"][k] if k != "all" else
                 {s: sum(res["bytes"][j][s] for j in kinds) for s in ("op", "dense")})
            cells = []
            for p, t in per.items():
                ms = t[k] if k != "all" else sum(t.values())
                gb = (b["op"] if p in FACTORED else b["dense"]) / (ms * 1e6)
                cells.append(f"{ms:.2f} ({gb:.1f})")
            lines.append(f"| {k} | {b['op'] / 1e6:.1f} MB ({b['dense'] / 1e6:.1f}) | "
                         + " | ".join(cells) + " |")
        op_ms = sum(per["op"].values())
        ideal = (sum(res["bytes"][k]["dense"] for k in kinds)
                 / sum(res["bytes"][k]["op"] for k in kinds))
        for p in per:
            if p not in FACTORED:
                ratio = sum(per[p].values()) / op_ms
                lines.append(f"- {p} / op: {ratio:.2f}x (ideal {ideal:.2f}x, "
                             f"{ratio / ideal:.2f} of ideal)")
        for p in FACTORED[1:]:
            if p in per:
                lines.append(f"- {p} / op: {sum(per[p].values()) / op_ms:.2f}x")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a factored checkpoint directory")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--m", type=int, nargs="+", default=[1], help="rows (tokens) per call")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="write JSON + markdown here")
    p.add_argument("--isa", choices=["auto", "avx2"], default="auto",
                   help="avx2: measure as an AVX2-only CPU would run (module docstring)")
    a = p.parse_args(argv)
    a.command = benchlib.command(__file__, argv)
    if a.rounds <= a.warmup:
        p.error(f"--rounds must exceed --warmup ({a.warmup}), got {a.rounds}")
    if a.isa == "avx2" and any(os.environ.get(k) != v for k, v in benchlib.AVX2_ENV.items()):
        if argv is not None:
            p.error("--isa avx2 from Python: set " + " ".join(f"{k}={v}" for k, v in
                                                              benchlib.AVX2_ENV.items()) + " first")
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | benchlib.AVX2_ENV)
    res = run(a)
    md = render(res)
    print(md)
    if a.out:
        m = res["meta"]
        slug = benchlib.device_slug(m["device"]) + ("-as-avx2" if a.isa == "avx2" else "")
        stem = os.path.join(a.out, f"{slug}-{m['date']}-layers-{m['ckpt']}-{a.dtype}")
        os.makedirs(a.out, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md + "\n")
        print(f"wrote {stem}.json, {stem}.md")
    return res


if __name__ == "__main__":
    main()
