// OpKernels and registration of the tf_bf16 ops (cc/ops/bf16_training_ops.cc),
// and the CPU specializations of their functors (bf16_training_ops.h). The
// GPU specializations are in bf16_training_ops_gpu.cu.cc; this file
// registers them when compiled with GOOGLE_CUDA (the GPU library).
//
// Every kernel validates all of its inputs before it writes anything, so a
// bad call leaves the variables untouched. On the CPU, work is split over
// TensorFlow's intra-op thread pool; the random bits depend only on (seed,
// step, var_id, element index), never on how the work was split.
#define EIGEN_USE_THREADS

#include "bf16_training_ops.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bf16_training_op_helpers.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/denormal.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {

using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;
using tf_bf16::Rounding;

namespace functor {

// Runs body(begin, end, block_key) over [0, n) on the intra-op pool, cutting
// blocks at multiples of 2^32 so each block has one block key.
// Arithmetic is done with denormals flushed, as in every TensorFlow CPU op,
// whichever thread the block lands on.
template <typename Body>
void ParallelElements(const CPUDevice& d, int64_t n, double bytes_loaded,
                      double bytes_stored, double cycles,
                      tf_bf16::RandomKey stream_key, const Body& body) {
  if (n <= 0) return;
  auto run = [&stream_key, &body](Eigen::Index begin, Eigen::Index end) {
    port::ScopedFlushDenormal flush;
    while (begin < end) {
      const uint64_t high = static_cast<uint64_t>(begin) >> 32;
      const Eigen::Index block_end =
          std::min<Eigen::Index>(end, static_cast<Eigen::Index>((high + 1) << 32));
      body(static_cast<int64_t>(begin), static_cast<int64_t>(block_end),
           stream_key.ForBlock(static_cast<uint32_t>(high)));
      begin = block_end;
    }
  };
  d.parallelFor(n, Eigen::TensorOpCost(bytes_loaded, bytes_stored, cycles), run);
}

template <>
struct Bf16StochasticRound<CPUDevice> {
  absl::Status operator()(const CPUDevice& d, const float* x, uint16_t* y, int64_t n,
                          tf_bf16::RandomKey stream_key) {
    ParallelElements(d, n, 4, 2, 12, stream_key,
                     [x, y](int64_t begin, int64_t end, tf_bf16::RandomKey k) {
                       const uint32_t key = k.value;
                       for (int64_t i = begin; i < end; ++i) {
                         y[i] = tf_bf16::RoundStochasticToBf16(
                             x[i], tf_bf16::ElementBits::Of(key, static_cast<uint32_t>(i)).Draw(0));
                       }
                     });
    return absl::OkStatus();
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

// The loops below copy scalars and the block key into locals and qualify pointers
// __restrict__ so that the compiler can keep them in registers and vectorize;
// the element functions are branch-free for the same reason.

template <Rounding R, typename S, typename D>
struct Bf16RoundedAssignAdd<CPUDevice, R, S, D> {
  absl::Status operator()(const CPUDevice& d, S* var, uint16_t* compensation, const D* delta,
                          int64_t n, tf_bf16::RandomKey stream_key) {
    const double state = sizeof(S) + (R == Rounding::kKahan ? 2 : 0);
    ParallelElements(d, n, state + sizeof(D), state, 8, stream_key,
                     [=](int64_t begin, int64_t end, tf_bf16::RandomKey block_key) {
                       const tf_bf16::RandomKey k = block_key;
                       S* __restrict__ w = var;
                       uint16_t* __restrict__ c = compensation;
                       const D* __restrict__ dl = delta;
                       uint32_t lo = static_cast<uint32_t>(begin);
                       for (int64_t i = begin; i < end; ++i, ++lo) {
                         tf_bf16::AssignAddElement<R>(w, c, tf_bf16::Load(dl[i]), i,
                                                      tf_bf16::ElementBits::Of(k.value, lo));
                       }
                     });
    return absl::OkStatus();
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplySgd<CPUDevice, R, S, G> {
  absl::Status operator()(const CPUDevice& d, S* var, S* accum, uint16_t* compensation,
                          const G* grad, int64_t n, const tf_bf16::SgdScalars& p,
                          tf_bf16::RandomKey stream_key) {
    const double state = sizeof(S) * (accum ? 2 : 1) + (R == Rounding::kKahan ? 2 : 0);
    auto run = [&](auto use_momentum, auto nesterov, auto decay) {
      constexpr bool kUseMomentum = decltype(use_momentum)::value;
      constexpr bool kNesterov = decltype(nesterov)::value;
      constexpr bool kDecay = decltype(decay)::value;
      ParallelElements(d, n, state + sizeof(G), state, 10, stream_key,
                       [=](int64_t begin, int64_t end, tf_bf16::RandomKey block_key) {
                         const tf_bf16::RandomKey k = block_key;
                         const tf_bf16::SgdScalars sp = WithConstantMasks<kNesterov, kDecay>(p);
                         S* __restrict__ w = var;
                         S* __restrict__ a = accum;
                         uint16_t* __restrict__ c = compensation;
                         const G* __restrict__ g = grad;
                         uint32_t lo = static_cast<uint32_t>(begin);
                         for (int64_t i = begin; i < end; ++i, ++lo) {
                           tf_bf16::SgdElement<R, kUseMomentum>(
                               w, a, c, tf_bf16::Load(g[i]), i, sp,
                               tf_bf16::ElementBits::Of(k.value, lo));
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
    return absl::OkStatus();
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplyAdam<CPUDevice, R, S, G> {
  absl::Status operator()(const CPUDevice& d, S* var, S* m, S* v, S* vhat,
                          uint16_t* compensation, const G* grad, int64_t n,
                          const tf_bf16::AdamScalars& p, tf_bf16::RandomKey stream_key) {
    const double state = sizeof(S) * (vhat ? 4 : 3) + (R == Rounding::kKahan ? 2 : 0);
    auto run = [&](auto amsgrad, auto decay) {
      constexpr bool kAmsgrad = decltype(amsgrad)::value;
      constexpr bool kDecay = decltype(decay)::value;
      ParallelElements(d, n, state + sizeof(G), state, 20, stream_key,
                       [=](int64_t begin, int64_t end, tf_bf16::RandomKey block_key) {
                         const tf_bf16::RandomKey k = block_key;
                         const tf_bf16::AdamScalars sp = WithConstantMasks<false, kDecay>(p);
                         S* __restrict__ w = var;
                         S* __restrict__ m1 = m;
                         S* __restrict__ m2 = v;
                         S* __restrict__ mx = vhat;
                         uint16_t* __restrict__ c = compensation;
                         const G* __restrict__ g = grad;
                         uint32_t lo = static_cast<uint32_t>(begin);
                         for (int64_t i = begin; i < end; ++i, ++lo) {
                           tf_bf16::AdamElement<R, kAmsgrad>(
                               w, m1, m2, mx, c, tf_bf16::Load(g[i]), i, sp,
                               tf_bf16::ElementBits::Of(k.value, lo));
                         }
                       });
    };
    DispatchBool(vhat != nullptr, [&](auto amsgrad) {
      DispatchBool(p.weight_decay_mask != 0, [&](auto decay) { run(amsgrad, decay); });
    });
    return absl::OkStatus();
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplyLion<CPUDevice, R, S, G> {
  absl::Status operator()(const CPUDevice& d, S* var, S* m, uint16_t* compensation,
                          const G* grad, int64_t n, const tf_bf16::LionScalars& p,
                          tf_bf16::RandomKey stream_key) {
    const double state = sizeof(S) * 2 + (R == Rounding::kKahan ? 2 : 0);
    DispatchBool(p.weight_decay_mask != 0, [&](auto decay) {
      constexpr bool kDecay = decltype(decay)::value;
      ParallelElements(d, n, state + sizeof(G), state, 10, stream_key,
                       [=](int64_t begin, int64_t end, tf_bf16::RandomKey block_key) {
                         const tf_bf16::RandomKey k = block_key;
                         const tf_bf16::LionScalars sp = WithConstantMasks<false, kDecay>(p);
                         S* __restrict__ w = var;
                         S* __restrict__ m1 = m;
                         uint16_t* __restrict__ c = compensation;
                         const G* __restrict__ g = grad;
                         uint32_t lo = static_cast<uint32_t>(begin);
                         for (int64_t i = begin; i < end; ++i, ++lo) {
                           tf_bf16::LionElement<R>(w, m1, c, tf_bf16::Load(g[i]), i, sp,
                                                   tf_bf16::ElementBits::Of(k.value, lo));
                         }
                       });
    });
    return absl::OkStatus();
  }
};

// Sparse updates run over groups of equal indices in parallel; within a
// group, positions are applied in their original order. row_body(first, k,
// block_key_for(i)) updates the row starting at flat element `first` with
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

// Calls element(i, j, block_key) for the row's elements i = first + j, with
// the block key of i's 2^32-element block (computed once per row unless the
// row straddles a block boundary).
template <typename Element>
void ForRowElements(int64_t first, int64_t row_size, tf_bf16::RandomKey stream_key,
                    const Element& element) {
  if (row_size <= 0) return;
  const uint64_t high_first = static_cast<uint64_t>(first) >> 32;
  const uint64_t high_last = static_cast<uint64_t>(first + row_size - 1) >> 32;
  if (high_first == high_last) {
    const tf_bf16::RandomKey k = stream_key.ForBlock(static_cast<uint32_t>(high_first));
    for (int64_t j = 0; j < row_size; ++j) element(first + j, j, k);
  } else {
    for (int64_t j = 0; j < row_size; ++j) {
      const int64_t i = first + j;
      element(i, j, stream_key.ForBlock(static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32)));
    }
  }
}

template <Rounding R, typename S, typename G>
struct Bf16SparseApplySgd<CPUDevice, R, S, G> {
  absl::Status operator()(const CPUDevice& d, S* var, S* accum, uint16_t* compensation,
                          const G* grad, const SparseIndexGroups& groups, int64_t row_size,
                          const tf_bf16::SgdScalars& p, tf_bf16::RandomKey stream_key) {
    auto run = [&](auto use_momentum) {
      constexpr bool kUseMomentum = decltype(use_momentum)::value;
      ParallelRowGroups(d, groups.num_groups, row_size, 3 * sizeof(S), [&](int64_t group) {
        const tf_bf16::SgdScalars sp = p;
        const int64_t first = groups.group_rows[group] * row_size;
        for (int64_t pos = groups.group_starts[group]; pos < groups.group_starts[group + 1];
             ++pos) {
          const int64_t k = groups.order[pos];
          const G* g = grad + k * row_size;
          ForRowElements(first, row_size, stream_key,
                         [&](int64_t i, int64_t j, tf_bf16::RandomKey block_key) {
                           tf_bf16::SgdElement<R, kUseMomentum>(
                               var, accum, compensation, tf_bf16::Load(g[j]), i, sp,
                               tf_bf16::ElementBits::Of(block_key.value,
                                                        static_cast<uint32_t>(i)));
                         });
        }
      });
    };
    if (accum) {
      run(std::true_type());
    } else {
      run(std::false_type());
    }
    return absl::OkStatus();
  }
};

template <Rounding R, typename S, typename G>
struct Bf16SparseApplyAdam<CPUDevice, R, S, G> {
  absl::Status operator()(const CPUDevice& d, S* var, S* m, S* v, S* vhat,
                          uint16_t* compensation, const G* grad,
                          const SparseIndexGroups& groups, int64_t row_size,
                          const tf_bf16::AdamScalars& p, tf_bf16::RandomKey stream_key) {
    auto run = [&](auto amsgrad) {
      constexpr bool kAmsgrad = decltype(amsgrad)::value;
      ParallelRowGroups(d, groups.num_groups, row_size, 4 * sizeof(S), [&](int64_t group) {
        const tf_bf16::AdamScalars sp = p;
        const int64_t first = groups.group_rows[group] * row_size;
        for (int64_t pos = groups.group_starts[group]; pos < groups.group_starts[group + 1];
             ++pos) {
          const int64_t k = groups.order[pos];
          const G* g = grad + k * row_size;
          ForRowElements(first, row_size, stream_key,
                         [&](int64_t i, int64_t j, tf_bf16::RandomKey block_key) {
                           tf_bf16::AdamElement<R, kAmsgrad>(
                               var, m, v, vhat, compensation, tf_bf16::Load(g[j]), i, sp,
                               tf_bf16::ElementBits::Of(block_key.value,
                                                        static_cast<uint32_t>(i)));
                         });
        }
      });
    };
    if (vhat) {
      run(std::true_type());
    } else {
      run(std::false_type());
    }
    return absl::OkStatus();
  }
};

template <>
struct Bf16CopyBytes<CPUDevice> {
  absl::Status operator()(const CPUDevice& d, void* dst, const void* src, int64_t bytes) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return absl::OkStatus();
  }
};

// Sparse indices: checked against the row count, then grouped so duplicates
// are applied in order while distinct rows run in parallel. One int64 host
// tensor holds order (n), group_starts (up to n + 1) and group_rows (up to n).
template <typename Index>
struct Bf16GroupSparseIndices<CPUDevice, Index> {
  absl::Status operator()(OpKernelContext* ctx, const Tensor& indices, int64_t rows,
                          SparseIndexGroups* groups) {
    const auto idx = indices.vec<Index>();
    const int64_t n = idx.size();
    for (int64_t k = 0; k < n; ++k) {
      if (idx(k) < 0 || static_cast<int64_t>(idx(k)) >= rows) {
        return bf16_ops::BadIndexError(k, static_cast<int64_t>(idx(k)), rows);
      }
    }
    TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_INT64, TensorShape({3 * n + 1}),
                                          &groups->storage));
    int64_t* order = groups->storage.flat<int64_t>().data();
    int64_t* starts = order + n;
    int64_t* group_rows = starts + n + 1;
    std::iota(order, order + n, 0);
    std::stable_sort(order, order + n, [&idx](int64_t a, int64_t b) { return idx(a) < idx(b); });
    int64_t num_groups = 0;
    for (int64_t p = 0; p < n; ++p) {
      if (p == 0 || idx(order[p]) != idx(order[p - 1])) {
        group_rows[num_groups] = static_cast<int64_t>(idx(order[p]));
        starts[num_groups++] = p;
      }
    }
    starts[num_groups] = n;
    groups->order = order;
    groups->group_starts = starts;
    groups->group_rows = group_rows;
    groups->num_groups = num_groups;
    return absl::OkStatus();
  }
};

}  // namespace functor

namespace {

using bf16_ops::CheckCompensationCount;
using bf16_ops::CheckGradient;
using bf16_ops::CheckSparseShapes;
using bf16_ops::CompensationPtr;
using bf16_ops::DispatchRounding;
using bf16_ops::LockedVariables;
using bf16_ops::ParseRounding;
using bf16_ops::ReadStreamKey;
using bf16_ops::StorageOf;
using bf16_ops::StoragePtr;

// ---------------------------------------------------------------------------
// OpKernels, one template per op for every device. Scalars (hyperparameters,
// seed, step, var_id) are .HostMemory inputs on every device; variables,
// gradients and indices stay on the op's device.

template <typename Device>
class StochasticRoundOp : public OpKernel {
 public:
  explicit StochasticRoundOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
    const Tensor& x = ctx->input(0);
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, functor::Bf16StochasticRound<Device>()(
                            ctx->eigen_device<Device>(), x.flat<float>().data(),
                            StoragePtr<bfloat16>(y), x.NumElements(), stream_key));
  }
};

template <typename Device, typename T, typename D>
class RoundedAssignAddOp : public OpKernel {
 public:
  explicit RoundedAssignAddOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
    const DataType dtype = DataTypeToEnum<T>::v();
    LockedVariables vars;
    int num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* delta;
    OP_REQUIRES_OK(ctx, ctx->input("delta", &delta));
    OP_REQUIRES_OK(ctx, CheckGradient(*delta, shape, "delta"));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate<Device>(ctx));

    absl::Status status;
    DispatchRounding(rounding_, [&](auto r) {
      status = functor::Bf16RoundedAssignAdd<Device, decltype(r)::value,
                                             typename StorageOf<T>::type,
                                             typename StorageOf<D>::type>()(
          ctx->eigen_device<Device>(), StoragePtr<T>(vars.Get("var")), CompensationPtr(vars),
          StoragePtr<D>(*delta), shape.num_elements(), stream_key);
    });
    OP_REQUIRES_OK(ctx, status);
  }

 private:
  Rounding rounding_;
};

template <typename Device, typename T, typename G>
class ApplySgdOp : public OpKernel {
 public:
  explicit ApplySgdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &use_nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
    LockedVariables vars;
    int num_accum, num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "accum", &num_accum));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES(ctx, num_accum <= 1,
                errors::InvalidArgument("At most one 'accum' variable, got ", num_accum));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::SgdScalars p;
    OP_REQUIRES_OK(ctx, bf16_ops::ReadSgdScalars(ctx, num_accum == 1, use_nesterov_, &p));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("accum", dtype, &shape));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, CheckGradient(*grad, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate<Device>(ctx));

    Tensor* accum = vars.Get("accum");
    absl::Status status;
    DispatchRounding(rounding_, [&](auto r) {
      status = functor::Bf16ApplySgd<Device, decltype(r)::value, typename StorageOf<T>::type,
                                     typename StorageOf<G>::type>()(
          ctx->eigen_device<Device>(), StoragePtr<T>(vars.Get("var")),
          accum ? StoragePtr<T>(accum) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), shape.num_elements(), p, stream_key);
    });
    OP_REQUIRES_OK(ctx, status);
  }

