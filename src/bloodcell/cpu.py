"""What this CPU is and can do, for choices that depend on it: bf16 training
(``train.choose_device_precision``), the int8 model (``predict``'s ``--backend auto``)
and the machine named beside every timing.

Read from /proc/cpuinfo (Linux); elsewhere the flags are unknown and every choice
falls back to the one that is right on any CPU (fp32, the float model).
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# x86 instructions that multiply int8 into int32 without the int16 intermediate of
# AVX2's vpmaddubsw, which saturates with full-range (8-bit) weights. ARM's dot product
# (asimddp) accumulates in int32 as well.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags ("flags" on x86, "Features" on ARM); empty if unknown."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name, or what the platform module says."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 autocast pays off only then (elsewhere it is emulated, slower)."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def has_int8_dot() -> bool:
    """VNNI, AMX-int8 or ARM's dot product: 8-bit weights are exact in ONNX Runtime's int8 kernels."""
    return bool(cpu_flags() & INT8_DOT_FLAGS)


def describe() -> str:
    """Model, cores and the flags that matter here, e.g. for a benchmark's header."""
    extras = [name for name, ok in (("AMX/AVX512-bf16", has_native_bf16()), ("int8 dot", has_int8_dot()))
              if ok]
    return f"{cpu_model()} ({os.cpu_count()} cores{''.join(', ' + e for e in extras)})"
