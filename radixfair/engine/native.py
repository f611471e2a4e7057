"""radixfair's own C kernels for x86 CPUs (`csrc/*.c`): built at first use, called through ctypes.

The sources are compiled together with the system's C compiler (`CC`, else `cc`) into one shared
library in a cache directory (`RADIXFAIR_KERNEL_CACHE`, else `~/.cache/radixfair/kernels`), named by
the hash of the sources and flags, so a changed source builds afresh and concurrent processes each
see a whole file. The library runs on torch's OpenMP threads (it binds to the `libgomp` torch has
loaded), as many as `set_threads` last said. Each kernel family checks the CPU features it needs
(`cpu_has`) before it is used; where the compiler is missing or the build fails, `native_library()`
is None (logged once) and the engine keeps its PyTorch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-fopenmp",
          "-shared", "-fPIC")
# every kernel needs these; a family may need more (VNNI)
BASE_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")

_threads = [torch.get_num_threads()]


def set_threads(n: int) -> None:
    """The threads the kernels' parallel loops use from now on (torch's own count is per thread and
    set separately)."""
    _threads[0] = max(1, n)


def threads() -> int:
    return _threads[0]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has(flags: Sequence[str]) -> bool:
    """Whether this CPU reports every one of `flags` (as /proc/cpuinfo names them)."""
    have = _cpu_flags()
    return all(f in have for f in flags)


def cache_dir() -> Path:
    env = os.environ.get("RADIXFAIR_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "radixfair" / "kernels"


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def build(srcs: Sequence[Path] | None = None, out_dir: Path | None = None, compiler: str | None = None) -> Path:
    """Compile `srcs` (default: every `csrc/*.c`) into one shared library, once per content and
    flags, and return its path. Raises RuntimeError naming what failed."""
    srcs = list(srcs) if srcs is not None else sources()
    cc = compiler or os.environ.get("CC", "cc")
    digest = hashlib.sha256(" ".join((cc, *CFLAGS)).encode())
    for s in srcs:
        digest.update(s.name.encode() + b"\0" + s.read_bytes())
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"radixfair_kernels-{digest.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # built beside the target and renamed into place
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, *map(str, srcs), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise RuntimeError(f"cannot run the C compiler {cc!r}: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        names = ", ".join(s.name for s in srcs)
        raise RuntimeError(f"{cc} failed on {names}: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The built library (ctypes releases the GIL during its calls), or None where it cannot be
    built or loaded here, or on a CPU without AVX512."""
    if not cpu_has(BASE_FLAGS):
        logger.info("no AVX512 on this CPU: radixfair's C kernels are off")
        return None
    try:
        return ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        logger.warning("radixfair's C kernels are unavailable, PyTorch paths are used instead: %s", e)
        return None
