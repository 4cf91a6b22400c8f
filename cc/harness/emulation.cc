// Host emulation of tf_bf16's CUDA kernels, for tests on machines without a
// GPU (tests/test_gpu_kernel_emulation.py loads it with ctypes).
//
// It runs the launchers of cc/kernels/bf16_update_kernels.cu.h, the code the
// GPU functors run, on a HostEmulator: the same choice of kernel (vectorised
// or one element at a time, template flags), the same per-thread functions
// (DenseThread, SparseThread), for any emulated grid size and thread order.
// What it cannot check is nvcc's code generation; cc/harness/bf16_harness.cu
// does that on a GPU.
//
// Arithmetic runs with denormals flushed (MXCSR FTZ and DAZ), as the CPU
// kernels do and as the GPU does under --ftz=true.
#include <xmmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "../kernels/bf16_update_kernels.cu.h"

namespace {

using tf_bf16::RandomKey;
using tf_bf16::Rounding;
namespace k = tf_bf16::kernels;

enum Op : int { kRound = 0, kAssignAdd = 1, kSgd = 2, kAdam = 3, kLion = 4 };

}  // namespace

extern "C" {

// One call, laid out for ctypes (tests/test_gpu_kernel_emulation.py mirrors
// it field by field).
struct TfBf16EmulatedCall {
  int32_t op;         // Op
  int32_t rounding;   // 0 nearest, 1 stochastic, 2 kahan
  int32_t var_bf16;   // state tensors bfloat16 (1) or float32 (0)
  int32_t grad_bf16;  // gradient/delta bfloat16 (1) or float32 (0)
  void* var;          // y for stochastic_round
  void* slot1;        // accum (SGD, optional) or m
  void* slot2;        // v
  void* slot3;        // vhat (optional)
  void* compensation;
  const void* grad;   // x for stochastic_round, delta for assign_add
  int64_t n;          // dense: elements; sparse: elements of var
  const int64_t* indices;  // sparse when not null
  int64_t num_indices;
  int64_t row_size;
  float lr, momentum, beta1, beta2, epsilon, weight_decay, beta1_power, beta2_power;
  int32_t nesterov;
  int32_t reverse_order;
  int64_t seed, step, var_id;
  uint64_t threads;
  int32_t allow_vector;
  int32_t chunks_per_trip;  // dense: HostEmulator::chunks_per_trip (0 or 1: one)
  int64_t first_index;  // dense only, see HostEmulator::first_index
  // Adam's 1 - beta, computed by the caller as Keras does (docs/rounding.md 5.3).
  float one_minus_beta1, one_minus_beta2;
};

}  // extern "C"