 private:
  Rounding rounding_;
  bool use_nesterov_;
};

template <typename Device, typename T, typename G>
class ApplyAdamOp : public OpKernel {
 public:
  explicit ApplyAdamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
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
    OP_REQUIRES_OK(ctx, bf16_ops::ReadAdamScalars(ctx, &p));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
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
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate<Device>(ctx));

    Tensor* vhat = vars.Get("vhat");
    absl::Status status;
    DispatchRounding(rounding_, [&](auto r) {
      status = functor::Bf16ApplyAdam<Device, decltype(r)::value, typename StorageOf<T>::type,
                                      typename StorageOf<G>::type>()(
          ctx->eigen_device<Device>(), StoragePtr<T>(vars.Get("var")),
          StoragePtr<T>(vars.Get("m")), StoragePtr<T>(vars.Get("v")),
          vhat ? StoragePtr<T>(vhat) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), shape.num_elements(), p, stream_key);
    });
    OP_REQUIRES_OK(ctx, status);
  }

 private:
  Rounding rounding_;
};

template <typename Device, typename T, typename G>
class ApplyLionOp : public OpKernel {
 public:
  explicit ApplyLionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
    LockedVariables vars;
    int num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "m"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::LionScalars p;
    OP_REQUIRES_OK(ctx, bf16_ops::ReadLionScalars(ctx, &p));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("m", dtype, &shape));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, CheckGradient(*grad, shape));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate<Device>(ctx));

    absl::Status status;
    DispatchRounding(rounding_, [&](auto r) {
      status = functor::Bf16ApplyLion<Device, decltype(r)::value, typename StorageOf<T>::type,
                                      typename StorageOf<G>::type>()(
          ctx->eigen_device<Device>(), StoragePtr<T>(vars.Get("var")),
          StoragePtr<T>(vars.Get("m")), CompensationPtr(vars), StoragePtr<G>(*grad),
          shape.num_elements(), p, stream_key);
    });
    OP_REQUIRES_OK(ctx, status);
  }

 private:
  Rounding rounding_;
};

