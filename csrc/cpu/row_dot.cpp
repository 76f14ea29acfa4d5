// Row-wise dot product of paired rows, the "positive logits" of a CLIP loss, on the CPU.
//
//   forward:  out[i] = sum_d a[i, d] * c[i, d]            a, c [rows, dim] -> out [rows]
//   backward: grad_a[i, d] = grad_out[i] * c[i, d],  grad_c[i, d] = grad_out[i] * a[i, d]
//
// float32 and float64; out and grad_out have the input dtype (fp32 for fp32, fp64 for fp64).
// Sums accumulate in fp64, so the fp32 result is the correctly rounded dot product in practice.
// Rows of a and c have unit stride along dim and row strides stride_a / stride_c (elements);
// grad_a and grad_c are written contiguous [rows, dim].
#include "row_dot.h"

#include "../common.h"

namespace fastclip {
namespace {

template <typename T>
void row_dot_impl(const T* a, const T* c, T* out, int64_t rows, int64_t dim, int64_t stride_a,
                  int64_t stride_c) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* a_row = a + i * stride_a;
    const T* c_row = c + i * stride_c;
    double acc = 0.0;
    for (int64_t d = 0; d < dim; ++d) acc += double(a_row[d]) * double(c_row[d]);
    out[i] = T(acc);
  }
}

template <typename T>
void row_dot_bwd_impl(const T* grad_out, const T* a, const T* c, T* grad_a, T* grad_c, int64_t rows,
                      int64_t dim, int64_t stride_a, int64_t stride_c) {
  for (int64_t i = 0; i < rows; ++i) {
    const T g = grad_out[i];
    const T* a_row = a + i * stride_a;
    const T* c_row = c + i * stride_c;
    for (int64_t d = 0; d < dim; ++d) {
      grad_a[i * dim + d] = g * c_row[d];
      grad_c[i * dim + d] = g * a_row[d];
    }
  }
}

void check_cpu_dtype(const char* fn, int dtype_code) {
  FASTCLIP_CHECK(dtype_code == int(DType::Float32) || dtype_code == int(DType::Float64), fn,
                 ": dtype_code must be 0 (float32) or 1 (float64) on the CPU, got ", dtype_code, " (",
                 dtype_name(dtype_code), ")");
}

}  // namespace

void row_dot_cpu(std::uintptr_t a_ptr, std::uintptr_t c_ptr, std::uintptr_t out_ptr, int64_t rows,
                 int64_t dim, int64_t stride_a, int64_t stride_c, int dtype_code) {
  check_cpu_dtype("row_dot_cpu", dtype_code);
  FASTCLIP_CHECK_ROWS("row_dot_cpu", a_ptr, "a", rows, dim, stride_a);
  FASTCLIP_CHECK_ROWS("row_dot_cpu", c_ptr, "c", rows, dim, stride_c);
  FASTCLIP_CHECK(rows == 0 || out_ptr != 0, "row_dot_cpu: out is a null pointer");
  if (dtype_code == int(DType::Float32)) {
    row_dot_impl(reinterpret_cast<const float*>(a_ptr), reinterpret_cast<const float*>(c_ptr),
                 reinterpret_cast<float*>(out_ptr), rows, dim, stride_a, stride_c);
  } else {
    row_dot_impl(reinterpret_cast<const double*>(a_ptr), reinterpret_cast<const double*>(c_ptr),
                 reinterpret_cast<double*>(out_ptr), rows, dim, stride_a, stride_c);
  }
}

void row_dot_bwd_cpu(std::uintptr_t grad_out_ptr, std::uintptr_t a_ptr, std::uintptr_t c_ptr,
                     std::uintptr_t grad_a_ptr, std::uintptr_t grad_c_ptr, int64_t rows, int64_t dim,
                     int64_t stride_a, int64_t stride_c, int dtype_code) {
  check_cpu_dtype("row_dot_bwd_cpu", dtype_code);
  FASTCLIP_CHECK_ROWS("row_dot_bwd_cpu", a_ptr, "a", rows, dim, stride_a);
  FASTCLIP_CHECK_ROWS("row_dot_bwd_cpu", c_ptr, "c", rows, dim, stride_c);
  FASTCLIP_CHECK(rows == 0 || grad_out_ptr != 0, "row_dot_bwd_cpu: grad_out is a null pointer");
  FASTCLIP_CHECK(rows * dim == 0 || (grad_a_ptr != 0 && grad_c_ptr != 0),
                 "row_dot_bwd_cpu: grad_a or grad_c is a null pointer");
  if (dtype_code == int(DType::Float32)) {
    row_dot_bwd_impl(reinterpret_cast<const float*>(grad_out_ptr), reinterpret_cast<const float*>(a_ptr),
                     reinterpret_cast<const float*>(c_ptr), reinterpret_cast<float*>(grad_a_ptr),
                     reinterpret_cast<float*>(grad_c_ptr), rows, dim, stride_a, stride_c);
  } else {
    row_dot_bwd_impl(reinterpret_cast<const double*>(grad_out_ptr), reinterpret_cast<const double*>(a_ptr),
                     reinterpret_cast<const double*>(c_ptr), reinterpret_cast<double*>(grad_a_ptr),
                     reinterpret_cast<double*>(grad_c_ptr), rows, dim, stride_a, stride_c);
  }
}

}  // namespace fastclip
