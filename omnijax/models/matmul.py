"""Float32 matrix products on XLA:CPU through oneMKL's sgemm (`model.impl.cpu_matmul`).

XLA:CPU runs a float32 product with YNNPACK or, when it contracts the left operand's major
axis (every weight gradient), with its own `dot`; on Intel hosts both run at 50-95% of oneMKL's
speed on the train step's shapes (`benchmarks/matmul.py`). `matmul` calls oneMKL instead, as
an XLA FFI custom call (`cpu_gemm.cc`, built at install), transposes given to BLAS rather than
copied; the blocked experts' products become grouped ones, one oneMKL call per expert
(`grouped_matmul`, `moe.grouped_swiglu`). oneMKL runs its GNU OpenMP threading layer, as in torch's CPU build: its Intel layer
gave wrong products in a process that had also loaded torch's libgomp.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp

TARGET = "omnijax_sgemm"
GROUPED_TARGET = "omnijax_grouped_sgemm"
GROUPED_GRAD_TARGET = "omnijax_grouped_sgemm_weight_grad"
_MKL_THREADING_GNU = 3


def _mkl_rt() -> pathlib.Path | None:
  try:
    files = importlib.metadata.files("mkl") or []
  except importlib.metadata.PackageNotFoundError:
    return None
  found = [f.locate() for f in files if f.name.startswith("libmkl_rt.so")]
  return pathlib.Path(found[0]) if found else None


@functools.cache
def unavailable() -> str | None:
  """Why the oneMKL products cannot run in this process (None: they can; registered)."""
  spec = importlib.util.find_spec("omnijax.models._cpu_gemm")
  if spec is None or spec.origin is None:
    return "omnijax's cpu_gemm extension was not built (pip install -e . needs a C++ compiler)"
  mkl_rt = _mkl_rt()
  if mkl_rt is None:
    return "oneMKL is not installed (pip install -e '.[cpu]')"
  if ctypes.util.find_library("gomp") is None and not _gomp_loaded():
    return "GNU OpenMP (libgomp.so.1, oneMKL's threading layer) is not on this host"
  mkl = ctypes.CDLL(str(mkl_rt), mode=ctypes.RTLD_LOCAL)
  mkl.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
  mkl.MKL_Set_Threading_Layer(_MKL_THREADING_GNU)
  lib = ctypes.CDLL(spec.origin)
  lib.omnijax_set_sgemm(ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.OmnijaxSgemm), platform="cpu")
  for target, handler in (
    (GROUPED_TARGET, lib.OmnijaxGroupedSgemm),
    (GROUPED_GRAD_TARGET, lib.OmnijaxGroupedSgemmWeightGrad),
  ):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  return None


def _gomp_loaded() -> bool:
  try:
    ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
  except OSError:
    return False
  return True


@functools.cache
def intel_cpu() -> bool:
  """An Intel host, where oneMKL's products were measured faster than XLA's."""
  try:
    return "GenuineIntel" in pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return False


def use_mkl(impl) -> bool:
  """Whether products traced now go to oneMKL: the ImplConfig's `cpu_matmul` resolves to "mkl",
  tracing for CPU on one device (a custom call has no sharding rule: sharded products stay
  XLA's)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (
    jax.default_backend() == "cpu"
    and impl.resolved("cpu").cpu_matmul == "mkl"
    and (mesh.empty or mesh.size == 1)
    and unavailable() is None
  )


def _sgemm(a, b, trans_a: bool, trans_b: bool):
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
    a, b, trans_a=trans_a, trans_b=trans_b
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mkl_matmul(a, b, trans_a: bool, trans_b: bool):
  return _sgemm(a, b, trans_a, trans_b)


def _mkl_matmul_fwd(a, b, trans_a, trans_b):
  return _sgemm(a, b, trans_a, trans_b), (a, b)


def _mkl_matmul_bwd(trans_a, trans_b, res, g):
  a, b = res
  # C = op(A) op(B): dop(A) = G op(B)^T, dop(B) = op(A)^T G; a transposed operand's gradient
  # is the transposed product, computed as such rather than transposed afterwards.
  d_a = _sgemm(b, g, trans_b, True) if trans_a else _sgemm(g, b, False, not trans_b)
  d_b = _sgemm(g, a, True, trans_a) if trans_b else _sgemm(a, g, not trans_a, False)
  return d_a, d_b


_mkl_matmul.defvjp(_mkl_matmul_fwd, _mkl_matmul_bwd)


def matmul(
  a, b, *, mkl: bool, trans_a: bool = False, trans_b: bool = False, preferred_element_type=None
):
  """op(a) @ op(b) of 2-D a, b (op: transpose where asked), through oneMKL where `mkl`
  (`use_mkl`) and both are float32, else XLA's dot."""
  if (
    mkl
    and unavailable() is None
    and a.dtype == b.dtype == jnp.float32
    and 0 < min(a.shape + b.shape)
    and max(a.shape + b.shape) < 2**31
  ):
    return _mkl_matmul(a, b, trans_a, trans_b)
  return jnp.dot(
    a.T if trans_a else a, b.T if trans_b else b, preferred_element_type=preferred_element_type
  )


def grouped_matmul(x, w, sizes, *, trans_w: bool = False):
  """x (M, K) in consecutive row groups of `sizes` (G,) from row 0, each times its w[g]: w (G,
  K, N), or (G, N, K) used transposed (`trans_w`) -> (M, N), rows past the groups zeros; one
  oneMKL product per group (`ragged_dot`'s product). Float32, where `use_mkl` holds."""
  n = w.shape[1] if trans_w else w.shape[2]
  return jax.ffi.ffi_call(GROUPED_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(
    x, w, sizes.astype(jnp.int32), trans_w=trans_w
  )


def grouped_weight_grad(x, dy, sizes):
  """The weights' gradient of `grouped_matmul`: (G, K, N) of x[group g]^T dy[group g]."""
  out = jax.ShapeDtypeStruct((sizes.shape[0], x.shape[1], dy.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(GROUPED_GRAD_TARGET, out)(x, dy, sizes.astype(jnp.int32))


def contract(x, w, *, mkl: bool, n_in: int = 1):
  """x (..., *in) @ w (*in, *out) -> (..., *out): the last n_in axes of x with the first n_in
  of w (through oneMKL as one 2-D product where `mkl`, else as XLA's dot_general)."""
  if not mkl:
    contracting = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, w, (contracting, ((), ())))
  k = math.prod(w.shape[:n_in])
  y = matmul(x.reshape(-1, k), w.reshape(k, -1), mkl=mkl)
  return y.reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])
