"""Faster forms of a throwaway candidate for CPU scoring.

A search scores hundreds of freshly built candidates, each once, on CPU.
These rewrites of such a candidate keep its function and cut the time and
memory of one forward and backward pass:

* :func:`fuse_batchnorm_relu_` turns each declared ``BatchNorm2d`` + ``ReLU``
  pair into one compiled kernel (``csrc/bn_relu_cpu.cpp``). Eager torch runs
  them as two kernels and keeps both the batch norm input and the ReLU output
  for the backward pass. The fused kernel reads its input twice, writes once,
  and keeps only its input. Running statistics are not updated.
* :func:`fuse_batchnorm_relu_conv_` does the same for a declared batch norm +
  ReLU + convolution triple, as one autograd step that keeps only the batch
  norm input. When the triple ends a residual branch, the scorer requests the
  Fisher term from the step (:func:`defer_fisher`): the backward pass
  recomputes the branch output from the kept input, so the output is not kept
  between the passes.
* :func:`merge_conv_groups_` rewrites grouped 3x3 convolutions with few
  channels per group as convolutions with fewer, wider groups whose weights
  are block diagonal (zeros outside the original groups). oneDNN runs some
  narrow groups several times slower on CPU than wider ones, and which widths
  are slow depends on the CPU (:data:`GROUP_WIDTHS`). The products outside
  the original groups are exact zeros, so only the order of the float sums
  changes.
* :func:`drop_conv_inputs_` makes convolutions keep only their weight for
  the backward pass. Without weight gradients the input gradient does not
  need the input, but eager torch keeps it anyway; this halves the memory
  kept per candidate.

All rewrites are for networks that are scored and thrown away: they share
weight storage with nothing and leave the model unfit for training.

The compiled helpers (the kernels above, the Fisher sums and the block cache
of :mod:`~blockswap_plugin.core.block_cache`) are one extension module, built
with :mod:`torch.utils.cpp_extension` on first use (about 80 s) and cached
under ``$BLOCKSWAP_CACHE/extensions``. ``tools/install.sh`` builds it ahead
with ``blockswap kernel``. Where it cannot be built (no C++ compiler),
scoring falls back to eager torch with a warning. Set ``BLOCKSWAP_FUSED=0``
to turn it off.

Host modules declare their pairs and triples with
:func:`register_batchnorm_relu_pairs` and :func:`register_batchnorm_relu_conv`.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from .cache import cache_root
from .env import env_flag

__all__ = [
    "BatchNormReLU",
    "BatchNormReLUConv",
    "defer_fisher",
    "fuse_batchnorm_relu_conv_",
    "is_batchnorm_relu_conv_output",
    "register_batchnorm_relu_conv",
    "InputGradConv2d",
    "drop_conv_inputs_",
    "fused_kernel",
    "kernel_status",
    "fuse_batchnorm_relu_",
    "merge_conv_groups_",
    "merged_group_count",
    "GROUP_WIDTHS",
    "cpu_family",
    "register_batchnorm_relu_pairs",
]

_logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
# Compiled together as one extension module; ops.h declares what module.cpp binds.
_SOURCES = tuple(_CSRC / name for name in ("bn_relu_cpu.cpp", "block_cache_cpu.cpp", "module.cpp"))
_HEADERS = (_CSRC / "ops.h",)
_PAIRS: Dict[Type[nn.Module], Tuple[Tuple[str, str], ...]] = {}
_TRIPLES: Dict[Type[nn.Module], Tuple[str, str, str]] = {}
_LOCK = threading.Lock()
_KERNEL: Optional[object] = None
_KERNEL_TRIED = False


def register_batchnorm_relu_pairs(cls: Type[nn.Module], pairs: Sequence[Tuple[str, str]]) -> None:
    """Declare that ``cls.forward`` applies child ``relu`` directly to the output of child ``bn``.

    Args:
        cls: Module class.
        pairs: ``(batch norm attribute, ReLU attribute)`` names; the ReLU must
            take the batch norm's output and nothing else may use that output.
    """
    _PAIRS[cls] = tuple((str(bn), str(relu)) for bn, relu in pairs)


def register_batchnorm_relu_conv(cls: Type[nn.Module], bn: str, relu: str, conv: str) -> None:
    """Declare that ``cls.forward`` applies child ``conv`` directly to ``relu(bn(x))``.

    :func:`fuse_batchnorm_relu_conv_` then runs the three as one step that
    keeps only the batch norm input, and that can give the Fisher potential at
    its output without keeping the output (see :class:`BatchNormReLUConv`).

    Args:
        cls: Module class.
        bn: Attribute of the batch norm.
        relu: Attribute of the ReLU, which takes the batch norm's output and nothing else.
        conv: Attribute of the convolution, which takes the ReLU's output and nothing else.
    """
    _TRIPLES[cls] = (str(bn), str(relu), str(conv))


def _compile_flags() -> List[str]:
    flags = ["-O3", "-std=c++20"]
    if platform.machine() in ("x86_64", "AMD64"):
        # 512-bit vectors made the kernel about 20 % faster on an AVX-512 Xeon.
        flags += ["-march=native", "-mprefer-vector-width=512"]
    return flags


def _cpu_flags_line() -> Optional[str]:
    """Return the first ``flags`` line of /proc/cpuinfo ("" if it has none), or None where the file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return None


