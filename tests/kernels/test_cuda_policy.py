"""The CUDA path policy (pgsvd_rt/ops/cuda_policy.py): fused Triton kernel or two cuBLAS GEMMs.

On the CPU: the lookup against a stand-in table, the table's validation, writing and merging, and
the ops' CUDA kernels (pgsvd_rt/ops/_triton.py, run on CPU tensors with the Triton interpreter)
taking the path the table names; which path ran is read from the ATen ops the profiler saw (the
cuBLAS path runs ``aten::mm`` / ``aten::addmm``, the kernel neither). On a GPU
(marked ``gpu``): both paths against the fp64 reference, under CUDA-graph replay and compiled.
"""

import json

import pytest
import torch

from pgsvd_rt.ops import cuda_policy as cp
from tests.accuracy import check_lowrank, lowrank_factors

GPU, CAP = "Stand-in GPU 80GB", "sm_90"
CLASSES = [
    {"r_max": 1024, "m": {"1": "fused", "64": "cublas"}},
    {"r_max": None, "m": {"1": "fused", "16": "cublas", "1024": "fused"}},
]
STAND_IN = {"version": 1, "devices": {
    GPU: {"capability": CAP, "notes": {"what": "ignored"}, "bfloat16": CLASSES},
    "Other GPU": {"capability": "sm_80", "bfloat16": [{"r_max": None, "m": {"1": "cublas"}}]},
    # The CUDA kernels' Python on CPU tensors (the interpreter) is looked up as device "cpu".
    "cpu": {"capability": "cpu", "float32": [
        {"r_max": 40, "m": {"1": "fused", "32": "cublas"}},
        {"r_max": None, "m": {"1": "cublas", "4": "fused"}}]},
}}


def test_m_bucket_is_the_next_power_of_two():
    assert [cp.m_bucket(m) for m in (0, 1, 2, 3, 4, 5, 17, 1024, 1025)] == \
        [1, 1, 2, 4, 4, 8, 32, 1024, 2048]


@pytest.mark.parametrize("name,cap,dtype,M,R,want", [
    (GPU, CAP, torch.bfloat16, 1, 100, "fused"),
    (GPU, CAP, torch.bfloat16, 32, 1024, "fused"),     # bucket 32 < 64
    (GPU, CAP, torch.bfloat16, 33, 1024, "cublas"),    # bucket 64
    (GPU, CAP, torch.bfloat16, 5000, 1, "cublas"),     # bucket 8192: the largest key, 64
    (GPU, CAP, torch.bfloat16, 17, 1025, "cublas"),    # next class; bucket 32 takes 16's choice
    (GPU, CAP, torch.bfloat16, 1000, 4096, "fused"),   # bucket 1024
    (GPU, CAP, torch.bfloat16, 0, 4096, "fused"),      # M = 0: bucket 1
    ("Same class GPU", CAP, torch.bfloat16, 64, 8, "cublas"),  # by capability
    ("Unknown GPU", "sm_75", torch.bfloat16, 64, 8, "fused"),  # not in the table
    (GPU, CAP, torch.float16, 64, 8, "fused"),         # dtype not measured
    ("Other GPU", "sm_80", torch.bfloat16, 1, 8, "cublas"),
])
def test_choose_from_a_stand_in_table(name, cap, dtype, M, R, want):
    assert cp.choose(cp.validate(STAND_IN), name, cap, dtype, M, R) == want


def test_the_committed_table_is_valid():
    table = cp.load(cp.TABLE_PATH)
    for name, entry in table["devices"].items():
        assert entry.get("capability", "").startswith("sm_"), name
    assert cp.choose(table, "No such GPU", "sm_0", torch.bfloat16, 1, 1) == "fused"


def _with(change):
    t = json.loads(json.dumps(STAND_IN))
    change(t["devices"][GPU])
    return t


