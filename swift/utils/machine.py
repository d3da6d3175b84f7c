"""What CPU this runs on: the facts every test header and benchmark report names.

fp32 results differ in the last bits between CPU kernels (AVX2 vs AVX-512/AMX code paths of MKL/oneDNN) and
timings differ several-fold between machines, so a figure without its CPU can't be compared with anything.
``cpu_info()`` collects the facts once; ``cpu_summary()`` turns them into the one line that reports print.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["CPU_FLAGS", "cpu_info", "cpu_summary", "parse_cpuinfo"]

# Instruction-set flags (as /proc/cpuinfo spells them) that change which fp32/bf16 kernels torch runs.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

_CPUINFO = Path("/proc/cpuinfo")
_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The CPU facts in the text of ``/proc/cpuinfo`` (Linux; x86 field names).

    Args:
        text: the file's content; the first processor's ``model name``, ``vendor_id`` and ``flags`` are read,
            and ``processor`` entries are counted.

    Returns:
        ``{"model": str, "vendor": str, "processors": int, "flags": {flag: bool for flag in CPU_FLAGS}}``;
        ``model``/``vendor`` are ``"unknown"`` when the text doesn't name them.
    """
    model = vendor = None
    flags: set[str] = set()
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and model is None:
            model = value
        elif key == "vendor_id" and vendor is None:
            vendor = _VENDORS.get(value, value)
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {
        "model": model or "unknown",
        "vendor": vendor or "unknown",
        "processors": processors,
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
    }


def cpu_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """CPU model, cores, instruction-set flags, and the torch build that uses them.

    Args:
        cpuinfo_text: ``/proc/cpuinfo``'s content; read from this machine when ``None`` (an empty text where
            the file doesn't exist, e.g. macOS: the model then comes from ``platform.processor()``).

    Returns:
        ``parse_cpuinfo``'s keys plus ``logical_cores`` (``os.cpu_count()``), ``cores_available`` (this
        process's CPU affinity), ``avx512`` / ``amx`` / ``bf16`` (hardware support; ``bf16`` = AVX512-BF16 or
        AMX-BF16), ``torch`` (version), ``torch_threads``, ``torch_cpu_capability`` (the kernel set torch
        dispatches to, e.g. ``"AVX512"``), ``mkl`` and ``onednn`` (available in this torch build).
    """
    import torch  # lazy: `import swift.utils` stays cheap for CLI --help paths

    if cpuinfo_text is None:
        cpuinfo_text = _CPUINFO.read_text() if _CPUINFO.is_file() else ""
    info = parse_cpuinfo(cpuinfo_text)
    if info["model"] == "unknown":
        info["model"] = platform.processor() or platform.machine() or "unknown"
    flags = info["flags"]
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    info.update(
        logical_cores=os.cpu_count(),
        cores_available=len(affinity) if affinity is not None else os.cpu_count(),
        avx512=flags["avx512f"],
        amx=flags["amx_tile"],
        bf16=flags["avx512_bf16"] or flags["amx_bf16"],
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        mkl=torch.backends.mkl.is_available(),
        onednn=torch.backends.mkldnn.is_available(),
    )
    return info


def cpu_summary(info: dict[str, Any] | None = None) -> str:
    """One line naming the CPU, its vector/matrix units and torch's threads, for headers and reports.

    Args:
        info: from ``cpu_info()``; collected now when ``None``.

    Example: ``"Intel(R) Xeon(R) Processor, 2 cores, AVX2 yes, AVX-512 yes, AMX yes, bf16 yes; torch 2.14.1
    (AVX512 kernels, MKL yes, oneDNN yes), 1 thread"``.
    """
    info = cpu_info() if info is None else info
    flags = info["flags"]

    def yes(value: bool) -> str:
        return "yes" if value else "no"

    cores = info["cores_available"]
    threads = info["torch_threads"]
    model, vendor = info["model"], info["vendor"]
    if vendor != "unknown" and vendor.lower() not in model.lower():
        model = f"{model} ({vendor})"  # e.g. a hypervisor's generic model name: the vendor still tells
    return (
        f"{model}, {cores} core{'s' * (cores != 1)}, AVX2 {yes(flags['avx2'])}, "
        f"AVX-512 {yes(info['avx512'])}, AMX {yes(info['amx'])}, bf16 {yes(info['bf16'])}; "
        f"torch {info['torch']} ({info['torch_cpu_capability']} kernels, MKL {yes(info['mkl'])}, "
        f"oneDNN {yes(info['onednn'])}), {threads} thread{'s' * (threads != 1)}"
    )
