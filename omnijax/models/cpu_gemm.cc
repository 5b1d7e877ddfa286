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

// C[c0:c0+m] (+)= op(A[a0:]) op(B[b0:]) in place: A, B and C row-major with their stored rows
// offset by `offsets` = (a0, b0, c0) (the rows of one expert's tile run in a buffer of all
// tiles), m x k the product's static sizes, n = C's columns; C is the aliased input `c`.
ffi::Error GemmRows(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> c,
                    ffi::Buffer<ffi::S32> offsets, ffi::ResultBuffer<ffi::F32> out, bool trans_a,
                    bool trans_b, int64_t m, int64_t k, bool accumulate) {
  if (sgemm == nullptr) return ffi::Error::Internal("omnijax_sgemm_rows: no BLAS sgemm was set");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2 || offsets.element_count() != 3) {
    return ffi::Error::InvalidArgument("omnijax_sgemm_rows takes 2-D operands and 3 offsets");
  }
  const int32_t* off = offsets.typed_data();
  int64_t n = cd[1];
  int64_t a_rows = trans_a ? k : m, b_rows = trans_b ? n : k;
  int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
  if (off[0] < 0 || off[0] + a_rows > ad[0] || a_cols != ad[1] || off[1] < 0 ||
      off[1] + b_rows > bd[0] || b_cols != bd[1] || off[2] < 0 || off[2] + m > cd[0]) {
    return ffi::Error::InvalidArgument("omnijax_sgemm_rows: rows out of range");
  }
  sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
        a.typed_data() + off[0] * ad[1], ad[1], b.typed_data() + off[1] * bd[1], bd[1],
        accumulate ? 1.0f : 0.0f, out->typed_data() + off[2] * n, n);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmnijaxSgemmRows, GemmRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("accumulate"));
