// Multi-tensor optimizer steps, shared by the CPU (cpu/multi_tensor.cpp) and CUDA
// (cuda/multi_tensor.cu) kernels: the metadata table, the hyper-parameters, and the per-element
// AdamW and LAMB math, in fp32 and in the operation order of fastclip_kernels/optim/reference.py.
//
// Metadata table: one int64 array built by fastclip_kernels/optim/native.py, then
//   [num_tensors][kTableFields]  param, grad, exp_avg, exp_avg_sq, master (0: none), step, numel
//   [num_chunks][2]              tensor index, first element of the chunk
// Entries 0..5 are addresses: param and grad have the kernel's dtype; exp_avg, exp_avg_sq, master
// are fp32 [numel]; step is a 0-d fp32 counter, already incremented. A chunk covers at most
// chunk_size elements of one tensor; one CUDA block (one CPU loop iteration) updates one chunk.
//
// Scalars are rounded as the reference rounds them: Python computes 1 - beta, 1 - lr * wd in
// double and torch rounds the result to fp32 when it meets an fp32 tensor; `x / t` for a Python
// float x and a tensor t is `t.reciprocal() * x` in torch. With lr given as a 0-d tensor (read
// through lr_ptr, so a CUDA graph can capture the step) those products are fp32 tensor ops.
#pragma once

#include <math.h>

#include <cstdint>

#include "common.h"

#ifdef __CUDACC__
#define FASTCLIP_HD __host__ __device__ __forceinline__
#else
#define FASTCLIP_HD inline
#endif

namespace fastclip {

enum TableField : int { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kMaster, kStep, kNumel, kTableFields };

// One chunk of one tensor, decoded from the table.
struct TableChunk {
  const int64_t* fields;  // the tensor's kTableFields entries
  int64_t tensor;         // index of the tensor
  int64_t start;          // first element of the chunk
  int n;                  // elements in the chunk

  FASTCLIP_HD bool has(int field) const { return fields[field] != 0; }
  template <typename T>
  FASTCLIP_HD T* ptr(int field) const {  // the chunk's first element of a [numel] operand
    return reinterpret_cast<T*>(static_cast<std::uintptr_t>(fields[field])) + start;
  }
  FASTCLIP_HD float step() const {
    return *reinterpret_cast<const float*>(static_cast<std::uintptr_t>(fields[kStep]));
  }
};

FASTCLIP_HD TableChunk table_chunk(const int64_t* table, int64_t num_tensors, int chunk_size, int64_t index) {
  const int64_t* entry = table + kTableFields * num_tensors + 2 * index;
  TableChunk c;
  c.tensor = entry[0];
  c.start = entry[1];
  c.fields = table + kTableFields * c.tensor;
  const int64_t left = c.fields[kNumel] - c.start;
  c.n = static_cast<int>(left < chunk_size ? left : chunk_size);
  return c;
}

// Argument checks shared by every multi-tensor entry point (the table's contents are checked on the
// CPU only: reading them on the host would synchronize a CUDA stream).
inline void check_table_args(const char* fn, std::uintptr_t table, int64_t num_tensors, int64_t num_chunks,
                             int64_t chunk_size) {
  FASTCLIP_CHECK(num_tensors >= 0 && num_chunks >= 0, fn, ": num_tensors and num_chunks must be >= 0, got ",
                 num_tensors, " and ", num_chunks);
  FASTCLIP_CHECK(chunk_size > 0 && chunk_size <= (int64_t(1) << 30), fn, ": chunk_size must be in [1, 2^30], got ",
                 chunk_size);
  FASTCLIP_CHECK(num_chunks <= 0x7fffffff, fn, ": num_chunks must be < 2^31, got ", num_chunks);
  FASTCLIP_CHECK(num_chunks == 0 || (table != 0 && num_tensors > 0), fn,
                 ": the table is a null pointer or num_tensors is 0 with ", num_chunks, " chunks");
}

// ---------------------------------------------------------------------------------------------
// AdamW: g = grad * grad_scale;  p *= 1 - lr wd;  m = lerp(m, g, 1 - beta1);
//        v = beta2 v + (1 - beta2) g^2;  p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
// with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step.
// ---------------------------------------------------------------------------------------------

struct AdamWHyper {
  float lr, decay;              // lr and 1 - lr * wd (rounded once from double); unused with lr_ptr
  const float* lr_ptr;          // 0-d fp32 lr, or null
  const float* grad_scale_ptr;  // 0-d fp32 gradient multiplier, or null
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
};

inline AdamWHyper make_adamw_hyper(double lr, std::uintptr_t lr_ptr, double beta1, double beta2, double eps,
                                   double weight_decay, std::uintptr_t grad_scale_ptr) {
  AdamWHyper h;
  h.lr = float(lr);
  h.decay = float(1.0 - lr * weight_decay);
  h.lr_ptr = reinterpret_cast<const float*>(lr_ptr);
  h.grad_scale_ptr = reinterpret_cast<const float*>(grad_scale_ptr);
  h.beta1 = float(beta1);
  h.one_minus_beta1 = float(1.0 - beta1);
  h.beta2 = float(beta2);
  h.one_minus_beta2 = float(1.0 - beta2);
  h.eps = float(eps);
  h.weight_decay = float(weight_decay);
  return h;
}

// Per-tensor values, computed once per chunk from the tensor's step (and lr, grad_scale pointers).
struct AdamWScalars {
  float grad_scale, decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size;
};

FASTCLIP_HD AdamWScalars adamw_scalars(const AdamWHyper& h, float step) {
  AdamWScalars s;
  s.grad_scale = h.grad_scale_ptr ? *h.grad_scale_ptr : 1.f;  // g * 1 == g, NaN and inf included
  const float bc1 = 1.f - powf(h.beta1, step);
  s.bc2_sqrt = sqrtf(1.f - powf(h.beta2, step));
  if (h.lr_ptr) {
    const float lr = *h.lr_ptr;
    s.decay = 1.f - lr * h.weight_decay;
    s.step_size = lr / bc1;
  } else {
    s.decay = h.decay;
    s.step_size = (1.f / bc1) * h.lr;  // torch: float / tensor == tensor.reciprocal() * float
  }
  s.one_minus_beta1 = h.one_minus_beta1;
  s.beta2 = h.beta2;
  s.one_minus_beta2 = h.one_minus_beta2;
  s.eps = h.eps;
  return s;
}

// torch.lerp as torch's vectorized CPU kernel computes it.
FASTCLIP_HD float lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? fmaf(weight, end - start, start) : fmaf(weight - 1.f, end - start, end);
}

