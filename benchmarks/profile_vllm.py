"""Where one vLLM engine spends a generation: torch profiler table of every op (CPU).

    python benchmarks/profile_vllm.py DIR [--dtype bfloat16] [--concurrency 1 | --prefill 8x512]
        [--compile] [--shapes]

Starts vLLM in-process on DIR (a dense HF directory or a factored checkpoint), warms up, times
two generations of ``--concurrency`` requests (random prompts of 32 tokens, 64 new tokens each;
``--prefill NxL``: N prompts of L tokens, one new token each), then profiles a third and prints
the ops by self CPU time (``--shapes``: per input shape). This is how the README's split of a
step into linear layers and the rest is read off: the bound on a factored model's speedup is
(dense wall) / (rest of dense + dense linears / ideal).
"""

from __future__ import annotations

import argparse
import os
import random
import time

#: What a vLLM model's linear layers call on the CPU (their self time, so nothing twice):
#: oneDNN (dense, where it builds), torch's GEMMs (dense bf16 without AVX-512), our ops.
LINEAR_OPS = ("_C::onednn_mm", "aten::mm", "aten::addmm", "pgsvd::lowrank_matmul",
              "pgsvd::lowrank_matmul_merged", "pgsvd::lowrank_matmul_grouped",
              "pgsvd::lowrank_matmul_packed")


def split_linears(prof, vocab: int) -> dict:
    """Milliseconds of a profile (``record_shapes=True``) in the decoder's linear layers and in
    the head (a linear op whose output has ``vocab`` columns), and the op total."""
    lin = head = total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total
        if e.key in LINEAR_OPS:
            out = e.input_shapes[0] if e.input_shapes else []
            if out and out[-1] == vocab:
                head += e.self_cpu_time_total
            else:
                lin += e.self_cpu_time_total
    return {"linear_ms": lin / 1e3, "head_ms": head / 1e3, "ops_ms": total / 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prefill", default=None, help="NxL: N prompts of L tokens, 1 new token")
    p.add_argument("--compile", action="store_true", help="vLLM's torch.compile (default eager)")
    p.add_argument("--shapes", action="store_true", help="group the table by input shapes")
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    n, length, new = a.concurrency, 32, 64
    if a.prefill:
        n, length = map(int, a.prefill.split("x"))
        new = 1
    llm = LLM(model=a.dir, dtype=a.dtype, max_model_len=length + new + 8,
              enforce_eager=not a.compile, kv_cache_memory_bytes=2**30, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    rng = random.Random(0)

    def prompts():
        return [{"prompt_token_ids": [rng.randrange(100, 20000) for _ in range(length)]}
                for _ in range(n)]

    llm.generate(prompts(), sp, use_tqdm=False)
    for _ in range(2):
        t0 = time.perf_counter()
        llm.generate(prompts(), sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        print(f"{'prompt' if a.prefill else 'output'} tokens/s: "
              f"{n * (length if a.prefill else new) / wall:.1f}")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts(), sp, use_tqdm=False)
        wall = time.perf_counter() - t0
    print(f"profiled generation: {wall * 1e3:.0f} ms wall, {wall / new * 1e3:.1f} ms per new token")
    print(prof.key_averages(group_by_input_shape=a.shapes).table(
        sort_by="self_cpu_time_total", row_limit=a.rows))
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    split = split_linears(prof, vocab)
    print(f"decoder linears {split['linear_ms']:.0f} ms, head {split['head_ms']:.0f} ms, all ops "
          f"{split['ops_ms']:.0f} ms, wall {wall * 1e3:.0f} ms (profiled)")


if __name__ == "__main__":
    main()
