// GPU specializations of the tf_bf16 functors (bf16_training_ops.h) and
// their explicit instantiations. The kernels and launchers are those of
// bf16_update_kernels.cu.h, which the H200 harness runs too.
//
// Compiled by nvcc with --fmad=false (the spec rounds after every float32
// operation: a fused multiply-add would round once where the CPU kernels and
// the reference round twice) and --ftz=true (the CPU kernels and the
// reference flush denormals): see setup.py.
#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cuda_runtime.h>

#include "bf16_training_op_helpers.h"
#include "bf16_training_ops.h"
#include "bf16_update_kernels.cu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {

using GPUDevice = Eigen::GpuDevice;
using tf_bf16::Rounding;
namespace kernels = tf_bf16::kernels;

namespace functor {
namespace {

kernels::GpuExecutor Executor(const GPUDevice& d) {
  return kernels::GpuExecutor{d.stream(), d.getNumGpuMultiProcessors()};
}

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return errors::Internal("tf_bf16: CUDA error in ", what, ": ", cudaGetErrorName(e), " (",
                          cudaGetErrorString(e),
                          "). The library's GPU kernels are built for the architectures in "
                          "TF_BF16_CUDA_ARCHS (default sm_80, sm_90); rebuild it for this GPU "
                          "if it is not among them.");
}

kernels::SparseGroupsView View(const SparseIndexGroups& g) {
  return kernels::SparseGroupsView{g.order, g.group_starts, g.group_rows, g.num_groups};
}

}  // namespace

template <>
absl::Status Bf16StochasticRound<GPUDevice>::operator()(const GPUDevice& d, const float* x,
                                                        uint16_t* y, int64_t n,
                                                        tf_bf16::RandomKey stream_key) {
  return CudaStatus(kernels::StochasticRound(Executor(d), x, y, n, stream_key), "stochastic_round");
}

template <Rounding R, typename S, typename D>
struct Bf16RoundedAssignAdd<GPUDevice, R, S, D> {
  absl::Status operator()(const GPUDevice& d, S* var, uint16_t* compensation, const D* delta,
                          int64_t n, tf_bf16::RandomKey stream_key) {
    return CudaStatus(kernels::RoundedAssignAdd<R>(Executor(d), var, compensation, delta, n,
                                                   stream_key),
                      "rounded_assign_add");
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplySgd<GPUDevice, R, S, G> {
  absl::Status operator()(const GPUDevice& d, S* var, S* accum, uint16_t* compensation,
                          const G* grad, int64_t n, const tf_bf16::SgdScalars& p,
                          tf_bf16::RandomKey stream_key) {
    return CudaStatus(
        kernels::ApplySgd<R>(Executor(d), var, accum, compensation, grad, n, p, stream_key),
        "apply_sgd");
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplyAdam<GPUDevice, R, S, G> {
  absl::Status operator()(const GPUDevice& d, S* var, S* m, S* v, S* vhat,
                          uint16_t* compensation, const G* grad, int64_t n,
                          const tf_bf16::AdamScalars& p, tf_bf16::RandomKey stream_key) {
    return CudaStatus(
        kernels::ApplyAdam<R>(Executor(d), var, m, v, vhat, compensation, grad, n, p, stream_key),
        "apply_adam");
  }
};

template <Rounding R, typename S, typename G>
struct Bf16ApplyLion<GPUDevice, R, S, G> {
  absl::Status operator()(const GPUDevice& d, S* var, S* m, uint16_t* compensation,
                          const G* grad, int64_t n, const tf_bf16::LionScalars& p,
                          tf_bf16::RandomKey stream_key) {
    return CudaStatus(kernels::ApplyLion<R>(Executor(d), var, m, compensation, grad, n, p, stream_key),
                      "apply_lion");
  }
};

template <>
absl::Status Bf16CopyBytes<GPUDevice>::operator()(const GPUDevice& d, void* dst,
                                                  const void* src, int64_t bytes) {
  return CudaStatus(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes),
                                    cudaMemcpyDeviceToDevice, d.stream()),
                    "the copy-on-write of a shared variable buffer");
}

// Indices stay in device memory: validated and grouped there (see
// kernels::IndexGrouping), with one wait for the 24-byte verdict, since the
// op must not write anything when an index is bad.
template <typename Index>
struct Bf16GroupSparseIndices<GPUDevice, Index> {
  absl::Status operator()(OpKernelContext* ctx, const Tensor& indices, int64_t rows,
                          SparseIndexGroups* groups) {
    const int64_t n = indices.NumElements();
    if (n > kernels::IndexGrouping<Index>::kMaxIndices) {
      return errors::InvalidArgument("Input 'indices' has ", n, " elements; the GPU kernels "
                                     "take at most ",
                                     kernels::IndexGrouping<Index>::kMaxIndices,
                                     " per call. Nothing was updated.");
    }
    const kernels::IndexGrouping<Index> grouping(n);
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        DT_INT8, TensorShape({static_cast<int64_t>(grouping.WorkspaceBytes())}),
        &groups->storage));
    const GPUDevice& d = ctx->eigen_device<GPUDevice>();
    kernels::SparseGroupsView view;
    kernels::IndexGroupingResult result;
    TF_RETURN_IF_ERROR(CudaStatus(
        grouping.Run(indices.flat<Index>().data(), rows, groups->storage.flat<int8>().data(),
                     d.stream(), d.getNumGpuMultiProcessors(), &view, &result),
        "the validation of sparse indices"));
    if (result.first_bad < static_cast<unsigned long long>(n)) {
      return bf16_ops::BadIndexError(static_cast<int64_t>(result.first_bad),
                                     static_cast<int64_t>(result.bad_value), rows);
    }
    groups->order = view.order;
    groups->group_starts = view.group_starts;
    groups->group_rows = view.group_rows;
    groups->num_groups = view.num_groups;
    return absl::OkStatus();
  }
};

