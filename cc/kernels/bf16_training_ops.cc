// CPU kernels and registration of the tf_bf16 ops (cc/ops/bf16_training_ops.cc).
//
// Every kernel validates all of its inputs before it writes anything, so a
// bad call leaves the variables untouched. Work is split over TensorFlow's
// intra-op thread pool; the random bits depend only on (seed, step, var_id,
// element index), never on how the work was split.
#define EIGEN_USE_THREADS

#include "bf16_training_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/denormal.h"
#include "tensorflow/core/platform/mutex.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {

using CPUDevice = Eigen::ThreadPoolDevice;
using tf_bf16::Rounding;

namespace {

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

absl::Status ParseRounding(OpKernelConstruction* ctx, Rounding* rounding) {
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

// Runs body(begin, end, lane_keys) over [0, n) on the intra-op pool, cutting
// blocks at multiples of 2^32 so each block has one set of lane keys.
// Arithmetic is done with denormals flushed, as in every TensorFlow CPU op,
// whichever thread the block lands on.
template <typename Body>
void ParallelElements(const CPUDevice& d, int64_t n, double bytes_loaded,
                      double bytes_stored, double cycles,
                      const tf_bf16::StreamKeys& keys, const Body& body) {
  if (n <= 0) return;
  auto run = [&keys, &body](Eigen::Index begin, Eigen::Index end) {
    port::ScopedFlushDenormal flush;
    while (begin < end) {
      const uint64_t high = static_cast<uint64_t>(begin) >> 32;
      const Eigen::Index block_end =
          std::min<Eigen::Index>(end, static_cast<Eigen::Index>((high + 1) << 32));
      body(static_cast<int64_t>(begin), static_cast<int64_t>(block_end),
           keys.ForBlock(static_cast<uint32_t>(high)));
      begin = block_end;
    }
  };
  d.parallelFor(n, Eigen::TensorOpCost(bytes_loaded, bytes_stored, cycles), run);
}

}  // namespace

namespace functor {

template <>
struct Bf16StochasticRound<CPUDevice> {
  void operator()(const CPUDevice& d, const float* x, uint16_t* y, int64_t n,
                  uint32_t stream_key) {
    tf_bf16::StreamKeys keys{stream_key, 0, 0, 0};
    ParallelElements(d, n, 4, 2, 12, keys,
                     [x, y](int64_t begin, int64_t end, const tf_bf16::LaneKeys& k) {
                       const uint32_t key = k.weight;
                       for (int64_t i = begin; i < end; ++i) {
                         y[i] = tf_bf16::RoundStochasticToBf16(
                             x[i], tf_bf16::RandomBits16(key, static_cast<uint32_t>(i)));
                       }
                     });
  }
};

// Calls fn(std::true_type) or fn(std::false_type).
template <typename Fn>
void DispatchBool(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type());
  } else {
    fn(std::false_type());
  }
}

// The Nesterov and weight-decay masks, made compile-time constants inside a
// loop: the compiler then drops the arithmetic of the branch not taken.
template <bool kNesterov, bool kDecay, typename Scalars>
Scalars WithConstantMasks(Scalars p) {
  p.weight_decay_mask = kDecay ? ~0u : 0u;
  if constexpr (std::is_same_v<Scalars, tf_bf16::SgdScalars>) {
    p.nesterov_mask = kNesterov ? ~0u : 0u;
  }
  return p;
}

// The loops below copy scalars and keys into locals and qualify pointers
// __restrict__ so that the compiler can keep them in registers and vectorize;
// the element functions are branch-free for the same reason.

