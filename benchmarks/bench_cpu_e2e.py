"""End to end on the CPU with real checkpoints: dense vs PGSVD-factored, decode and prefill.

    python benchmarks/bench_cpu_e2e.py --model smollm2-135m \\
        --ckpt pgsvd-20=ckpts/smollm2-pgsvd-20 --ckpt pgsvd-40=ckpts/smollm2-pgsvd-40 \\
        --out benchmarks/results
    python benchmarks/bench_cpu_e2e.py --smoke --out /tmp/e   # tiny random model (CI)

Variants: ``dense`` (the ``--model`` as loaded) and every ``--ckpt NAME=DIR`` (a factored
checkpoint written by ``pgsvd compress``, loaded with ``load_factored``: real PGSVD factors and
ranks). Per dtype (``--dtypes``, default fp32 and bf16), every variant is built first and the
timed runs alternate between them, so a shared CPU's drifting load hits all alike.

Measured per variant:
- decode tokens/s, greedy, at each ``--batches`` size (rectangular batches of random prompts of
  ``--prompt`` tokens, ``--new-tokens`` new tokens; tokens/s = B T / wall time of the whole
  generation including its prefill) in every ``--modes`` of :mod:`pgsvd_rt.generation`:
  ``hf`` (transformers ``generate``: the plain-HF peer), ``static`` (static KV cache, inference
  mode), ``compile`` (the same with the decode step ``torch.compile``-d; its one-off compile
  time is reported, not timed), and ``vllm`` (the peer engine: vLLM on the CPU serving the same
  directory, eager, one engine per variant and batch kept alive in a subprocess
  (benchmarks/bench_vllm.py's worker) and timed in the same rounds as the others, B requests of
  random prompts of the same length submitted together; its own output tokens/s, prefill included,
  engine start excluded). ``hf`` runs at batch 1 only.
- with ``--grouped``, also every checkpoint as ``NAME+grouped``: q/k/v and gate/up fused into one
  ``lowrank_matmul_grouped`` call each (:func:`pgsvd_rt.nn.group_projections_`; x read once).
- prefill latency of one ``--prefill``-token prompt (``logits_to_keep=1``, no cache).
- bytes read per decoded token: every parameter except the input embedding (only B of its rows
  are read), plus the output head (the tied embedding when tied). The ideal decode speedup of a
  variant over dense is the ratio of those bytes (KV-cache reads, small at these lengths, are
  left out); ``frac ideal`` = measured speedup / ideal.
Output: ``cpu-<cpu>-<date>-e2e-cpu-<model>.{json,md}`` in --out, rewritten after each dtype.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from pgsvd_rt.device import DTYPES  # noqa: E402

log = logging.getLogger("bench_cpu_e2e")


def bytes_per_token(model) -> int:
    """Parameter bytes one decode step reads: all but the input embedding, plus the head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    nbytes = total - emb.numel() * emb.element_size()
    if head is not None and head.weight is emb:
        nbytes += emb.numel() * emb.element_size()
    return nbytes


def build(a, name: str, dtype: torch.dtype):
    from pgsvd_rt import models
    from pgsvd_rt.io import load_factored
    from pgsvd_rt.nn import group_projections_

    base, _, grouped = name.partition("+")
    if a.smoke:
        model = _smoke_model(base, dtype)
    elif base == "dense":
        model = models.load(a.model)[0].to(dtype)
    else:
        model = load_factored(a.ckpt[base], dtype=dtype)[0]
    if grouped:  # "NAME+grouped": q/k/v and gate/up fused into one op call each
        group_projections_(model)
    return model.eval()