// Sparse updates: shapes are checked on the host, index values on the device
// that holds them (functor::Bf16GroupSparseIndices), both before the copy-on-
// write and the update.
template <typename Device, typename T, typename G, typename Index>
class SparseApplySgdOp : public OpKernel {
 public:
  explicit SparseApplySgdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &use_nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
    LockedVariables vars;
    int num_accum, num_compensation;
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "var"));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "accum", &num_accum));
    OP_REQUIRES_OK(ctx, vars.Add(ctx, "compensation", &num_compensation));
    OP_REQUIRES(ctx, num_accum <= 1,
                errors::InvalidArgument("At most one 'accum' variable, got ", num_accum));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype, num_compensation));
    tf_bf16::SgdScalars p;
    OP_REQUIRES_OK(ctx, bf16_ops::ReadSgdScalars(ctx, num_accum == 1, use_nesterov_, &p));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    vars.LockAll();
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype, nullptr));
    const TensorShape shape = vars.Get("var")->shape();
    OP_REQUIRES_OK(ctx, vars.Check("accum", dtype, &shape));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16, &shape));
    const Tensor* grad;
    const Tensor* indices;
    OP_REQUIRES_OK(ctx, ctx->input("grad", &grad));
    OP_REQUIRES_OK(ctx, ctx->input("indices", &indices));
    OP_REQUIRES_OK(ctx, CheckSparseShapes(*grad, *indices, shape));
    const int64_t rows = shape.dim_size(0);
    functor::SparseIndexGroups groups;
    OP_REQUIRES_OK(ctx, functor::Bf16GroupSparseIndices<Device, Index>()(ctx, *indices, rows,
                                                                         &groups));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate<Device>(ctx));

    const int64_t row_size = rows == 0 ? 0 : shape.num_elements() / rows;
    Tensor* accum = vars.Get("accum");
    absl::Status status;
    DispatchRounding(rounding_, [&](auto r) {
      status = functor::Bf16SparseApplySgd<Device, decltype(r)::value,
                                           typename StorageOf<T>::type,
                                           typename StorageOf<G>::type>()(
          ctx->eigen_device<Device>(), StoragePtr<T>(vars.Get("var")),
          accum ? StoragePtr<T>(accum) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), groups, row_size, p, stream_key);
    });
    OP_REQUIRES_OK(ctx, status);
  }

 private:
  Rounding rounding_;
  bool use_nesterov_;
};