template <Rounding R, typename S, typename G>
struct Bf16SparseApplySgd<GPUDevice, R, S, G> {
  absl::Status operator()(const GPUDevice& d, S* var, S* accum, uint16_t* compensation,
                          const G* grad, const SparseIndexGroups& groups, int64_t row_size,
                          const tf_bf16::SgdScalars& p, tf_bf16::RandomKey stream_key) {
    return CudaStatus(kernels::SparseApplySgd<R>(Executor(d), var, accum, compensation, grad,
                                                 View(groups), row_size, p, stream_key),
                      "sparse apply_sgd");
  }
};

template <Rounding R, typename S, typename G>
struct Bf16SparseApplyAdam<GPUDevice, R, S, G> {
  absl::Status operator()(const GPUDevice& d, S* var, S* m, S* v, S* vhat,
                          uint16_t* compensation, const G* grad,
                          const SparseIndexGroups& groups, int64_t row_size,
                          const tf_bf16::AdamScalars& p, tf_bf16::RandomKey stream_key) {
    return CudaStatus(kernels::SparseApplyAdam<R>(Executor(d), var, m, v, vhat, compensation,
                                                  grad, View(groups), row_size, p, stream_key),
                      "sparse apply_adam");
  }
};

// Explicit instantiations: every rounding, variable dtype and gradient dtype
// the OpKernels dispatch to (bfloat16 as its uint16_t bits).
#define INSTANTIATE_GPU(R, S, G)                        \
  template struct Bf16RoundedAssignAdd<GPUDevice, R, S, G>; \
  template struct Bf16ApplySgd<GPUDevice, R, S, G>;         \
  template struct Bf16ApplyAdam<GPUDevice, R, S, G>;        \
  template struct Bf16ApplyLion<GPUDevice, R, S, G>;        \
  template struct Bf16SparseApplySgd<GPUDevice, R, S, G>;   \
  template struct Bf16SparseApplyAdam<GPUDevice, R, S, G>;
#define INSTANTIATE_GPU_TYPES(R)            \
  INSTANTIATE_GPU(R, float, float)          \
  INSTANTIATE_GPU(R, float, uint16_t)       \
  INSTANTIATE_GPU(R, uint16_t, float)       \
  INSTANTIATE_GPU(R, uint16_t, uint16_t)
INSTANTIATE_GPU_TYPES(Rounding::kNearest)
INSTANTIATE_GPU_TYPES(Rounding::kStochastic)
INSTANTIATE_GPU_TYPES(Rounding::kKahan)
template struct Bf16GroupSparseIndices<GPUDevice, int32>;
template struct Bf16GroupSparseIndices<GPUDevice, int64_t>;
#undef INSTANTIATE_GPU_TYPES
#undef INSTANTIATE_GPU

}  // namespace functor
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
