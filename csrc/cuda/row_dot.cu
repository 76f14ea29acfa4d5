// Row-wise dot product of paired rows, the "positive logits" of a CLIP loss, on a CUDA GPU.
//
//   forward:  out[i] = sum_d a[i, d] * c[i, d]            a, c [rows, dim] -> out [rows] fp32
//   backward: grad_a[i, d] = grad_out[i] * c[i, d],  grad_c[i, d] = grad_out[i] * a[i, d]
//
// a and c are float32, float16 or bfloat16 with unit stride along dim and row strides
// stride_a / stride_c (elements); products accumulate in fp32; grad_out is fp32 [rows] and grad_a,
// grad_c are written contiguous [rows, dim] in the input dtype. Kernels run on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <stdexcept>

#include "../common.h"
#include "convert.cuh"
#include "row_dot.h"

namespace fastclip {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 8 warps (256 threads) per block

// N consecutive elements moved as one 16-byte load/store when N * sizeof(T) == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One warp per row: lanes stride over the row in N-element vectors, then a shuffle reduction.
// Grid (ceil(rows / 8)), block (32, 8). Reads 2 * rows * dim elements, writes rows fp32.
template <typename T, int N>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    row_dot_fwd_kernel(const T* __restrict__ a, const T* __restrict__ c, float* __restrict__ out,
                       int64_t rows, int64_t dim, int64_t stride_a, int64_t stride_c) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;  // the whole warp leaves together
  const auto* a_row = reinterpret_cast<const Vec<T, N>*>(a + row * stride_a);
  const auto* c_row = reinterpret_cast<const Vec<T, N>*>(c + row * stride_c);
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < dim / N; j += kWarp) {
    const Vec<T, N> va = a_row[j], vc = c_row[j];
#pragma unroll
    for (int k = 0; k < N; ++k) acc += to_float(va.v[k]) * to_float(vc.v[k]);
  }
  acc = warp_sum(acc);
  if (threadIdx.x == 0) out[row] = acc;
}

// Same grid as the forward. Reads 2 * rows * dim elements + rows fp32, writes 2 * rows * dim.
template <typename T, int N>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    row_dot_bwd_kernel(const float* __restrict__ grad_out, const T* __restrict__ a, const T* __restrict__ c,
                       T* __restrict__ grad_a, T* __restrict__ grad_c, int64_t rows, int64_t dim,
                       int64_t stride_a, int64_t stride_c) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const float g = grad_out[row];
  const auto* a_row = reinterpret_cast<const Vec<T, N>*>(a + row * stride_a);
  const auto* c_row = reinterpret_cast<const Vec<T, N>*>(c + row * stride_c);
  auto* grad_a_row = reinterpret_cast<Vec<T, N>*>(grad_a + row * dim);
  auto* grad_c_row = reinterpret_cast<Vec<T, N>*>(grad_c + row * dim);
  for (int64_t j = threadIdx.x; j < dim / N; j += kWarp) {
    const Vec<T, N> va = a_row[j], vc = c_row[j];
    Vec<T, N> ga, gc;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      ga.v[k] = from_float<T>(g * to_float(vc.v[k]));
      gc.v[k] = from_float<T>(g * to_float(va.v[k]));
    }
    grad_a_row[j] = ga;
    grad_c_row[j] = gc;
  }
}

// 16-byte vectors need 16-byte aligned rows: every pointer aligned and dim, strides multiples of N.
bool vectorizable(int n, std::initializer_list<std::uintptr_t> ptrs, std::initializer_list<int64_t> sizes) {
  for (auto p : ptrs)
    if (p % 16 != 0) return false;
  for (auto s : sizes)
    if (s % n != 0) return false;
  return true;
}

void check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(concat(fn, ": kernel launch failed: ", cudaGetErrorString(err)));
}

// Calls f(T{}) with T the element type of dtype_code (float32, float16, bfloat16).
template <typename F>
void dispatch_cuda_dtype(const char* fn, int dtype_code, F&& f) {
  switch (static_cast<DType>(dtype_code)) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    default:
      FASTCLIP_CHECK(false, fn, ": dtype_code must be 0 (float32), 2 (float16) or 3 (bfloat16) on CUDA, got ",
                     dtype_code, " (", dtype_name(dtype_code), ")");
  }
}

