"""What the CPU can do decides bf16 training and the int8 default: read from /proc/cpuinfo."""
from __future__ import annotations

import pytest

from bloodcell import cpu

X86_VNNI = """processor\t: 0
model name\t: Example Xeon
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_bf16 amx_int8
"""
X86_AVX2 = "processor\t: 0\nmodel name\t: Example Core\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp crc32\n"


@pytest.mark.parametrize("text, int8_dot, bf16, name", [
    (X86_VNNI, True, True, "Example Xeon"),
    (X86_AVX2, False, False, "Example Core"),
    (ARM, True, False, None),
    ("", False, False, None),  # not Linux, or /proc unreadable: the choices right on any CPU
])
def test_flags_decide_int8_and_bf16(monkeypatch, text, int8_dot, bf16, name):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: text)
    assert cpu.has_int8_dot() is int8_dot
    assert cpu.has_native_bf16() is bf16
    if name:
        assert cpu.cpu_model() == name and name in cpu.describe()
    else:
        assert cpu.cpu_model()  # the platform module's answer, never empty
    assert ("int8 dot" in cpu.describe()) is int8_dot
    # a flag name inside another word does not count
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: "flags\t: avx512_vnni_x fake_amx_int8\n")
    assert not cpu.has_int8_dot()
