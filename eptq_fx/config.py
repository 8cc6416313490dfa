"""Typed, frozen, validated configuration.

``EPTQConfig(weight_bits=4, act_bits=8)`` is all most users write; the nested ``HessianConfig`` and
``ReconstructionConfig`` carry the method's knobs with defaults taken from the paper's public code.
"""
from __future__ import annotations

import difflib
import enum
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from eptq_fx.errors import ConfigError

# the modes are defined in eptq_fx.modes; importing them from here keeps working
from eptq_fx.modes import AUTO_CACHE_BYTES, ActPlacement, HessianScope, Precision, Target, WidthCost  # noqa: F401

ActScheme = Literal["asymmetric", "symmetric", "unsigned"]
RangeMethod = Literal["minmax", "mse", "hmse"]
Granularity = Literal["layer", "block", "network"]
Method = Literal["eptq", "rtn"]

MIN_BITS, MAX_BITS = 2, 16


class _Keep:
    """Sentinel: an override field that is not set keeps the global value."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


def _check_bits(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer between {MIN_BITS} and {MAX_BITS}, got {value!r}.")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{name} must be between {MIN_BITS} and {MAX_BITS}, got {value}.")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}.{hint}")


def _coerce_enum_(obj, attr: str, kind: type[enum.Enum], label: str) -> None:
    """Replace ``obj.attr`` (an enum member or its value) by the member of ``kind`` (frozen dataclass field)."""
    try:
        object.__setattr__(obj, attr, kind(getattr(obj, attr)))
    except ValueError:
        raise ConfigError(f"{label} must be one of {', '.join(m.value for m in kind)}, "
                          f"got {getattr(obj, attr)!r}.") from None


def _check_positive(name: str, value, integer: bool = True) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}.")


@dataclass(frozen=True)
class Override:
    """Per-layer override. Exactly one of ``name`` (exact qualified module name), ``regex`` (``re.fullmatch``
    on the name) or ``module_type`` selects layers; ``weight_bits`` / ``act_bits`` set to ``None`` leave
    that part in float, ``KEEP`` (the default) keeps the global setting. Later overrides win."""

    name: str | None = None
    regex: str | None = None
    module_type: type | None = None
    weight_bits: int | None | _Keep = KEEP
    act_bits: int | None | _Keep = KEEP

    def __post_init__(self) -> None:
        chosen = [x for x in (self.name, self.regex, self.module_type) if x is not None]
        if len(chosen) != 1:
            raise ConfigError("An Override needs exactly one of name=, regex= or module_type=.")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ConfigError(f"Override regex {self.regex!r} is not a valid regular expression: {e}.") from e
        if self.module_type is not None and not isinstance(self.module_type, type):
            raise ConfigError(f"Override module_type must be a class, got {self.module_type!r}.")
        for f in ("weight_bits", "act_bits"):
            v = getattr(self, f)
            if v is not KEEP:
                _check_bits(f"Override.{f}", v, allow_none=True)

    def matches(self, name: str, module: object) -> bool:
        if self.name is not None:
            return name == self.name
        if self.regex is not None:
            return re.fullmatch(self.regex, name) is not None
        return isinstance(module, self.module_type)


@dataclass(frozen=True)
class HessianConfig:
    """Label-free Hessian (Hutchinson) settings."""

    max_probes: int = 100  # paper code: ~100 Rademacher probes
    min_probes: int = 10
    tol: float = 1e-2  # stop when the running mean's relative change stays below tol
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    # when one sample's output has at most max_probes elements (e.g. 10 logits), probe with its unit directions
    # instead: the exact per-sample trace in that many backward passes, no Hutchinson noise
    exact_small_outputs: bool = True
    # "identity": tr(JᵀJ), the paper's label-free Hessian; "softmax": tr(Jᵀ(diag(p) − ppᵀ)J) with p the model's
    # own softmax, the Hessian of the KL divergence to its prediction (still label-free; classifiers only)
    output_metric: Literal["identity", "softmax"] = "identity"
    batch_size: int = 128  # samples per Hessian batch (independent of the reconstruction batch)
    weight_samples: int = 64  # images used for the per-element weight Hessian (HMSE thresholds)
    weight_probes: int = 16
    # None (the default) disables the cache; eptq_fx.config.user_cache_dir() / "hessian" is the usual place
    cache_dir: str | None = None
    # with uniform reconstruction weights (hessian_weighting=False) still score the layers, for eptq_fx.report's
    # sensitivity column and mixed precision (the stage's cost); False skips the Hessian there
    report_scores: bool = True
    # ... on a seeded subset of this many samples with at most this many probes each: a layer's mean score over
    # 256 samples × 10 probes ranks it as well as the full set does, at a fraction of the cost (40× fewer
    # backward passes for 1024 ImageNet images; 10 probes are still exact for 10-logit outputs)
    report_samples: int = 64
    report_probes: int = 10

    def __post_init__(self) -> None:
        for n in ("max_probes", "min_probes", "batch_size", "weight_samples", "weight_probes", "report_samples",
                  "report_probes"):
            _check_positive(f"HessianConfig.{n}", getattr(self, n))
        if self.min_probes > self.max_probes:
            raise ConfigError("HessianConfig.min_probes must not exceed max_probes.")
        _check_positive("HessianConfig.tol", self.tol, integer=False)
        _check_choice("HessianConfig.probe", self.probe, ("rademacher", "gaussian"))
        _check_choice("HessianConfig.output_metric", self.output_metric, ("identity", "softmax"))


@dataclass(frozen=True)
class ReconstructionConfig:
    """AdaRound-style reconstruction settings (paper-code defaults where the paper states them)."""

    granularity: Granularity = "block"
    # BRECQ's target, the block's outputs (since stop 30; Target.LAYERS until then): with the tempered Hessian
    # sample weights below it measured ResNet-20 W4A4 80.65 over six seeds (drop 0.38) against 80.45 for the
    # per-layer target, ResNet-56 W4A4 83.18 against 83.21 (BENCHMARKS.md, "The tempered sample attention")
    target: Target = Target.BLOCK
    iters: int = 500  # optimisation steps per block (network mode: in total); ~2 min for ResNet-20 on 2 cores
    # a block whose narrowest weights have b < 4 bits runs 2^(2(4−b)−1)·iters steps (method/reconstruction.py
    # block_steps): 8× at 2 bits, 2× at 3. ResNet-20 W2A4: 4× gave +0.72 / +1.52 over 1× (seeds 0 / 1), 8× another
    # +1.17 (seed 0) (BENCHMARKS.md, "Steps per block by bit width" and stop 25); 4- and 8-bit runs are unchanged
    low_bit_steps: bool = True
    batch_size: int = 32
    lr_round: float = 1e-2
    lr_bias: float = 1e-3
    lr_scale: float = 1e-3  # per-channel weight scale and activation scales
    reg_factor: float = 0.01  # AdaRound's absolute weight of the rounding regulariser (when reg_relative = 0)
    # > 0: in blocks whose narrowest weights have at most reg_relative_max_bits bits, the rounding regulariser is
    # reg_relative × (the block's round-to-nearest loss) × the mean over its weights of 1 − |2h − 1|^β, in place
    # of reg_factor × the sum: the same balance against the reconstruction loss whatever the scale of the
    # block's outputs and its number of weights (AdaRound's absolute weight makes it differ 30× between
    # ResNet-20's blocks). ResNet-20 W2A4 79.68 / 79.74 against 77.78 / 77.61 (seeds 0 / 1), ConvMixer W2A4 82.40
    # against 81.65; at 4 bits it measured +0.13 on ResNet-20 (four seeds) and −0.58 on ConvMixer (three), so
    # 4- and 8-bit blocks keep the absolute weight
    # (BENCHMARKS.md, "A rounding regulariser relative to the block's loss")
    reg_relative: float = 1000.0
    reg_relative_max_bits: int = 3
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of steps with beta held and no rounding regulariser decay
    gamma: float = -0.1
    zeta: float = 1.1
    train_bias: bool = True
    train_weight_scale: bool = True
    train_act_scale: bool = True
    act_phase_in: bool = True  # activation quantization phased in: p·x + (1−p)·Q(x), p from 1 to 0
    # probability of keeping an activation in float while training (QDrop); 0 disables. 0.5 measured best
    # (ResNet-20 W2A4 76.07 against 74.62 without, W4A4 80.38 against 80.26; BENCHMARKS.md "EPTQ, issue 11")
    qdrop: float = 0.5
    # True weighs each sample's (and layer's) error by its label-free Hessian score, within hessian_scope. Under
    # the block target the weight of a sample is its trace at the block output (the paper's sample attention,
    # tempered by hessian_sample_power). Under Target.LAYERS the Hessian measured behind uniform weights wherever
    # the BatchNorms fold, and ahead by 2.5 points on ConvMixer W2A4 with its per-channel profile, hence
    # HessianScope.RESCALED for that target (BENCHMARKS.md, "The Hessian where BatchNorms stay in the graph")
    hessian_weighting: bool = True
    # also weight each channel (dim 1) of a compare point by its share of that sample's Hessian trace: a
    # per-sample block-diagonal (per-channel) rather than isotropic second-order approximation of the output
    # error. True was the default with Target.LAYERS and HessianScope.RESCALED (stops 23–29)
    hessian_per_channel: bool = False
    # False: a layer's weight is its Hessian score averaged over the samples (the same for every sample), and a
    # channel profile keeps only its per-sample shape; True: each sample weighs by its own score (the paper's
    # sample attention), which concentrates the fit on fewer samples
    hessian_per_sample: bool = True
    # each sample's Hessian weight relative to the mean over the samples, raised to this power (1: the scores as
    # they are; 0: every sample alike). The traces spread more in deeper networks (effective sample share
    # (Σw)²/(N·Σw²) at the first block output: ResNet-20 0.80, ResNet-56 0.62), and at power 1 the block target
    # lost 0.41 on ResNet-56 W4A4 while gaining 0.23 on ResNet-20; at 1/2 (the one value tried) it keeps
    # ResNet-20's gain and ResNet-56's accuracy
    hessian_sample_power: float = 0.5
    # blocks whose narrowest weights have fewer bits than this train with uniform sample weights (1: every block
    # is Hessian-weighted). The tempered Hessian is ahead of uniform weights at W4A4 on all three CIFAR models and
    # level or behind below 4 bits, but 4 (uniform there) measured below both at W2A4 / W3A3, so the low-bit
    # differences are noise (BENCHMARKS.md, "The Hessian by bit width")
    hessian_min_bits: int = 1
    hessian_scope: HessianScope = HessianScope.ALL
    # keep the result only if the network output on held-out calibration samples is closer to float than
    # round-to-nearest's; the held-out share is not trained on (see method/fallback.py)
    fallback: bool = True
    fallback_holdout: float = 0.125
    # a block reverts to round-to-nearest when its held-out loss ends higher than round-to-nearest's by more
    # than block_fallback_z standard errors of the paired per-sample difference (0: by any amount, the rule
    # until stop 28). The held-out samples are calibration images, usually the float model's own training
    # images: on ConvMixer W3A3 the head block's held-out loss rose by 1.7 standard errors (better on 48 % of
    # the held-out images) while it was better on 69 % of the test images, 1.7 points of top-1 (BENCHMARKS.md)
    block_fallback_z: float = 2.0
    # steps of network-wise fine-tuning after the blocks (method/finetune.py): biases and weight / activation
    # scales trained through the whole network on the output's squared distance to float, rounding fixed;
    # kept only if the held-out output error drops. 0 skips it. finetune_lr scales lr_bias and lr_scale
    finetune_iters: int = 0
    finetune_lr: float = 1.0
    # BFLOAT16 stores the block inputs and float targets kept between blocks (the run's largest memory at
    # ImageNet size) in bfloat16, read back as float32: half the memory, a relative rounding of 2^-9 per value;
    # AUTO does so only for tensors over AUTO_CACHE_BYTES (384 MiB: ResNet-18's maps at 1024 images up to its
    # second stage, ConvMixer-256's at 32×32; no CIFAR ResNet's)
    cache_precision: Precision = Precision.AUTO
    # BFLOAT16 runs each training step's forward and backward under torch.autocast (bfloat16 convs and matmuls,
    # quantizers still in float32); losses that decide anything (block and network fallbacks) stay float32
    compute_precision: Precision = Precision.FLOAT32

    def __post_init__(self) -> None:
        _check_choice("ReconstructionConfig.granularity", self.granularity, ("layer", "block", "network"))
        _coerce_enum_(self, "target", Target, "ReconstructionConfig.target")
        _coerce_enum_(self, "hessian_scope", HessianScope, "ReconstructionConfig.hessian_scope")
        for n in ("cache_precision", "compute_precision"):
            _coerce_enum_(self, n, Precision, f"ReconstructionConfig.{n}")
        if self.compute_precision is Precision.AUTO:
            raise ConfigError("ReconstructionConfig.compute_precision must be 'float32' or 'bfloat16' "
                              "('auto' is for cache_precision only).")
        _check_positive("ReconstructionConfig.iters", self.iters)
        _check_positive("ReconstructionConfig.batch_size", self.batch_size)
        for n in ("lr_round", "lr_bias", "lr_scale", "beta_start", "beta_end"):
            _check_positive(f"ReconstructionConfig.{n}", getattr(self, n), integer=False)
        if not 0.0 <= self.reg_factor:
            raise ConfigError("ReconstructionConfig.reg_factor must be >= 0.")
        if not 0.0 <= self.reg_relative:
            raise ConfigError("ReconstructionConfig.reg_relative must be >= 0 (0: reg_factor's absolute weight).")
        _check_positive("ReconstructionConfig.reg_relative_max_bits", self.reg_relative_max_bits)
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError("ReconstructionConfig.warmup must be in [0, 1).")
        if not 0.0 <= self.qdrop < 1.0:
            raise ConfigError("ReconstructionConfig.qdrop must be in [0, 1).")
        if isinstance(self.finetune_iters, bool) or not isinstance(self.finetune_iters, int) or self.finetune_iters < 0:
            raise ConfigError("ReconstructionConfig.finetune_iters must be an integer >= 0 (0 skips the "
                              "network-wise fine-tuning).")
        _check_positive("ReconstructionConfig.finetune_lr", self.finetune_lr, integer=False)
        if not 0.0 <= self.block_fallback_z < math.inf:
            raise ConfigError("ReconstructionConfig.block_fallback_z must be a finite number >= 0 (0: a block "
                              "reverts to round-to-nearest on any increase of its held-out loss).")
        if not 0.0 <= self.hessian_sample_power <= 1.0:
            raise ConfigError("ReconstructionConfig.hessian_sample_power must be in [0, 1] (1: the Hessian scores "
                              "as they are, 0: every sample weighs alike).")
        _check_positive("ReconstructionConfig.hessian_min_bits", self.hessian_min_bits)
        if not 0.0 <= self.fallback_holdout <= 0.5:
            raise ConfigError("ReconstructionConfig.fallback_holdout must be in [0, 0.5].")
        if not (self.gamma < 0.0 and self.zeta > 1.0):
            raise ConfigError("ReconstructionConfig needs gamma < 0 and zeta > 1 (the stretch of the sigmoid).")


@dataclass(frozen=True)
class EPTQConfig:
    """Everything a quantization run needs to know. Frozen and validated on construction."""

    weight_bits: int = 8
    act_bits: int = 8
    method: Method = "eptq"
    act_scheme: ActScheme = "asymmetric"
    power_of_two: bool = False
    weight_range: RangeMethod = "mse"  # "hmse" needs the Hessian; method="eptq" uses it when set
    act_range: Literal["minmax", "mse"] = "mse"
    n_grid: int = 100  # clipping-ratio grid size of the scale searches
    first_last_8bit: bool = True  # first and last weight layer (and their input activations) at 8 bits
    act_placement: ActPlacement = ActPlacement.AUTO
    overrides: tuple[Override, ...] = ()
    n_calib: int = 1024
    calib_batch_size: int = 32
    seed: int = 0
    # mixed precision: a weight-memory budget in bytes (int) or as a fraction of the 8-bit size (float in (0, 1]);
    # per-layer weight widths are then chosen among weight_candidates (see eptq_fx.mixed_precision)
    weight_memory: int | float | None = None
    weight_candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    width_cost: WidthCost = WidthCost.ERROR_FEEDBACK
    hessian: HessianConfig = field(default_factory=HessianConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_choice("method", self.method, ("eptq", "rtn"))
        _check_choice("act_scheme", self.act_scheme, ("asymmetric", "symmetric", "unsigned"))
        _check_choice("weight_range", self.weight_range, ("minmax", "mse", "hmse"))
        _check_choice("act_range", self.act_range, ("minmax", "mse"))
        _check_positive("n_grid", self.n_grid)
        _coerce_enum_(self, "act_placement", ActPlacement, "act_placement")
        _coerce_enum_(self, "width_cost", WidthCost, "width_cost")
        _check_positive("n_calib", self.n_calib)
        _check_positive("calib_batch_size", self.calib_batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}.")
        wm = self.weight_memory
        if wm is not None:
            if isinstance(wm, bool) or not isinstance(wm, (int, float)) or wm <= 0 or \
                    (isinstance(wm, float) and wm > 1.0):
                raise ConfigError(f"weight_memory must be bytes (a positive int) or a fraction of the 8-bit "
                                  f"size (a float in (0, 1]), got {wm!r}.")
        if not isinstance(self.weight_candidates, tuple) or not self.weight_candidates:
            raise ConfigError(f"weight_candidates must be a non-empty tuple of bit widths, "
                              f"got {self.weight_candidates!r}.")
        for b in self.weight_candidates:
            _check_bits("weight_candidates", b)
        if self.power_of_two and self.act_scheme == "asymmetric":
            raise ConfigError(
                "power_of_two scales need a zero point of 0: use act_scheme='symmetric' or 'unsigned'."
            )
        if not isinstance(self.overrides, tuple) or not all(isinstance(o, Override) for o in self.overrides):
            raise ConfigError("overrides must be a tuple of eptq_fx.Override.")
        if not isinstance(self.hessian, HessianConfig):
            raise ConfigError("hessian must be an eptq_fx.HessianConfig.")
        if not isinstance(self.reconstruction, ReconstructionConfig):
            raise ConfigError("reconstruction must be an eptq_fx.ReconstructionConfig.")

    def fingerprint_dict(self) -> dict:
        """A JSON-able description used to fingerprint runs (checkpoints, caches)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "overrides":
                v = [repr(o) for o in v]
            elif f.name == "act_placement":
                v = v.value
            elif f.name in ("hessian", "reconstruction"):
                v = {g.name: getattr(v, g.name) for g in fields(v)}
            out[f.name] = v
        return out


