"""Compile every GPU autotune config of the fused low-rank kernel for sm_80 / sm_90 on any machine.

    python benchmarks/kernel_resources.py --out benchmarks/results            # report (~2 min)
    python benchmarks/kernel_resources.py --arch 90 --dtypes bf16 --check     # policy, exit 1

No GPU is needed: Triton compiles ahead of time for a named target (``triton.compile`` with a
``GPUTarget``) down to a cubin with the ptxas it ships, and ``cuobjdump`` (also shipped) reads the
cubin's registers and stack frame. What this shows is what the compiler makes of each config:
shared memory per program, registers per thread, stack bytes (register spills; the kernel has
no local arrays), and whether the main loops are software-pipelined (``cp.async``). What it
cannot show is time: which config is fastest is the autotuner's job on the GPU.

Specialisation matters as much as the config. A JIT launch marks pointers and ints that are
multiples of 16 as such, and unit strides as constants; loads are vectorised only where the
compiler can prove alignment. ``aligned`` compiles as a LLaMA-7B layer with contiguous x and
factors and R a multiple of 16 sees it; ``unaligned`` as the same layer with an arbitrary rank
(R and the factors' row strides not multiples of 16), which is what per-layer PGSVD ranks give
unless the factors are padded (``pgsvd_rt.nn.pad_ranks_``).

The policy ``--check`` enforces (tests/kernels/test_gpu_compile.py runs it in CI): every config
compiles for every target asked, is pipelined, and on sm_90 in bf16/fp16 at aligned shapes fits
H100 shared memory and spills nothing. Configs too big for a smaller GPU are only reported: the
autotuner drops them there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the JIT functions

EXIT_UNAVAILABLE = 3  # no Triton NVIDIA backend here (argparse errors exit 2, violations 1)
# Largest opt-in dynamic shared memory per block, bytes (CUDA programming guide, compute caps).
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
DEVICE = {80: "A100", 86: "RTX 30xx", 89: "L4 / RTX 40xx", 90: "H100 / H200"}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def available() -> str | None:
    """None when configs can be compiled here, else the reason they cannot."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"Triton with the NVIDIA backend is not importable: {e}"
    if not os.access(_cuobjdump(), os.X_OK):
        return f"no cuobjdump shipped with Triton at {_cuobjdump()}"
    return None


