// Multi-tensor AdamW, LAMB and gradient norms on a CUDA GPU (apex's multi_tensor_apply pattern).
//
// One launch per op updates every tensor of a call: block b takes chunk b of the metadata table
// (../optim_math.h: tensor index and first element; at most chunk_size elements), loads the tensor's
// pointers and step from the table, and strides over the chunk with kThreads threads, 16 bytes per
// load of the param/grad dtype (N = 16 / sizeof(T) elements; fp32 streams move 4N bytes) when every
// pointer of the chunk is 16-byte aligned, one element at a time otherwise and for the tail.
//
// Per element and step, params of dtype T (fp32 m, v, optional fp32 master w):
//   AdamW         reads g, m, v, w; writes m, v, w (and p = round(w) with a master)
//   LAMB stage 1  reads g, m, v, w; writes m, v; sums w^2, u^2 per tensor (one atomicAdd per block)
//   LAMB stage 2  reads m, v, w; writes w (and p)
// Without the trust ratio LAMB needs no norms: stage 1 applies the update and stage 2 is skipped.
// Norms, clip coefficients, lr (optionally) and grad_scale stay in device memory: no host
// synchronization, so a step can be captured in a CUDA graph. Kernels run on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <type_traits>

#include "../common.h"
#include "convert.cuh"
#include "../optim_math.h"
#include "multi_tensor.h"

namespace fastclip {

int cuda_runtime_version() { return CUDART_VERSION; }
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocks = 2;  // two blocks per SM: <= 64 registers, 1024 threads in flight per SM

// N consecutive elements moved together: one 16-byte access, or several for 32-byte fp32 groups.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Packed {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load(const T* ptr, float (&x)[N]) {
  const Packed<T, N> packed = *reinterpret_cast<const Packed<T, N>*>(ptr);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] = to_float(packed.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* ptr, const float (&x)[N]) {
  Packed<T, N> packed;
#pragma unroll
  for (int k = 0; k < N; ++k) packed.v[k] = from_float<T>(x[k]);
  *reinterpret_cast<Packed<T, N>*>(ptr) = packed;
}

// Table addresses point to global memory; saying so lets the compiler use LDG/STG, not generic loads.
template <typename T>
__device__ __forceinline__ T* global(T* ptr) {
  __builtin_assume(__isGlobal(ptr));
  return ptr;
}

// The fp32 weight an update applies to (the master if there is one) and its write-back.
template <int N, typename T>
__device__ __forceinline__ void load_weight(const T* p, const float* master, int i, float (&w)[N]) {
  if (master)
    load<N>(global(master + i), w);
  else
    load<N>(p + i, w);
}

template <int N, typename T>
__device__ __forceinline__ void store_weight(T* p, float* master, int i, const float (&w)[N]) {
  if (master) store<N>(global(master + i), w);
  store<N>(p + i, w);
}

template <typename... P>
__device__ __forceinline__ bool aligned16(const P*... ptrs) {
  return ((reinterpret_cast<std::uintptr_t>(ptrs) % 16 == 0) && ...);
}

// Calls f(i, width) for groups of `width` elements of a chunk of n: N-wide groups if `vectorized`,
// then single elements. Consecutive threads take consecutive groups (coalesced).
template <int N, typename F>
__device__ __forceinline__ void chunk_loop(int n, bool vectorized, F&& f) {
  int done = 0;
  if (vectorized) {
    done = n - n % N;
    for (int i = threadIdx.x * N; i < done; i += kThreads * N) f(i, std::integral_constant<int, N>{});
  }
  for (int i = done + threadIdx.x; i < n; i += kThreads) f(i, std::integral_constant<int, 1>{});
}

