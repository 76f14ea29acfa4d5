// Multi-tensor AdamW, LAMB and gradient norms on the CPU: the metadata table, the chunk loop and the
// per-element math of ../optim_math.h, exactly as the CUDA kernels (cuda/multi_tensor.cu) use them,
// so that CI tests the table logic and the math without a GPU. One thread walks the chunks in order
// (a CUDA block per chunk on the GPU); sums of squares accumulate in fp64 per chunk and per tensor.
//
// Params and grads are float32, float16 or bfloat16; fp16/bf16 storage is converted here with the
// rounding of torch's c10::Half / c10::BFloat16 (round to nearest even, overflow to inf, subnormal
// halves, canonical NaNs), so `param == master.to(param.dtype)` holds bit for bit.
#include "multi_tensor.h"

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "../common.h"
#include "../optim_math.h"

namespace fastclip {
namespace {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }
inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));         // inf, NaN
  if (exp != 0) return bits_float(sign | ((exp + 112) << 23) | (mant << 13));  // rebias 15 -> 127
  const float sub = std::ldexp(float(mant), -24);                              // zero, subnormal: exact
  return sign ? -sub : sub;
}

// r + 1 if the dropped bits `rest` are above half a unit, or exactly half and r is odd.
inline uint32_t round_half_even(uint32_t r, uint32_t rest, uint32_t half) {
  return r + ((rest > half || (rest == half && (r & 1u))) ? 1u : 0u);
}

template <typename T>
T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  if (std::isnan(x)) return {0x7fc0};
  const uint32_t u = float_bits(x);
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <>
inline Half from_float<Half>(float x) {
  const uint32_t u = float_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u)                                     // >= 2^-14: normal half
    return {uint16_t(sign | round_half_even((a - 0x38000000u) >> 13, a & 0x1fffu, 0x1000u))};
  if (a < 0x33000000u) return {uint16_t(sign)};  // < 2^-25: rounds to zero
  // Subnormal half, in units of 2^-24: the 24-bit significand shifted right by 126 - exponent.
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u, shift = 126 - (a >> 23);
  return {uint16_t(sign | round_half_even(mant >> shift, mant & ((1u << shift) - 1), 1u << (shift - 1)))};
}

const char* field_name(int field) {
  static const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq", "master", "step"};
  return names[field];
}

// Decodes chunk `index` after checking its table entry (the CUDA kernels cannot read the table on
// the host without a synchronization, so only this path checks it).
TableChunk checked_chunk(const char* fn, const int64_t* table, int64_t num_tensors, int64_t chunk_size,
                         int64_t index, std::initializer_list<int> needed) {
  const int64_t tensor = table[kTableFields * num_tensors + 2 * index];
  FASTCLIP_CHECK(tensor >= 0 && tensor < num_tensors, fn, ": chunk ", index, " names tensor ", tensor,
                 ", expected [0, ", num_tensors, ")");
  const TableChunk c = table_chunk(table, num_tensors, int(chunk_size), index);
  FASTCLIP_CHECK(c.start >= 0 && c.start < c.fields[kNumel], fn, ": chunk ", index, " starts at element ",
                 c.start, " of tensor ", tensor, ", which has ", c.fields[kNumel]);
  for (int field : needed)
    FASTCLIP_CHECK(c.has(field), fn, ": tensor ", tensor, " has a null ", field_name(field), " pointer");
  return c;
}

const std::initializer_list<int> kOptimizerFields = {kParam, kGrad, kExpAvg, kExpAvgSq, kStep};

// Calls f(T{}) with T the param/grad storage type of dtype_code.
template <typename F>
void dispatch_param_dtype(const char* fn, int dtype_code, F&& f) {
  switch (static_cast<DType>(dtype_code)) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(Half{});
    case DType::BFloat16: return f(BFloat16{});
    default:
      FASTCLIP_CHECK(false, fn, ": dtype_code must be 0 (float32), 2 (float16) or 3 (bfloat16), got ", dtype_code,
                     " (", dtype_name(dtype_code), ")");
  }
}

// The fp32 weight an update applies to (the master if there is one) and its write-back.
template <typename T>
inline float load_weight(const T* p, const float* master, int i) {
  return master ? master[i] : to_float(p[i]);
}
template <typename T>
inline void store_weight(T* p, float* master, int i, float w) {
  if (master) master[i] = w;
  p[i] = from_float<T>(w);
}

