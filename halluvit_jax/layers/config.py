"""`HalConfig`, the one description of what makes a model "hal", and the `impl` switch.

`HalConfig` is carried by every backbone and block (`hal=None` means the baseline): the hMHSA
variant and init, whether the FFNs become cFFNs and how they are factorized, and whether the
cFFNs are built in training form (parallel BatchNorm branches) or in the folded deploy form.
See docs/design.md for the math behind each field.

`impl` chooses how a layer computes, never what: every layer takes ``impl`` in `IMPLS`, and
`run` is the one place that turns it into a call.

- ``"plain"``: the textbook forward written with stock jax ops (the reference, and what XLA
  compiles well on TPU and GPU).
- ``"fused"``: the CPU-tuned kernels of `halluvit_jax.layers.fused` (custom VJPs that recompute
  instead of keeping activations, convolutions rewritten as shifted sums, ...). Same values and
  gradients.
- ``"pallas"`` (opt-in): hMHSA's attention core as Pallas kernels, forward and a recomputing
  backward, per batch shard under a mesh: on TPU one Mosaic kernel per query block
  (`halluvit_jax.layers.kernels.hmhsa_pallas`), on CUDA flash-attention-style Triton kernels
  with the hallucination on the keys (`halluvit_jax.layers.kernels.hmhsa_triton`; a layer of
  more than four real heads runs the accel core), on CPU the Mosaic kernel in Pallas'
  interpreter (tests); the cFFN in training form and train mode as two Mosaic kernels with its
  BatchNorm branches' statistics computed inside (`halluvit_jax.layers.kernels.cffn_pallas`; on
  TPU, interpreted on CPU); every other layer, and the cFFN elsewhere, runs its ``"accel"``
  form where it has one, its plain path otherwise. ``"auto"`` picks no kernel: the Mosaic
  kernels have compiled deviceless for TPU (docs/aot.md) and the Triton kernels for sm_90
  (benchmarks/triton_compile.py), but none has run on its hardware yet.
- ``"accel"``: two layers laid out for accelerators in stock jax ops; every other layer runs
  its plain path. Same values and gradients as plain (tests/test_hmhsa_accel.py,
  tests/test_impl_equivalence.py).

  - hMHSA's attention core (`halluvit_jax.layers.attention_accel.hmhsa_core`): the
    hallucination moved onto the keys, IHH as a 3x3 convolution of k' and the hallucinated
    logits as one more matmul, CHH as multiply-adds of head maps, separate softmaxes of the real
    and hallucinated heads, no concatenation of maps. On an H200 it ran hMHSA's core faster than
    the plain path at every shape measured, forward and forward+backward, and the DeiT-S-hal
    model faster in inference and training (benchmarks/attention_core_gpu.py,
    benchmarks/gpu.sh, rendered in docs/benchmarks.md). For TPU, by XLA:TPU's own estimate from
    a deviceless compile, it moves fewer HBM bytes than the plain path: in the core alone at
    every shape of benchmarks/attention_core_tpu.py, and in the whole DeiT-S-hal train step and
    deploy forward (docs/aot.md).
  - the cFFN's training-form factors (`halluvit_jax.layers.mlp.rep_dense_accel`): each factor's
    BatchNorm branches folded into one matmul, their batch statistics from one pass over the
    branch outputs or, for a narrow factor (``fc2b``, ``c' -> C``), from the input's Gram
    matrix, so that its ``[N, r, C]`` branch outputs never exist. By XLA:TPU's estimate the hal
    train steps move fewer HBM bytes with it (docs/aot.md); on a GPU it has not been timed (it
    has no more MACs than plain, and ``benchmarks/gpu.sh``'s accel rows time it).

  ``"auto"`` picks accel for CUDA and TPU.
- ``"auto"`` (default): ``"fused"`` when compiling for CPU, ``"accel"`` for CUDA and TPU,
  ``"plain"`` for every other platform, chosen by ``jax.lax.platform_dependent`` at lowering
  time (so an export for ``tpu`` or ``cuda`` from a CPU host contains only that platform's
  path).

A call that needs the attention maps as values (sown into ``intermediates`` for analysis) or
needs dropout inside a layer runs the plain path whatever ``impl`` says: only it builds those
tensors (`run`'s ``hook``).

A new implementation is a name in `IMPLS` and, where ``"auto"`` should pick it, an entry in
`AUTO`; a layer that has a kernel for it passes it to `run` as a keyword (``pallas=...``); a layer
without one runs its plain path.

`trace_target` says which compiler a trace is for: ``"xla"`` (default) or ``"onnx"``, the ONNX
export (`halluvit_jax.convert.export.export_onnx`), whose runtime runs every op as its own pass
over memory and fuses little. Under ``"onnx"`` the attention layers trace the same values as a
different program: MHSA as two matmuls around one softmax with its heads leading and the scale
on q (no library attention call, whose lowering transposes and scales the ``N x Nk`` maps), and
hMHSA's CHH as one matmul (`halluvit_jax.layers.attention_accel.mix_heads`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

# The hMHSA variants: the hallucination steps each applies to the real logits, in order.
HAL_STEPS: dict[str, tuple[str, ...]] = {
    "copy": (), "ihh": ("ihh",), "chh": ("chh",), "ihh_chh": ("ihh", "chh"), "chh_ihh": ("chh", "ihh"),
}
HAL_VARIANTS = tuple(HAL_STEPS)
HAL_INITS = ("identity", "random")

# The parameters the layers name that an optimizer leaves without weight decay (besides every
# leaf with ndim <= 1): norm scales (cFFN's BatchNorm scale is [branches, C]), any bias,
# position embeddings, class tokens. The trainer's default and the configs' value.
NO_DECAY_REGEX = r"(^|/)(pos_embed\w*|cls_token|dist_token|scale|\w*bias)$"
FACTORIZE = ("w1", "w2")
IMPLS = ("auto", "plain", "fused", "accel", "pallas")
# What "auto" runs per platform (`jax.lax.platform_dependent` names); every other platform: plain.
AUTO = {"cpu": "fused", "cuda": "accel", "tpu": "accel"}
# What a trace is for (`trace_target`).
TARGETS = ("xla", "onnx")
_TARGET: contextvars.ContextVar[str] = contextvars.ContextVar("trace_target", default="xla")


@dataclasses.dataclass(frozen=True)
class HalConfig:
    """The hMHSA + cFFN switches of a model (docs/design.md sections 2-3).

    - ``variant``: how hallucinated maps are made from the real ones: ``"ihh_chh"`` (IHH then
      CHH, the paper's choice), ``"chh_ihh"``, ``"ihh"``, ``"chh"`` or ``"copy"``.
    - ``hal_init``: ``"identity"`` (IHH/CHH start as identities: hallucinated heads begin as
      copies of the real ones) or ``"random"`` (PyTorch's default conv init).
    - ``cffn``: replace every FFN by a cFFN (False: hMHSA with the plain FFN, Table 5's ablation).
    - ``compact_ratio`` (t), ``round_to``: the inner width ``c' = round(t m C / (m + 1))``.
    - ``num_branches`` (r): training-time parallel (Dense -> BatchNorm) branches per factor.
    - ``factorize``: which FFN matrix is factorized, ``"w2"`` (default) or ``"w1"``.
    - ``deploy``: build the cFFNs folded (one Dense per factor; `halluvit_jax.reparameterize`
      turns training variables into these).
    """

    variant: str = "ihh_chh"
    hal_init: str = "identity"
    cffn: bool = True
    compact_ratio: float = 2.0 / 3.0
    num_branches: int = 2
    factorize: str = "w2"
    round_to: int = 1
    deploy: bool = False

    def __post_init__(self):
        checks = (
            (self.variant in HAL_VARIANTS, f"variant={self.variant!r}; choose one of {HAL_VARIANTS}"),
            (self.hal_init in HAL_INITS, f"hal_init={self.hal_init!r}; choose one of {HAL_INITS}"),
            (self.factorize in FACTORIZE, f"factorize={self.factorize!r}; choose one of {FACTORIZE}"),
            (self.compact_ratio > 0, f"compact_ratio={self.compact_ratio}; it must be positive"),
            (self.num_branches >= 1, f"num_branches={self.num_branches}; it must be >= 1"),
            (self.round_to >= 1, f"round_to={self.round_to}; it must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"HalConfig: {message}.")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def make(cls, value: HalConfig | dict[str, Any] | bool | None) -> HalConfig | None:
        """A `HalConfig` from what a config file or a checkpoint's JSON holds: a `HalConfig`, a
        dict of its fields, True (the defaults) or False/None (the baseline)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
            value = value.to_dict()
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.fields()))
            if unknown:
                raise ValueError(
                    f"Unknown HalConfig field(s) {unknown}; the fields are {list(cls.fields())}."
                )
            return cls(**value)
        raise TypeError(f"hal must be a HalConfig, a dict of its fields or None, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {IMPLS}.")
    return impl


def run(impl: str, plain: Callable[..., Any], fused: Callable[..., Any], *args: Any,
        hook: Callable[[Any], Any] | None = None, **kernels: Callable[..., Any]) -> Any:
    """A layer's forward pass on the path ``impl`` names: the one place that decides it.

    - ``hook`` (sow the attention maps, dropout inside the layer): ``plain(*args, hook=hook)``,
      whatever ``impl`` says; only the plain path builds the tensors a hook sees.
    - ``"plain"`` / ``"fused"`` / another name in `IMPLS`: that function (``kernels`` holds
      the layer's kernels for further implementations; a layer without one runs ``plain``).
    - ``"auto"``: chosen per platform at lowering time (`AUTO`), by ``jax.lax.platform_dependent``.

    Every function must be pure in ``args`` (a pytree of arrays) with the same output structure.
    """
    check_impl(impl)
    if hook is not None:
        return plain(*args, hook=hook)
    table = {"plain": plain, "fused": fused, **kernels}
    if impl != "auto":
        return table.get(impl, plain)(*args)
    per_platform = {platform: table.get(name, plain) for platform, name in AUTO.items()}
    return jax.lax.platform_dependent(*args, default=plain, **per_platform)


@contextlib.contextmanager
def trace_target(target: str) -> Iterator[None]:
    """Within the block, the layers trace the program for ``target`` (one of `TARGETS`): the same
    values, a different program (see the module docstring). Read at trace time and not part of
    jax's trace caches: trace a fresh function inside the block (a function jax has traced
    before keeps the program it was traced with)."""
    if target not in TARGETS:
        raise ValueError(f"trace_target must be one of {TARGETS}, got {target!r}.")
    token = _TARGET.set(target)
    try:
        yield
    finally:
        _TARGET.reset(token)


def tracing_for(target: str) -> bool:
    """Whether the trace under way is for ``target`` (`trace_target`)."""
    return _TARGET.get() == target