namespace {

template <Rounding R, typename S, typename G>
int Run(const TfBf16EmulatedCall& c, const k::HostEmulator& ex) {
  const RandomKey stream_key = tf_bf16::MakeStreamKey(c.seed, c.step, c.var_id);
  S* var = static_cast<S*>(c.var);
  S* slot1 = static_cast<S*>(c.slot1);
  S* slot2 = static_cast<S*>(c.slot2);
  S* slot3 = static_cast<S*>(c.slot3);
  auto* comp = static_cast<uint16_t*>(c.compensation);
  const G* grad = static_cast<const G*>(c.grad);

  tf_bf16::SgdScalars sgd{c.lr, c.momentum, c.weight_decay, tf_bf16::MaskOf(c.nesterov != 0),
                          tf_bf16::MaskOf(c.weight_decay != 0.0f)};
  tf_bf16::AdamScalars adam;
  adam.lr = c.lr;
  adam.alpha = c.lr * std::sqrt(1.0f - c.beta2_power) / (1.0f - c.beta1_power);
  adam.one_minus_beta1 = c.one_minus_beta1;
  adam.one_minus_beta2 = c.one_minus_beta2;
  adam.epsilon = c.epsilon;
  adam.weight_decay = c.weight_decay;
  adam.weight_decay_mask = tf_bf16::MaskOf(c.weight_decay != 0.0f);
  tf_bf16::LionScalars lion{c.lr,          c.beta1,        1.0f - c.beta1,
                            c.beta2,       1.0f - c.beta2, c.weight_decay,
                            tf_bf16::MaskOf(c.weight_decay != 0.0f)};

  if (c.indices != nullptr) {
    // Grouping as the CPU functor does it (the GPU does it with cub; the
    // harness checks that on a GPU).
    const int64_t n = c.num_indices;
    std::vector<int64_t> order(n), starts, rows;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return c.indices[a] < c.indices[b]; });
    for (int64_t p = 0; p < n; ++p) {
      if (p == 0 || c.indices[order[p]] != c.indices[order[p - 1]]) {
        starts.push_back(p);
        rows.push_back(c.indices[order[p]]);
      }
    }
    starts.push_back(n);
    const k::SparseGroupsView groups{order.data(), starts.data(), rows.data(),
                                     static_cast<int64_t>(rows.size())};
    if (c.op == kSgd) {
      return k::SparseApplySgd<R>(ex, var, slot1, comp, grad, groups, c.row_size, sgd, stream_key);
    }
    if (c.op == kAdam) {
      return k::SparseApplyAdam<R>(ex, var, slot1, slot2, slot3, comp, grad, groups,
                                   c.row_size, adam, stream_key);
    }
    return -1;
  }
  switch (c.op) {
    case kAssignAdd:
      return k::RoundedAssignAdd<R>(ex, var, comp, grad, c.n, stream_key);
    case kSgd:
      return k::ApplySgd<R>(ex, var, slot1, comp, grad, c.n, sgd, stream_key);
    case kAdam:
      return k::ApplyAdam<R>(ex, var, slot1, slot2, slot3, comp, grad, c.n, adam, stream_key);
    case kLion:
      return k::ApplyLion<R>(ex, var, slot1, comp, grad, c.n, lion, stream_key);
  }
  return -1;
}

template <Rounding R>
int RunTypes(const TfBf16EmulatedCall& c, const k::HostEmulator& ex) {
  if (c.var_bf16) {
    return c.grad_bf16 ? Run<R, uint16_t, uint16_t>(c, ex) : Run<R, uint16_t, float>(c, ex);
  }
  return c.grad_bf16 ? Run<R, float, uint16_t>(c, ex) : Run<R, float, float>(c, ex);
}

// The plain host math: every element in index order (sparse: every position
// in order), each with the block key of its own index. Nothing vectorised,
// no threads: an independent statement of what the CPU kernels compute.
template <Rounding R, typename S, typename G>
int Reference(const TfBf16EmulatedCall& c) {
  const RandomKey stream = tf_bf16::MakeStreamKey(c.seed, c.step, c.var_id);
  S* var = static_cast<S*>(c.var);
  S* slot1 = static_cast<S*>(c.slot1);
  S* slot2 = static_cast<S*>(c.slot2);
  S* slot3 = static_cast<S*>(c.slot3);
  auto* comp = static_cast<uint16_t*>(c.compensation);
  const G* grad = static_cast<const G*>(c.grad);
  tf_bf16::SgdScalars sgd{c.lr, c.momentum, c.weight_decay, tf_bf16::MaskOf(c.nesterov != 0),
                          tf_bf16::MaskOf(c.weight_decay != 0.0f)};
  tf_bf16::AdamScalars adam;
  adam.lr = c.lr;
  adam.alpha = c.lr * std::sqrt(1.0f - c.beta2_power) / (1.0f - c.beta1_power);
  adam.one_minus_beta1 = c.one_minus_beta1;
  adam.one_minus_beta2 = c.one_minus_beta2;
  adam.epsilon = c.epsilon;
  adam.weight_decay = c.weight_decay;
  adam.weight_decay_mask = tf_bf16::MaskOf(c.weight_decay != 0.0f);
  tf_bf16::LionScalars lion{c.lr,          c.beta1,        1.0f - c.beta1,
                            c.beta2,       1.0f - c.beta2, c.weight_decay,
                            tf_bf16::MaskOf(c.weight_decay != 0.0f)};
  auto element = [&](int64_t i, const G* g) {
    const RandomKey block = stream.ForBlock(static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32));
    const tf_bf16::ElementBits bits = tf_bf16::ElementBits::Of(block.value, static_cast<uint32_t>(i));
    const float gv = tf_bf16::Load(*g);
    switch (c.op) {
      case kAssignAdd:
        tf_bf16::AssignAddElement<R>(var, comp, gv, i, bits);
        break;
      case kSgd:
        if (slot1) {
          tf_bf16::SgdElement<R, true>(var, slot1, comp, gv, i, sgd, bits);
        } else {
          tf_bf16::SgdElement<R, false>(var, slot1, comp, gv, i, sgd, bits);
        }
        break;
      case kAdam:
        if (slot3) {
          tf_bf16::AdamElement<R, true>(var, slot1, slot2, slot3, comp, gv, i, adam, bits);
        } else {
          tf_bf16::AdamElement<R, false>(var, slot1, slot2, slot3, comp, gv, i, adam, bits);
        }
        break;
      case kLion:
        tf_bf16::LionElement<R>(var, slot1, comp, gv, i, lion, bits);
        break;
    }
  };
  if (c.indices != nullptr) {
    for (int64_t k = 0; k < c.num_indices; ++k) {
      for (int64_t j = 0; j < c.row_size; ++j) {
        element(c.indices[k] * c.row_size + j, grad + k * c.row_size + j);
      }
    }
  } else {
    for (int64_t i = c.first_index; i < c.first_index + c.n; ++i) element(i, grad + i);
  }
  return 0;
}