// One element: w is the fp32 weight (the master, or the fp32 param), g the scaled gradient.
FASTCLIP_HD void adamw_element(float g, float& w, float& m, float& v, const AdamWScalars& s) {
  w = w * s.decay;
  m = lerp(m, g, s.one_minus_beta1);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  w = w - m / denom * s.step_size;
}

// ---------------------------------------------------------------------------------------------
// LAMB: g = grad * grad_scale;  m = beta1 m + c g (c = 1 - beta1 with grad averaging, else 1);
//       v = beta2 v + (1 - beta2) g^2;  u = (m / bc1) / (sqrt(v / bc2) + eps) + wd w
//       (bc = 1 without bias correction);  r = ||w|| / ||u|| (1 if a norm is 0 or no trust
//       ratio);  w -= lr r u.  Stage 1 updates m, v and sums w^2, u^2 per tensor; stage 2
//       recomputes u from the new m, v (no temporary buffer) and applies the update.
// ---------------------------------------------------------------------------------------------

struct LambHyper {
  float lr;
  const float* lr_ptr;          // 0-d fp32 lr, or null
  const float* grad_scale_ptr;  // 0-d fp32 gradient multiplier, or null
  float beta1, grad_coef, beta2, one_minus_beta2, eps, weight_decay;
  bool bias_correction, use_trust_ratio;
};

inline LambHyper make_lamb_hyper(double lr, std::uintptr_t lr_ptr, double beta1, double beta2, double eps,
                                 double weight_decay, bool bias_correction, bool grad_averaging,
                                 bool use_trust_ratio, std::uintptr_t grad_scale_ptr) {
  LambHyper h;
  h.lr = float(lr);
  h.lr_ptr = reinterpret_cast<const float*>(lr_ptr);
  h.grad_scale_ptr = reinterpret_cast<const float*>(grad_scale_ptr);
  h.beta1 = float(beta1);
  h.grad_coef = float(grad_averaging ? 1.0 - beta1 : 1.0);
  h.beta2 = float(beta2);
  h.one_minus_beta2 = float(1.0 - beta2);
  h.eps = float(eps);
  h.weight_decay = float(weight_decay);
  h.bias_correction = bias_correction;
  h.use_trust_ratio = use_trust_ratio;
  return h;
}

struct LambScalars {
  float grad_scale, lr, beta1, grad_coef, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay;
};

FASTCLIP_HD LambScalars lamb_scalars(const LambHyper& h, float step) {
  LambScalars s;
  s.grad_scale = h.grad_scale_ptr ? *h.grad_scale_ptr : 1.f;
  s.lr = h.lr_ptr ? *h.lr_ptr : h.lr;
  s.bc1 = h.bias_correction ? 1.f - powf(h.beta1, step) : 1.f;  // x / 1 == x
  s.bc2 = h.bias_correction ? 1.f - powf(h.beta2, step) : 1.f;
  s.beta1 = h.beta1;
  s.grad_coef = h.grad_coef;
  s.beta2 = h.beta2;
  s.one_minus_beta2 = h.one_minus_beta2;
  s.eps = h.eps;
  s.weight_decay = h.weight_decay;
  return s;
}

FASTCLIP_HD void lamb_moments(float g, float& m, float& v, const LambScalars& s) {
  m = fmaf(s.grad_coef, g, m * s.beta1);  // torch: m.mul_(beta1).add_(g, alpha=c)
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
}

// The LAMB update direction u of one element (before the trust ratio).
FASTCLIP_HD float lamb_direction(float w, float m, float v, const LambScalars& s) {
  return (m / s.bc1) / (sqrtf(v / s.bc2) + s.eps) + s.weight_decay * w;
}

// lr * r from the tensor's sums of squares of w and u.
FASTCLIP_HD float lamb_lr_ratio(float lr, float w_sq, float u_sq, bool use_trust_ratio) {
  float ratio = 1.f;
  if (use_trust_ratio) {
    const float w_norm = sqrtf(w_sq), u_norm = sqrtf(u_sq);
    if (w_norm > 0.f && u_norm > 0.f) ratio = w_norm / u_norm;
  }
  return lr * ratio;
}

// min(1, max_norm / (total_norm + 1e-6)) as torch computes it; NaN stays NaN (torch.clamp).
FASTCLIP_HD float clip_coefficient(float total_norm, float max_norm) {
  const float coef = (1.f / (total_norm + 1e-6f)) * max_norm;
  return coef > 1.f ? 1.f : coef;
}

}  // namespace fastclip
