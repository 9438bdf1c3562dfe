"""Accuracy at equal bytes: low rank (zero-shot, healed, with int8 factors) against torchao.

    python benchmarks/bench_int8.py --model smollm2-135m --out benchmarks/results \\
        --text-file ../shared/data/wikitext-2-raw/wiki.test.raw
    python benchmarks/bench_int8.py --model smollm2-135m --variants dense torchao-int8 \\
        torchao-int4 pgsvd-20 pgsvd-20~heal100 --no-timing --tag heal --out ...   # heal table
    python benchmarks/bench_int8.py --smoke --out /tmp/i8     # tiny random model (CI)

Every variant serves in bf16 (activations; int8/int4 weights where quantised):
- ``dense``: the model.
- ``torchao-int8``: torchao's int8 weight-only (per output channel), the usual 8-bit peer.
- ``torchao-int4``: torchao's CPU int4 weight-only (``PrototypeInt4WeightOnlyConfig``, group 64).
- ``pgsvd-P``: PGSVD at ratio P/100, bf16 factors; ``pgsvd-P+int8``: the same ranks with int8
  factors (``compress --int8``: per-row scales, Gram-weighted clipping), served by
  ``pgsvd::lowrank_matmul_int8`` (torch's int8 weight-only GEMM, factors never dequantised).
- ``pgsvd-P~healS``: ``pgsvd-P`` healed for S steps (``pgsvd_rt.compress.heal``: KL toward the
  dense model on the calibration pool, ``--heal-batch`` x ``--heal-seq-len`` tokens a step, lr
  ``--heal-lr``); same ranks, bytes and speed as ``pgsvd-P`` (not timed again).
One calibration (``--calib-samples`` x 512 wiki-offline tokens) serves every PGSVD variant.

Measured: bytes of the compressed linears against dense bf16 (factors, int8 values and scales as
stored; torchao's from its format: int8 1 B per weight + a bf16 scale per row; int4 0.5 B per
weight + bf16 scale and zero per group of 64), perplexity on ``--text-file`` (WikiText-2) and on
the held-out wiki-offline slice (``--windows`` x 512 each, BOS as the tokenizer says), greedy
decode tokens/s at batch 1 (random 64-token prompt, ``--new``
tokens, static KV cache; ``--compile`` also with the decode step ``torch.compile``-d, which
torchao's int8 needs to avoid dequantising its weight each call), variants timed in turns over
``--rounds`` rounds. Per-layer int8 error: what int8 adds to each factored layer's error,
``‖(AB − A_q B_q) X‖² / ‖AB X‖²`` (median, max) and the clip ratios chosen.
Output: ``cpu-<cpu>-<date>-int8-<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from pgsvd_rt import data, models  # noqa: E402
from pgsvd_rt.arch import block_linears  # noqa: E402
from pgsvd_rt.compress import calibrate, compress_  # noqa: E402
from pgsvd_rt.compress.heal import heal_  # noqa: E402
from pgsvd_rt.config import CalibConfig, CompressConfig, HealConfig  # noqa: E402
from pgsvd_rt.eval import perplexity  # noqa: E402
from pgsvd_rt.generation import StaticGreedy  # noqa: E402

log = logging.getLogger("bench_int8")
PROMPT = 64


def linear_bytes(model: nn.Module, torchao: str | None = None) -> int:
    """Bytes of the decoder blocks' linears as stored (weights, factors, scales, biases)."""
    total = 0
    for _, _, _, mod in block_linears(model):
        if torchao is not None:  # torchao's tensor subclasses report their logical dtype
            N, K = mod.weight.shape
            per = {"int8": N * K + 2 * N, "int4": N * K // 2 + 2 * 2 * N * (K // 64)}[torchao]
            total += per + (0 if mod.bias is None else 2 * N)
            continue
        tensors = list(mod.parameters()) + list(mod.buffers())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def torchao_variant(dense: nn.Module, kind: str) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(dense)
    if kind == "int8":
        config = Int8WeightOnlyConfig()
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=64)
    names = {name for name, *_ in block_linears(model)}
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    return model