// Sum over the block, valid in thread 0. May be called repeatedly.
template <typename V>
__device__ __forceinline__ V block_sum(V x) {
  __shared__ V partial[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  __syncthreads();  // a previous call may still read `partial`
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < kWarps ? partial[lane] : V(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// out[tensor] += sum of g^2 over one chunk. Grid (num_chunks), block kThreads; reads the gradients
// once (2-4 B per element), one fp32 atomicAdd per block.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    sq_norm_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int chunk_size, float* __restrict__ out) {
  const TableChunk c = table_chunk(table, num_tensors, chunk_size, blockIdx.x);
  const T* g = global(c.ptr<const T>(kGrad));
  float acc = 0.f;
  chunk_loop<N>(c.n, aligned16(g), [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    float x[W];
    load<W>(g + i, x);
#pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(x[k], x[k], acc);
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(out + c.tensor, acc);
}

// One block: norm = sqrt(sum of sq[num_tensors]) (fp64 sum), coef = clip coefficient if coef != null.
__global__ void __launch_bounds__(kThreads) global_norm_kernel(const float* __restrict__ sq, int64_t num_tensors,
                                                                float* __restrict__ norm, float max_norm,
                                                                float* __restrict__ coef) {
  double acc = 0.0;
  for (int64_t t = threadIdx.x; t < num_tensors; t += kThreads) acc += sq[t];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const float total = sqrtf(float(acc));
    *norm = total;
    if (coef) *coef = clip_coefficient(total, max_norm);
  }
}

__global__ void clip_coefficient_kernel(const float* __restrict__ total_norm, float max_norm, float* __restrict__ out) {
  *out = clip_coefficient(*total_norm, max_norm);
}

// AdamW over one chunk per block. Grid (num_chunks), block kThreads.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    adamw_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int chunk_size, AdamWHyper h) {
  const TableChunk c = table_chunk(table, num_tensors, chunk_size, blockIdx.x);
  const AdamWScalars s = adamw_scalars(h, c.step());
  T* p = global(c.ptr<T>(kParam));
  const T* g = global(c.ptr<const T>(kGrad));
  float *m = global(c.ptr<float>(kExpAvg)), *v = global(c.ptr<float>(kExpAvgSq));
  float* master = c.has(kMaster) ? c.ptr<float>(kMaster) : nullptr;
  chunk_loop<N>(c.n, aligned16(p, g, m, v, master), [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    float gr[W], w[W], mr[W], vr[W];
    load<W>(g + i, gr);
    load<W>(m + i, mr);
    load<W>(v + i, vr);
    load_weight<W>(p, master, i, w);
#pragma unroll
    for (int k = 0; k < W; ++k) adamw_element(gr[k] * s.grad_scale, w[k], mr[k], vr[k], s);
    store<W>(m + i, mr);
    store<W>(v + i, vr);
    store_weight<W>(p, master, i, w);
  });
}

// LAMB stage 1 over one chunk per block: m, v; norms[tensor] += sum w^2, norms[T + tensor] += sum u^2.
// Without the trust ratio: m, v and the update w -= lr u, no norms.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    lamb_stage1_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int chunk_size, LambHyper h,
                       float* __restrict__ norms) {
  const TableChunk c = table_chunk(table, num_tensors, chunk_size, blockIdx.x);
  const LambScalars s = lamb_scalars(h, c.step());
  T* p = global(c.ptr<T>(kParam));
  const T* g = global(c.ptr<const T>(kGrad));
  float *m = global(c.ptr<float>(kExpAvg)), *v = global(c.ptr<float>(kExpAvgSq));
  float* master = c.has(kMaster) ? c.ptr<float>(kMaster) : nullptr;
  float w_sq = 0.f, u_sq = 0.f;
  chunk_loop<N>(c.n, aligned16(p, g, m, v, master), [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    float gr[W], w[W], mr[W], vr[W];
    load<W>(g + i, gr);
    load<W>(m + i, mr);
    load<W>(v + i, vr);
    load_weight<W>(p, master, i, w);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      lamb_moments(gr[k] * s.grad_scale, mr[k], vr[k], s);
      const float u = lamb_direction(w[k], mr[k], vr[k], s);
      if (h.use_trust_ratio) {
        w_sq = fmaf(w[k], w[k], w_sq);
        u_sq = fmaf(u, u, u_sq);
      } else {
        w[k] = w[k] - s.lr * u;
      }
    }
    store<W>(m + i, mr);
    store<W>(v + i, vr);
    if (!h.use_trust_ratio) store_weight<W>(p, master, i, w);
  });
  if (h.use_trust_ratio) {  // uniform over the block
    w_sq = block_sum(w_sq);
    u_sq = block_sum(u_sq);
    if (threadIdx.x == 0) {
      atomicAdd(norms + c.tensor, w_sq);
      atomicAdd(norms + num_tensors + c.tensor, u_sq);
    }
  }
}

