// Input validation, variable locking and copy-on-write shared by the tf_bf16
// OpKernels of every device (bf16_training_ops.cc), in the manner of
// tensorflow/core/kernels/training_op_helpers.h. Host code only: everything
// here reads host memory (shapes, dtypes and the .HostMemory scalars) except
// the copy-on-write, which runs on the variable's device through
// functor::Bf16CopyBytes.
//
// Errors name the op input and, where known, the variable, and say that
// nothing was updated: every check runs before anything is written.
#ifndef TF_BF16_CC_KERNELS_BF16_TRAINING_OP_HELPERS_H_
#define TF_BF16_CC_KERNELS_BF16_TRAINING_OP_HELPERS_H_

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "bf16_training_ops.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/mutex.h"

namespace tensorflow {
namespace bf16_ops {

using tf_bf16::Rounding;

// bfloat16 tensors are handed to the functors as their raw uint16_t bits.
template <typename T>
struct StorageOf {
  using type = T;
};
template <>
struct StorageOf<bfloat16> {
  using type = uint16_t;
};

template <typename T>
typename StorageOf<T>::type* StoragePtr(Tensor* t) {
  return reinterpret_cast<typename StorageOf<T>::type*>(t->flat<T>().data());
}
template <typename T>
const typename StorageOf<T>::type* StoragePtr(const Tensor& t) {
  return reinterpret_cast<const typename StorageOf<T>::type*>(t.flat<T>().data());
}

inline absl::Status ParseRounding(OpKernelConstruction* ctx, Rounding* rounding) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("rounding", &name));
  if (name == "nearest") {
    *rounding = Rounding::kNearest;
  } else if (name == "stochastic") {
    *rounding = Rounding::kStochastic;
  } else if (name == "kahan") {
    *rounding = Rounding::kKahan;
  } else {
    return errors::InvalidArgument("Unknown rounding '", name,
                                   "'; use 'nearest', 'stochastic' or 'kahan'.");
  }
  return absl::OkStatus();
}

// Calls fn with the rounding as a compile-time constant.
template <typename Fn>
void DispatchRounding(Rounding rounding, const Fn& fn) {
  switch (rounding) {
    case Rounding::kNearest:
      fn(std::integral_constant<Rounding, Rounding::kNearest>());
      break;
    case Rounding::kStochastic:
      fn(std::integral_constant<Rounding, Rounding::kStochastic>());
      break;
    case Rounding::kKahan:
      fn(std::integral_constant<Rounding, Rounding::kKahan>());
      break;
  }
}

inline std::string Describe(const char* input, const ResourceHandle& handle) {
  return absl::StrCat("input '", input, "' (variable '", handle.name(), "')");
}

// ---------------------------------------------------------------------------
// The value rules of the scalar inputs (docs/rounding.md, section 7, "Allowed
// ranges"), shared by the kernels of every device (the Read*Scalars below) and
// the XLA lowering (bf16_training_ops_xla.cc, for compile-time constants): one
// rule and one message per input. Comparisons are made on the float's bits, so
// the answer does not depend on the thread's denormals-are-zero mode (eager ops
// run on the caller's thread, graph ops on TensorFlow's pool threads, which
// flush denormals) nor on the device: -0 counts as zero, a negative subnormal
// as negative, exactly as the lowering's run-time predicate decides.

inline uint32_t FloatBits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline bool IsFiniteValue(float x) { return (FloatBits(x) & 0x7F800000u) != 0x7F800000u; }
// x < 0, false for -0 and NaN, true for negative subnormals.
inline bool IsNegativeValue(float x) {
  const uint32_t u = FloatBits(x);
  return (u & 0x80000000u) != 0 && (u & 0x7FFFFFFFu) != 0 && (u & 0x7FFFFFFFu) <= 0x7F800000u;
}
inline bool IsZeroValue(float x) { return (FloatBits(x) & 0x7FFFFFFFu) == 0; }
// x > 1 (x finite or +Inf).
inline bool IsAboveOneValue(float x) {
  const uint32_t u = FloatBits(x);
  return (u & 0x80000000u) == 0 && u > 0x3F800000u;
}
inline bool IsAtLeastOneValue(float x) {
  const uint32_t u = FloatBits(x);
  return (u & 0x80000000u) == 0 && u >= 0x3F800000u;
}

