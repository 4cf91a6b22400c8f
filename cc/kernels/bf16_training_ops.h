// Functors of the tf_bf16 update ops, one specialization per device, in the
// manner of tensorflow/core/kernels/training_ops.h: the CPU specializations
// live in bf16_training_ops.cc, the GPU ones in bf16_training_ops_gpu.cu.cc
// (which runs the CUDA kernels of bf16_update_kernels.cu.h). The per-element
// math they all run lives in bf16_update_math.h.
#ifndef TF_BF16_CC_KERNELS_BF16_TRAINING_OPS_H_
#define TF_BF16_CC_KERNELS_BF16_TRAINING_OPS_H_

#include <cstdint>

#include "bf16_update_math.h"
#include "tensorflow/core/framework/tensor.h"

namespace tensorflow {

class OpKernelContext;

namespace functor {

// Every functor returns an error only for a failure of the device (a CUDA
// launch or copy); inputs are validated before a functor is called.
//
// Pointers address a variable's storage on the functor's device: float for
// float32 tensors, raw uint16_t bit patterns for bfloat16 ones. Optional
// tensors (accum, compensation, vhat) are nullptr when absent. `stream_key` is
// the call's stream key (tf_bf16::MakeStreamKey); the functors derive the block
// key of each 2^32-element block themselves.

template <typename Device>
struct Bf16StochasticRound {
  absl::Status operator()(const Device& d, const float* x, uint16_t* y, int64_t n,
                  tf_bf16::RandomKey stream_key);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename D>
struct Bf16RoundedAssignAdd {
  absl::Status operator()(const Device& d, S* var, uint16_t* compensation, const D* delta,
                  int64_t n, tf_bf16::RandomKey stream_key);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16ApplySgd {
  absl::Status operator()(const Device& d, S* var, S* accum, uint16_t* compensation,
                  const G* grad, int64_t n, const tf_bf16::SgdScalars& scalars,
                  tf_bf16::RandomKey stream_key);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16ApplyAdam {
  absl::Status operator()(const Device& d, S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                  const G* grad, int64_t n, const tf_bf16::AdamScalars& scalars,
                  tf_bf16::RandomKey stream_key);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16ApplyLion {
  absl::Status operator()(const Device& d, S* var, S* m, uint16_t* compensation, const G* grad,
                  int64_t n, const tf_bf16::LionScalars& scalars,
                  tf_bf16::RandomKey stream_key);
};

// Copy-on-write of a variable buffer that another tensor still shares: a copy
// of `bytes` bytes from src to dst, both on the device, ordered before any
// later work of the op on that device.
template <typename Device>
struct Bf16CopyBytes {
  absl::Status operator()(const Device& d, void* dst, const void* src, int64_t bytes);
};

// The sparse indices of one call, validated and grouped, in device memory of
// the op's device. Positions 0..n-1 of `indices`, stably sorted by index, are
// `order`; `group_starts` (num_groups + 1 entries) delimits runs of equal
// indices in `order`, and `group_rows[g]` is the variable row of group g.
// Groups touch disjoint rows and can run in parallel; the positions of one
// group are applied one after another, in order (duplicates in order).
struct SparseIndexGroups {
  Tensor storage;  // owns the arrays below
  const int64_t* order = nullptr;
  const int64_t* group_starts = nullptr;
  const int64_t* group_rows = nullptr;
  int64_t num_groups = 0;
};

// Validates `indices` (a vector, on the op's device) against [0, rows) and
// groups them. A bad index gives InvalidArgument naming 'indices' and its
// first bad position; the caller then writes nothing.
template <typename Device, typename Index>
struct Bf16GroupSparseIndices {
  absl::Status operator()(OpKernelContext* ctx, const Tensor& indices, int64_t rows,
                          SparseIndexGroups* groups);
};

// Sparse updates touch rows group_rows[g] of a [rows, row_size] view of the
// variable; `grad` is [num_indices, row_size], row k the gradient of
// position k.
template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16SparseApplySgd {
  absl::Status operator()(const Device& d, S* var, S* accum, uint16_t* compensation,
                  const G* grad, const SparseIndexGroups& groups, int64_t row_size,
                  const tf_bf16::SgdScalars& scalars, tf_bf16::RandomKey stream_key);
};

template <typename Device, tf_bf16::Rounding R, typename S, typename G>
struct Bf16SparseApplyAdam {
  absl::Status operator()(const Device& d, S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                  const G* grad, const SparseIndexGroups& groups, int64_t row_size,
                  const tf_bf16::AdamScalars& scalars, tf_bf16::RandomKey stream_key);
};

}  // namespace functor
}  // namespace tensorflow

#endif  // TF_BF16_CC_KERNELS_BF16_TRAINING_OPS_H_