def _signature(fn, dtype: str, groups: int, aligned: bool) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as a JIT launch on a contiguous LLaMA-7B layer sees them."""
    sig, const = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = {"t_ptr": "*fp32", "sync_ptr": "*i32"}.get(p.name, f"*{dtype}")
        else:
            sig[p.name] = "i32"
    for unit in ("stride_xk", "stride_vr"):  # ints equal to 1 are specialised as constants
        sig[unit], const[unit] = "constexpr", 1
    div16 = ["x_ptr", "v_ptr", "t_ptr", "sync_ptr", "K", "stride_xm", "M_BUCKET"]
    div16 += [f"{a}{g}{b}" for g in range(groups) for a, b in (("u", "_ptr"), ("b", "_ptr"),
                                                               ("y", "_ptr"), ("N", ""))]
    if aligned:  # R_total is v's row stride, R_g u_g's
        div16 += ["R_total", "stride_vk"] + [f"R{g}" for g in range(groups)]
    names = [p.name for p in fn.params]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    return sig, const, attrs


def compile_config(cfg, path: str, arch: int, dtype: str, groups: int, aligned: bool) -> dict:
    """Compile one config; returns its row (resources, or the error)."""
    import triton
    from pgsvd_rt.kernels import lowrank_matmul as lm
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = lm._lowrank_matmul_kernel
    sig, const, attrs = _signature(fn, dtype, groups, aligned)
    const.update(cfg.kwargs, NUM_GROUPS=groups, DOT_PRECISION="tf32" if dtype == "fp32" else None,
                 **{f"HAS_BIAS{g}": g < groups for g in range(lm.MAX_GROUPS)})
    row = {"path": path, "arch": arch, "dtype": dtype, "groups": groups, "aligned": aligned,
           "config": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as e:  # a config that does not compile is a result, not a crash
        return {**row, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m is None:
        return {**row, "error": f"cannot read cuobjdump output: {usage[-300:]!r}"}
    smem = int(k.metadata.shared)
    return {**row, "compile_s": round(time.perf_counter() - t0, 2), "shared_bytes": smem,
            "fits": smem <= SMEM_LIMIT.get(arch, 0), "registers": int(m.group(1)),
            "stack_bytes": int(m.group(2)), "pipelined": "async_copy" in k.asm["ttgir"]}


def violations(rows: list[dict]) -> list[str]:
    """The policy of the module docstring; one line per broken row."""
    bad = []
    for r in rows:
        name = (f"sm_{r['arch']} {r['dtype']} {r['path']} G={r['groups']} "
                f"{'aligned' if r['aligned'] else 'unaligned'} {r['config']} "
                f"w{r['num_warps']} s{r['num_stages']}")
        if "error" in r:
            bad.append(f"{name}: does not compile: {r['error']}")
            continue
        if not r["pipelined"]:
            bad.append(f"{name}: main loops not pipelined (no cp.async)")
        if r["arch"] == 90 and r["aligned"] and r["dtype"] in ("bf16", "fp16"):
            if not r["fits"]:
                bad.append(f"{name}: {r['shared_bytes']} B shared memory > "
                           f"{SMEM_LIMIT[90]} B of an H100")
            if r["stack_bytes"]:
                bad.append(f"{name}: spills ({r['stack_bytes']} B stack, "
                           f"{r['registers']} registers)")
    return bad


def run(args) -> dict:
    import triton
    from pgsvd_rt.kernels import lowrank_matmul as lm

    paths = {"decode": lm.GPU_DECODE_CONFIGS, "prefill": lm.GPU_PREFILL_CONFIGS}
    rows = []
    for arch in args.arch:
        for dtype in args.dtypes:
            for groups in args.groups:
                for aligned in args.alignment:
                    for path in args.paths:
                        for cfg in paths[path]:
                            rows.append(compile_config(cfg, path, arch, dtype, groups,
                                                       aligned == "aligned"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import command, today

    return {"triton": triton.__version__, "date": today(),
            "command": command(__file__),
            "smem_limit_bytes": SMEM_LIMIT, "rows": rows, "violations": violations(rows)}


def to_markdown(res: dict) -> str:
    lines = [
        f"# Fused low-rank kernel: compiled resources per autotune config (Triton {res['triton']})",
        "",
        f"Compiled ahead of time on a CPU machine on {res['date']} (`{res['command'].strip()}`); "
        "no GPU was run, so nothing here is a timing. Shared memory limits: "
        + ", ".join(f"sm_{a} {v} B ({DEVICE[int(a)]})"  # JSON turns the int keys into str
                    for a, v in res["smem_limit_bytes"].items()
                    if any(r["arch"] == int(a) for r in res["rows"])) + ".",
        "",
        "## Summary (G = 1 and 3 together)",
        "",
        "| arch | dtype | R | path | configs | spill | max stack B | do not fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in res["rows"]:
        key = (-r["arch"], r["dtype"], not r["aligned"], r["path"])
        groups.setdefault(key, []).append(r)
    for (arch, dtype, unaligned, path), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        lines.append(
            f"| sm_{-arch} | {dtype} | {'unaligned' if unaligned else '16-aligned'} | {path} | "
            f"{len(rs)}{f' ({len(rs) - len(ok)} errors)' if len(ok) < len(rs) else ''} | "
            f"{sum(1 for r in ok if r['stack_bytes'])} | "
            f"{max((r['stack_bytes'] for r in ok), default=0)} | "
            f"{sum(1 for r in ok if not r['fits'])} |")
    lines += [
        "",
        "## Every config",
        "",
        "| arch | dtype | G | R | path | BLOCK M/R/K/N, SPLIT_K | warps | stages | shared B | "
        "fits | regs | stack B | pipelined |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        c = r["config"]
        head = (f"| sm_{r['arch']} | {r['dtype']} | {r['groups']} | "
                f"{'16-aligned' if r['aligned'] else 'unaligned'} | {r['path']} | "
                f"{c['BLOCK_M']}/{c['BLOCK_R']}/{c['BLOCK_K']}/{c['BLOCK_N']}, {c['SPLIT_K']} | "
                f"{r['num_warps']} | {r['num_stages']} | ")
        if "error" in r:
            lines.append(head + f"error: {r['error'][:80]} | | | | |")
        else:
            lines.append(head + f"{r['shared_bytes']} | {'y' if r['fits'] else 'no'} | "
                         f"{r['registers']} | {r['stack_bytes']} | "
                         f"{'y' if r['pipelined'] else 'no'} |")
    lines += ["", "Policy violations (see the module docstring): "
              + ("none" if not res["violations"] else "")]
    lines += [f"- {v}" for v in res["violations"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"],
                   choices=["bf16", "fp16", "fp32"])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 3], choices=[1, 2, 3, 4])
    p.add_argument("--alignment", nargs="+", default=["aligned", "unaligned"],
                   choices=["aligned", "unaligned"])
    p.add_argument("--paths", nargs="+", default=["decode", "prefill"],
                   choices=["decode", "prefill"])
    p.add_argument("--out", help="write kernel-resources-triton<version>.{json,md} here")
    p.add_argument("--check", action="store_true", help="exit 1 on a policy violation")
    p.add_argument("--render", metavar="JSON", help="only re-render the markdown of a results JSON")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            md = to_markdown(json.load(f))
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(md)
        return 0
    reason = available()
    if reason:
        print(f"kernel_resources: cannot compile here: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    res = run(args)
    md = to_markdown(res)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"kernel-resources-triton{res['triton']}")
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
    print(md)
    return 1 if args.check and res["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