inline absl::Status CheckFiniteValue(const char* name, float value, bool non_negative) {
  if (!IsFiniteValue(value) || (non_negative && IsNegativeValue(value))) {
    return errors::InvalidArgument(
        "Input '", name, "' must be a finite", non_negative ? ", non-negative" : "",
        " number, got ", value,
        ". Check the optimizer's hyperparameters and learning-rate schedule; the "
        "variables were not updated.");
  }
  return absl::OkStatus();
}

// Adam: 1 - beta in (0, 1], i.e. beta in [0, 1).
inline absl::Status CheckOneMinusBetas(float one_minus_beta1, float one_minus_beta2) {
  for (float x : {one_minus_beta1, one_minus_beta2}) {
    if (IsNegativeValue(x) || IsZeroValue(x) || IsAboveOneValue(x)) {
      return errors::InvalidArgument(
          "Inputs 'one_minus_beta1' and 'one_minus_beta2' must be in (0, 1], got ",
          one_minus_beta1, " and ", one_minus_beta2,
          ": beta_1 and beta_2 must be in [0, 1) (beta 1 never updates the moment; beta > 1 "
          "diverges). The variables were not updated.");
    }
  }
  return absl::OkStatus();
}

// Adam's step: the 0-based iteration count, from which the bias correction
// beta ** (step + 1) is computed. A negative step gives powers above 1 and NaN.
inline absl::Status CheckAdamStep(int64_t step) {
  if (step < 0) {
    return errors::InvalidArgument(
        "Input 'step' is ", step,
        "; Adam's step is the 0-based iteration count (>= 0), which the bias "
        "correction beta ** (step + 1) needs. The variables were not updated.");
  }
  return absl::OkStatus();
}

// beta1_power = beta_1 ** (step + 1) in [0, 1) (1 divides by zero; above 1 the
// step changes sign); beta2_power = beta_2 ** (step + 1) in [0, 1] (above 1 its
// square root is NaN).
inline absl::Status CheckBiasCorrectionPowers(float beta1_power, float beta2_power) {
  if (beta1_power == 1.0f) {
    return errors::InvalidArgument(
        "Input 'beta1_power' is 1, which divides the bias correction by zero; pass "
        "beta_1 ** (step + 1) with beta_1 < 1.");
  }
  if (IsNegativeValue(beta1_power) || IsAtLeastOneValue(beta1_power)) {
    return errors::InvalidArgument(
        "Input 'beta1_power' must be in [0, 1), got ", beta1_power,
        ": it is beta_1 ** (step + 1) with beta_1 in [0, 1) and step >= 0. The variables "
        "were not updated.");
  }
  if (IsNegativeValue(beta2_power) || IsAboveOneValue(beta2_power)) {
    return errors::InvalidArgument(
        "Input 'beta2_power' must be in [0, 1], got ", beta2_power,
        ": it is beta_2 ** (step + 1) with beta_2 in [0, 1) and step >= 0. The variables "
        "were not updated.");
  }
  return absl::OkStatus();
}

// Adam's step size alpha = lr * sqrt(1 - beta2_power) / (1 - beta1_power) must
// be finite: a learning rate near the float32 maximum overflows it to Inf, and
// every weight would become -Inf or NaN.
inline absl::Status CheckAdamStepSize(float alpha, float lr, float beta1_power,
                                      float beta2_power) {
  if (!IsFiniteValue(alpha)) {
    return errors::InvalidArgument(
        "Adam's step size lr * sqrt(1 - beta2_power) / (1 - beta1_power) = ", alpha,
        " is not finite (input 'lr' = ", lr, ", 'beta1_power' = ", beta1_power,
        ", 'beta2_power' = ", beta2_power,
        "): lower the learning rate. The variables were not updated.");
  }
  return absl::OkStatus();
}