template <Rounding R, typename S, typename D>
struct Bf16RoundedAssignAdd<CPUDevice, R, S, D> {
  void operator()(const CPUDevice& d, S* var, uint16_t* compensation, const D* delta,
                  int64_t n, const tf_bf16::StreamKeys& keys) {
    const double state = sizeof(S) + (R == Rounding::kKahan ? 2 : 0);
    ParallelElements(d, n, state + sizeof(D), state, 8, keys,
                     [=](int64_t begin, int64_t end, const tf_bf16::LaneKeys& lane_keys) {
                       const tf_bf16::LaneKeys k = lane_keys;
                       S* __restrict__ w = var;
                       uint16_t* __restrict__ c = compensation;
                       const D* __restrict__ dl = delta;
                       uint32_t lo = static_cast<uint32_t>(begin);
                       for (int64_t i = begin; i < end; ++i, ++lo) {
                         tf_bf16::AssignAddElement<R>(w, c, tf_bf16::Load(dl[i]), i, lo, k);
                       }
                     });
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplySgd<CPUDevice, R, S, G> {
  void operator()(const CPUDevice& d, S* var, S* accum, uint16_t* compensation,
                  const G* grad, int64_t n, const tf_bf16::SgdScalars& p,
                  const tf_bf16::StreamKeys& keys) {
    const double state = sizeof(S) * (accum ? 2 : 1) + (R == Rounding::kKahan ? 2 : 0);
    auto run = [&](auto use_momentum, auto nesterov, auto decay) {
      constexpr bool kUseMomentum = decltype(use_momentum)::value;
      constexpr bool kNesterov = decltype(nesterov)::value;
      constexpr bool kDecay = decltype(decay)::value;
      ParallelElements(d, n, state + sizeof(G), state, 10, keys,
                       [=](int64_t begin, int64_t end, const tf_bf16::LaneKeys& lane_keys) {
                         const tf_bf16::LaneKeys k = lane_keys;
                         const tf_bf16::SgdScalars sp = WithConstantMasks<kNesterov, kDecay>(p);
                         S* __restrict__ w = var;
                         S* __restrict__ a = accum;
                         uint16_t* __restrict__ c = compensation;
                         const G* __restrict__ g = grad;
                         uint32_t lo = static_cast<uint32_t>(begin);
                         for (int64_t i = begin; i < end; ++i, ++lo) {
                           tf_bf16::SgdElement<R, kUseMomentum>(w, a, c, tf_bf16::Load(g[i]),
                                                                i, lo, sp, k);
                         }
                       });
    };
    DispatchBool(p.weight_decay_mask != 0, [&](auto decay) {
      if (!accum) {
        run(std::false_type(), std::false_type(), decay);
      } else {
        DispatchBool(p.nesterov_mask != 0,
                     [&](auto nesterov) { run(std::true_type(), nesterov, decay); });
      }
    });
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplyAdam<CPUDevice, R, S, G> {
  void operator()(const CPUDevice& d, S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                  const G* grad, int64_t n, const tf_bf16::AdamScalars& p,
                  const tf_bf16::StreamKeys& keys) {
    const double state = sizeof(S) * (vhat ? 4 : 3) + (R == Rounding::kKahan ? 2 : 0);
    auto run = [&](auto amsgrad, auto decay) {
      constexpr bool kAmsgrad = decltype(amsgrad)::value;
      constexpr bool kDecay = decltype(decay)::value;
      ParallelElements(d, n, state + sizeof(G), state, 20, keys,
                       [=](int64_t begin, int64_t end, const tf_bf16::LaneKeys& lane_keys) {
                         const tf_bf16::LaneKeys k = lane_keys;
                         const tf_bf16::AdamScalars sp = WithConstantMasks<false, kDecay>(p);
                         S* __restrict__ w = var;
                         S* __restrict__ m1 = m;
                         S* __restrict__ m2 = v;
                         S* __restrict__ mx = vhat;
                         uint16_t* __restrict__ c = compensation;
                         const G* __restrict__ g = grad;
                         uint32_t lo = static_cast<uint32_t>(begin);
                         for (int64_t i = begin; i < end; ++i, ++lo) {
                           tf_bf16::AdamElement<R, kAmsgrad>(w, m1, m2, mx, c,
                                                             tf_bf16::Load(g[i]), i, lo, sp, k);
                         }
                       });
    };
    DispatchBool(vhat != nullptr, [&](auto amsgrad) {
      DispatchBool(p.weight_decay_mask != 0, [&](auto decay) { run(amsgrad, decay); });
    });
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplyLion<CPUDevice, R, S, G> {
  void operator()(const CPUDevice& d, S* var, S* m, uint16_t* compensation, const G* grad,
                  int64_t n, const tf_bf16::LionScalars& p,
                  const tf_bf16::StreamKeys& keys) {
    const double state = sizeof(S) * 2 + (R == Rounding::kKahan ? 2 : 0);
    DispatchBool(p.weight_decay_mask != 0, [&](auto decay) {
      constexpr bool kDecay = decltype(decay)::value;
      ParallelElements(d, n, state + sizeof(G), state, 10, keys,
                       [=](int64_t begin, int64_t end, const tf_bf16::LaneKeys& lane_keys) {
                         const tf_bf16::LaneKeys k = lane_keys;
                         const tf_bf16::LionScalars sp = WithConstantMasks<false, kDecay>(p);
                         S* __restrict__ w = var;
                         S* __restrict__ m1 = m;
                         uint16_t* __restrict__ c = compensation;
                         const G* __restrict__ g = grad;
                         uint32_t lo = static_cast<uint32_t>(begin);
                         for (int64_t i = begin; i < end; ++i, ++lo) {
                           tf_bf16::LionElement<R>(w, m1, c, tf_bf16::Load(g[i]), i, lo, sp,
                                                   k);
                         }
                       });
    });
  }
};

// Sparse updates run over groups of equal indices in parallel; within a
// group, positions are applied in their original order. row_body(first, k,
// lane_keys_for(i)) updates the row starting at flat element `first` with
// gradient row k.
template <typename RowBody>
void ParallelRowGroups(const CPUDevice& d, int64_t num_groups, int64_t row_size,
                       double bytes_per_element, const RowBody& row_body) {
  if (num_groups <= 0) return;
  auto run = [&row_body](Eigen::Index begin, Eigen::Index end) {
    port::ScopedFlushDenormal flush;
    for (Eigen::Index group = begin; group < end; ++group) row_body(group);
  };
  d.parallelFor(num_groups,
                Eigen::TensorOpCost(bytes_per_element * row_size, bytes_per_element * row_size,
                                    30.0 * row_size),
                run);
}

// Calls element(i, j, lane_keys) for the row's elements i = first + j, with
// the lane keys of i's 2^32-element block (computed once per row unless the
// row straddles a block boundary).
template <typename Element>
void ForRowElements(int64_t first, int64_t row_size, const tf_bf16::StreamKeys& keys,
                    const Element& element) {
  if (row_size <= 0) return;
  const uint64_t high_first = static_cast<uint64_t>(first) >> 32;
  const uint64_t high_last = static_cast<uint64_t>(first + row_size - 1) >> 32;
  if (high_first == high_last) {
    const tf_bf16::LaneKeys k = keys.ForBlock(static_cast<uint32_t>(high_first));
    for (int64_t j = 0; j < row_size; ++j) element(first + j, j, k);
  } else {
    for (int64_t j = 0; j < row_size; ++j) {
      const int64_t i = first + j;
      element(i, j, keys.ForBlock(static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32)));
    }
  }
}

template <Rounding R, typename S, typename G, typename Index>
struct Bf16SparseApplySgd<CPUDevice, R, S, G, Index> {
  void operator()(const CPUDevice& d, S* var, S* accum, uint16_t* compensation,
                  const G* grad, const Index* indices, const int64_t* order,
                  const int64_t* group_starts, int64_t num_groups, int64_t row_size,
                  const tf_bf16::SgdScalars& p, const tf_bf16::StreamKeys& keys) {
    auto run = [&](auto use_momentum) {
      constexpr bool kUseMomentum = decltype(use_momentum)::value;
      ParallelRowGroups(d, num_groups, row_size, 3 * sizeof(S), [&](int64_t group) {
        const tf_bf16::SgdScalars sp = p;
        for (int64_t pos = group_starts[group]; pos < group_starts[group + 1]; ++pos) {
          const int64_t k = order[pos];
          const G* g = grad + k * row_size;
          ForRowElements(static_cast<int64_t>(indices[k]) * row_size, row_size, keys,
                         [&](int64_t i, int64_t j, const tf_bf16::LaneKeys& lane_keys) {
                           tf_bf16::SgdElement<R, kUseMomentum>(
                               var, accum, compensation, tf_bf16::Load(g[j]), i,
                               static_cast<uint32_t>(i), sp, lane_keys);
                         });
        }
      });
    };
    if (accum) {
      run(std::true_type());
    } else {
      run(std::false_type());
    }
  }
};

template <Rounding R, typename S, typename G, typename Index>
struct Bf16SparseApplyAdam<CPUDevice, R, S, G, Index> {
  void operator()(const CPUDevice& d, S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                  const G* grad, const Index* indices, const int64_t* order,
                  const int64_t* group_starts, int64_t num_groups, int64_t row_size,
                  const tf_bf16::AdamScalars& p, const tf_bf16::StreamKeys& keys) {
    auto run = [&](auto amsgrad) {
      constexpr bool kAmsgrad = decltype(amsgrad)::value;
      ParallelRowGroups(d, num_groups, row_size, 4 * sizeof(S), [&](int64_t group) {
        const tf_bf16::AdamScalars sp = p;
        for (int64_t pos = group_starts[group]; pos < group_starts[group + 1]; ++pos) {
          const int64_t k = order[pos];
          const G* g = grad + k * row_size;
          ForRowElements(static_cast<int64_t>(indices[k]) * row_size, row_size, keys,
                         [&](int64_t i, int64_t j, const tf_bf16::LaneKeys& lane_keys) {
                           tf_bf16::AdamElement<R, kAmsgrad>(var, m, v, vhat, compensation,
                                                             tf_bf16::Load(g[j]), i,
                                                             static_cast<uint32_t>(i), sp,
                                                             lane_keys);
                         });
        }
      });
    };
    if (vhat) {
      run(std::true_type());
    } else {
      run(std::false_type());
    }
  }
};

}  // namespace functor

namespace {

// ---------------------------------------------------------------------------
// Input validation. Errors name the op input and, where known, the variable.

std::string Describe(const char* input, const ResourceHandle& handle) {
  return absl::StrCat("input '", input, "' (variable '", handle.name(), "')");
}

absl::Status ReadFiniteScalar(OpKernelContext* ctx, const char* name, float* value,
                              bool non_negative = false) {
  const Tensor* t;
  TF_RETURN_IF_ERROR(ctx->input(name, &t));
  if (!TensorShapeUtils::IsScalar(t->shape())) {
    return errors::InvalidArgument("Input '", name, "' must be a scalar, got shape ",
                                   t->shape().DebugString(), ".");
  }
  *value = t->scalar<float>()();
  if (!std::isfinite(*value) || (non_negative && *value < 0.0f)) {
    return errors::InvalidArgument(
        "Input '", name, "' must be a finite", non_negative ? ", non-negative" : "",
        " number, got ", *value,
        ". Check the optimizer's hyperparameters and learning-rate schedule; the "
        "variables were not updated.");
  }
  return absl::OkStatus();
}

absl::Status ReadInt64Scalar(OpKernelContext* ctx, const char* name, int64_t* value) {
  const Tensor* t;
  TF_RETURN_IF_ERROR(ctx->input(name, &t));
  if (!TensorShapeUtils::IsScalar(t->shape())) {
    return errors::InvalidArgument("Input '", name, "' must be a scalar, got shape ",
                                   t->shape().DebugString(), ".");
  }
  *value = t->scalar<int64_t>()();
  return absl::OkStatus();
}

struct RandomStream {
  int64_t seed, step, var_id;
};

absl::Status ReadRandomStream(OpKernelContext* ctx, RandomStream* stream) {
  TF_RETURN_IF_ERROR(ReadInt64Scalar(ctx, "seed", &stream->seed));
  TF_RETURN_IF_ERROR(ReadInt64Scalar(ctx, "step", &stream->step));
  return ReadInt64Scalar(ctx, "var_id", &stream->var_id);
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
  // ops do).
  absl::Status PrepareForInPlaceUpdate(OpKernelContext* ctx) {
    for (auto& e : entries_) {
      Tensor* t = e.var->tensor();
      if (t->RefCountIsOne()) continue;
      Tensor copy;
      AllocatorAttributes attr;
      attr.set_gpu_compatible(true);
      attr.set_nic_compatible(true);
      TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &copy, attr));
      std::memcpy(copy.data(), t->data(), t->TotalBytes());
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

  const ResourceHandle& Handle(const char* name) const {
    for (const auto& e : entries_) {
      if (std::strcmp(e.input, name) == 0) return e.handle;
    }
    return entries_.front().handle;
  }

 private:
  std::vector<Entry> entries_;
  std::vector<mutex_lock> locks_;
};

absl::Status CheckCompensationCount(Rounding rounding, DataType dtype, int count) {
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

absl::Status CheckGradient(const Tensor& grad, const TensorShape& expected,
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

uint16_t* CompensationPtr(LockedVariables& vars) {
  Tensor* c = vars.Get("compensation");
  return c ? StoragePtr<bfloat16>(c) : nullptr;
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

// Sparse indices: checked against the row count, then grouped so duplicates
// are applied in order while distinct rows run in parallel.
template <typename Index>
absl::Status GroupIndices(const Tensor& indices, int64_t rows, std::vector<int64_t>* order,
                          std::vector<int64_t>* group_starts) {
  if (!TensorShapeUtils::IsVector(indices.shape())) {
    return errors::InvalidArgument("Input 'indices' must be a vector, got shape ",
                                   indices.shape().DebugString(), ".");
  }
  const auto idx = indices.vec<Index>();
  const int64_t n = idx.size();
  for (int64_t k = 0; k < n; ++k) {
    if (idx(k) < 0 || static_cast<int64_t>(idx(k)) >= rows) {
      return errors::InvalidArgument("Input 'indices'[", k, "] = ", idx(k),
                                     " is not in [0, ", rows,
                                     "), the rows of 'var'. Nothing was updated.");
    }
  }
  order->resize(n);
  std::iota(order->begin(), order->end(), 0);
  std::stable_sort(order->begin(), order->end(),
                   [&idx](int64_t a, int64_t b) { return idx(a) < idx(b); });
  group_starts->clear();
  for (int64_t p = 0; p < n; ++p) {
    if (p == 0 || idx((*order)[p]) != idx((*order)[p - 1])) group_starts->push_back(p);
  }
  group_starts->push_back(n);
  return absl::OkStatus();
}

absl::Status CheckSparseGradient(const Tensor& grad, const Tensor& indices,
                                 const TensorShape& var_shape) {
  if (var_shape.dims() < 1) {
    return errors::InvalidArgument("Sparse updates need 'var' of rank >= 1, got shape ",
                                   var_shape.DebugString(), ".");
  }
  TensorShape expected = var_shape;
  expected.set_dim(0, indices.NumElements());
  return CheckGradient(grad, expected);
}

// ---------------------------------------------------------------------------

class StochasticRoundOp : public OpKernel {
 public:
  explicit StochasticRoundOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    const Tensor& x = ctx->input(0);
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    functor::Bf16StochasticRound<CPUDevice>()(
        ctx->eigen_cpu_device(), x.flat<float>().data(), StoragePtr<bfloat16>(y),
        x.NumElements(),
        tf_bf16::StreamKey(stream.seed, stream.step, stream.var_id, tf_bf16::kWeightLane));
  }
};

template <typename T, typename D>
class RoundedAssignAddOp : public OpKernel {
 public:
  explicit RoundedAssignAddOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    const DataType dtype = DataTypeToEnum<T>::v();
    LockedVariables vars;
    int num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* delta;
    OP_REQUIRES_OK(ctx, ctx->input("delta", &delta));
    OP_REQUIRES_OK(ctx, CheckGradient(*delta, shape, "delta"));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate(ctx));

    const auto keys = tf_bf16::MakeStreamKeys(stream.seed, stream.step, stream.var_id);
    DispatchRounding(rounding_, [&](auto r) {
      functor::Bf16RoundedAssignAdd<CPUDevice, decltype(r)::value,
                                    typename StorageOf<T>::type,
                                    typename StorageOf<D>::type>()(
          ctx->eigen_cpu_device(), StoragePtr<T>(vars.Get("var")),
          CompensationPtr(vars), StoragePtr<D>(*delta), shape.num_elements(), keys);
    });
  }

 private:
  Rounding rounding_;
};

absl::Status ReadSgdScalars(OpKernelContext* ctx, bool use_momentum, bool use_nesterov,
                            tf_bf16::SgdScalars* p) {
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "lr", &p->lr, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "momentum", &p->momentum));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "weight_decay", &p->weight_decay));
  p->use_momentum = use_momentum;
  p->nesterov_mask = tf_bf16::MaskOf(use_nesterov);
  p->weight_decay_mask = tf_bf16::MaskOf(p->weight_decay != 0.0f);
  if (use_nesterov && !use_momentum) {
    return errors::InvalidArgument(
        "use_nesterov=True needs a momentum accumulator ('accum').");
  }
  return absl::OkStatus();
}

absl::Status ReadAdamScalars(OpKernelContext* ctx, bool amsgrad, tf_bf16::AdamScalars* p) {
  float beta1_power, beta2_power;
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "beta1_power", &beta1_power));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "beta2_power", &beta2_power));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "lr", &p->lr, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "one_minus_beta1", &p->one_minus_beta1));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "one_minus_beta2", &p->one_minus_beta2));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "epsilon", &p->epsilon, /*non_negative=*/true));
  TF_RETURN_IF_ERROR(ReadFiniteScalar(ctx, "weight_decay", &p->weight_decay));
  if (!(p->one_minus_beta1 > 0.0f && p->one_minus_beta1 <= 1.0f) ||
      !(p->one_minus_beta2 > 0.0f && p->one_minus_beta2 <= 1.0f)) {
    return errors::InvalidArgument(
        "Inputs 'one_minus_beta1' and 'one_minus_beta2' must be in (0, 1], got ",
        p->one_minus_beta1, " and ", p->one_minus_beta2,
        ": beta_1 and beta_2 must be in [0, 1) (beta 1 never updates the moment; beta > 1 "
        "diverges). The variables were not updated.");
  }
  if (beta1_power == 1.0f) {
    return errors::InvalidArgument(
        "Input 'beta1_power' is 1, which divides the bias correction by zero; pass "
        "beta_1 ** (step + 1) with beta_1 < 1.");
  }
  // Scalar math in float32, in the order of tf.raw_ops.ResourceApplyAdam; 1 - beta
  // comes from the caller, computed as Keras computes it (docs/rounding.md 5.3).
  p->alpha = p->lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power);
  p->weight_decay_mask = tf_bf16::MaskOf(p->weight_decay != 0.0f);
  p->amsgrad = amsgrad;
  return absl::OkStatus();
}