// LAMB stage 2 over one chunk per block: u from the updated m, v; w -= lr * ratio[tensor] * u.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    lamb_stage2_kernel(const int64_t* __restrict__ table, int64_t num_tensors, int chunk_size, LambHyper h,
                       const float* __restrict__ norms) {
  const TableChunk c = table_chunk(table, num_tensors, chunk_size, blockIdx.x);
  const LambScalars s = lamb_scalars(h, c.step());
  const float lr_ratio = lamb_lr_ratio(s.lr, norms[c.tensor], norms[num_tensors + c.tensor], true);
  T* p = global(c.ptr<T>(kParam));
  const float *m = global(c.ptr<const float>(kExpAvg)), *v = global(c.ptr<const float>(kExpAvgSq));
  float* master = c.has(kMaster) ? c.ptr<float>(kMaster) : nullptr;
  chunk_loop<N>(c.n, aligned16(p, m, v, master), [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    float w[W], mr[W], vr[W];
    load<W>(m + i, mr);
    load<W>(v + i, vr);
    load_weight<W>(p, master, i, w);
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = w[k] - lr_ratio * lamb_direction(w[k], mr[k], vr[k], s);
    store_weight<W>(p, master, i, w);
  });
}

void check_cuda(cudaError_t err, const char* fn, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(concat(fn, ": ", what, " failed: ", cudaGetErrorString(err)));
}

void check_launch(const char* fn) { check_cuda(cudaGetLastError(), fn, "kernel launch"); }

// Calls f(T{}) with T the param/grad element type of dtype_code.
template <typename F>
void dispatch_param_dtype(const char* fn, int dtype_code, F&& f) {
  switch (static_cast<DType>(dtype_code)) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    default:
      FASTCLIP_CHECK(false, fn, ": dtype_code must be 0 (float32), 2 (float16) or 3 (bfloat16), got ", dtype_code,
                     " (", dtype_name(dtype_code), ")");
  }
}

void zero_async(float* ptr, int64_t count, cudaStream_t stream, const char* fn) {
  check_cuda(cudaMemsetAsync(ptr, 0, sizeof(float) * count, stream), fn, "cudaMemsetAsync");
}

}  // namespace

void multi_tensor_sq_norm_cuda(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                               int64_t chunk_size, int dtype_code, std::uintptr_t out_ptr, std::uintptr_t stream) {
  const char* fn = "multi_tensor_sq_norm_cuda";
  check_table_args(fn, table_ptr, num_tensors, num_chunks, chunk_size);
  FASTCLIP_CHECK(num_tensors == 0 || out_ptr != 0, fn, ": out is a null pointer");
  dispatch_param_dtype(fn, dtype_code, [&](auto tag) {
    using T = decltype(tag);
    auto* s = reinterpret_cast<cudaStream_t>(stream);
    auto* out = reinterpret_cast<float*>(out_ptr);
    if (num_tensors == 0) return;
    zero_async(out, num_tensors, s, fn);
    if (num_chunks == 0) return;
    sq_norm_kernel<T, 16 / sizeof(T)><<<unsigned(num_chunks), kThreads, 0, s>>>(
        reinterpret_cast<const int64_t*>(table_ptr), num_tensors, int(chunk_size), out);
    check_launch(fn);
  });
}

