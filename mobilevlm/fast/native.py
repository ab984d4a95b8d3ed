"""The project's own CPU kernels (kernels/*.cpp), for what torch's maintained kernels do slowly on a CPU:
int4 x int8 and int8 x int8 matrix products (`int4_kernels.VnniKernel`, `Int8Linear`) and one token's attention
over a bf16 KV cache (`LeanDecoder`), on a worker pool of their own (spin_pool.cpp). They need AVX-512 VNNI and
a C++ compiler; they are built on first use with torch's extension builder (~15 s, cached under
~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR) and loaded as torch operators.
Where they cannot be built, or MOBILEVLM_NATIVE_KERNELS=0, torch's own kernels run instead (with a warning when
the CPU has AVX-512 VNNI but the build failed).

The kernels use no AMX. `matrix_isa` says whether torch's oneDNN may (the OS really enables the tiles, checked by
running them in a child process) and keeps oneDNN on AVX-512 where the CPU advertises AMX that does not run.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

SWITCH = "MOBILEVLM_NATIVE_KERNELS"
SOURCES = tuple(Path(__file__).parent / "kernels" / name for name in ("vnni_matmul.cpp", "decode_attention.cpp", "spin_pool.cpp"))
# -fopenmp: at::parallel_for is a header template that runs serially unless the caller is compiled with OpenMP (it
# then uses torch's own libgomp, which has the same soname)
_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fno-math-errno", "-fopenmp")


def cpu_model_name() -> str:
    """The CPU's marketing name (/proc/cpuinfo's "model name"), for benchmark tables and build manifests."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


# Run in a child process, which dies of SIGILL instead of the caller where the tiles are forbidden: asks Linux for
# the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM = 0x1023 for XFEATURE_XTILEDATA = 18, then
# ARCH_GET_XCOMP_PERM = 0x1022 to read the grant back), then executes ldtilecfg (a one-tile palette-1
# configuration), tilezero tmm0 and tilerelease. Exit status 0: AMX runs here.
_AMX_PROBE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
arch_prctl = 158
if libc.syscall(ctypes.c_long(arch_prctl), ctypes.c_long(0x1023), ctypes.c_long(18)) != 0:
    sys.exit(3)
granted = ctypes.c_uint64()
if libc.syscall(ctypes.c_long(arch_prctl), ctypes.c_long(0x1022), ctypes.byref(granted)) != 0 or not granted.value >> 18 & 1:
    sys.exit(3)
code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write(bytes.fromhex("c4e2784907" "c4e27b49c0" "c4e27849c0" "c3"))
config = (ctypes.c_uint8 * 64)()
config[0], config[16], config[48] = 1, 64, 16  # palette 1; tmm0: 64 bytes a row, 16 rows
ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(code)))(ctypes.addressof(config))
"""


def amx_advertised() -> bool:
    """Whether cpuid lists AMX tiles (which a VM can do while its host forbids them)."""
    return torch.cpu._is_amx_tile_supported()


@functools.lru_cache(maxsize=None)
def amx_enabled() -> bool:
    """Whether AMX instructions really run in this process's environment: the cpuid flag is not enough (a VM can
    advertise AMX whose first `tileloadd` dies with SIGILL), and Linux hands the tile state out only on request."""
    if not (sys.platform == "linux" and amx_advertised()):
        return False
    try:
        return subprocess.run([sys.executable, "-c", _AMX_PROBE], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def matrix_isa() -> str:
    """The widest matrix instructions torch's oneDNN may use here (bf16 / fp32 matrix products: the tower and
    prefill outside the native kernels): "AMX" where the tiles run, else "AVX-512", else torch's capability.

    Where cpuid advertises AMX that does not run, oneDNN is capped at AVX-512 BF16 (`ONEDNN_MAX_CPU_ISA`, read at
    its first primitive, so call this before the first matrix product) so that it never executes a tile instruction.
    """
    if amx_enabled():
        return "AMX"
    if amx_advertised():
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    return "AVX-512" if torch.cpu._is_avx512_supported() else torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=None)
def build(sources: tuple[Path, ...] = SOURCES, name: str = "mobilevlm_cpu_kernels") -> str | None:
    """Builds and loads the kernels; returns why not, or None when they are loaded."""
    if not (torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()):
        return "the CPU has no AVX-512 VNNI"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not (Path(_get_build_directory(name, False)) / f"{name}.so").is_file():
            # a first build is silent for ~15 s otherwise (later runs load the cached library, or rebuild it
            # after a source change)
            print("mobilevlm: building the native CPU kernels (first use; ~15 s)", file=sys.stderr, flush=True)
        load(name=name, sources=[str(source) for source in sources], extra_cflags=list(_FLAGS), extra_ldflags=["-fopenmp"],
             is_python_module=False)
    except Exception as error:  # a missing compiler or ninja: the maintained kernels still work
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"building {', '.join(source.name for source in sources)} failed ({detail})"
    return None


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this process uses the native kernels (decided once; warns when they were wanted but failed)."""
    matrix_isa()  # the first CPU-path decision of a process: keeps oneDNN off tiles that would raise SIGILL
    if os.environ.get(SWITCH, "1") == "0":
        return False
    problem = build()
    if problem is not None and torch.cpu._is_vnni_supported():
        warnings.warn(f"native CPU kernels: {problem}; using torch's slower kernels instead")
    return problem is None