template <typename Device, typename T, typename G, typename Index>
class SparseApplyAdamOp : public OpKernel {
 public:
  explicit SparseApplyAdamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
  }

  void Compute(OpKernelContext* ctx) override {
    const DataType dtype = DataTypeToEnum<T>::v();
    tf_bf16::RandomKey stream_key;
    OP_REQUIRES_OK(ctx, ReadStreamKey(ctx, &stream_key));
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
    OP_REQUIRES_OK(ctx, bf16_ops::ReadAdamScalars(ctx, &p));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
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
    OP_REQUIRES_OK(ctx, CheckSparseShapes(*grad, *indices, shape));
    const int64_t rows = shape.dim_size(0);
    functor::SparseIndexGroups groups;
    OP_REQUIRES_OK(ctx, functor::Bf16GroupSparseIndices<Device, Index>()(ctx, *indices, rows,
                                                                         &groups));
    OP_REQUIRES_OK(ctx, vars.PrepareForInPlaceUpdate<Device>(ctx));

    const int64_t row_size = rows == 0 ? 0 : shape.num_elements() / rows;
    Tensor* vhat = vars.Get("vhat");
    absl::Status status;
    DispatchRounding(rounding_, [&](auto r) {
      status = functor::Bf16SparseApplyAdam<Device, decltype(r)::value,
                                            typename StorageOf<T>::type,
                                            typename StorageOf<G>::type>()(
          ctx->eigen_device<Device>(), StoragePtr<T>(vars.Get("var")),
          StoragePtr<T>(vars.Get("m")), StoragePtr<T>(vars.Get("v")),
          vhat ? StoragePtr<T>(vhat) : nullptr, CompensationPtr(vars),
          StoragePtr<G>(*grad), groups, row_size, p, stream_key);
    });
    OP_REQUIRES_OK(ctx, status);
  }

 private:
  Rounding rounding_;
};

}  // namespace