template <typename T, typename G>
class ApplySgdOp : public OpKernel {
 public:
  explicit ApplySgdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &use_nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    LockedVariables vars;
    int num_accum, num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "accum", &num_accum));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES(ctx, num_accum <= 1,
                errors::InvalidArgument("At most one 'accum' variable, got ", num_accum));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::SgdScalars p;
    OP_REQUIRES_OK(ctx, ReadSgdScalars(ctx, num_accum == 1, use_nesterov_, &p));
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("accum", dtype, &shape));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, CheckGradient(*grad, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate(ctx));

    Tensor* accum = vars.Get("accum");
    const auto keys = tf_bf16::MakeStreamKeys(stream.seed, stream.step, stream.var_id);
    DispatchRounding(rounding_, [&](auto r) {
      functor::Bf16ApplySgd<CPUDevice, decltype(r)::value, typename StorageOf<T>::type,
                            typename StorageOf<G>::type>()(
          ctx->eigen_cpu_device(), StoragePtr<T>(vars.Get("var")),
          accum ? StoragePtr<T>(accum) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), shape.num_elements(), p, keys);
    });
  }

 private:
  Rounding rounding_;
  bool use_nesterov_;
};

template <typename T, typename G>
class ApplyAdamOp : public OpKernel {
 public:
  explicit ApplyAdamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    LockedVariables vars;
    int num_vhat, num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "m"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "v"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "vhat", &num_vhat));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES(ctx, num_vhat <= 1,
                errors::InvalidArgument("At most one 'vhat' variable, got ", num_vhat));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::AdamScalars p;
    OP_REQUIRES_OK(ctx, ReadAdamScalars(ctx, num_vhat == 1, &p));
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    for (const char* slot : {"m", "v", "vhat"}) {
      OP_REQUIRES_OK(ctx, vars.Check(slot, dtype, &shape));
    }
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, CheckGradient(*grad, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate(ctx));

    Tensor* vhat = vars.Get("vhat");
    const auto keys = tf_bf16::MakeStreamKeys(stream.seed, stream.step, stream.var_id);
    DispatchRounding(rounding_, [&](auto r) {
      functor::Bf16ApplyAdam<CPUDevice, decltype(r)::value, typename StorageOf<T>::type,
                             typename StorageOf<G>::type>()(
          ctx->eigen_cpu_device(), StoragePtr<T>(vars.Get("var")),
          StoragePtr<T>(vars.Get("m")), StoragePtr<T>(vars.Get("v")),
          vhat ? StoragePtr<T>(vhat) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), shape.num_elements(), p, keys);
    });
  }

 private:
  Rounding rounding_;
};

