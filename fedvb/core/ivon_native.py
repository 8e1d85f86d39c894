"""IVON's native CPU kernels (``ivon_native.c``): built with the system C compiler on first use, called by ctypes.

The shared library is cached per source, compiler, flags and CPU (its architecture, model and
instruction-set flags: the build uses ``-march=native``, so a library built on one CPU must never be
loaded on another that lacks its instructions, as in a cache shared over a mixed cluster) in
``$FEDVB_CACHE/native`` (default ``~/.cache/fedvb/native``) and written under
a temporary name then renamed, so parallel workers may build it at once.
Without a C compiler (or with ``FEDVB_IVON_KERNEL=torch``) :func:`load` gives
None and IVON uses its torch implementation; that choice is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["NativeKernels", "load"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ivon_native.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]

_float_p = ctypes.POINTER(ctypes.c_float)


def _pointer(tensor: Tensor | None):
    return None if tensor is None else ctypes.cast(tensor.data_ptr(), _float_p)


class NativeKernels:
    """The compiled ``ivon_sample`` and ``ivon_update`` on contiguous float32 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._sample = library.ivon_sample
        self._sample.restype = None
        self._sample.argtypes = [_float_p, _float_p, _float_p, _float_p, ctypes.c_int64, ctypes.c_uint64]
        self._update = library.ivon_update
        self._update.restype = None
        self._update.argtypes = [_float_p] * 10 + [ctypes.c_int64] + [ctypes.c_float] * 6 + [ctypes.c_int] * 2
        self._sample_rows = library.ivon_sample_rows
        self._sample_rows.restype = None
        self._sample_rows.argtypes = [_float_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.POINTER(ctypes.c_uint64)]
        self._update_rows = library.ivon_update_rows
        self._update_rows.restype = None
        self._update_rows.argtypes = (
            [_float_p] * 10 + [ctypes.c_int64] * 2 + [ctypes.c_float] * 2 + [_float_p] * 2 + [ctypes.c_float] * 2
            + [ctypes.c_int]
        )  # fmt: skip

    @staticmethod
    def supports(*tensors: Tensor | None) -> bool:
        return all(
            t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors
        )

    @staticmethod
    def _check(n: int, tensors: tuple[Tensor | None, ...]) -> None:
        # C reads raw pointers: anything but n contiguous float32 CPU values would be read out of bounds
        if not all(t is None or (NativeKernels.supports(t) and t.numel() == n) for t in tensors):
            raise ValueError(f"IVON native kernels need contiguous float32 CPU tensors of {n} elements")

    def sample_(self, param: Tensor, saved: Tensor, noise: Tensor, sqrt_precision: Tensor, key: int) -> None:
        """``noise <- z`` (standard normal, a function of ``key`` and the index), ``saved <- param``,
        ``param += z / sqrt_precision``."""
        self._check(param.numel(), (param, saved, noise, sqrt_precision))
        self._sample(_pointer(param), _pointer(saved), _pointer(noise), _pointer(sqrt_precision), param.numel(), key)

    def update_(self, mean, hess, momentum, grad, grad_noise, sqrt_precision, s0, s0m0, dual_v, dual_big_v, *,
                raw_noise, beta1, beta2, lam, c, lr, clip) -> None:  # fmt: skip
        """:func:`fedvb.core.ivon.ivon_update_` in one fused pass. ``raw_noise``: ``grad_noise`` holds the draw
        ``z`` of a single sample (``g z`` is formed here) instead of the average of ``g z``. ``s0`` is full
        length or one number; ``s0m0`` and the duals may be None (absent). ``grad_noise`` is left unchanged."""
        n = mean.numel()
        s0_full = s0.numel() == n
        self._check(n, (mean, hess, momentum, grad, grad_noise, sqrt_precision, s0m0, dual_v, dual_big_v))
        self._check(n if s0_full else 1, (s0.reshape(-1),))
        pointers = map(_pointer, (mean, hess, momentum, grad, grad_noise, sqrt_precision, s0, s0m0, dual_v, dual_big_v))
        self._update(*pointers, n, beta1, beta2, lam, c, lr, clip, int(raw_noise), int(s0_full))

    def sample_rows_(
        self, param: Tensor, saved: Tensor, noise: Tensor, sqrt_precision: Tensor, keys: list[int]
    ) -> None:
        """:meth:`sample_` on each row of ``(rows, n)`` tensors with its own key (a cohort, one client a row)."""
        rows, n = param.shape
        self._check(rows * n, (param, saved, noise, sqrt_precision))
        keys_array = (ctypes.c_uint64 * rows)(*keys)
        self._sample_rows(_pointer(param), _pointer(saved), _pointer(noise), _pointer(sqrt_precision), rows, n,
                          keys_array)  # fmt: skip

    def update_rows_(self, mean, hess, momentum, grad, grad_noise, sqrt_precision, s0, s0m0, dual_v, dual_big_v, *,
                     raw_noise, beta1, beta2, lam: Tensor, c: Tensor, lr, clip) -> None:  # fmt: skip
        """:meth:`update_` on each row of ``(rows, n)`` tensors with that row's ``lam`` and ``c`` (float32
        ``(rows,)``); ``s0`` full length per row."""
        rows, n = mean.shape
        tensors = (mean, hess, momentum, grad, grad_noise, sqrt_precision, s0, s0m0, dual_v, dual_big_v)
        self._check(rows * n, tensors)
        self._check(rows, (lam, c))
        pointers = map(_pointer, tensors)
        self._update_rows(*pointers, rows, n, beta1, beta2, _pointer(lam), _pointer(c), lr, clip, int(raw_noise))


def cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine, the CPU model and its instruction-set flags."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in fields:
                fields[key] = " ".join(sorted(value.split())) if key in ("flags", "Features") else value.strip()
    except OSError:  # not Linux: the processor string is the best we have
        fields["processor"] = platform.processor()
    return platform.machine() + "|" + "|".join(f"{k}={v}" for k, v in sorted(fields.items()))


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDVB_CACHE", Path.home() / ".cache" / "fedvb")) / "native"


@functools.lru_cache(maxsize=1)
def load() -> NativeKernels | None:
    """The kernels, built if needed; None when disabled or when no C compiler can build them."""
    if os.environ.get("FEDVB_IVON_KERNEL", "auto") == "torch":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("IVON: no C compiler found; using the torch kernels (slower on a CPU)")
        return None
    source = SOURCE.read_bytes()
    key = b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), cpu_signature().encode()])
    tag = hashlib.sha256(key).hexdigest()[:16]
    target = _cache_dir() / f"ivon_native-{tag}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
                temporary = Path(handle.name)
            try:
                subprocess.run(
                    [compiler, *FLAGS, str(SOURCE), "-o", str(temporary)], check=True, capture_output=True, text=True
                )
                temporary.replace(target)
            finally:
                temporary.unlink(missing_ok=True)
        return NativeKernels(ctypes.CDLL(str(target)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning("IVON: could not build the native kernels (%s); using the torch kernels", detail.strip()[:500])
        return None