void global_norm_cuda(std::uintptr_t sq_ptr, int64_t num_tensors, std::uintptr_t norm_ptr, double max_norm,
                      std::uintptr_t coef_ptr, std::uintptr_t stream) {
  const char* fn = "global_norm_cuda";
  FASTCLIP_CHECK(num_tensors >= 0, fn, ": num_tensors must be >= 0, got ", num_tensors);
  FASTCLIP_CHECK((num_tensors == 0 || sq_ptr != 0) && norm_ptr != 0, fn, ": sq or norm is a null pointer");
  global_norm_kernel<<<1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(sq_ptr), num_tensors, reinterpret_cast<float*>(norm_ptr), float(max_norm),
      reinterpret_cast<float*>(coef_ptr));
  check_launch(fn);
}

void clip_coefficient_cuda(std::uintptr_t total_norm_ptr, double max_norm, std::uintptr_t out_ptr,
                           std::uintptr_t stream) {
  const char* fn = "clip_coefficient_cuda";
  FASTCLIP_CHECK(total_norm_ptr != 0 && out_ptr != 0, fn, ": total_norm or out is a null pointer");
  clip_coefficient_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(total_norm_ptr), float(max_norm), reinterpret_cast<float*>(out_ptr));
  check_launch(fn);
}

void multi_tensor_adamw_cuda(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                             int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                             double beta2, double eps, double weight_decay, std::uintptr_t grad_scale_ptr,
                             std::uintptr_t stream) {
  const char* fn = "multi_tensor_adamw_cuda";
  check_table_args(fn, table_ptr, num_tensors, num_chunks, chunk_size);
  const AdamWHyper h = make_adamw_hyper(lr, lr_ptr, beta1, beta2, eps, weight_decay, grad_scale_ptr);
  dispatch_param_dtype(fn, dtype_code, [&](auto tag) {
    using T = decltype(tag);
    if (num_chunks == 0) return;
    adamw_kernel<T, 16 / sizeof(T)><<<unsigned(num_chunks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const int64_t*>(table_ptr), num_tensors, int(chunk_size), h);
    check_launch(fn);
  });
}

void multi_tensor_lamb_cuda(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                            int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                            double beta2, double eps, double weight_decay, bool bias_correction,
                            bool grad_averaging, bool use_trust_ratio, std::uintptr_t grad_scale_ptr,
                            std::uintptr_t norms_ptr, std::uintptr_t stream) {
  const char* fn = "multi_tensor_lamb_cuda";
  check_table_args(fn, table_ptr, num_tensors, num_chunks, chunk_size);
  FASTCLIP_CHECK(!use_trust_ratio || num_tensors == 0 || norms_ptr != 0, fn,
                 ": norms is a null pointer (needed with use_trust_ratio)");
  const LambHyper h = make_lamb_hyper(lr, lr_ptr, beta1, beta2, eps, weight_decay, bias_correction, grad_averaging,
                                      use_trust_ratio, grad_scale_ptr);
  dispatch_param_dtype(fn, dtype_code, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = 16 / sizeof(T);
    if (num_chunks == 0) return;
    auto* s = reinterpret_cast<cudaStream_t>(stream);
    const auto* table = reinterpret_cast<const int64_t*>(table_ptr);
    auto* norms = reinterpret_cast<float*>(norms_ptr);
    if (use_trust_ratio) zero_async(norms, 2 * num_tensors, s, fn);
    lamb_stage1_kernel<T, N><<<unsigned(num_chunks), kThreads, 0, s>>>(table, num_tensors, int(chunk_size), h, norms);
    check_launch(fn);
    if (!use_trust_ratio) return;
    lamb_stage2_kernel<T, N><<<unsigned(num_chunks), kThreads, 0, s>>>(table, num_tensors, int(chunk_size), h, norms);
    check_launch(fn);
  });
}

}  // namespace fastclip
