"""End-to-end latency: prefill and greedy decode of dense vs svd-als vs pgsvd (20% / 40%).

    # CPU, the embedded model with its real weights (small: prompt 256, batch 1, 8 new tokens)
    python benchmarks/bench_e2e.py --model smollm2-135m --out benchmarks/results
    # GPU, LLaMA-2-7B-shaped bf16 model with random weights and ranks from a real-spectra profile
    python benchmarks/bench_e2e.py --model llama2-7b --out $OUT --variants dense pgsvd-40
    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e           # tiny random model (CI)

Models. ``smollm2-135m``: the embedded checkpoint (fp32 on CPU; ``--dtype`` on GPU); factored
variants take the ranks of benchmarks/profiles/smollm2-135m.json (PGSVD's from the real spectra,
uniform for svd-als) and the factor values of a truncated SVD (the solver does not change
latency). ``llama2-7b``: transformers LlamaConfig with the public 7B values, built directly on
the device in bf16 with random weights; factored variants put LowRankLinear modules with random
factors of the ranks in benchmarks/profiles/llama2-7b.json (derivation: make_profile.py),
rounded to the nearest multiple of ``--rank-multiple`` (default 128 there, 1 elsewhere: every
distinct (K, N, R) costs a Triton autotune on its first call, ~1 s per M bucket; pgsvd-40 has
195 distinct shapes at multiple 1, 40 at 64, 23 at 128).

Measures, per variant: parameter bytes (all, and the compressed linears); prefill latency of one
prompt of each ``--prompts`` length (``logits_to_keep=1``, no cache; median of ``--reps``);
decode tokens/s at each ``--batches`` size: a greedy loop over a static KV cache (transformers
StaticCache; a prompt of 256 / B tokens per sequence, so its prefill is the same 256-token
Triton M bucket as the first prefill row, then T - 1 timed steps of B tokens),
tokens/s = B (T - 1) / t. On CUDA the step is torch.compile(mode="reduce-overhead"), i.e. a
CUDA graph; if that fails the run falls back to the eager step and says so in each decode row's
``mode``. Peak GPU memory per variant (torch.cuda.max_memory_allocated over its prefill +
decode runs). On CPU every variant is built
first and the timed runs alternate between them (``--interleave``), so a shared CPU's drifting
load hits all alike; process CPU time is reported beside wall time. Output:
``<device>-<date>-e2e-<model>.json`` and ``.md`` in --out, rewritten after every variant so a
run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from pgsvd_rt.device import DTYPES  # noqa: E402

PROFILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
VARIANTS = ("dense", "svd-als-20", "pgsvd-20", "svd-als-40", "pgsvd-40")
# On request only: pgsvd's ranks with the factors zero-padded to R = 16k (pgsvd_rt.nn.pad_ranks_;
# exact), to measure what aligned factors buy the fused kernel at arbitrary ranks.
PAD_SUFFIX = "-pad16"
PAD_VARIANTS = ("pgsvd-20" + PAD_SUFFIX, "pgsvd-40" + PAD_SUFFIX)
HF_NAME = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
log = logging.getLogger("bench_e2e")


def _config(name: str):
    from transformers import LlamaConfig

    if name == "smoke":
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=272,
                           max_position_embeddings=512)
    c = benchlib.MODELS[name]
    return LlamaConfig(hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                       num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"],
                       max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=c["rope_theta"], tie_word_embeddings=False)


def build_dense(name: str, device: str, dtype: torch.dtype):
    """(model, real_weights). The embedded model loads its checkpoint; others are random."""
    if name == "smollm2-135m":
        from pgsvd_rt import models

        try:
            model, _, _ = models.load(name)
            return model.to(device=device, dtype=dtype).eval(), True
        except (ValueError, ImportError) as exc:  # e.g. a GPU machine without the 98 MB package
            log.warning("embedded model unavailable (%s): random weights of its config", exc)
    from transformers import LlamaForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(_config(name))
    finally:
        torch.set_default_dtype(prev)
    return model.eval(), False


def load_ranks(name: str, variant: str, multiple: int) -> dict[str, list[int | None]]:
    """proj -> rank per block (None: dense) from benchmarks/profiles, rounded to ``multiple``."""
    if name == "smoke":  # a spread of ranks on the tiny model
        base = {"q": 8, "k": 6, "v": 7, "o": 9, "gate": 20, "up": 18, "down": 22}
        scale = 1.0 if variant.endswith("20") else 0.7
        return {p: [max(1, int(r * scale)), max(1, int(r * scale)) + 3] for p, r in base.items()}
    with open(os.path.join(PROFILES, f"{name}.json")) as f:
        prof = json.load(f)["profiles"][variant]["ranks"]
    if multiple <= 1:
        return prof
    return {p: [None if r is None else max(multiple, multiple * round(r / multiple)) for r in rs]
            for p, rs in prof.items()}


def factorize_(model, ranks: dict, real: bool) -> None:
    """Swap linears for LowRankLinear: truncated-SVD factors (real weights) or random ones."""
    from pgsvd_rt.compress.solvers import svd_factors
    from pgsvd_rt.nn import LowRankLinear, replace_linear

    repl = {}
    for b, block in enumerate(model.model.layers):
        for p, hf in HF_NAME.items():
            R = ranks[p][b]
            lin = block.get_submodule(hf)
            N, K = lin.weight.shape
            if R is None or R * (N + K) >= N * K:
                continue
            w = lin.weight
            bias = None if lin.bias is None else lin.bias.detach()
            if real:
                A, B = svd_factors(w.detach().to("cpu", torch.float64), R)
                mod = LowRankLinear.from_factors(A.to(w.device), B.to(w.device), bias,
                                                 dtype=w.dtype)
            else:
                mod = LowRankLinear(K, N, R, bias=bias is not None, device=w.device,
                                    dtype=w.dtype)
                with torch.no_grad():
                    mod.u.normal_(0, R**-0.5)
                    mod.v.normal_(0, K**-0.5)
                    if bias is not None:
                        mod.bias.copy_(bias)
            repl[f"model.layers.{b}.{hf}"] = mod
    replace_linear(model, repl)


def param_bytes(model) -> dict:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lin = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
              if n.startswith("model.layers.") and ("_proj." in n))
    return {"param_bytes": total, "linear_param_bytes": lin}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, device: str) -> tuple[float, float]:
    """(wall s, process CPU s) of one call. On a shared CPU the wall time includes waiting for
    other processes; the CPU time (all threads) does not, so both are kept."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _inputs(B: int, L: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(B * 100003 + L)
    return torch.randint(0, vocab, (B, L), device=device, generator=g)