// ---------------------------------------------------------------------------
// Registration: one macro per device. Resources and the scalar inputs that
// the kernels read on the host are .HostMemory; x, delta, grad and indices
// stay on the device.

#define REGISTER_STOCHASTIC_ROUND(D)                                                 \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>StochasticRound")                             \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id"),                                 \
                          StochasticRoundOp<D##Device>);

#define REGISTER_DENSE_KERNELS(D, T, G)                                              \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceRoundedAssignAdd")                    \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("var")                                     \
                              .HostMemory("compensation")                            \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id")                                  \
                              .TypeConstraint<T>("T")                                \
                              .TypeConstraint<G>("Tdelta"),                          \
                          RoundedAssignAddOp<D##Device, T, G>);                      \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceApplySgd")                            \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("var")                                     \
                              .HostMemory("accum")                                   \
                              .HostMemory("compensation")                            \
                              .HostMemory("lr")                                      \
                              .HostMemory("momentum")                                \
                              .HostMemory("weight_decay")                            \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id")                                  \
                              .TypeConstraint<T>("T")                                \
                              .TypeConstraint<G>("Tgrad"),                           \
                          ApplySgdOp<D##Device, T, G>);                              \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceApplyAdam")                           \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("var")                                     \
                              .HostMemory("m")                                       \
                              .HostMemory("v")                                       \
                              .HostMemory("vhat")                                    \
                              .HostMemory("compensation")                            \
                              .HostMemory("beta1_power")                             \
                              .HostMemory("beta2_power")                             \
                              .HostMemory("lr")                                      \
                              .HostMemory("one_minus_beta1")                         \
                              .HostMemory("one_minus_beta2")                         \
                              .HostMemory("epsilon")                                 \
                              .HostMemory("weight_decay")                            \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id")                                  \
                              .TypeConstraint<T>("T")                                \
                              .TypeConstraint<G>("Tgrad"),                           \
                          ApplyAdamOp<D##Device, T, G>);                             \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceApplyLion")                           \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("var")                                     \
                              .HostMemory("m")                                       \
                              .HostMemory("compensation")                            \
                              .HostMemory("lr")                                      \
                              .HostMemory("beta1")                                   \
                              .HostMemory("beta2")                                   \
                              .HostMemory("weight_decay")                            \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id")                                  \
                              .TypeConstraint<T>("T")                                \
                              .TypeConstraint<G>("Tgrad"),                           \
                          ApplyLionOp<D##Device, T, G>);

