// XLA:CPU custom call for float32 matrix products with a BLAS sgemm (oneMKL's, set at load
// time by omnijax/models/matmul.py): C = op(A) op(B), row-major, op a transpose or not. BLAS
// takes transposed operands in place, so a weight gradient (X^T dY) needs no layout copy.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), LP64.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                       float, float*, int);
Sgemm sgemm = nullptr;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                bool trans_a, bool trans_b) {
  if (sgemm == nullptr) return ffi::Error::Internal("omnijax_sgemm: no BLAS sgemm was set");
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("omnijax_sgemm takes 2-D operands");
  }
  int m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1], n = trans_b ? bd[0] : bd[1];
  sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
        a.typed_data(), ad[1], b.typed_data(), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

}  // namespace

extern "C" void omnijax_set_sgemm(void* f) { sgemm = reinterpret_cast<Sgemm>(f); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmnijaxSgemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