template <typename T, typename G>
class ApplyLionOp : public OpKernel {
 public:
  explicit ApplyLionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    LockedVariables vars;
    int num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "m"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::LionScalars p;
    OP_REQUIRES_OK(ctx, ReadFiniteScalar(ctx, "lr", &p.lr, /*non_negative=*/true));
    OP_REQUIRES_OK(ctx, ReadFiniteScalar(ctx, "beta1", &p.beta1));
    OP_REQUIRES_OK(ctx, ReadFiniteScalar(ctx, "beta2", &p.beta2));
    OP_REQUIRES_OK(ctx, ReadFiniteScalar(ctx, "weight_decay", &p.weight_decay));
    OP_REQUIRES(ctx, p.beta1 >= 0.0f && p.beta1 <= 1.0f && p.beta2 >= 0.0f && p.beta2 <= 1.0f,
                errors::InvalidArgument("Inputs 'beta1' and 'beta2' must be in [0, 1], got ",
                                        p.beta1, " and ", p.beta2,
                                        ". The variables were not updated."));
    p.one_minus_beta1 = 1.0f - p.beta1;
    p.one_minus_beta2 = 1.0f - p.beta2;
    p.weight_decay_mask = tf_bf16::MaskOf(p.weight_decay != 0.0f);
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("m", dtype, &shape));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, CheckGradient(*grad, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate(ctx));

    const auto keys = tf_bf16::MakeStreamKeys(stream.seed, stream.step, stream.var_id);
    DispatchRounding(rounding_, [&](auto r) {
      functor::Bf16ApplyLion<CPUDevice, decltype(r)::value, typename StorageOf<T>::type,
                             typename StorageOf<G>::type>()(
          ctx->eigen_cpu_device(), StoragePtr<T>(vars.Get("var")),
          StoragePtr<T>(vars.Get("m")), CompensationPtr(vars), StoragePtr<G>(*grad),
          shape.num_elements(), p, keys);
    });
  }

 private:
  Rounding rounding_;
};