@pytest.mark.parametrize("table,msg", [
    ({"version": 2, "devices": {}}, '"version": 1'),
    ({"version": 1}, '"devices" must be a dict'),
    (_with(lambda e: e["bfloat16"][0]["m"].update({"64": "dense"})), "'dense' is not one of"),
    (_with(lambda e: e["bfloat16"][0]["m"].update({"064": "fused"})), "'064' is not a positive"),
    (_with(lambda e: e["bfloat16"].reverse()), "only the last rank class may have r_max null"),
    (_with(lambda e: e["bfloat16"].insert(1, {"r_max": 512, "m": {}})), "integer r_max above 1024"),
    (_with(lambda e: e.update(bfloat17=[])), "bfloat17: not a torch dtype name"),
    (_with(lambda e: e.update(capability=90)), "capability must be a string"),
])
def test_validate_names_the_problem(table, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        cp.validate(table, "stand-in")


def test_from_env(tmp_path):
    assert cp.from_env("cublas").force == "cublas" and cp.from_env("fused").force == "fused"
    path = tmp_path / "t.json"
    cp.dump(STAND_IN, path)
    assert cp.from_env(str(path)).table == STAND_IN
    assert cp.from_env(None).table == cp.load(cp.TABLE_PATH)
    with pytest.raises(FileNotFoundError):
        cp.from_env(str(tmp_path / "missing.json"))


def test_entry_from_timings_sums_a_block_and_merges_classes():
    def rows(N, K, R, M, fused, cublas, weight):
        return [dict(dtype="bfloat16", N=N, K=K, R=R, M=M, path=p, ms=ms, weight=weight)
                for p, ms in (("fused", fused), ("cublas", cublas))]

    timings = (
        # class 1024 (R 819): cuBLAS wins from M = 64 on; 2% faster at M = 16 is a tie (margin).
        rows(4096, 4096, 819, 1, 1.0, 1.5, 4) + rows(4096, 4096, 819, 16, 1.0, 0.98, 4)
        + rows(4096, 4096, 819, 64, 1.0, 0.5, 4)
        # class 2048: two shapes; at M = 16 the 4-weighted fused win outweighs the other
        + rows(4096, 4096, 1228, 1, 1.0, 2.0, 4) + rows(11008, 4096, 1791, 1, 1.0, 2.0, 2)
        + rows(4096, 4096, 1228, 16, 1.0, 1.1, 4) + rows(11008, 4096, 1791, 16, 1.0, 0.8, 2)
        + rows(4096, 4096, 1228, 64, 1.0, 0.6, 4) + rows(11008, 4096, 1791, 64, 1.0, 0.6, 2)
        + [dict(dtype="bfloat16", N=1, K=1, R=1, M=1, path="fused", ms=9.0)]  # no pair: unused
    )
    entry = cp.entry_from_timings(timings, CAP, margin=0.03, date="2026-12-06")
    assert entry["capability"] == CAP and entry["notes"]["date"] == "2026-12-06"
    # Both classes choose alike at every M: one class, r_max null, sums over all shapes.
    (cls,) = entry["bfloat16"]
    assert cls["r_max"] is None
    assert cls["m"] == {"1": "fused", "16": "fused", "64": "cublas"}
    assert cls["cublas_over_fused"]["16"] == round((4 * 0.98 + 4 * 1.1 + 2 * 0.8) / 10, 3)
    table = {"version": 1, "devices": {GPU: entry}}
    assert cp.choose(cp.validate(table), GPU, CAP, torch.bfloat16, 100, 5000) == "cublas"

    # A class that differs keeps its own: R 819 now wins at 16, R > 1024 still does not.
    timings[2:4] = rows(4096, 4096, 819, 16, 1.0, 0.5, 4)
    entry = cp.entry_from_timings(timings, CAP)
    assert [(c["r_max"], c["m"]["16"]) for c in entry["bfloat16"]] == \
        [(1024, "cublas"), (None, "fused")]


def test_merge_file_replaces_and_adds_devices(tmp_path):
    dest = tmp_path / "cuda_policy.json"
    cp.dump({"version": 1, "devices": {"Old GPU": {"capability": "sm_80"},
                                       GPU: {"capability": "sm_0"}}}, dest)
    measured = tmp_path / "gpu-2026-12-06-cuda-policy.json"
    measured.write_text(json.dumps({"timings": [], "table": STAND_IN}))
    assert cp.merge_file(measured, dest) == list(STAND_IN["devices"])
    merged = cp.load(dest)
    assert merged["devices"]["Old GPU"] == {"capability": "sm_80"}
    assert merged["devices"][GPU] == STAND_IN["devices"][GPU]
    assert cp.merge_file(measured, tmp_path / "new.json")  # no table there yet: created


def test_policy_benchmark_writes_the_table(lowrank_kernels, kernel_device, tmp_path):
    """gpu_check.sh's policy step in smoke form: bench_lowrank_matmul.py --policy times both
    paths (on CPU through the CUDA kernel's Python, interpreted) and writes a table that loads,
    holds this device's entry, and keeps the committed table's other devices."""
    from tests.benchmarks import load_bench

    table_path = tmp_path / "cuda_policy.json"
    bench = load_bench("bench_lowrank_matmul")
    assert bench.main(["--smoke", "--out", str(tmp_path), "--policy", str(table_path)]) == 0
    name, cap = cp.device_keys(torch.device(kernel_device))
    table = cp.load(table_path)
    assert set(table["devices"]) == set(cp.load(cp.TABLE_PATH)["devices"]) | {name}
    (res_file,) = tmp_path.glob("*-smoke-cuda-policy.json")
    res = json.loads(res_file.read_text())
    assert res["complete"] and res["table"]["devices"][name] == table["devices"][name]
    assert {(r["M"], r["path"]) for r in res["timings"]} == \
        {(M, p) for M in (1, 4, 32) for p in cp.CHOICES}
    (cls,) = table["devices"][name]["float32" if kernel_device == "cpu" else "float16"]
    assert cls["r_max"] is None and list(cls["m"]) == ["1", "4", "32"]
    assert res_file.with_suffix(".md").read_text().count("| tiny 64x48 |") == 3


# ------------------------------------------------------------------------------ the dispatcher
def _run(fn):
    """(fn(), the path it took): the cuBLAS path runs aten::mm / aten::addmm, the fused kernel
    (interpreted or compiled) neither; the profiler sees them inside the op's kernel too."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = {e.name for e in prof.events()}
    return out, ("cublas" if names & {"aten::mm", "aten::addmm"} else "fused")


@pytest.mark.parametrize("M,R,want", [(1, 7, "fused"), (40, 7, "cublas"), (2, 41, "cublas"),
                                      (5, 41, "fused")])
def test_cuda_kernel_takes_the_tables_path(lowrank_kernels, M, R, want):
    from pgsvd_rt.ops import _triton

    x, u, v, b = lowrank_factors(M, 37, 29, R, torch.float32, "cpu", True, "sliced", seed=M + R)
    x = x.reshape(1, M, 37) if M % 2 else x  # leading dims fold into M
    with cp.override(STAND_IN):
        y, ran = _run(lambda: _triton._lowrank_matmul_cuda(x, u, v, b))
    assert ran == want
    assert y.shape == (*x.shape[:-1], 29)
    check_lowrank(y.reshape(M, 29), x.reshape(M, 37), u, v, b)


@pytest.mark.parametrize("M,want", [(2, "cublas"), (8, "fused")])
def test_cuda_grouped_kernel_takes_the_tables_path(lowrank_kernels, M, want):
    """The grouped op is looked up at R = R_1 + ... + R_G (45 > 40: the second class)."""
    from pgsvd_rt.ops import _triton

    g = torch.Generator().manual_seed(M)
    K, shapes = 37, [(41, 7), (16, 1), (24, 37)]
    x = torch.randn(M, K, generator=g)
    us = [torch.randn(N, R, generator=g) / R**0.5 for N, R in shapes]
    vs = [torch.randn(K, R, generator=g) / K**0.5 for _, R in shapes]
    bias_cat = torch.cat([torch.randn(41, generator=g), torch.zeros(16), torch.randn(24)])
    with cp.override(STAND_IN):
        ys, ran = _run(lambda: _triton._lowrank_matmul_grouped_cuda(x, us, torch.cat(vs, 1),
                                                                     bias_cat))
    assert ran == want
    for y, u, v, b in zip(ys, us, vs, bias_cat.split([41, 16, 24]), strict=True):
        check_lowrank(y, x, u, v, b)


@pytest.mark.parametrize("force", ["fused", "cublas"])
def test_override_forces_a_path_and_restores(lowrank_kernels, force):
    from pgsvd_rt.ops import _triton

    x, u, v, b = lowrank_factors(3, 37, 29, 7, torch.float16, "cpu", False, "contig", seed=1)
    before = cp._active
    with cp.override(force) as policy:
        y, ran = _run(lambda: _triton._lowrank_matmul_cuda(x, u, v, b))
    assert ran == force and policy.force == force
    assert cp._active is before
    check_lowrank(y, x, u, v, b)


def test_policy_caches_per_shape_class():
    policy = cp.Policy(STAND_IN)
    cpu = torch.device("cpu")
    assert policy(cpu, torch.float32, 33, 7) == "cublas"
    assert policy(cpu, torch.float32, 64, 7) == "cublas"  # the same bucket: one entry
    assert policy(cpu, torch.float32, 0, 7) == policy(cpu, torch.float32, 1, 7) == "fused"
    assert len(policy._cache) == 2


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cublas_path_accurate_under_graphs_and_compile():
    """The cuBLAS path (the fused one is what every other GPU test runs, the committed table
    naming nothing for their shapes): the 2x rule in bf16 at decode and prefill M, grouped too;
    a CUDA graph captured under the policy replays it; torch.compile(fullgraph) runs the op.
    No Triton kernel runs here, so it adds no compile or autotune to the GPU session."""
    from pgsvd_rt import ops

    with cp.override("cublas"):
        for M in (1, 300):
            x, u, v, b = lowrank_factors(M, 1024, 512, 96, torch.bfloat16, "cuda", True,
                                         "contig", seed=M)
            y, ran = _run(lambda: ops.lowrank_matmul(x, u, v, b))  # noqa: B023
            assert ran == "cublas"
            check_lowrank(y, x, u, v, b)
            ys = ops.lowrank_matmul_grouped(x, [u, u[:64]], torch.cat([v, v], 1), None)
            check_lowrank(ys[1], x, u[:64], v, None)
        static_x = x[:4].clone()
        want = ops.lowrank_matmul(static_x, u, v, b)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = ops.lowrank_matmul(static_x, u, v, b)
        static_x.mul_(-0.5)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, ops.lowrank_matmul(static_x, u, v, b))
        compiled = torch.compile(lambda t: ops.lowrank_matmul(t, u, v, b), fullgraph=True)
        torch.testing.assert_close(compiled(x[:4]), want)
