"""The host allocator's policy for CPU runs, set before JAX starts its CPU backend.

XLA:CPU allocates an execution's temporaries afresh each time it runs. glibc serves a block over
32 MiB, and any block over 64 MiB asked for on one of XLA's worker threads, with a new mmap that
the kernel zero-fills page by page on first touch and unmaps again when the step frees it: a train
step of the `small` benchmark preset takes ~1.2M page faults (~5 GB) and 2-5 s of kernel time.
- `retain` serves every block from one glibc heap that is never given back to the kernel, so
  later steps reuse warm pages; all threads then share that one arena and its lock.
- `tbbmalloc` replaces malloc with oneTBB's scalable allocator (the `tbb` wheel's
  libtbbmalloc_proxy, preloaded: it must be in the process from its start, see `preload_env`),
  told to keep freed blocks of any size over 1 MiB for reuse: per-thread caches and no page
  faults after the first step.
Both cost a resident set near the step's peak. It only matters where the model runs on the host
CPU; accelerators have their own allocators.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from importlib import metadata
from pathlib import Path

from omnijax.errors import ConfigError

POLICIES = ("system", "retain", "tbbmalloc")

# oneTBB keeps freed blocks above this size ("huge") through its regular cleanups.
TBB_KEEP_BYTES = 1 << 20

RESTARTED = "OMNIJAX_RESTARTED_UNDER_TBBMALLOC"  # set in a run that `restart_under` started

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def _tbb_libraries() -> list[Path]:
  """libtbbmalloc and its malloc-replacing proxy, from the installed `tbb` wheel."""
  try:
    files = metadata.files("tbb") or []
  except metadata.PackageNotFoundError:
    files = []
  found = {f.name: Path(f.locate()).resolve() for f in files}
  libs = [found.get(name) for name in ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")]
  if None in libs:
    raise ConfigError(
      "host_malloc=tbbmalloc needs oneTBB's allocator: pip install tbb==2023.2.0 (Linux x86-64; "
      "a dependency of omnijax there)."
    )
  return libs


def preload_env(policy: str, env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: this process's) with what a new process needs to start under `policy`:
  for `tbbmalloc`, the allocator preloaded (LD_PRELOAD) and told to keep its freed blocks."""
  env = dict(os.environ if env is None else env)
  if policy == "tbbmalloc":
    libs = [str(lib) for lib in _tbb_libraries()]
    rest = [x for x in env.get("LD_PRELOAD", "").split(":") if x and x not in libs]
    env["LD_PRELOAD"] = ":".join(libs + rest)
    env["TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"] = str(TBB_KEEP_BYTES)
  return env


def restart_under(policy: str, argv: list[str]) -> None:
  """For `tbbmalloc` not loaded yet: runs this process again under it, once (`execve`, same
  PID), as `python *argv`; `set_policy` then checks the preload took. Otherwise returns."""
  if policy == "tbbmalloc" and not tbbmalloc_loaded() and RESTARTED not in os.environ:
    os.execve(sys.executable, [sys.executable, *argv], preload_env(policy) | {RESTARTED: "1"})


def tbbmalloc_loaded() -> bool:
  """Whether this process runs on oneTBB's allocator (started under `preload_env`)."""
  proxy = _tbb_libraries()[1]
  maps = Path("/proc/self/maps")
  return maps.exists() and str(proxy) in maps.read_text()


def set_policy(policy: str) -> None:
  """`system`: glibc's defaults (nothing is changed); `retain`: one arena, no mmap'ed blocks, no
  trimming. Threads keep the arena they first used, so this must run before JAX (or torch) starts
  its worker threads. `tbbmalloc` is set at process start (`preload_env`); here it is checked."""
  if policy not in POLICIES:
    raise ConfigError(f"host_malloc={policy!r}: choose one of {', '.join(POLICIES)}.")
  if policy == "system":
    return
  if policy == "tbbmalloc":
    if not tbbmalloc_loaded():
      raise ConfigError(
        f"host_malloc={policy} replaces malloc when the process starts: start it with "
        "omnijax.hostmem.preload_env's LD_PRELOAD (python -m omnijax.launch does this itself)."
      )
    return
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    raise ConfigError(
      "host_malloc=retain must be set before JAX starts its backend (before the first "
      "jax.devices() or computation in the process); set it first thing."
    )
  name = ctypes.util.find_library("c")
  libc = ctypes.CDLL(name) if name else None
  if libc is None or not hasattr(libc, "mallopt"):
    raise ConfigError(
      f"host_malloc=retain needs glibc's mallopt; this C library ({name}) lacks it."
    )
  for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)):
    if libc.mallopt(param, value) != 1:
      raise ConfigError(f"host_malloc=retain: mallopt({param}, {value}) failed.")