template <typename T, typename G, typename Index>
class SparseApplySgdOp : public OpKernel {
 public:
  explicit SparseApplySgdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &use_nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    LockedVariables vars;
    int num_accum, num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "accum", &num_accum));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES(ctx, num_accum <= 1,
                errors::InvalidArgument("At most one 'accum' variable, got ", num_accum));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::SgdScalars p;
    OP_REQUIRES_OK(ctx, ReadSgdScalars(ctx, num_accum == 1, use_nesterov_, &p));
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("accum", dtype, &shape));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    const Tensor* indices;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, ctx->input("indices", &indices));
    std::vector<int64_t> order, group_starts;
    OP_REQUIRES_OK(ctx, shape.dims() >= 1 ? GroupIndices<Index>(*indices, shape.dim_size(0),
                                                                 &order, &group_starts)
                                          : absl::OkStatus());
    OP_REQUIRES_OK(ctx, CheckSparseGradient(*grad, *indices, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate(ctx));

    const int64_t rows = shape.dim_size(0);
    const int64_t row_size = rows == 0 ? 0 : shape.num_elements() / rows;
    Tensor* accum = vars.Get("accum");
    const auto keys = tf_bf16::MakeStreamKeys(stream.seed, stream.step, stream.var_id);
    DispatchRounding(rounding_, [&](auto r) {
      functor::Bf16SparseApplySgd<CPUDevice, decltype(r)::value,
                                  typename StorageOf<T>::type, typename StorageOf<G>::type,
                                  Index>()(
          ctx->eigen_cpu_device(), StoragePtr<T>(vars.Get("var")),
          accum ? StoragePtr<T>(accum) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), indices->flat<Index>().data(), order.data(),
          group_starts.data(), static_cast<int64_t>(group_starts.size()) - 1, row_size, p,
          keys);
    });
  }

 private:
  Rounding rounding_;
  bool use_nesterov_;
};

