"""Run one vLLM engine on a checkpoint and print its greedy tokens as JSON (a subprocess of the
tests, so every engine gets a fresh process and nothing outlives the test).

    python -m tests.integrations.vllm_worker CKPT --dtype float32 --tp 1 --prompts '[[1,2,3]]'
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="vLLM's torch.compile (default eager)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.tp)))
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            str(i % (os.cpu_count() or 1)) for i in range(args.tp)))
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.ckpt, dtype=args.dtype, tensor_parallel_size=args.tp,
              max_model_len=256, enforce_eager=not args.compile, gpu_memory_utilization=0.25,
              seed=0)
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(args.prompts)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                ignore_eos=True), use_tqdm=False)
    print("PGSVD_TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    if args.tp == 1:  # which path served: layers with factors packed for the CPU kernels
        counts = llm.apply_model(_packed_layers)[0]
        print("PGSVD_PACKED " + json.dumps(counts), flush=True)


def _packed_layers(model) -> list[int]:
    """[factored layers whose factors were packed, factored layers]."""
    layers = [m for m in model.modules() if hasattr(m, "pgsvd_packed")]
    return [sum(m.pgsvd_packed is not None for m in layers), len(layers)]


if __name__ == "__main__":
    main()