template <typename T>
void adamw_chunk(const TableChunk& c, const AdamWHyper& h) {
  const AdamWScalars s = adamw_scalars(h, c.step());
  T* p = c.ptr<T>(kParam);
  const T* g = c.ptr<T>(kGrad);
  float *m = c.ptr<float>(kExpAvg), *v = c.ptr<float>(kExpAvgSq);
  float* master = c.has(kMaster) ? c.ptr<float>(kMaster) : nullptr;
  for (int i = 0; i < c.n; ++i) {
    float w = load_weight(p, master, i);
    adamw_element(to_float(g[i]) * s.grad_scale, w, m[i], v[i], s);
    store_weight(p, master, i, w);
  }
}

// Stage 1: m, v, and the chunk's sums of w^2 and u^2 added to sq[tensor], sq[num_tensors + tensor].
// Without the trust ratio the update needs no norms and is applied here (there is no stage 2).
template <typename T>
void lamb_stage1_chunk(const TableChunk& c, const LambHyper& h, double* sq, int64_t num_tensors) {
  const LambScalars s = lamb_scalars(h, c.step());
  T* p = c.ptr<T>(kParam);
  const T* g = c.ptr<T>(kGrad);
  float *m = c.ptr<float>(kExpAvg), *v = c.ptr<float>(kExpAvgSq);
  float* master = c.has(kMaster) ? c.ptr<float>(kMaster) : nullptr;
  double w_sq = 0.0, u_sq = 0.0;
  for (int i = 0; i < c.n; ++i) {
    float w = load_weight(p, master, i);
    lamb_moments(to_float(g[i]) * s.grad_scale, m[i], v[i], s);
    const float u = lamb_direction(w, m[i], v[i], s);
    if (h.use_trust_ratio) {
      w_sq += double(w) * w;
      u_sq += double(u) * u;
    } else {
      store_weight(p, master, i, w - lamb_lr_ratio(s.lr, 0.f, 0.f, false) * u);
    }
  }
  sq[c.tensor] += w_sq;
  sq[num_tensors + c.tensor] += u_sq;
}

// Stage 2: u again from the updated m, v; w -= lr * ratio * u.
template <typename T>
void lamb_stage2_chunk(const TableChunk& c, const LambHyper& h, const float* norms, int64_t num_tensors) {
  const LambScalars s = lamb_scalars(h, c.step());
  const float lr_ratio = lamb_lr_ratio(s.lr, norms[c.tensor], norms[num_tensors + c.tensor], true);
  T* p = c.ptr<T>(kParam);
  const float *m = c.ptr<float>(kExpAvg), *v = c.ptr<float>(kExpAvgSq);
  float* master = c.has(kMaster) ? c.ptr<float>(kMaster) : nullptr;
  for (int i = 0; i < c.n; ++i) {
    const float w = load_weight(p, master, i);
    store_weight(p, master, i, w - lr_ratio * lamb_direction(w, m[i], v[i], s));
  }
}

}  // namespace

void multi_tensor_sq_norm_cpu(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                              int64_t chunk_size, int dtype_code, std::uintptr_t out_ptr) {
  const char* fn = "multi_tensor_sq_norm_cpu";
  check_table_args(fn, table_ptr, num_tensors, num_chunks, chunk_size);
  FASTCLIP_CHECK(num_tensors == 0 || out_ptr != 0, fn, ": out is a null pointer");
  const auto* table = reinterpret_cast<const int64_t*>(table_ptr);
  dispatch_param_dtype(fn, dtype_code, [&](auto tag) {
    using T = decltype(tag);
    std::vector<double> sums(num_tensors, 0.0);
    for (int64_t k = 0; k < num_chunks; ++k) {
      const TableChunk c = checked_chunk(fn, table, num_tensors, chunk_size, k, {kGrad});
      const T* g = c.ptr<T>(kGrad);
      double acc = 0.0;
      for (int i = 0; i < c.n; ++i) acc += double(to_float(g[i])) * to_float(g[i]);
      sums[c.tensor] += acc;
    }
    auto* out = reinterpret_cast<float*>(out_ptr);
    for (int64_t t = 0; t < num_tensors; ++t) out[t] = float(sums[t]);
  });
}