template <typename T, typename G, typename Index>
class SparseApplyAdamOp : public OpKernel {
 public:
  explicit SparseApplyAdamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    RandomStream stream;
    OP_REQUIRES_OK(ctx, ReadRandomStream(ctx, &stream));
    LockedVariables vars;
    int num_vhat, num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "m"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "v"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "vhat", &num_vhat));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES(ctx, num_vhat <= 1,
                errors::InvalidArgument("At most one 'vhat' variable, got ", num_vhat));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::AdamScalars p;
    OP_REQUIRES_OK(ctx, ReadAdamScalars(ctx, num_vhat == 1, &p));
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    for (const char* slot : {"m", "v", "vhat"}) {
      OP_REQUIRES_OK(ctx, vars.Check(slot, dtype, &shape));
    }
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    const Tensor* indices;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, ctx->input("indices", &indices));
    std::vector<int64_t> order, group_starts;
    OP_REQUIRES_OK(ctx, shape.dims() >= 1 ? GroupIndices<Index>(*indices, shape.dim_size(0),
                                                                 &order, &group_starts)
                                          : absl::OkStatus());
    OP_REQUIRES_OK(ctx, CheckSparseGradient(*grad, *indices, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate(ctx));

    const int64_t rows = shape.dim_size(0);
    const int64_t row_size = rows == 0 ? 0 : shape.num_elements() / rows;
    Tensor* vhat = vars.Get("vhat");
    const auto keys = tf_bf16::MakeStreamKeys(stream.seed, stream.step, stream.var_id);
    DispatchRounding(rounding_, [&](auto r) {
      functor::Bf16SparseApplyAdam<CPUDevice, decltype(r)::value,
                                   typename StorageOf<T>::type, typename StorageOf<G>::type,
                                   Index>()(
          ctx->eigen_cpu_device(), StoragePtr<T>(vars.Get("var")),
          StoragePtr<T>(vars.Get("m")), StoragePtr<T>(vars.Get("v")),
          vhat ? StoragePtr<T>(vhat) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), indices->flat<Index>().data(), order.data(),
          group_starts.data(), static_cast<int64_t>(group_starts.size()) - 1, row_size, p,
          keys);
    });
  }

 private:
  Rounding rounding_;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("TfBf16>StochasticRound").Device(DEVICE_CPU),
                        StochasticRoundOp);