def _build_name() -> str:
    # -march=native code must not be loaded on another CPU, so the CPU's flags
    # are part of the key, with the source, the compiler flags and the torch build.
    flags = _cpu_flags_line()
    if flags is None:
        flags = platform.processor()
    digest = hashlib.sha256()
    sources = (path.read_bytes() for path in _SOURCES + _HEADERS)
    parts = (*sources, " ".join(_compile_flags()).encode(), torch.__version__.encode(),
             flags.encode(), platform.machine().encode())
    for part in parts:
        digest.update(part)
    return f"blockswap_cpu_ops_{digest.hexdigest()[:12]}"


def fused_kernel() -> Optional[object]:
    """Return the compiled batch norm + ReLU kernel, or None where it is turned off or cannot be built.

    The first call in a process compiles the kernel if no cached build exists.
    """
    global _KERNEL, _KERNEL_TRIED
    if not env_flag("BLOCKSWAP_FUSED"):
        return None
    with _LOCK:
        if _KERNEL is not None or _KERNEL_TRIED:
            return _KERNEL
        name = _build_name()
        folder = cache_root() / "extensions" / name
        _KERNEL_TRIED = True
        # cpp_extension warns that no CUDA runtime exists on CPU machines and
        # prints a banner for unknown compilers; a failed build is reported below.
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_logger.level
        cpp_logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension

            folder.mkdir(parents=True, exist_ok=True)
            if any(folder.glob(f"{name}*.so")):
                _logger.info("loading the fused batch norm + ReLU kernel from %s", folder)
            else:
                _logger.info("compiling the fused batch norm + ReLU kernel into %s (about 80 s, once)", folder)
            _KERNEL = cpp_extension.load(
                name, [str(path) for path in _SOURCES], extra_cflags=_compile_flags(), build_directory=str(folder),
                verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - any build failure means: use eager torch
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            # The compiler's own message is more useful than ninja's summary line.
            causes = [line for line in lines[1:] if "error" in line.lower() or "not found" in line.lower()]
            lines = causes[:1] or lines
            _logger.warning(
                "could not build the fused batch norm + ReLU kernel in %s (%s: %s); scoring uses eager torch, "
                "which is slower. Check that a C++ compiler works and that the folder is writable "
                "(BLOCKSWAP_CACHE moves it), or set BLOCKSWAP_FUSED=0 to hide this warning.",
                folder, type(error).__name__, lines[0] if lines else "no message",
            )
            _KERNEL = None
        finally:
            cpp_logger.setLevel(level)
        return _KERNEL


class _BatchNormReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernel):
        y, mean, invstd = kernel.forward(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        ctx.kernel = kernel
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mean, invstd, weight, bias = ctx.saved_tensors
        return ctx.kernel.backward(grad, x, mean, invstd, weight, bias), None, None, None, None


class BatchNormReLU(nn.Module):
    """Batch norm in training mode followed by ReLU, in one CPU kernel, for scoring only.

    Uses the batch norm's affine parameters and ``eps``; normalises with the
    batch statistics and does not update running statistics. Inputs that the
    kernel does not take (not 4-D, not CPU, not float32/bfloat16, or with
    gradients for the affine parameters) go through eager torch.

    Args:
        bn: The batch norm to replace.
        kernel: The compiled kernel (:func:`fused_kernel`).
    """

    def __init__(self, bn: nn.BatchNorm2d, kernel: object) -> None:
        super().__init__()
        self.bn = bn
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not _kernel_takes(x, bn):
            return _eager_batchnorm_relu(x, bn)
        return _BatchNormReLUFunction.apply(x, bn.weight, bn.bias, float(bn.eps), self.kernel)


def _conv_args(conv: nn.Conv2d) -> Tuple:
    return (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _conv_input_gradient(grad: torch.Tensor, conv_input: torch.Tensor, weight: torch.Tensor, conv_args: Tuple
                         ) -> torch.Tensor:
    """Return the input gradient of a bias-free convolution; only the shape and layout of ``conv_input`` are read."""
    stride, padding, dilation, groups = conv_args
    return torch.ops.aten.convolution_backward(
        grad, conv_input, weight, None, list(stride), list(padding), list(dilation),
        False, [0, 0], groups, [True, False, False],
    )[0]


def _kernel_takes(x: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    """Return whether the compiled kernel can normalise ``x`` with ``bn`` (else eager torch does)."""
    return (
        x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        and bn.affine and not bn.weight.requires_grad and not bn.bias.requires_grad
    )


def _eager_batchnorm_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return torch.relu(nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))


class _BatchNormReLUConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, eps, conv_weight, conv_args, kernel):
        h, mean, invstd = kernel.forward(z, weight, bias, eps)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
        conv_weight = conv_weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = nn.functional.conv2d(h.to(dtype), conv_weight, None, *conv_args)
        ctx.save_for_backward(z, mean, invstd, weight, bias, conv_weight)
        ctx.conv_args = conv_args
        ctx.kernel = kernel
        # The scorer sets this to a function of (output, gradient) when the
        # output is a branch output; the backward pass then recomputes the output.
        ctx.fisher = None
        ctx.input = z
        return out

    @staticmethod
    def backward(ctx, grad):
        z, mean, invstd, weight, bias, conv_weight = ctx.saved_tensors
        grad = grad.to(conv_weight.dtype)
        if ctx.fisher is not None:
            h = ctx.kernel.apply(z, mean, invstd, weight, bias).to(conv_weight.dtype)
            with torch.autocast("cpu", enabled=False):
                ctx.fisher(nn.functional.conv2d(h, conv_weight, None, *ctx.conv_args), grad)
        else:
            # The kernel's output layout: only shape and layout are read.
            h = torch.empty(z.shape, dtype=conv_weight.dtype, memory_format=torch.channels_last)
        grad_h = _conv_input_gradient(grad, h, conv_weight, ctx.conv_args)
        del h
        ctx.input = None
        return ctx.kernel.backward(grad_h, z, mean, invstd, weight, bias), None, None, None, None, None, None


def is_batchnorm_relu_conv_output(tensor: torch.Tensor) -> bool:
    """Return whether ``tensor`` is the direct output of a :class:`BatchNormReLUConv` step (see :func:`defer_fisher`)."""
    return type(tensor.grad_fn) is _BatchNormReLUConvFunction._backward_cls  # noqa: SLF001


def defer_fisher(output: torch.Tensor, fisher) -> torch.Tensor:
    """Have ``fisher(output, gradient)`` called in the backward pass of the step that made ``output``.

    The output is recomputed there from the kept batch norm input, so it
    need not be kept between the passes. Returns the batch norm input: a
    gradient request for it makes the backward pass reach that step.
    """
    node = output.grad_fn
    node.fisher = fisher
    return node.input


class BatchNormReLUConv(nn.Module):
    """Batch norm (training) + ReLU + a bias-free convolution as one autograd step, for scoring only.

    The step keeps only the batch norm input (and the weights) for the
    backward pass. There it recomputes the ReLU output with the compiled
    kernel, for the input gradient of the convolution, and, when the scorer
    asked for the Fisher term of this output (:func:`defer_fisher`), the
    output too. A branch output then costs no memory between the two passes.
    Inputs the kernel does not take go through eager torch.

    Args:
        bn: The batch norm.
        conv: The convolution that takes ``relu(bn(x))``.
        kernel: The compiled kernel (:func:`fused_kernel`).
    """

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, kernel: object) -> None:
        super().__init__()
        self.bn = bn
        self.conv = conv
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, conv = self.bn, self.conv
        if not _kernel_takes(x, bn) or conv.weight.requires_grad:
            return conv(_eager_batchnorm_relu(x, bn))
        return _BatchNormReLUConvFunction.apply(x, bn.weight, bn.bias, float(bn.eps), conv.weight, _conv_args(conv),
                                                self.kernel)


