"""swift.utils.machine: the CPU facts in test headers and benchmark reports."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from swift.utils import cpu_info, cpu_summary
from swift.utils.machine import parse_cpuinfo

# Abridged /proc/cpuinfo of the two kinds of machine this project runs on (two processors each).
INTEL_XEON = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 fma avx avx2 avx512f avx512dq avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 fma avx avx2 avx512f avx512dq avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""

AMD_EPYC = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse sse2 fma avx avx2 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse sse2 fma avx avx2 bmi2 sha_ni
"""


def test_parse_intel_with_avx512_and_amx():
    info = parse_cpuinfo(INTEL_XEON)
    assert info["model"] == "Intel(R) Xeon(R) Processor"
    assert info["vendor"] == "Intel"
    assert info["processors"] == 2
    assert info["flags"] == {
        "avx2": True,
        "fma": True,
        "avx512f": True,
        "avx512_bf16": True,
        "amx_tile": True,
        "amx_bf16": True,
    }


def test_parse_amd_without_avx512_or_amx():
    info = parse_cpuinfo(AMD_EPYC)
    assert info["model"] == "AMD EPYC 7B13 64-Core Processor"
    assert info["vendor"] == "AMD"
    assert info["processors"] == 2
    assert info["flags"]["avx2"] and info["flags"]["fma"]
    assert not any(info["flags"][f] for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))


def test_parse_flag_names_match_whole_words_only():
    """'avx512f' must not be read from 'avx512fp16'-like names, nor 'amx_tile' from 'amx_tile_x'."""
    info = parse_cpuinfo("processor : 0\nflags : avx512fp16 amx_tile_x avx2\n")
    assert info["flags"]["avx2"]
    assert not info["flags"]["avx512f"] and not info["flags"]["amx_tile"]


def test_parse_empty_text_is_unknown():
    info = parse_cpuinfo("")
    assert (info["model"], info["vendor"], info["processors"]) == ("unknown", "unknown", 0)
    assert not any(info["flags"].values())


def test_summary_names_the_model_and_the_flags():
    intel = cpu_summary(cpu_info(INTEL_XEON))
    assert intel.startswith("Intel(R) Xeon(R) Processor, ")
    for part in ("AVX2 yes", "AVX-512 yes", "AMX yes", "bf16 yes", f"torch {torch.__version__}"):
        assert part in intel, (part, intel)
    amd = cpu_summary(cpu_info(AMD_EPYC))
    assert amd.startswith("AMD EPYC 7B13 64-Core Processor, ")
    for part in ("AVX2 yes", "AVX-512 no", "AMX no", "bf16 no"):
        assert part in amd, (part, amd)


def test_summary_adds_the_vendor_when_the_model_name_hides_it():
    text = (
        "processor : 0\nvendor_id : AuthenticAMD\nmodel name : QEMU Virtual CPU version 2.5+\nflags : avx2\n"
    )
    assert cpu_summary(cpu_info(text)).startswith("QEMU Virtual CPU version 2.5+ (AMD), ")


def test_info_reports_torch_threads_and_backends():
    info = cpu_info(AMD_EPYC)
    assert info["torch_threads"] == torch.get_num_threads()  # conftest sets 1
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["mkl"] is torch.backends.mkl.is_available()
    assert info["onednn"] is torch.backends.mkldnn.is_available()
    n = torch.get_num_threads()
    assert cpu_summary(info).endswith(f", {n} thread" + ("s" if n != 1 else ""))


def test_info_reads_this_machine():
    info = cpu_info()
    assert info["model"] not in ("", "unknown")
    assert info["logical_cores"] == os.cpu_count() and 1 <= info["cores_available"] <= os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # the first 'flags' line, split independently of parse_cpuinfo
        line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("flags"))
        words = line.split(":", 1)[1].split()
        assert info["avx512"] == ("avx512f" in words) and info["amx"] == ("amx_tile" in words)