template <Rounding R>
int ReferenceTypes(const TfBf16EmulatedCall& c) {
  if (c.var_bf16) {
    return c.grad_bf16 ? Reference<R, uint16_t, uint16_t>(c) : Reference<R, uint16_t, float>(c);
  }
  return c.grad_bf16 ? Reference<R, float, uint16_t>(c) : Reference<R, float, float>(c);
}

}  // namespace

extern "C" {

// The plain host math of the same call (not stochastic_round); returns 0.
int tf_bf16_reference(const TfBf16EmulatedCall* call) {
  const TfBf16EmulatedCall& c = *call;
  const unsigned int saved_csr = _mm_getcsr();
  _mm_setcsr(saved_csr | 0x8040);  // FTZ | DAZ
  int status = -1;
  if (c.rounding == 0) status = ReferenceTypes<Rounding::kNearest>(c);
  if (c.rounding == 1) status = ReferenceTypes<Rounding::kStochastic>(c);
  if (c.rounding == 2) status = ReferenceTypes<Rounding::kKahan>(c);
  _mm_setcsr(saved_csr);
  return status;
}

// Returns the chunk width the launcher chose (8: vectorised, 1: one element
// at a time), or -1 for a call it does not know.
int tf_bf16_emulate(const TfBf16EmulatedCall* call) {
  const TfBf16EmulatedCall& c = *call;
  k::HostEmulator ex;
  ex.threads = c.threads > 0 ? c.threads : 1;
  ex.reverse_order = c.reverse_order != 0;
  ex.allow_vector = c.allow_vector != 0;
  ex.first_index = c.first_index;
  ex.chunks_per_trip = c.chunks_per_trip > 1 ? k::kMaxChunksPerTrip : 1;
  const unsigned int saved_csr = _mm_getcsr();
  _mm_setcsr(saved_csr | 0x8040);  // FTZ | DAZ
  int status = -1;
  if (c.op == kRound) {
    status = k::StochasticRound(ex, static_cast<const float*>(c.grad),
                                static_cast<uint16_t*>(c.var), c.n,
                                tf_bf16::MakeStreamKey(c.seed, c.step, c.var_id));
  } else if (c.rounding == 0) {
    status = RunTypes<Rounding::kNearest>(c, ex);
  } else if (c.rounding == 1) {
    status = RunTypes<Rounding::kStochastic>(c, ex);
  } else if (c.rounding == 2) {
    status = RunTypes<Rounding::kKahan>(c, ex);
  }
  _mm_setcsr(saved_csr);
  return status;
}

// sizeof(TfBf16EmulatedCall), so that the test can check its mirror.
int64_t tf_bf16_emulated_call_size() { return sizeof(TfBf16EmulatedCall); }

}  // extern "C"
