"""The enums that select a mode of a config field, with why each mode exists. Split from config.py (the frozen
dataclasses and their validation), which re-exports every name here."""
from __future__ import annotations

import enum


class Target(str, enum.Enum):
    """What each block's reconstruction matches to the float model. ``LAYERS``: the output of every quantized
    layer in the block (AdaRound's per-layer distance, summed). ``BLOCK``: the block's own outputs, after
    everything that follows its layers up to the next block (nonlinearities, an unfolded BatchNorm, the
    residual add), as BRECQ / QDrop do, so the layers of a block may trade errors that cancel downstream."""

    LAYERS = "layers"
    BLOCK = "block"


class HessianScope(str, enum.Enum):
    """Where a Hessian-weighted loss (``hessian_weighting=True``) applies. ``ALL``: every block. ``RESCALED``: only
    blocks with a compare point whose output a BatchNorm that could not be folded rescales (per channel) before the
    next quantizer, e.g. ConvMixer's conv → GELU → BatchNorm; every other block weighs samples and channels alike.
    Why: there the plain squared error misjudges which channels matter downstream and the per-channel Hessian
    corrects it (ConvMixer W2A4 +1.95 on three seeds); where every BatchNorm folds it only concentrates the fit
    (ResNet-20 W2A4 −1.8, BENCHMARKS.md "Hessian per channel vs uniform weights"). That was the default with
    ``Target.LAYERS`` (stops 23–29); with ``Target.BLOCK`` the default weighs every block (``ALL``)."""

    ALL = "all"
    RESCALED = "rescaled"


class WidthCost(str, enum.Enum):
    """How mixed precision estimates a layer's output error at a candidate width. ``ROUND_TO_NEAREST``: its
    weights rounded to nearest (HAWQ's estimate). ``ERROR_FEEDBACK``: rounded one input column at a time, each
    column's rounding error pushed onto the columns not yet rounded through the inverse of the layer's input
    second moments (the optimal-brain-quantization update GPTQ uses), an estimate of what a reconstruction that
    chooses the rounding can reach. Why: reconstruction repairs 4-bit weights almost fully and 2-bit weights
    far less, and the round-to-nearest estimate, blind to that, buys 8 bits for layers EPTQ would have repaired
    anyway and pays with 2-bit layers (BENCHMARKS.md "Mixed precision")."""

    ROUND_TO_NEAREST = "round_to_nearest"
    ERROR_FEEDBACK = "error_feedback"
    # error-feedback rounding, weighed at the network output: ‖f(Q_b(W_l)) − f‖² with only layer l quantized,
    # the label-free Hessian's quadratic form on the actual error instead of its trace times ‖Δy‖²/D
    NETWORK_OUTPUT = "network_output"


class Precision(str, enum.Enum):
    """Floating-point format of reconstruction's activation caches or of its training steps. ``AUTO`` (caches
    only): bfloat16 for a cached tensor over ``AUTO_CACHE_BYTES`` in float32 (ImageNet-size feature maps of
    1024 images), float32 for everything smaller."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    AUTO = "auto"


# Precision.AUTO's threshold. At 1024 images ResNet-18's maps are 3.3 GB (stem), 822 MB (first stage) and
# 411 MB (second stage) in float32: with only the stem in bfloat16 (a 1 GiB threshold) the default run peaked at
# 8.97 GB (BENCHMARKS.md "Scale"). A CIFAR ResNet's largest map is 67 MB (float32); ConvMixer-256's 1 GiB goes to
# bfloat16 (ResNet-20 W4A4 with every cache in bfloat16: 80.14 against 80.17)
AUTO_CACHE_BYTES = 384 * 2 ** 20


class ActPlacement(str, enum.Enum):
    """Where activation quantizers go. ``INPUTS``: on the inputs of quantized layers only. ``FUSABLE``: also on
    the inputs of adds and concatenations where an int8 runtime can then run them in integers: the outputs of
    conv / linear layers that feed them, and a residual shortcut reads the quantizer its value already has for
    the next layer, as PT2E's X86InductorQuantizer annotates and ONNX Runtime's QDQ rules fuse (QLinearConv with
    a quantized output, QLinearAdd); reconstruction then sees (and optimises) those quantizers too. ``AUTO``:
    ``FUSABLE`` where the activations are 8-bit (the width runtimes have integer kernels for), ``INPUTS``
    below, where the extra quantization points would only cost accuracy."""

    INPUTS = "inputs"
    AUTO = "auto"
    FUSABLE = "fusable"
