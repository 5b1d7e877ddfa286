"""The host allocator's policy for CPU runs, set before JAX starts its CPU backend.

XLA:CPU allocates an execution's temporaries afresh each time it runs. glibc serves a block over
32 MiB, and any block over 64 MiB asked for on one of XLA's worker threads, with a new mmap that
the kernel zero-fills page by page on first touch and unmaps again when the step frees it: a train
step of the `small` benchmark preset takes ~1.2M page faults (~5 GB) and 2-5 s of kernel time.
`retain` serves every block from one heap that is never given back to the kernel, so later steps
reuse warm pages, at the cost of a resident set near the step's peak (and its fragmentation).
It only matters where the model runs on the host CPU; accelerators have their own allocators.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from omnijax.errors import ConfigError

POLICIES = ("system", "retain")

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def set_policy(policy: str) -> None:
  """`system`: glibc's defaults (nothing is changed); `retain`: one arena, no mmap'ed blocks, no
  trimming. Threads keep the arena they first used, so this must run before JAX (or torch) starts
  its worker threads."""
  if policy not in POLICIES:
    raise ConfigError(f"host_malloc={policy!r}: choose one of {', '.join(POLICIES)}.")
  if policy == "system":
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