def fuse_batchnorm_relu_conv_(model: nn.Module, kernel: Optional[object] = None,
                              skip: Iterable[nn.Module] = ()) -> int:
    """Replace every registered batch norm + ReLU + convolution triple by :class:`BatchNormReLUConv`.

    The batch norm's attribute gets the fused step, the ReLU and the
    convolution become identities. Only bias-free ``nn.Conv2d`` with zero
    padding given as numbers are taken. Returns the number of triples fused
    (0 without the kernel).

    Args:
        model: Network to rewrite in place.
        kernel: The compiled kernel; :func:`fused_kernel` when omitted.
        skip: Modules to leave as they are (modules that carry hooks).
    """
    kernel = kernel or fused_kernel()
    if kernel is None:
        return 0
    skipped = {id(module) for module in skip}
    fused = 0
    for module in list(model.modules()):
        names = _TRIPLES.get(type(module))
        if names is None:
            continue
        bn, relu, conv = (getattr(module, name, None) for name in names)
        if any(id(part) in skipped for part in (bn, relu, conv)):
            continue
        if (type(bn) is nn.BatchNorm2d and isinstance(relu, nn.ReLU) and type(conv) is nn.Conv2d
                and conv.bias is None and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
            setattr(module, names[0], BatchNormReLUConv(bn, conv, kernel))
            setattr(module, names[1], nn.Identity())
            setattr(module, names[2], nn.Identity())
            fused += 1
    return fused


def fuse_batchnorm_relu_(model: nn.Module, kernel: Optional[object] = None, skip: Iterable[nn.Module] = ()) -> int:
    """Replace every registered batch norm + ReLU pair in ``model`` by :class:`BatchNormReLU`.

    The ReLU becomes an identity. Returns the number of pairs fused (0 when
    the kernel is unavailable).

    Args:
        model: Network to rewrite in place.
        kernel: The compiled kernel; :func:`fused_kernel` when omitted.
        skip: Modules to leave as they are, such as modules that carry hooks
            (the fused module does not call them, so their hooks would not run).
    """
    kernel = kernel or fused_kernel()
    if kernel is None:
        return 0
    skipped = {id(module) for module in skip}
    fused = 0
    for module in model.modules():
        for bn_name, relu_name in _PAIRS.get(type(module), ()):
            bn = getattr(module, bn_name, None)
            relu = getattr(module, relu_name, None)
            if id(bn) in skipped or id(relu) in skipped:
                continue
            if type(bn) is nn.BatchNorm2d and isinstance(relu, nn.ReLU):
                setattr(module, bn_name, BatchNormReLU(bn, kernel))
                setattr(module, relu_name, nn.Identity())
                fused += 1
    return fused


# Minimum channels per group that merge_conv_groups_ gives a 3x3 convolution, at stride 1 and 2, by CPU
# family, from oneDNN bf16 timings on an AMX Xeon and an AMD EPYC (docs/benchmarks.md, "Merged convolution groups").
GROUP_WIDTHS: Dict[str, Tuple[int, int]] = {"amx": (16, 32), "other": (4, 8)}
_CPU_FAMILY: Optional[str] = None


def cpu_family() -> str:
    """Return ``"amx"`` on CPUs with AMX-BF16 tiles (read from /proc/cpuinfo), else ``"other"``."""
    global _CPU_FAMILY
    if _CPU_FAMILY is None:
        flags = _cpu_flags_line() or ""
        _CPU_FAMILY = "amx" if "amx_bf16" in flags.split() else "other"
    return _CPU_FAMILY


def merged_group_count(conv: nn.Conv2d, family: Optional[str] = None) -> int:
    """Return the number of groups :func:`merge_conv_groups_` gives ``conv`` on CPU.

    A grouped 3x3 convolution with fewer channels per group than
    :data:`GROUP_WIDTHS` gives for its stride gets the most groups that are
    at least that wide. A depthwise convolution at stride 1 was fast on every
    CPU measured and is kept.

    Args:
        conv: The convolution.
        family: Key of :data:`GROUP_WIDTHS`, or None for this machine's :func:`cpu_family`.

    NOTE: only the two CPUs named at :data:`GROUP_WIDTHS` were measured, so
    CPUs without AVX-512 get the second rule untested.
    """
    groups = conv.groups
    if groups == 1 or conv.kernel_size == (1, 1):
        return groups
    if groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1):
        return groups
    family = family or cpu_family()
    if family not in GROUP_WIDTHS:
        raise ValueError(f"unknown CPU family {family!r}; use one of {', '.join(GROUP_WIDTHS)}")
    width = GROUP_WIDTHS[family][0 if conv.stride == (1, 1) else 1]
    fits = [d for d in range(1, groups + 1) if groups % d == 0 and conv.in_channels // d >= width]
    return max(fits) if fits else 1


def merge_conv_groups_(model: nn.Module) -> int:
    """Rewrite grouped convolutions with narrow groups as block-diagonal ones with wider groups.

    Every ``nn.Conv2d`` whose :func:`merged_group_count` is smaller than its
    group count gets a zero-padded weight that does not require gradients.
    Returns the number of convolutions rewritten.
    """
    merged = 0
    for conv in model.modules():
        if type(conv) is not nn.Conv2d or conv.groups == 1:
            continue
        new_groups = merged_group_count(conv)
        if new_groups == conv.groups:
            continue
        weight = conv.weight.detach()
        out_per_group = conv.out_channels // conv.groups
        in_per_group = weight.shape[1]
        per_merged = conv.groups // new_groups
        dense = weight.new_zeros(conv.out_channels, in_per_group * per_merged, *weight.shape[2:])
        for group in range(conv.groups):
            rows = slice(group * out_per_group, (group + 1) * out_per_group)
            start = (group % per_merged) * in_per_group
            dense[rows, start:start + in_per_group] = weight[rows]
        conv.weight = nn.Parameter(dense, requires_grad=False)
        conv.groups = new_groups
        merged += 1
    return merged


class _InputGradConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.input_meta = (x.shape, x.dtype, x.device, _memory_format(x))
        ctx.conv = (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, device, memory_format = ctx.input_meta
        stride, padding, dilation, groups = ctx.conv
        # Only the shape and layout of this stand-in input are read.
        stand_in = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        grad_input = _conv_input_gradient(grad.to(dtype), stand_in, weight, (stride, padding, dilation, groups))
        return grad_input, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class InputGradConv2d(nn.Module):
    """A bias-free ``nn.Conv2d`` that keeps only its weight for the backward pass, for scoring only.

    The backward pass returns the gradient of the input and no weight
    gradient. Falls back to the wrapped convolution where its weight requires
    gradients. :func:`drop_conv_inputs_` wraps only convolutions without bias,
    with zero padding given as numbers.

    Args:
        conv: The convolution to wrap.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if conv.weight.requires_grad or x.dim() != 4:
            return conv(x)
        return _InputGradConv2dFunction.apply(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)


def drop_conv_inputs_(model: nn.Module, skip: Iterable[nn.Module] = ()) -> int:
    """Wrap every bias-free ``nn.Conv2d`` of ``model`` in :class:`InputGradConv2d`; return how many.

    Modules in ``skip`` stay as they are (the wrapper does not call the
    convolution module, so hooks on it would not run).
    """
    skipped = {id(module) for module in skip}
    targets = [
        (parent, name, child)
        for parent in model.modules() if not isinstance(parent, BatchNormReLUConv)
        for name, child in parent.named_children()
        if type(child) is nn.Conv2d and child.bias is None and child.padding_mode == "zeros"
        and not isinstance(child.padding, str) and id(child) not in skipped
    ]
    for parent, name, child in targets:
        setattr(parent, name, InputGradConv2d(child))
    return len(targets)


def kernel_status() -> Tuple[bool, str]:
    """Build or load the kernel; return False only if it failed, with a line that describes the state."""
    if not env_flag("BLOCKSWAP_FUSED"):
        return True, "fused batch norm + ReLU kernel: turned off by BLOCKSWAP_FUSED"
    if fused_kernel() is None:
        return False, "fused batch norm + ReLU kernel: not available (see the warning above); scoring uses eager torch"
    return True, f"fused batch norm + ReLU kernel: ready ({cache_root() / 'extensions' / _build_name()})"