def _smoke_model(name: str, dtype: torch.dtype):
    """A tiny random LLaMA; 'dense' as is, any other name with SVD factors at half rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pgsvd_rt.compress.solvers import svd_factors
    from pgsvd_rt.nn import LowRankLinear, replace_linear

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=272,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    if name != "dense":
        repl = {}
        for n, mod in model.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                A, B = svd_factors(mod.weight.detach().double(), min(mod.weight.shape) // 4)
                repl[f"model.layers.{n}"] = LowRankLinear.from_factors(A.float(), B.float())
        replace_linear(model, repl)
    return model.to(dtype)


def _prompts(B: int, P: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, P), generator=g)


class Variant:
    def __init__(self, a, name: str, dtype: torch.dtype) -> None:
        from pgsvd_rt.generation import StaticGreedy

        t0 = time.perf_counter()
        self.name, self.model = name, build(a, name, dtype)
        vocab = self.model.config.vocab_size
        self.res = {"variant": name, "bytes_per_token": bytes_per_token(self.model),
                    "load_s": time.perf_counter() - t0, "decode": [], "compile_s": {}}
        self.work, self.runs = {}, {}
        for B in a.batches:
            ids = _prompts(B, a.prompt, vocab, seed=B)
            for mode in a.modes:
                if mode == "hf" and B != 1 or mode == "vllm" and "+" in name:
                    continue  # HF at batch 1 only; vLLM groups merged layers itself
                if mode == "hf":
                    self.work[("decode", mode, B)] = self._hf(ids, a.new_tokens)
                elif mode == "vllm":
                    self.work[("decode", mode, B)] = self._vllm(a, name, dtype, B)
                else:
                    dec = StaticGreedy(self.model, a.prompt + a.new_tokens,
                                       compile=mode == "compile")
                    self.work[("decode", mode, B)] = (
                        lambda dec=dec, ids=ids: dec.generate(ids, a.new_tokens))
        pre = _prompts(1, a.prefill, vocab, seed=7)
        self.work[("prefill", None, a.prefill)] = lambda: self.model(
            input_ids=pre, use_cache=False, logits_to_keep=1)

    def _hf(self, ids, T):
        def run():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=T, min_new_tokens=T, pad_token_id=0)
        return run

    @staticmethod
    def _vllm(a, name: str, dtype: torch.dtype, B: int):
        """Seconds vLLM takes for B requests of a.prompt tokens, a.new_tokens each (an engine
        kept alive in a worker subprocess, started at warm-up: benchmarks/bench_vllm.py)."""
        import bench_vllm

        def run():
            key = (name, dtype, B)
            if key not in a.vllm_engines:  # the warm-up call: start (and warm) the engine
                if name == "dense" and "dense" not in a.vllm_dirs:
                    a.vllm_dirs["dense"] = bench_vllm.dense_dir(a.model, a.vllm_root)
                cfg = argparse.Namespace(prompt=a.prompt, new_tokens=a.new_tokens,
                                         kv_cache_gib=a.vllm_kv_cache_gib, concurrency=[B],
                                         compile=False, out=a.out)
                a.vllm_engines[key] = bench_vllm.Engine(
                    cfg, a.vllm_dirs.get(name) or a.ckpt[name], str(dtype).removeprefix("torch."))
                return None
            return B * a.new_tokens / a.vllm_engines[key].run(B)
        return run

    def warm_up(self) -> None:
        """Untimed first calls: compilation (its time is recorded), first-touch, caches; for
        vLLM the engine's start and its own warm-up."""
        for key, fn in self.work.items():
            t0 = time.perf_counter()
            with torch.inference_mode() if key[1] != "hf" else torch.no_grad():
                fn()
            if key[1] == "compile":
                self.res["compile_s"][str(key[2])] = time.perf_counter() - t0

    def measure_once(self) -> None:
        for key, fn in self.work.items():
            with torch.inference_mode() if key[1] != "hf" else torch.no_grad():
                t0 = time.perf_counter()
                seconds = fn()  # the vLLM worker reports its own time
                wall = time.perf_counter() - t0
                self.runs.setdefault(key, []).append(seconds if key[1] == "vllm" else wall)

    def summary(self, a) -> dict:
        res = dict(self.res)
        for (kind, mode, n), ts in self.runs.items():
            med = statistics.median(ts)
            if kind == "prefill":
                res["prefill"] = {"prompt": n, "ms": med * 1e3, "runs_ms": [t * 1e3 for t in ts]}
            else:
                res["decode"].append({"mode": mode, "batch": n, "s": med, "runs_s": ts,
                                      "tokens_per_s": n * a.new_tokens / med,
                                      "ms_per_step": med / a.new_tokens * 1e3})
        return res


