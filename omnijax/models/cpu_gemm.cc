// XLA:CPU custom call for float32 matrix products with a BLAS sgemm (oneMKL's, set at load
// time by omnijax/models/matmul.py): C = op(A) op(B), row-major, op a transpose or not. BLAS
// takes transposed operands in place, so a weight gradient (X^T dY) needs no layout copy.
#include <algorithm>
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

// Grouped products over row groups of `sizes` (consecutive, from row 0; rows past their sum
// are zeros): out[rows of g] = x[rows of g] op(w[g]), with w (G, K, N), or (G, N, K) when
// trans_w.
ffi::Error GroupedGemm(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> out,
                       bool trans_w) {
  if (sgemm == nullptr) return ffi::Error::Internal("omnijax_grouped_sgemm: no BLAS sgemm set");
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sizes.element_count() != wd[0]) {
    return ffi::Error::InvalidArgument("omnijax_grouped_sgemm: x (M, K), w (G, K, N), sizes (G,)");
  }
  int64_t m = xd[0], k = xd[1], n = trans_w ? wd[1] : wd[2];
  const int32_t* size = sizes.typed_data();
  float* o = out->typed_data();
  int64_t row = 0;
  for (int64_t g = 0; g < wd[0]; ++g) {
    if (size[g] < 0 || row + size[g] > m) {
      return ffi::Error::InvalidArgument("omnijax_grouped_sgemm: group sizes exceed the rows");
    }
    if (size[g] > 0) {
      sgemm(kRowMajor, kNoTrans, trans_w ? kTrans : kNoTrans, size[g], n, k, 1.0f,
            x.typed_data() + row * k, k, w.typed_data() + g * k * n, trans_w ? k : n, 0.0f,
            o + row * n, n);
    }
    row += size[g];
  }
  std::fill(o + row * n, o + m * n, 0.0f);
  return ffi::Error::Success();
}

// The weight gradient of GroupedGemm: out[g] = x[rows of g]^T dy[rows of g], (G, K, N).
ffi::Error GroupedGemmWeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> out) {
  if (sgemm == nullptr) return ffi::Error::Internal("omnijax_grouped_sgemm: no BLAS sgemm set");
  auto xd = x.dimensions(), yd = dy.dimensions(), od = out->dimensions();
  int64_t m = xd[0], k = xd[1], n = yd[1];
  const int32_t* size = sizes.typed_data();
  float* o = out->typed_data();
  int64_t row = 0;
  for (int64_t g = 0; g < od[0]; ++g) {
    if (size[g] < 0 || row + size[g] > m) {
      return ffi::Error::InvalidArgument("omnijax_grouped_sgemm: group sizes exceed the rows");
    }
    if (size[g] > 0) {
      sgemm(kRowMajor, kTrans, kNoTrans, k, n, size[g], 1.0f, x.typed_data() + row * k, k,
            dy.typed_data() + row * n, n, 0.0f, o + g * k * n, n);
    } else {
      std::fill(o + g * k * n, o + (g + 1) * k * n, 0.0f);
    }
    row += size[g];
  }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmnijaxGroupedSgemm, GroupedGemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OmnijaxGroupedSgemmWeightGrad, GroupedGemmWeightGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
