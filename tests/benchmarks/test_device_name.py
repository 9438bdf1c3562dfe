"""Results files are keyed by the device name: on an x86 CPU it carries the vector level the CPU
kernels pick by (two "AMD EPYC" machines of this workplace differ in it: Zen 3 AVX2, Zen 4
AVX512-BF16)."""

import torch

from pgsvd_rt.device import _simd_level, cpu_flags, device_name


def test_cpu_name_carries_the_simd_level():
    name = device_name("cpu")
    assert name.startswith("CPU: ") and f"{torch.get_num_threads()} torch threads" in name
    flags = cpu_flags()
    level = _simd_level()
    if "avx512_bf16" in flags and {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert level == "AVX512-BF16"
    elif {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert level == "AVX-512"
    elif {"avx2", "fma"} <= flags:
        assert level == "AVX2"
    else:
        assert level is None
    if level:
        assert f"({level})," in name