#define REGISTER_SPARSE_KERNELS(D, T, G, Index)                                      \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceSparseApplySgd")                      \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("var")                                     \
                              .HostMemory("accum")                                   \
                              .HostMemory("compensation")                            \
                              .HostMemory("lr")                                      \
                              .HostMemory("momentum")                                \
                              .HostMemory("weight_decay")                            \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id")                                  \
                              .TypeConstraint<T>("T")                                \
                              .TypeConstraint<G>("Tgrad")                            \
                              .TypeConstraint<Index>("Tindices"),                    \
                          SparseApplySgdOp<D##Device, T, G, Index>);                 \
  REGISTER_KERNEL_BUILDER(Name("TfBf16>ResourceSparseApplyAdam")                     \
                              .Device(DEVICE_##D)                                    \
                              .HostMemory("var")                                     \
                              .HostMemory("m")                                       \
                              .HostMemory("v")                                       \
                              .HostMemory("vhat")                                    \
                              .HostMemory("compensation")                            \
                              .HostMemory("beta1_power")                             \
                              .HostMemory("beta2_power")                             \
                              .HostMemory("lr")                                      \
                              .HostMemory("one_minus_beta1")                         \
                              .HostMemory("one_minus_beta2")                         \
                              .HostMemory("epsilon")                                 \
                              .HostMemory("weight_decay")                            \
                              .HostMemory("seed")                                    \
                              .HostMemory("step")                                    \
                              .HostMemory("var_id")                                  \
                              .TypeConstraint<T>("T")                                \
                              .TypeConstraint<G>("Tgrad")                            \
                              .TypeConstraint<Index>("Tindices"),                    \
                          SparseApplyAdamOp<D##Device, T, G, Index>);