inline absl::Status CheckLionBetas(float beta1, float beta2) {
  if (IsNegativeValue(beta1) || IsAboveOneValue(beta1) || IsNegativeValue(beta2) ||
      IsAboveOneValue(beta2)) {
    return errors::InvalidArgument("Inputs 'beta1' and 'beta2' must be in [0, 1], got ", beta1,
                                   " and ", beta2, ". The variables were not updated.");
  }
  return absl::OkStatus();
}

// Scalar inputs are registered with .HostMemory on every device: these reads
// are host reads.
inline absl::Status ReadFiniteScalar(OpKernelContext* ctx, const char* name, float* value,
                                     bool non_negative = false) {
  const Tensor* t;
  TF_RETURN_IF_ERROR(ctx->input(name, &t));
  if (!TensorShapeUtils::IsScalar(t->shape())) {
    return errors::InvalidArgument("Input '", name, "' must be a scalar, got shape ",
                                   t->shape().DebugString(), ".");
  }
  *value = t->scalar<float>()();
  return CheckFiniteValue(name, *value, non_negative);
}

inline absl::Status ReadInt64Scalar(OpKernelContext* ctx, const char* name, int64_t* value) {
  const Tensor* t;
  TF_RETURN_IF_ERROR(ctx->input(name, &t));
  if (!TensorShapeUtils::IsScalar(t->shape())) {
    return errors::InvalidArgument("Input '", name, "' must be a scalar, got shape ",
                                   t->shape().DebugString(), ".");
  }
  *value = t->scalar<int64_t>()();
  return absl::OkStatus();
}

// The stream key of the call (docs/rounding.md 3.2), from its seed, step and var_id inputs.
inline absl::Status ReadStreamKey(OpKernelContext* ctx, tf_bf16::RandomKey* stream_key) {
  int64_t seed, step, var_id;
  TF_RETURN_IF_ERROR(ReadInt64Scalar(ctx, "seed", &seed));
  TF_RETURN_IF_ERROR(ReadInt64Scalar(ctx, "step", &step));
  TF_RETURN_IF_ERROR(ReadInt64Scalar(ctx, "var_id", &var_id));
  *stream_key = tf_bf16::MakeStreamKey(seed, step, var_id);
  return absl::OkStatus();
}

// The resource variables one op updates, looked up, locked in a global order
// (so that concurrent ops on overlapping variables cannot deadlock) and
// checked, all before anything is written.
class LockedVariables {
 public:
  struct Entry {
    const char* input;
    ResourceHandle handle;
    core::RefCountPtr<Var> var;
  };

  // Looks up every resource in input (list) `name`. Returns the number found.
  absl::Status Add(OpKernelContext* ctx, const char* name, int* count = nullptr) {
    int start, stop;
    TF_RETURN_IF_ERROR(ctx->op_kernel().InputRange(name, &start, &stop));
    for (int i = start; i < stop; ++i) {
      const ResourceHandle& handle = HandleFromInput(ctx, i);
      core::RefCountPtr<Var> var;
      absl::Status s = LookupResource(ctx, handle, &var);
      if (!s.ok()) {
        return errors::InvalidArgument(
            "Could not find ", Describe(name, handle),
            ": it was never initialized or has been deleted. Initialize the variable "
            "(e.g. build the model and optimizer) before updating it. ",
            s.message());
      }
      entries_.push_back(Entry{name, handle, std::move(var)});
    }
    if (count) *count = stop - start;
    return absl::OkStatus();
  }

  // Every input names a different variable: the same variable in two roles
  // (compensation = var, m = v, accum = var, ...) would have each element read
  // and written twice by one update. Refused, naming both inputs.
  absl::Status CheckDistinct() const {
    for (size_t a = 0; a < entries_.size(); ++a) {
      for (size_t b = a + 1; b < entries_.size(); ++b) {
        if (entries_[a].var.get() != entries_[b].var.get()) continue;
        return errors::InvalidArgument(
            "Inputs '", entries_[a].input, "' and '", entries_[b].input,
            "' are the same variable ('", entries_[a].handle.name(),
            "'): the weight, each optimizer slot and the compensation buffer must be "
            "different variables. Nothing was updated.");
      }
    }
    return absl::OkStatus();
  }