dim3 row_grid(int64_t rows) { return dim3(unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock)); }

}  // namespace

int cuda_runtime_version() { return CUDART_VERSION; }

void row_dot_cuda(std::uintptr_t a_ptr, std::uintptr_t c_ptr, std::uintptr_t out_ptr, int64_t rows,
                  int64_t dim, int64_t stride_a, int64_t stride_c, int dtype_code, std::uintptr_t stream) {
  FASTCLIP_CHECK_ROWS("row_dot_cuda", a_ptr, "a", rows, dim, stride_a);
  FASTCLIP_CHECK_ROWS("row_dot_cuda", c_ptr, "c", rows, dim, stride_c);
  FASTCLIP_CHECK(rows == 0 || out_ptr != 0, "row_dot_cuda: out is a null pointer");
  dispatch_cuda_dtype("row_dot_cuda", dtype_code, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    if (rows == 0) return;
    const auto* a = reinterpret_cast<const T*>(a_ptr);
    const auto* c = reinterpret_cast<const T*>(c_ptr);
    auto* out = reinterpret_cast<float*>(out_ptr);
    const dim3 grid = row_grid(rows), block(kWarp, kRowsPerBlock);
    auto* s = reinterpret_cast<cudaStream_t>(stream);
    if (vectorizable(N, {a_ptr, c_ptr}, {dim, stride_a, stride_c}))
      row_dot_fwd_kernel<T, N><<<grid, block, 0, s>>>(a, c, out, rows, dim, stride_a, stride_c);
    else
      row_dot_fwd_kernel<T, 1><<<grid, block, 0, s>>>(a, c, out, rows, dim, stride_a, stride_c);
    check_launch("row_dot_cuda");
  });
}

void row_dot_bwd_cuda(std::uintptr_t grad_out_ptr, std::uintptr_t a_ptr, std::uintptr_t c_ptr,
                      std::uintptr_t grad_a_ptr, std::uintptr_t grad_c_ptr, int64_t rows, int64_t dim,
                      int64_t stride_a, int64_t stride_c, int dtype_code, std::uintptr_t stream) {
  FASTCLIP_CHECK_ROWS("row_dot_bwd_cuda", a_ptr, "a", rows, dim, stride_a);
  FASTCLIP_CHECK_ROWS("row_dot_bwd_cuda", c_ptr, "c", rows, dim, stride_c);
  FASTCLIP_CHECK(rows == 0 || grad_out_ptr != 0, "row_dot_bwd_cuda: grad_out is a null pointer");
  FASTCLIP_CHECK(rows * dim == 0 || (grad_a_ptr != 0 && grad_c_ptr != 0),
                 "row_dot_bwd_cuda: grad_a or grad_c is a null pointer");
  dispatch_cuda_dtype("row_dot_bwd_cuda", dtype_code, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    if (rows == 0) return;
    const auto* g = reinterpret_cast<const float*>(grad_out_ptr);
    const auto* a = reinterpret_cast<const T*>(a_ptr);
    const auto* c = reinterpret_cast<const T*>(c_ptr);
    auto* ga = reinterpret_cast<T*>(grad_a_ptr);
    auto* gc = reinterpret_cast<T*>(grad_c_ptr);
    const dim3 grid = row_grid(rows), block(kWarp, kRowsPerBlock);
    auto* s = reinterpret_cast<cudaStream_t>(stream);
    if (vectorizable(N, {a_ptr, c_ptr, grad_a_ptr, grad_c_ptr}, {dim, stride_a, stride_c}))
      row_dot_bwd_kernel<T, N><<<grid, block, 0, s>>>(g, a, c, ga, gc, rows, dim, stride_a, stride_c);
    else
      row_dot_bwd_kernel<T, 1><<<grid, block, 0, s>>>(g, a, c, ga, gc, rows, dim, stride_a, stride_c);
    check_launch("row_dot_bwd_cuda");
  });
}

}  // namespace fastclip