#define REGISTER_DENSE_KERNELS(T, G)                                              \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceRoundedAssignAdd")                 \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<G>("Tdelta"),                       \
                          RoundedAssignAddOp<T, G>);                              \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceApplySgd")                         \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<G>("Tgrad"),                        \
                          ApplySgdOp<T, G>);                                      \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceApplyAdam")                        \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<G>("Tgrad"),                        \
                          ApplyAdamOp<T, G>);                                     \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceApplyLion")                        \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<G>("Tgrad"),                        \
                          ApplyLionOp<T, G>);

#define REGISTER_SPARSE_KERNELS(T, G, Index)                                      \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceSparseApplySgd")                   \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<G>("Tgrad")                         \
                              .TypeConstraint<Index>("Tindices"),                 \
                          SparseApplySgdOp<T, G, Index>);                         \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceSparseApplyAdam")                  \
                              .Device(DEVICE_CPU)                                 \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<G>("Tgrad")                         \
                              .TypeConstraint<Index>("Tindices"),                 \
                          SparseApplyAdamOp<T, G, Index>);

#define REGISTER_ALL(T, G)          \
  REGISTER_DENSE_KERNELS(T, G)      \
  REGISTER_SPARSE_KERNELS(T, G, int32) \
  REGISTER_SPARSE_KERNELS(T, G, int64_t)

REGISTER_ALL(float, float)
REGISTER_ALL(float, bfloat16)
REGISTER_ALL(bfloat16, float)
REGISTER_ALL(bfloat16, bfloat16)

#undef REGISTER_ALL
#undef REGISTER_SPARSE_KERNELS
#undef REGISTER_DENSE_KERNELS

}  // namespace tensorflow