  void LockAll() {
    std::vector<mutex*> mus;
    for (auto& e : entries_) mus.push_back(e.var->mu());
    std::sort(mus.begin(), mus.end());
    mus.erase(std::unique(mus.begin(), mus.end()), mus.end());
    for (mutex* mu : mus) locks_.emplace_back(*mu);
  }

  // Checks dtype and shape of every entry of input `name` (var's shape by
  // default). Must be called with the locks held.
  absl::Status Check(const char* name, DataType dtype, const TensorShape* shape) const {
    for (const auto& e : entries_) {
      if (std::strcmp(e.input, name) != 0) continue;
      const Tensor* t = e.var->tensor();
      if (!e.var->is_initialized || !t->IsInitialized()) {
        return errors::InvalidArgument(Describe(name, e.handle),
                                       " is not initialized; assign it a value first. "
                                       "Nothing was updated.");
      }
      if (t->dtype() != dtype) {
        return errors::InvalidArgument(
            Describe(name, e.handle), " has dtype ", DataTypeString(t->dtype()),
            " but ", DataTypeString(dtype),
            " was expected. tf_bf16 updates bfloat16 and float32 variables; optimizer "
            "slots and Kahan compensation buffers must match (compensation: bfloat16). "
            "Nothing was updated.");
      }
      if (shape && t->shape() != *shape) {
        return errors::InvalidArgument(Describe(name, e.handle), " has shape ",
                                       t->shape().DebugString(), " but ",
                                       shape->DebugString(),
                                       " was expected (the shape of 'var'). Nothing was "
                                       "updated.");
      }
    }
    return absl::OkStatus();
  }

  // After all checks pass: a variable whose buffer is shared with a tensor
  // that was read from it earlier gets its own copy first, so in-place writes
  // never change a value somebody else holds (as TensorFlow's own training
  // ops do). The copy is made on the op's device, where the variable lives.
  template <typename Device>
  absl::Status PrepareForInPlaceUpdate(OpKernelContext* ctx) {
    for (auto& e : entries_) {
      Tensor* t = e.var->tensor();
      if (t->RefCountIsOne()) continue;
      Tensor copy;
      AllocatorAttributes attr;
      attr.set_gpu_compatible(true);
      attr.set_nic_compatible(true);
      TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &copy, attr));
      if (t->TotalBytes() > 0) {
        TF_RETURN_IF_ERROR(functor::Bf16CopyBytes<Device>()(
            ctx->eigen_device<Device>(), copy.data(), t->data(),
            static_cast<int64_t>(t->TotalBytes())));
      }
      *t = copy;
    }
    return absl::OkStatus();
  }

  Tensor* Get(const char* name, int k = 0) {
    for (auto& e : entries_) {
      if (std::strcmp(e.input, name) == 0 && k-- == 0) return e.var->tensor();
    }
    return nullptr;
  }

 private:
  std::vector<Entry> entries_;
  std::vector<mutex_lock> locks_;
};

inline absl::Status CheckCompensationCount(Rounding rounding, DataType dtype, int count) {
  if (rounding == Rounding::kKahan && dtype == DT_BFLOAT16 && count != 1) {
    return errors::InvalidArgument(
        "rounding='kahan' on a bfloat16 variable needs exactly one compensation "
        "variable (bfloat16, the variable's shape, initialized to zeros); got ",
        count, ".");
  }
  if ((rounding != Rounding::kKahan || dtype != DT_BFLOAT16) && count != 0) {
    return errors::InvalidArgument(
        "A compensation variable is only used with rounding='kahan' on a bfloat16 "
        "variable; got ",
        count, " with this rounding and dtype ", DataTypeString(dtype),
        ". Remove it, or use rounding='kahan'.");
  }
  return absl::OkStatus();
}

inline absl::Status CheckGradient(const Tensor& grad, const TensorShape& expected,
                                  const char* name = "grad") {
  if (grad.shape() != expected) {
    return errors::InvalidArgument("Input '", name, "' has shape ",
                                   grad.shape().DebugString(), " but ",
                                   expected.DebugString(),
                                   " was expected (the shape of 'var'). Nothing was "
                                   "updated.");
  }
  return absl::OkStatus();
}