void global_norm_cpu(std::uintptr_t sq_ptr, int64_t num_tensors, std::uintptr_t norm_ptr, double max_norm,
                     std::uintptr_t coef_ptr) {
  FASTCLIP_CHECK(num_tensors >= 0, "global_norm_cpu: num_tensors must be >= 0, got ", num_tensors);
  FASTCLIP_CHECK((num_tensors == 0 || sq_ptr != 0) && norm_ptr != 0, "global_norm_cpu: sq or norm is a null pointer");
  const auto* sq = reinterpret_cast<const float*>(sq_ptr);
  double total = 0.0;
  for (int64_t t = 0; t < num_tensors; ++t) total += sq[t];
  const float norm = std::sqrt(float(total));
  *reinterpret_cast<float*>(norm_ptr) = norm;
  if (coef_ptr != 0) *reinterpret_cast<float*>(coef_ptr) = clip_coefficient(norm, float(max_norm));
}

void clip_coefficient_cpu(std::uintptr_t total_norm_ptr, double max_norm, std::uintptr_t out_ptr) {
  FASTCLIP_CHECK(total_norm_ptr != 0 && out_ptr != 0, "clip_coefficient_cpu: total_norm or out is a null pointer");
  *reinterpret_cast<float*>(out_ptr) =
      clip_coefficient(*reinterpret_cast<const float*>(total_norm_ptr), float(max_norm));
}

void multi_tensor_adamw_cpu(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                            int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                            double beta2, double eps, double weight_decay, std::uintptr_t grad_scale_ptr) {
  const char* fn = "multi_tensor_adamw_cpu";
  check_table_args(fn, table_ptr, num_tensors, num_chunks, chunk_size);
  const AdamWHyper h = make_adamw_hyper(lr, lr_ptr, beta1, beta2, eps, weight_decay, grad_scale_ptr);
  const auto* table = reinterpret_cast<const int64_t*>(table_ptr);
  dispatch_param_dtype(fn, dtype_code, [&](auto tag) {
    for (int64_t k = 0; k < num_chunks; ++k)
      adamw_chunk<decltype(tag)>(checked_chunk(fn, table, num_tensors, chunk_size, k, kOptimizerFields), h);
  });
}

void multi_tensor_lamb_cpu(std::uintptr_t table_ptr, int64_t num_tensors, int64_t num_chunks,
                           int64_t chunk_size, int dtype_code, double lr, std::uintptr_t lr_ptr, double beta1,
                           double beta2, double eps, double weight_decay, bool bias_correction,
                           bool grad_averaging, bool use_trust_ratio, std::uintptr_t grad_scale_ptr,
                           std::uintptr_t norms_ptr) {
  const char* fn = "multi_tensor_lamb_cpu";
  check_table_args(fn, table_ptr, num_tensors, num_chunks, chunk_size);
  FASTCLIP_CHECK(!use_trust_ratio || num_tensors == 0 || norms_ptr != 0, fn,
                 ": norms is a null pointer (needed with use_trust_ratio)");
  const LambHyper h = make_lamb_hyper(lr, lr_ptr, beta1, beta2, eps, weight_decay, bias_correction, grad_averaging,
                                      use_trust_ratio, grad_scale_ptr);
  const auto* table = reinterpret_cast<const int64_t*>(table_ptr);
  dispatch_param_dtype(fn, dtype_code, [&](auto tag) {
    using T = decltype(tag);
    std::vector<double> sq(2 * num_tensors, 0.0);
    for (int64_t k = 0; k < num_chunks; ++k)
      lamb_stage1_chunk<T>(checked_chunk(fn, table, num_tensors, chunk_size, k, kOptimizerFields), h, sq.data(),
                           num_tensors);
    if (!use_trust_ratio) return;
    auto* norms = reinterpret_cast<float*>(norms_ptr);
    for (int64_t t = 0; t < 2 * num_tensors; ++t) norms[t] = float(sq[t]);
    for (int64_t k = 0; k < num_chunks; ++k)
      lamb_stage2_chunk<T>(checked_chunk(fn, table, num_tensors, chunk_size, k, kOptimizerFields), h, norms,
                           num_tensors);
  });
}

}  // namespace fastclip
