"""Frozen, validated configuration dataclasses (torchao style: a verb on a model + a config)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

METHODS = ("svd", "asvd", "svd-llm", "svd-als", "pgsvd")
#: Methods whose factor values depend on calibration activations.
METHODS_NEEDING_GRAMS = ("asvd", "svd-llm", "svd-als", "pgsvd")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``samples`` sequences of ``seq_len`` tokens from the wiki-offline corpus.

    Defaults are the paper harness (256 × 4096 tokens) scaled to a 2-core CPU.
    """

    samples: int = 64
    seq_len: int = 512
    batch_size: int = 4
    #: Number of decoder blocks whose Grams are held in memory at once (None: all). Bounds the
    #: memory of calibration at the price of one dense forward pass per group of blocks.
    blocks_per_pass: int | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibConfig.{name} must be a positive int, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"CalibConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.blocks_per_pass is not None and (
            not isinstance(self.blocks_per_pass, int) or self.blocks_per_pass < 1
        ):
            raise ValueError(
                f"CalibConfig.blocks_per_pass must be None or >= 1, got {self.blocks_per_pass!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CalibConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how.

    Exactly one of ``ratio`` (target compression of the compressed linears' parameters,
    ``1 − Σ P_l / Σ N_l M_l``) or ``eps`` (PGSVD tolerance) drives the ranks; the uniform-rank
    baselines need ``ratio``.

    Attributes:
        method: one of :data:`METHODS`.
        ratio: target compression in (0, 1), e.g. 0.2 for 20%.
        eps: PGSVD relative-error tolerance in [0, 1] (instead of ratio).
        per_class_eps: PGSVD with one ε for attention and one for MLP, each bisected to its own
            share of the budget.
        als_iters: ALS iterations (paper: 10). als_ridge: relative ridge for failed r×r Choleskys.
        asvd_alpha: ASVD scaling exponent α (paper of ASVD: 0.5).
        eig_floor: relative eigenvalue floor when SVD-LLM's Cholesky fails.
        int8: store the factors in int8 (a scale per row of u and per rank of v, clipping chosen
            by the layer's activation-weighted error: :mod:`pgsvd_rt.compress.quantize`).
        calib: calibration data settings.
    """

    method: str = "pgsvd"
    ratio: float | None = 0.2
    eps: float | None = None
    per_class_eps: bool = False
    als_iters: int = 10
    als_ridge: float = 1e-10
    asvd_alpha: float = 0.5
    eig_floor: float = 1e-8
    int8: bool = False
    calib: CalibConfig = CalibConfig()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.ratio is None) == (self.eps is None):
            raise ValueError(
                f"give exactly one of ratio or eps (got ratio={self.ratio!r}, eps={self.eps!r})"
            )
        if self.ratio is not None and not (
            isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0
        ):
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if self.eps is not None:
            if not (isinstance(self.eps, (int, float)) and 0.0 <= self.eps <= 1.0):
                raise ValueError(f"eps must be in [0, 1], got {self.eps!r}")
            if self.method != "pgsvd":
                raise ValueError(f"eps drives PGSVD ranks only; method {self.method!r} needs ratio")
        if self.per_class_eps and (self.method != "pgsvd" or self.ratio is None):
            raise ValueError("per_class_eps needs method='pgsvd' and a target ratio")
        if not isinstance(self.als_iters, int) or self.als_iters < 0:
            raise ValueError(f"als_iters must be an int >= 0, got {self.als_iters!r}")
        for name in ("als_ridge", "asvd_alpha", "eig_floor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.int8, bool):
            raise TypeError(f"int8 must be a bool, got {self.int8!r}")
        if not isinstance(self.calib, CalibConfig):
            raise TypeError(f"calib must be a CalibConfig, got {type(self.calib).__name__}")

    @property
    def needs_grams(self) -> bool:
        return self.method in METHODS_NEEDING_GRAMS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["calib"] = self.calib.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if isinstance(kw.get("calib"), dict):
            kw["calib"] = CalibConfig.from_dict(kw["calib"])
        return cls(**kw)


@dataclass(frozen=True)
class HealConfig:
    """Recovery after compression (:func:`pgsvd_rt.compress.heal.heal_`): knowledge
    distillation of the factored model toward its dense source on calibration text.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step; seq_len: tokens per sequence.
        samples: distinct calibration sequences cycled through (the wiki-offline calibration
            pool, never an evaluation text); default ``steps * batch_size`` (each seen once).
        lr: AdamW's peak learning rate (linear warm-up over ``warmup`` steps, cosine to 10%).
        temperature: of the softmax both models' logits go through (the KL is scaled by T²).
        grad_clip: max global norm of the gradients of the trained tensors.
        bf16: autocast the forward passes to bf16 ("auto": where the CPU has AVX512-BF16, or on
            CUDA; the trained tensors and the optimizer stay fp32).
        save_every: steps between resumable states.
        seed: order of the batches.
    """

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    samples: int | None = None
    lr: float = 1e-4
    warmup: int = 5
    temperature: float = 1.0
    grad_clip: float = 1.0
    bf16: str = "auto"
    save_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HealConfig.{name} must be a positive int, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"HealConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"HealConfig.samples must be None or a positive int, "
                             f"got {self.samples!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"HealConfig.warmup must be an int >= 0, got {self.warmup!r}")
        for name in ("lr", "temperature", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HealConfig.{name} must be a finite number > 0, got {value!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"HealConfig.bf16 must be 'auto', 'on' or 'off', got {self.bf16!r}")

    @property
    def n_samples(self) -> int:
        return self.samples if self.samples is not None else self.steps * self.batch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HealConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