#define REGISTER_ALL(D, T, G)           \
  REGISTER_DENSE_KERNELS(D, T, G)       \
  REGISTER_SPARSE_KERNELS(D, T, G, int32) \
  REGISTER_SPARSE_KERNELS(D, T, G, int64_t)

#define REGISTER_DEVICE(D)              \
  REGISTER_STOCHASTIC_ROUND(D)          \
  REGISTER_ALL(D, float, float)         \
  REGISTER_ALL(D, float, bfloat16)      \
  REGISTER_ALL(D, bfloat16, float)      \
  REGISTER_ALL(D, bfloat16, bfloat16)

REGISTER_DEVICE(CPU)

#if GOOGLE_CUDA
// The GPU specializations are compiled by nvcc in bf16_training_ops_gpu.cu.cc,
// which instantiates each of them explicitly.
namespace functor {
#define DECLARE_GPU_DENSE(R, S, G)                                 \
  extern template struct Bf16RoundedAssignAdd<GPUDevice, R, S, G>; \
  extern template struct Bf16ApplySgd<GPUDevice, R, S, G>;         \
  extern template struct Bf16ApplyAdam<GPUDevice, R, S, G>;        \
  extern template struct Bf16ApplyLion<GPUDevice, R, S, G>;        \
  extern template struct Bf16SparseApplySgd<GPUDevice, R, S, G>;   \
  extern template struct Bf16SparseApplyAdam<GPUDevice, R, S, G>;
#define DECLARE_GPU_TYPES(R)                 \
  DECLARE_GPU_DENSE(R, float, float)         \
  DECLARE_GPU_DENSE(R, float, uint16_t)      \
  DECLARE_GPU_DENSE(R, uint16_t, float)      \
  DECLARE_GPU_DENSE(R, uint16_t, uint16_t)
DECLARE_GPU_TYPES(Rounding::kNearest)
DECLARE_GPU_TYPES(Rounding::kStochastic)
DECLARE_GPU_TYPES(Rounding::kKahan)
template <>
absl::Status Bf16StochasticRound<GPUDevice>::operator()(const GPUDevice& d, const float* x,
                                                        uint16_t* y, int64_t n,
                                                        tf_bf16::RandomKey stream_key);
template <>
absl::Status Bf16CopyBytes<GPUDevice>::operator()(const GPUDevice& d, void* dst,
                                                  const void* src, int64_t bytes);
extern template struct Bf16GroupSparseIndices<GPUDevice, int32>;
extern template struct Bf16GroupSparseIndices<GPUDevice, int64_t>;
#undef DECLARE_GPU_TYPES
#undef DECLARE_GPU_DENSE
}  // namespace functor

REGISTER_DEVICE(GPU)
#endif  // GOOGLE_CUDA

#undef REGISTER_DEVICE
#undef REGISTER_ALL
#undef REGISTER_SPARSE_KERNELS
#undef REGISTER_DENSE_KERNELS
#undef REGISTER_STOCHASTIC_ROUND

}  // namespace tensorflow