def _decode_loop(model, B: int, T: int, device: str, compiled: bool):
    """A greedy decode of T new tokens after a prompt of 256 / B tokens, static KV cache.

    Returns a callable that runs prefill + T - 1 decode steps and returns (wall s, CPU s) of the
    decode steps alone. ``compiled``: the step is ``torch.compile(mode="reduce-overhead")``,
    i.e. replayed as a CUDA graph; shapes never change between calls, so it compiles once.
    """
    from transformers import StaticCache

    P = max(1, 256 // B)  # B * P = 256 tokens: no extra autotune bucket for this prefill
    ids = _inputs(B, P, model.config.vocab_size, device)
    cache = StaticCache(config=model.config, max_cache_len=P + T)
    positions = torch.arange(P + T, device=device)

    def step(tok, pos):
        out = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True)

    stepc = torch.compile(step, mode="reduce-overhead") if compiled else step

    def run():
        cache.reset()
        out = model(input_ids=ids, past_key_values=cache, cache_position=positions[:P],
                    use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1, :].argmax(-1, keepdim=True)
        gen = [tok]
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(P, P + T - 1):
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            tok = stepc(tok, positions[i : i + 1]).clone()
            gen.append(tok)
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        run.prompt, run.tokens = ids, torch.cat(gen, dim=1)  # (B, T): for correctness checks
        return wall, cpu

    return run


def _workloads(model, a, device: str, compiled: bool) -> dict:
    """key -> zero-argument callable: ("prefill", P) timed from outside; ("decode", B) returns
    its own (wall, CPU) seconds of the decode steps."""
    vocab = model.config.vocab_size
    work = {}
    for P in a.prompts:
        ids = _inputs(1, P, vocab, device)
        work[("prefill", P)] = (lambda ids=ids: model(input_ids=ids, use_cache=False,
                                                      logits_to_keep=1))
    for B in a.batches:
        work[("decode", B)] = _decode_loop(model, B, a.new_tokens, device, compiled)
    return work