def user_cache_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/eptq_fx`` (else ``~/.cache/eptq_fx``), never the
    directory the user happens to run from."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eptq_fx"


def check_override_names(config: EPTQConfig, known_names: list[str], modules: list | None = None) -> None:
    """Refuse overrides that select no layer: a ``name`` that is not a layer (listing close matches), a
    ``regex`` that matches no layer name, a ``module_type`` no layer has (when ``modules`` is given)."""
    for o in config.overrides:
        if o.regex is not None and not any(re.fullmatch(o.regex, n) for n in known_names):
            raise ConfigError(f"Override regex {o.regex!r} matches no quantizable layer (re.fullmatch on names "
                              f"such as {', '.join(known_names[:3])}).")
        if o.module_type is not None and modules is not None and \
                not any(isinstance(m, o.module_type) for m in modules if m is not None):
            kinds = sorted({type(m).__name__ for m in modules if m is not None})
            raise ConfigError(f"Override module_type {o.module_type.__name__} matches no quantizable layer; "
                              f"the model's layers are {', '.join(kinds)}.")
        if o.name is not None and o.name not in known_names:
            close = difflib.get_close_matches(o.name, known_names, n=3)
            hint = f" Close matches: {', '.join(close)}." if close else \
                f" Quantizable layers: {', '.join(known_names[:5])}{', ...' if len(known_names) > 5 else ''}."
            raise ConfigError(f"Override name {o.name!r} matches no quantizable layer.{hint}")


def parse_bits(text: str) -> tuple[int, int]:
    """``"W4A8"`` → ``(4, 8)``."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", text.strip())
    if not m:
        raise ConfigError(f"Bit widths look like W4A8 (weights 4 bits, activations 8), got {text!r}.")
    return int(m.group(1)), int(m.group(2))