inline uint16_t* CompensationPtr(LockedVariables& vars) {
  Tensor* c = vars.Get("compensation");
  return c ? StoragePtr<bfloat16>(c) : nullptr;
}

// The shape checks of a sparse update that need no index values (those are
// checked on the device by functor::Bf16GroupSparseIndices).
inline absl::Status CheckSparseShapes(const Tensor& grad, const Tensor& indices,
                                      const TensorShape& var_shape) {
  if (var_shape.dims() < 1) {
    return errors::InvalidArgument("Sparse updates need 'var' of rank >= 1, got shape ",
                                   var_shape.DebugString(), ".");
  }
  if (!TensorShapeUtils::IsVector(indices.shape())) {
    return errors::InvalidArgument("Input 'indices' must be a vector, got shape ",
                                   indices.shape().DebugString(), ".");
  }
  TensorShape expected = var_shape;
  expected.set_dim(0, indices.NumElements());
  return CheckGradient(grad, expected);
}

inline absl::Status ReadSgdScalars(OpKernelContext* ctx, bool use_momentum, bool use_nesterov,
                                   tf_bf16::SgdScalars* p) {
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "lr", &p->lr, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "momentum", &p->momentum));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "weight_decay", &p->weight_decay));
  p->nesterov_mask = tf_bf16::MaskOf(use_nesterov);
  p->weight_decay_mask = tf_bf16::MaskOf(p->weight_decay != 0.0f);
  if (use_nesterov && !use_momentum) {
    return errors::InvalidArgument(
        "use_nesterov=True needs a momentum accumulator ('accum').");
  }
  return absl::OkStatus();
}

inline absl::Status ReadAdamScalars(OpKernelContext* ctx, tf_bf16::AdamScalars* p) {
  float beta1_power, beta2_power;
  int64_t step;
  TF_RETURN_IF_ERROR(ReadInt64Scalar(ctx, "step", &step));
  TF_RETURN_IF_ERROR(CheckAdamStep(step));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "beta1_power", &beta1_power));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "beta2_power", &beta2_power));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "lr", &p->lr, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "one_minus_beta1", &p->one_minus_beta1));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "one_minus_beta2", &p->one_minus_beta2));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "epsilon", &p->epsilon, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "weight_decay", &p->weight_decay));
  TF_RETURN_IF_ERROR(CheckOneMinusBetas(p->one_minus_beta1, p->one_minus_beta2));
  TF_RETURN_IF_ERROR(CheckBiasCorrectionPowers(beta1_power, beta2_power));
  // Scalar math in float32, in the order of tf.raw_ops.ResourceApplyAdam, on
  // the host for every device; 1 - beta comes from the caller, computed as
  // Keras computes it (docs/rounding.md 5.3).
  p->alpha = p->lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power);
  TF_RETURN_IF_ERROR(CheckAdamStepSize(p->alpha, p->lr, beta1_power, beta2_power));
  p->weight_decay_mask = tf_bf16::MaskOf(p->weight_decay != 0.0f);
  return absl::OkStatus();
}

inline absl::Status ReadLionScalars(OpKernelContext* ctx, tf_bf16::LionScalars* p) {
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "lr", &p->lr, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "beta1", &p->beta1));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "beta2", &p->beta2));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "weight_decay", &p->weight_decay));
  TF_RETURN_IF_ERROR(CheckLionBetas(p->beta1, p->beta2));
  p->one_minus_beta1 = 1.0f - p->beta1;
  p->one_minus_beta2 = 1.0f - p->beta2;
  p->weight_decay_mask = tf_bf16::MaskOf(p->weight_decay != 0.0f);
  return absl::OkStatus();
}

// The message of a bad sparse index, the same on every device.
inline absl::Status BadIndexError(int64_t position, int64_t value, int64_t rows) {
  return errors::InvalidArgument("Input 'indices'[", position, "] = ", value,
                                 " is not in [0, ", rows,
                                 "), the rows of 'var'. Nothing was updated.");
}

}  // namespace bf16_ops
}  // namespace tensorflow

#endif  // TF_BF16_CC_KERNELS_BF16_TRAINING_OP_HELPERS_H_