class Variant:
    """One model variant under test: the model, its workloads, and the timed runs so far."""

    def __init__(self, a, variant: str, device: str, dtype: torch.dtype) -> None:
        from pgsvd_rt.compress import ranks as rk
        from pgsvd_rt.models import linear_specs
        from pgsvd_rt.nn import pad_ranks_

        name = "smoke" if a.smoke else a.model
        t0 = time.perf_counter()
        self.model, real = build_dense(name, device, dtype)
        if variant != "dense":
            base = variant.removesuffix(PAD_SUFFIX)
            factorize_(self.model, load_ranks(name, base, a.rank_multiple), real)
            if variant != base:
                pad_ranks_(self.model, 16)
        specs = linear_specs(self.model)
        rl = [getattr(self.model.get_submodule(s.name), "rank", None) for s in specs]
        self.res = {"variant": variant, "real_weights": real,
                    "build_s": time.perf_counter() - t0,
                    "achieved_ratio": rk.achieved_ratio(
                        [(s.out_features, s.in_features) for s in specs], rl),
                    "distinct_ranks": len({r for r in rl if r}), **param_bytes(self.model)}
        self.a, self.device, self.runs = a, device, {}
        self.mode = "eager"
        self.work = None

    @torch.no_grad()
    def warm_up(self) -> None:
        """Untimed first calls (Triton autotune, torch.compile); falls back to eager decode."""
        compiled = self.device == "cuda" and not self.a.eager
        self.work = _workloads(self.model, self.a, self.device, compiled)
        if compiled:
            self.mode = "static cache + torch.compile(reduce-overhead)"
        for key, fn in list(self.work.items()):
            try:
                fn()
                if key[0] == "decode" and compiled:
                    fn()  # a second call: CUDA graphs are recorded after a warm-up run
            except Exception as exc:  # noqa: BLE001 - report, then fall back to eager decode
                if key[0] != "decode" or not compiled:
                    raise
                log.warning("%s: compiled decode failed (%s); eager fallback",
                            self.res["variant"], exc)
                torch._dynamo.reset()
                compiled = False
                self.mode = f"eager (compile failed: {type(exc).__name__}: {str(exc)[:160]})"
                self.work = _workloads(self.model, self.a, self.device, False)
                for k2, f2 in self.work.items():
                    if k2[0] == "decode":
                        f2()
                break

    @torch.no_grad()
    def measure_once(self) -> None:
        for key, fn in self.work.items():
            t = fn() if key[0] == "decode" else _once(fn, self.device)
            self.runs.setdefault(key, []).append(t)

    def summary(self) -> dict:
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for k, v in self.runs.items()}
        res = dict(self.res)
        res["prefill"] = [{"prompt": P, "ms_median": med[("prefill", P)][0] * 1e3,
                           "cpu_ms_median": med[("prefill", P)][1] * 1e3,
                           "ms_runs": [w * 1e3 for w, _ in self.runs[("prefill", P)]],
                           "tokens_per_s": P / med[("prefill", P)][0]}
                          for P in self.a.prompts]
        T, res["decode"] = self.a.new_tokens, []
        for B in self.a.batches:
            w, c = med[("decode", B)]
            res["decode"].append({
                "batch": B, "new_tokens": T, "steps": T - 1, "s_steps": w, "mode": self.mode,
                "runs": self.runs[("decode", B)], "tokens_per_s": B * (T - 1) / w,
                "ms_per_step": w / (T - 1) * 1e3, "cpu_tokens_per_s": B * (T - 1) / max(c, 1e-9)})
        return res


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"# End to end on {m['device']} ({m['date']}): {m['model']}", "",
             f"- dtype {m['dtype']}, torch {m['torch']}, {m['notes']}", "",
             "| variant | ratio | params GB | " +
             " | ".join(f"prefill {P} ms" for P in m["prompts"]) + " | " +
             " | ".join(f"decode b{B} tok/s" for B in m["batches"]) +
             " | decode speedup vs dense | CPU-time decode tok/s | peak GB | decode mode |",
             "|---" * (7 + len(m["prompts"]) + len(m["batches"])) + "|"]
    dense = next((r for r in rep["variants"] if r["variant"] == "dense" and "error" not in r),
                 None)
    for r in rep["variants"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:120]} |")
            continue
        sp = "-"
        if dense:
            sp = ", ".join(f"{d['tokens_per_s'] / dd['tokens_per_s']:.2f}x"
                           for d, dd in zip(r["decode"], dense["decode"], strict=False))
        peak = f"{r['peak_gpu_bytes'] / 1e9:.2f}" if "peak_gpu_bytes" in r else "-"
        modes = "; ".join(sorted({d["mode"] for d in r["decode"]}))
        lines.append(
            f"| {r['variant']} | {r['achieved_ratio']:.3f} | {r['param_bytes'] / 1e9:.3f} | " +
            " | ".join(f"{p['ms_median']:.1f}" for p in r["prefill"]) + " | " +
            " | ".join(f"{d['tokens_per_s']:.1f}" for d in r["decode"]) +
            f" | {sp} | " + ", ".join(f"{d.get('cpu_tokens_per_s', 0):.1f}" for d in r["decode"])
            + f" | {peak} | {modes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama2-7b"])
    p.add_argument("--smoke", action="store_true", help="tiny random model; runs on CPU (CI)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   choices=VARIANTS + PAD_VARIANTS)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompts", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rank-multiple", type=int, default=None)
    p.add_argument("--eager", action="store_true", help="no static cache / torch.compile")
    p.add_argument("--tag", default=None, help="suffix of the output file name")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build every variant first and alternate their timed runs "
                   "(default on CPU: a shared CPU drifts; off on GPU: peak memory per variant)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    if a.smoke:
        defaults = dict(prompts=[16], batches=[1], new_tokens=4, reps=1, rank_multiple=1)
    elif gpu:
        defaults = dict(prompts=[256, 1024, 4096], batches=[1, 16], new_tokens=64, reps=5,
                        rank_multiple=128 if a.model == "llama2-7b" else 1)
    else:
        defaults = dict(prompts=[256], batches=[1], new_tokens=8, reps=3, rank_multiple=1)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.interleave is None:
        a.interleave = not gpu
    if not gpu and a.model == "llama2-7b" and not a.smoke:
        p.error("--model llama2-7b needs a CUDA device (7B on CPU is not a latency benchmark)")
    name = benchlib.device_name(device)
    model_desc = "tiny random LLaMA (smoke)" if a.smoke else (
        "SmolLM2-135M (embedded, real weights; SVD factors)" if a.model == "smollm2-135m"
        else "LLaMA-2-7B-shaped, random weights; ranks from benchmarks/profiles/llama2-7b.json")
    notes = (f"rank multiple {a.rank_multiple}; decode: {a.new_tokens} new tokens after a "
             f"prompt of 256/B tokens; prefill/decode medians of {a.reps}; "
             f"{torch.get_num_threads()} CPU threads" if not gpu else
             f"rank multiple {a.rank_multiple}; decode: {a.new_tokens} new tokens after a "
             f"prompt of 256/B tokens; medians of {a.reps}")
    rep = {"meta": {"device": name, "device_type": device, "date": benchlib.today(),
                    "model": model_desc, "dtype": str(dtype)[6:], "prompts": a.prompts,
                    "batches": a.batches, "smoke": a.smoke, "notes": notes,
                    **benchlib.versions()},
           "variants": []}
    os.makedirs(a.out, exist_ok=True)
    tag = "smoke" if a.smoke else a.model + (f"-{a.tag}" if a.tag else "")
    stem = os.path.join(a.out, f"{benchlib.device_slug(name)}-{benchlib.today()}-e2e-{tag}")
    def write():
        with open(stem + ".json", "w") as f:
            json.dump(rep, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(to_markdown(rep))

    if a.interleave:  # all variants in memory; rounds alternate them so load drift hits all
        vs = [Variant(a, v, device, dtype) for v in a.variants]
        for v in vs:
            v.warm_up()
        for _ in range(a.reps):
            for v in vs:
                v.measure_once()
        rep["variants"] = [v.summary() for v in vs]
        write()
    else:  # one variant at a time (GPU: each one's peak memory alone)
        for name_v in a.variants:
            log.info("e2e %s: %s", tag, name_v)
            v = None
            try:
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                v = Variant(a, name_v, device, dtype)
                v.warm_up()
                for _ in range(a.reps):
                    v.measure_once()
                res = v.summary()
                if gpu:
                    res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            except Exception as exc:  # noqa: BLE001 - record it; the next variant still runs
                log.exception("e2e %s: %s failed", tag, name_v)
                res = {"variant": name_v, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            rep["variants"].append(res)
            write()
            del v
            if gpu:
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    sys.stdout.write(to_markdown(rep))
    return rep


if __name__ == "__main__":
    main()