def _table(rep: dict, dtype: str) -> list[str]:
    vs = rep["results"][dtype]
    dense = next(v for v in vs if v["variant"] == "dense")
    keys = [(d["mode"], d["batch"]) for d in dense["decode"]]
    tok = {(v["variant"], d["mode"], d["batch"]): d["tokens_per_s"] for v in vs
           for d in v["decode"]}
    lines = [f"### {dtype}", "",
             "| variant | bytes/token MB | ideal | prefill ms | " +
             " | ".join(f"{m} b{b} tok/s (speedup, frac ideal)" for m, b in keys) + " |",
             "|---" * (4 + len(keys)) + "|"]
    for v in vs:
        ideal = dense["bytes_per_token"] / v["bytes_per_token"]
        cells = []
        for m, b in keys:
            t = tok.get((v["variant"], m, b))
            if t is None:
                cells.append("-")
                continue
            sp = t / tok[("dense", m, b)]
            cells.append(f"{t:.1f} ({sp:.2f}x, {sp / ideal:.2f})")
        pre = v.get("prefill", {}).get("ms", float("nan"))
        lines.append(f"| {v['variant']} | {v['bytes_per_token'] / 1e6:.1f} | {ideal:.2f}x | "
                     f"{pre:.0f} | " + " | ".join(cells) + " |")
    comp = {v["variant"]: v["compile_s"] for v in vs if v["compile_s"]}
    if comp:
        lines += ["", "compile time (s, batch: s): " + "; ".join(
            f"{k} " + ", ".join(f"b{b} {s:.0f}" for b, s in c.items()) for k, c in comp.items())]
    return lines + [""]


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"# End to end on {m['device']} ({m['date']}): {m['model']}", "",
             f"- torch {m['torch']}, {m['threads']} threads; greedy decode of {m['new_tokens']} "
             f"new tokens after random prompts of {m['prompt']} tokens (tokens/s over the whole "
             f"generation, prefill included), prefill of {m['prefill']} tokens; medians of "
             f"{m['reps']} interleaved rounds; speedup vs dense in the same mode and batch; "
             "ideal = dense bytes/token over the variant's", ""]
    for dtype in rep["results"]:
        lines += _table(rep, dtype)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m", help="the dense model (a pgsvd spec)")
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--smoke", action="store_true", help="tiny random model (CI)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["hf", "static", "compile"],
                   choices=["hf", "static", "compile", "vllm"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vllm-kv-cache-gib", type=float, default=1.0,
                   help="vLLM KV-cache size per engine")
    p.add_argument("--grouped", action="store_true",
                   help="also each checkpoint with q/k/v and gate/up grouped (NAME+grouped)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpts = {}
    for item in a.ckpt:
        name, sep, path = item.partition("=")
        if not sep or not name or name == "dense" or not os.path.isdir(path):
            p.error(f"--ckpt must be NAME=DIR with an existing directory, got {item!r}")
        ckpts[name] = path
    a.ckpt = ckpts
    if "vllm" in a.modes and a.smoke:
        p.error("--smoke runs no vLLM (its tiny model is not a directory)")
    a.vllm_dirs, a.vllm_root, a.vllm_engines = {}, tempfile.mkdtemp(prefix="pgsvd-e2e-"), {}
    names = ["dense"] + (["lowrank"] if a.smoke else list(ckpts))
    names += [f"{n}+grouped" for n in names[1:] if a.grouped]
    if a.smoke:
        a.batches, a.prompt, a.new_tokens, a.prefill, a.reps = [1, 2], 8, 4, 16, 1
        a.modes = [m for m in a.modes if m != "compile"]
    name = benchlib.device_name("cpu")
    rep = {"meta": {"device": name, "date": benchlib.today(), "threads": torch.get_num_threads(),
                    "model": "tiny random LLaMA (smoke)" if a.smoke else a.model,
                    "checkpoints": ckpts, "prompt": a.prompt, "new_tokens": a.new_tokens,
                    "prefill": a.prefill, "reps": a.reps, "modes": a.modes,
                    **benchlib.versions()}, "results": {}}
    os.makedirs(a.out, exist_ok=True)
    tag = "smoke" if a.smoke else a.model
    stem = os.path.join(a.out, f"{benchlib.device_slug(name)}-{benchlib.today()}-e2e-cpu-{tag}")
    for dname in a.dtypes:
        vs = [Variant(a, n, DTYPES[dname]) for n in names]
        for v in vs:
            log.info("%s %s: warm-up", dname, v.name)
            v.warm_up()
        for r in range(a.reps):
            log.info("%s: round %d", dname, r + 1)
            for v in vs:
                v.measure_once()
        rep["results"][dname] = [v.summary(a) for v in vs]
        for e in a.vllm_engines.values():
            e.close()
        a.vllm_engines.clear()
        del vs
        torch._dynamo.reset()
        with open(stem + ".json", "w") as f:
            json.dump(rep, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(to_markdown(rep))
    shutil.rmtree(a.vllm_root, ignore_errors=True)
    sys.stdout.write(to_markdown(rep))
    return rep


if __name__ == "__main__":
    main()