def build_variants(a, dense, tok) -> tuple[dict, dict]:
    """name -> model (bf16, eval), in ``a.variants``' order, and name -> compression summary
    (PGSVD variants).

    Memory (a 0.5B model's heal must fit 24 GiB with the rest): every PGSVD base is compressed
    once, first; the Grams are freed before any heal (which holds a teacher, a student, AdamW's
    state and the logits); torchao's variants are built last."""
    calib = CalibConfig(samples=a.calib_samples, seq_len=a.seq_len)
    stats, prov = calibrate(dense, tok, calib, progress=False)
    pgsvd_specs = [s for s in a.variants if s != "dense" and not s.startswith("torchao-")]
    compressed: dict = {}  # base spec -> (fp32 model as compressed, report)
    for base in dict.fromkeys(s.partition("~heal")[0] for s in pgsvd_specs):
        ratio = int(base.split("-")[1].split("+")[0]) / 100
        model = copy.deepcopy(dense).float()
        compressed[base] = model, compress_(
            model, CompressConfig(method="pgsvd", ratio=ratio, int8=base.endswith("+int8"),
                                  calib=calib),
            stats=stats, calibration=prov, progress=False)
    del stats
    gc.collect()
    out, info = {"dense": dense.to(torch.bfloat16)}, {}
    for spec in pgsvd_specs:
        base, _, heal = spec.partition("~heal")
        model, report = compressed[base]
        model = copy.deepcopy(model)  # fp32; the cached one stays as compressed
        if heal:
            hc = HealConfig(steps=int(heal), batch_size=a.heal_batch, seq_len=a.heal_seq_len,
                            lr=a.heal_lr)
            h = heal_(model, copy.deepcopy(dense).float(), tok, hc, progress=False)
            info[spec] = {"heal_s_per_step": h.s_per_step, "heal_wall_s": h.wall_s,
                          "heal_tokens": h.tokens, "heal_kl_first": h.kl_first,
                          "heal_kl_last": h.kl_last, "heal_bf16": h.bf16}
            log.info("%s: healed %d steps, %.1f s/step, KL %.3f -> %.3f", spec, h.steps,
                     h.s_per_step, h.kl_first, h.kl_last)
            gc.collect()
        out[spec] = model.to(torch.bfloat16).eval()
        errs = [r.int8_rel_error for r in report.layers if r.int8_rel_error is not None]
        clips = [c for r in report.layers if r.int8_clip for c in r.int8_clip]
        info[spec] = info.get(spec, {}) | {"achieved_ratio": report.achieved_ratio,
                                           "dense_layers": report.dense_layers}
        if errs:
            info[spec] |= {"int8_rel_error_median": statistics.median(errs),
                           "int8_rel_error_max": max(errs), "layers": len(errs),
                           "clip_share_below_1": sum(c < 1 for c in clips) / len(clips),
                           "clips_seen": sorted(set(clips))}
    del compressed
    for spec in (s for s in a.variants if s.startswith("torchao-")):
        try:
            out[spec] = torchao_variant(dense, spec.removeprefix("torchao-"))
        except Exception as exc:  # noqa: BLE001 - a peer that does not run here is reported
            log.warning("%s does not run here: %s", spec, exc)
            info[spec] = {"error": f"{type(exc).__name__}: {exc}"}
    return {s: out[s] for s in dict.fromkeys(["dense", *a.variants]) if s in out}, info


