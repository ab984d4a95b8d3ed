"""The project's own CPU kernels (kernels/*.cpp), for what torch's maintained kernels do slowly on a CPU:
int4 x int8 and int8 x int8 matrix products (`int4_kernels.VnniKernel`, `Int8Linear`) and one token's attention
over a bf16 KV cache (`LeanDecoder`), on a worker pool of their own (spin_pool.cpp). They need AVX-512 VNNI and
a C++ compiler; they are built on first use with torch's extension builder (~15 s, cached under
~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR) and loaded as torch operators.
Where they cannot be built, or MOBILEVLM_NATIVE_KERNELS=0, torch's own kernels run instead (with a warning when
the CPU has AVX-512 VNNI but the build failed).
"""
from __future__ import annotations

import functools
import os
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
    if os.environ.get(SWITCH, "1") == "0":
        return False
    problem = build()
    if problem is not None and torch.cpu._is_vnni_supported():
        warnings.warn(f"native CPU kernels: {problem}; using torch's slower kernels instead")
    return problem is None
