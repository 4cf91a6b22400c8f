// Functors of the tf_bf16 update ops, one specialization per device, in the
// manner of tensorflow/core/kernels/training_ops.h. The per-element math they
// all run lives in bf16_update_math.h.
#ifndef TF_BF16_CC_KERNELS_BF16_TRAINING_OPS_H_
#define TF_BF16_CC_KERNELS_BF16_TRAINING_OPS_H_

#include <cstdint>

#include "bf16_update_math.h"

namespace tensorflow {
namespace functor {

// Pointers address a variable's storage: float for float32 tensors, raw
// uint16_t bit patterns for bfloat16 ones. Optional tensors (accum,
// compensation, vhat) are nullptr when absent.

template <typename Device>
struct Bf16StochasticRound {
  void operator()(const Device& d, const float* x, uint16_t* y, int64_t n,
                  uint32_t stream_key);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename D>
struct Bf16RoundedAssignAdd {
  void operator()(const Device& d, S* var, uint16_t* compensation, const D* delta,
                  int64_t n, const tf_bf16::StreamKeys& keys);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16ApplySgd {
  void operator()(const Device& d, S* var, S* accum, uint16_t* compensation,
                  const G* grad, int64_t n, const tf_bf16::SgdScalars& scalars,
                  const tf_bf16::StreamKeys& keys);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16ApplyAdam {
  void operator()(const Device& d, S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                  const G* grad, int64_t n, const tf_bf16::AdamScalars& scalars,
                  const tf_bf16::StreamKeys& keys);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16ApplyLion {
  void operator()(const Device& d, S* var, S* m, uint16_t* compensation, const G* grad,
                  int64_t n, const tf_bf16::LionScalars& scalars,
                  const tf_bf16::StreamKeys& keys);
};

// Sparse updates touch rows indices[k] of a [rows, row_size] view of the
// variable; `grad` is [num_indices, row_size]. Duplicate indices are applied
// in order; `order` lists the positions 0..num_indices-1 stably sorted by
// index and `group_starts` (num_groups + 1 entries) delimits equal indices.
template <typename Device, tf_bf16::Rounding R, typename S, typename G, typename Index>
struct Bf16SparseApplySgd {
  void operator()(const Device& d, S* var, S* accum, uint16_t* compensation,
                  const G* grad, const Index* indices, const int64_t* order,
                  const int64_t* group_starts, int64_t num_groups, int64_t row_size,
                  const tf_bf16::SgdScalars& scalars, const tf_bf16::StreamKeys& keys);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G, typename Index>
struct Bf16SparseApplyAdam {
  void operator()(const Device& d, S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                  const G* grad, const Index* indices, const int64_t* order,
                  const int64_t* group_starts, int64_t num_groups, int64_t row_size,
                  const tf_bf16::AdamScalars& scalars, const tf_bf16::StreamKeys& keys);
};

}  // namespace functor
}  // namespace tensorflow

#endif  // TF_BF16_CC_KERNELS_BF16_TRAINING_OPS_H_