def decode_timer(model, vocab: int, new: int, compiled: bool):
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    dec = StaticGreedy(model, PROMPT + new, compile=compiled)

    def run() -> float:
        t0 = time.perf_counter()
        dec.generate(ids, new)
        return new / (time.perf_counter() - t0)

    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--smoke", action="store_true", help="tiny random model (CI)")
    ap.add_argument("--variants", nargs="+", default=[
        "dense", "torchao-int8", "torchao-int4", "pgsvd-20+int8", "pgsvd-60", "pgsvd-40+int8",
        "pgsvd-70"])
    ap.add_argument("--text-file", default=None, help="default: held-out wiki-offline slice")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile-d decode")
    ap.add_argument("--no-timing", action="store_true", help="accuracy and bytes only")
    ap.add_argument("--heal-batch", type=int, default=4)
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--tag", default="", help="appended to the output name")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()
    if a.smoke:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.conftest import tiny_model, tiny_tokenizer

        dense, tok, desc = tiny_model("llama"), tiny_tokenizer(), "tiny random llama"
        a.windows, a.seq_len, a.calib_samples, a.new, a.rounds = 2, 32, 4, 4, 1
        a.heal_batch, a.heal_seq_len = 2, 16
    else:
        dense, tok, source = models.load(a.model)
        desc = source.describe()
    texts = {"ppl": data.eval_ids(tok, a.text_file)}
    if a.text_file is not None:
        texts["ppl_heldout"] = data.eval_ids(tok, None)
    bos = data.bos_id(tok)
    dense_bytes = linear_bytes(dense.to(torch.bfloat16))
    variants, info = build_variants(a, dense, tok)
    rows = {}
    for name, model in variants.items():
        kind = name.removeprefix("torchao-") if name.startswith("torchao-") else None
        rows[name] = {"bytes_vs_dense": linear_bytes(model, kind) / dense_bytes,
                      **{key: perplexity(model, ids, a.seq_len, a.windows, bos_id=bos)["ppl"]
                         for key, (ids, _) in texts.items()},
                      **info.get(name, {})}
        log.info("%s: bytes %.3f, ppl %s", name, rows[name]["bytes_vs_dense"],
                 {k: round(rows[name][k], 3) for k in texts})
    vocab = dense.get_input_embeddings().num_embeddings
    timed = {n: m for n, m in variants.items() if "~heal" not in n}  # healed: same speed
    for mode in () if a.no_timing else ("static", "compile") if a.compile else ("static",):
        timers = {}
        for name, model in timed.items():
            try:
                timers[name] = decode_timer(model, vocab, a.new, mode == "compile")
                timers[name]()  # warm-up (compiles)
            except Exception as exc:  # noqa: BLE001
                rows[name][f"tok_s_{mode}_error"] = f"{type(exc).__name__}: {exc}"
                timers.pop(name, None)
        samples = {n: [] for n in timers}
        for r in range(a.rounds):  # in turns, order rotated: a drifting load hits all alike
            order = list(timers)[r % len(timers):] + list(timers)[:r % len(timers)]
            for name in order:
                samples[name].append(timers[name]())
        for name, s in samples.items():
            rows[name][f"tok_s_{mode}"] = statistics.median(s)
    res = {"model": desc, "device": benchlib.device_name("cpu"), "date": benchlib.today(),
           "torch": torch.__version__, "torchao": _torchao_version(), "bos": bos is not None,
           "windows": a.windows, "seq_len": a.seq_len, "text": texts["ppl"][1],
           "heldout": texts["ppl_heldout"][1] if "ppl_heldout" in texts else None,
           "calib_samples": a.calib_samples, "new_tokens": a.new, "rounds": a.rounds,
           "rows": rows, "wall_s": time.perf_counter() - t_start,
           "command": benchlib.command(__file__)}
    os.makedirs(a.out, exist_ok=True)
    tag = ("smoke" if a.smoke else a.model) + (f"-{a.tag}" if a.tag else "")
    stem = os.path.join(a.out, f"{benchlib.device_slug(res['device'])}-{res['date']}-int8-{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(res))
    print(f"wrote {stem}.json, {stem}.md")
    return res


def _torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


def to_markdown(res: dict) -> str:
    modes = [m for m in ("static", "compile")
             if any(f"tok_s_{m}" in r for r in res["rows"].values())]
    held = any("ppl_heldout" in r for r in res["rows"].values())
    head = ("| variant | linear bytes vs bf16 dense | WikiText-2 ppl | "
            + ("held-out ppl | " if held else "") + " | ".join(
                f"decode tok/s b1 ({m})" for m in modes)
            + (" | " if modes else "") + "heal: s/step, KL first -> last | "
            "int8 error per layer: median / max |")
    lines = [f"# Low rank + int8 at equal bytes, {res['model']}", "",
             f"{res['device']}, {res['date']}; torch {res['torch']}, torchao {res['torchao']}. "
             f"Perplexity over {res['windows']} x {res['seq_len']}-token windows of "
             f"{res['text']}; decode: {res['new_tokens']} new tokens after a 64-token prompt, "
             f"median of {res['rounds']} rounds taken in turns. CPU numbers.", "", head,
             "|" + "---|" * (5 + held + len(modes))]
    for name, r in sorted(res["rows"].items(), key=lambda kv: -kv[1]["bytes_vs_dense"]):
        tps = " | ".join(f"{r[f'tok_s_{m}']:.1f}" if f"tok_s_{m}" in r else "-" for m in modes)
        err = (f"{r['int8_rel_error_median']:.2e} / {r['int8_rel_error_max']:.2e}"
               if "int8_rel_error_median" in r else "")
        heal = (f"{r['heal_s_per_step']:.1f}, {r['heal_kl_first']:.3f} -> {r['heal_kl_last']:.3f}"
                if "heal_s_per_step" in r else "")
        lines.append(f"| {name} | {r['bytes_vs_dense']:.3f} | {r['ppl']:.3f} | "
                     + (f"{r['ppl_heldout']:.3f} | " if held else "")
                     + (f"{tps} | " if modes else "") + f"{heal} | {err} |")
    lines += ["", f"Command: `{res['command']}` ({res['wall_s']:.0f} s)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
