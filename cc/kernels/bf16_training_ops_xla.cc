// XLA lowering of the tf_bf16 ops (cc/ops/bf16_training_ops.cc) for the
// XLA_CPU_JIT and XLA_GPU_JIT devices, so that tf.function(jit_compile=True)
// and Keras's model.compile(jit_compile=True) (Keras's default on GPUs) run
// them. The element math is bf16_update_math_xla.h, the HLO form of
// bf16_update_math.h; docs/rounding.md section 8 specifies what is lowered and
// what differs from the CPU kernels (only how bad input is reported).
//
// Validation: whatever the CPU kernels check is checked here too. Structure
// (dtypes, shapes, the number of slot and compensation variables) and
// hyperparameters that are compile-time constants are checked while
// compiling, with the CPU kernels' messages. A value known only at run time (a
// learning rate read from a variable, sparse indices) cannot raise inside
// compiled code: a failed check makes the update write back every variable
// unchanged (a select on the validity predicate), so nothing bad is written.
//
// Sparse updates (duplicate indices applied one after another, in order, like
// the CPU kernel) run in rounds: round r updates the positions that are the
// r-th occurrence of their index, so the rows written in one round are
// distinct. Each round gathers the rows of every position, computes the
// update and scatter-adds the difference of the new and old bit patterns
// (integers, so the result is exact and independent of the order of the
// adds) for the positions of that round and zero for the others. The number
// of rounds is the largest multiplicity of an index, known only at run time:
// an XLA while loop.
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bf16_training_op_helpers.h"
#include "bf16_update_math.h"
#include "bf16_update_math_xla.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/compiler/tf2xla/xla_resource.h"
#include "tensorflow/core/framework/kernel_def.pb.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/comparators.h"
#include "xla/hlo/builder/lib/constants.h"
#include "xla/hlo/builder/lib/loops.h"
#include "xla/hlo/builder/lib/slicing.h"
#include "xla/hlo/builder/xla_builder.h"

namespace tensorflow {
namespace {

using tf_bf16::Rounding;
using tf_bf16::xla_math::Batch;
using tf_bf16::xla_math::ElementIndex;
using tf_bf16::xla_math::Hlo;
using tf_bf16::xla_math::Value;
using xla::XlaOp;

constexpr int64_t kTwoTo32 = int64_t{1} << 32;

using bf16_ops::CheckCompensationCount;
using bf16_ops::ParseRounding;

xla::PrimitiveType StorageType(DataType dtype) {
  return dtype == DT_BFLOAT16 ? xla::U16 : xla::U32;
}

// ---------------------------------------------------------------------------
// Validation, the CPU kernel's checks (cc/kernels/bf16_training_ops.cc) with
// its messages: at compile time where the value is known then (with the
// kernels' own check functions, bf16_training_op_helpers.h), else folded into
// a run-time validity predicate that decides exactly as those functions do.

// Exact IEEE comparisons of a float32 scalar with 0 and 1, on its bits: the
// same answer on every device, denormals-are-zero or not.
XlaOp IsFinite(const Hlo& h, XlaOp x) {
  using tf_bf16::xla_math::kExponentMask;
  return xla::Ne(xla::And(Hlo::Bits(x), h.U32(kExponentMask)), h.U32(kExponentMask));
}
XlaOp IsNegative(const Hlo& h, XlaOp x) {  // x < 0 (false for -0 and NaN)
  XlaOp u = Hlo::Bits(x);
  return xla::And(xla::Ne(xla::And(u, h.U32(tf_bf16::xla_math::kSignMask)), h.U32(0)),
                  xla::And(xla::Ne(xla::And(u, h.U32(tf_bf16::xla_math::kAbsMask)), h.U32(0)),
                           xla::Not(h.IsNanBits(u))));
}
XlaOp IsAboveOne(const Hlo& h, XlaOp x) {  // x > 1, for finite x
  XlaOp u = Hlo::Bits(x);
  return xla::And(xla::Eq(xla::And(u, h.U32(tf_bf16::xla_math::kSignMask)), h.U32(0)),
                  xla::Gt(u, h.U32(0x3F800000u)));
}
XlaOp IsAtLeastOne(const Hlo& h, XlaOp x) {  // x >= 1, for finite x
  XlaOp u = Hlo::Bits(x);
  return xla::And(xla::Eq(xla::And(u, h.U32(tf_bf16::xla_math::kSignMask)), h.U32(0)),
                  xla::Ge(u, h.U32(0x3F800000u)));
}

class Validation {
 public:
  Validation(const XlaOpKernel& kernel, XlaOpKernelContext* ctx)
      : kernel_(kernel), ctx_(ctx), h_(ctx->builder()) {}

  // A float32 scalar hyperparameter: finite, and non-negative if asked.
  absl::StatusOr<XlaOp> Scalar(const char* name, bool non_negative = false) {
    int index;
    TF_ASSIGN_OR_RETURN(index, InputIndex(name));
    const TensorShape shape = ctx_->InputShape(index);
    if (!TensorShapeUtils::IsScalar(shape)) {
      return errors::InvalidArgument("Input '", name, "' must be a scalar, got shape ",
                                     shape.DebugString(), ".");
    }
    XlaOp x = ctx_->Input(index);
    double constant;
    if (ctx_->ConstantInputAsFloatScalar(index, &constant).ok()) {
      const float value = static_cast<float>(constant);
      TF_RETURN_IF_ERROR(bf16_ops::CheckFiniteValue(name, value, non_negative));
      constants_[name] = value;
      return x;
    }
    Require(IsFinite(h_, x));
    if (non_negative) Require(xla::Not(IsNegative(h_, x)));
    return x;
  }

  // Adam's step (int64): >= 0, as bf16_ops::CheckAdamStep.
  absl::Status AdamStep() {
    int index;
    TF_ASSIGN_OR_RETURN(index, InputIndex("step"));
    int64_t constant;
    if (ctx_->ConstantInputAsIntScalar(index, &constant).ok()) {
      return bf16_ops::CheckAdamStep(constant);
    }
    Require(xla::Ge(ctx_->Input(index), xla::ConstantR0<int64_t>(ctx_->builder(), 0)));
    return absl::OkStatus();
  }

  // The value of a scalar read by Scalar(), if it was a compile-time constant.
  bool Constant(const char* name, float* value) const {
    auto it = constants_.find(name);
    if (it == constants_.end()) return false;
    *value = it->second;
    return true;
  }

  void Require(XlaOp ok) { valid_ = valid_.valid() ? xla::And(valid_, ok) : ok; }

  // The run-time predicate, or an empty op when every check passed at compile time.
  XlaOp valid() const { return valid_; }

  absl::StatusOr<int> InputIndex(const char* name) const {
    int start, stop;
    TF_RETURN_IF_ERROR(kernel_.InputRange(name, &start, &stop));
    return start;
  }

 private:
  const XlaOpKernel& kernel_;
  XlaOpKernelContext* ctx_;
  Hlo h_;
  XlaOp valid_;
  std::map<std::string, float> constants_;
};

// The resource variables an update reads and writes, in the order the element
// math takes them: var, its slots in input order, then the compensation.
class Variables {
 public:
  Variables(const XlaOpKernel& kernel, XlaOpKernelContext* ctx) : kernel_(kernel), ctx_(ctx) {}

  // Adds the variables of (list) input `name`; returns how many there are.
  absl::StatusOr<int> Add(const char* name) {
    int start, stop;
    TF_RETURN_IF_ERROR(kernel_.InputRange(name, &start, &stop));
    for (int i = start; i < stop; ++i) entries_.push_back(Entry{name, i, DT_INVALID});
    return stop - start;
  }

  // Checks dtype and shape of every entry of `name`: its shape is var's
  // (checked first, which records it).
  absl::Status Check(const char* name, DataType dtype) {
    for (Entry& e : entries_) {
      if (e.input != name) continue;
      DataType type;
      TensorShape shape;
      TF_RETURN_IF_ERROR(ctx_->GetVariableTypeAndShape(e.index, &type, &shape));
      if (type == DT_INVALID) {
        return errors::InvalidArgument("input '", name,
                                       "' is not initialized; assign it a value first. "
                                       "Nothing was updated.");
      }
      if (type != dtype) {
        return errors::InvalidArgument(
            "input '", name, "' has dtype ", DataTypeString(type), " but ",
            DataTypeString(dtype),
            " was expected. tf_bf16 updates bfloat16 and float32 variables; optimizer "
            "slots and Kahan compensation buffers must match (compensation: bfloat16). "
            "Nothing was updated.");
      }
      if (std::string(name) == "var") {
        shape_ = shape;
      } else if (shape != shape_) {
        return errors::InvalidArgument("input '", name, "' has shape ", shape.DebugString(),
                                       " but ", shape_.DebugString(),
                                       " was expected (the shape of 'var'). Nothing was "
                                       "updated.");
      }
      e.dtype = dtype;
    }
    return absl::OkStatus();
  }

  // Every input names a different variable, as LockedVariables::CheckDistinct
  // (the same resource in two roles resolves to one XlaResource).
  absl::Status CheckDistinct() const {
    std::vector<XlaResource*> resources;
    for (const Entry& e : entries_) {
      XlaResource* resource;
      TF_RETURN_IF_ERROR(ctx_->GetResourceInput(e.index, &resource));
      resources.push_back(resource);
    }
    for (size_t a = 0; a < entries_.size(); ++a) {
      for (size_t b = a + 1; b < entries_.size(); ++b) {
        if (resources[a] != resources[b]) continue;
        return errors::InvalidArgument(
            "Inputs '", entries_[a].input, "' and '", entries_[b].input,
            "' are the same variable ('", resources[a]->name(),
            "'): the weight, each optimizer slot and the compensation buffer must be "
            "different variables. Nothing was updated.");
      }
    }
    return absl::OkStatus();
  }

  const TensorShape& shape() const { return shape_; }

  // The current values as storage bits (u32 / u16), flattened to `dims`.
  absl::StatusOr<std::vector<XlaOp>> ReadBits(absl::Span<const int64_t> dims) {
    std::vector<XlaOp> bits;
    for (const Entry& e : entries_) {
      XlaOp value;
      TF_RETURN_IF_ERROR(ctx_->ReadVariableInput(e.index, e.dtype, nullptr, &value));
      bits.push_back(xla::Reshape(xla::BitcastConvertType(value, StorageType(e.dtype)), dims));
    }
    return bits;
  }

  absl::Status AssignBits(absl::Span<const XlaOp> bits) {
    for (size_t k = 0; k < entries_.size(); ++k) {
      const Entry& e = entries_[k];
      XlaOp value = xla::Reshape(xla::BitcastConvertType(bits[k], EncodePrimitiveType(e.dtype)),
                                 shape_.dim_sizes());
      TF_RETURN_IF_ERROR(ctx_->AssignVariable(e.index, e.dtype, value));
    }
    return absl::OkStatus();
  }

  std::vector<DataType> dtypes() const {
    std::vector<DataType> out;
    for (const Entry& e : entries_) out.push_back(e.dtype);
    return out;
  }

 private:
  static xla::PrimitiveType EncodePrimitiveType(DataType dtype) {
    return dtype == DT_BFLOAT16 ? xla::BF16 : xla::F32;
  }

  struct Entry {
    std::string input;
    int index;
    DataType dtype;
  };
  const XlaOpKernel& kernel_;
  XlaOpKernelContext* ctx_;
  std::vector<Entry> entries_;
  TensorShape shape_;
};

absl::Status CheckGradientShape(XlaOpKernelContext* ctx, int index, const TensorShape& expected,
                                const char* name = "grad") {
  const TensorShape shape = ctx->InputShape(index);
  if (shape != expected) {
    return errors::InvalidArgument("Input '", name, "' has shape ", shape.DebugString(), " but ",
                                   expected.DebugString(),
                                   " was expected (the shape of 'var'). Nothing was updated.");
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Drivers: run the element math over every element (dense) or over the rows
// of a sparse gradient, and write the results back.

// math(batch, state bits, gradient, scalars) -> new state bits, same order.
using ElementMath = std::function<std::vector<XlaOp>(
    const Batch&, absl::Span<const XlaOp>, Value, absl::Span<const XlaOp>)>;

struct Update {
  Rounding rounding;
  DataType dtype;        // of var and its slots
  XlaOp grad;            // dense: var's shape; sparse: [num_indices, row...]
  DataType grad_dtype;
  std::vector<XlaOp> scalars;
  XlaOp seed, step, var_id;
  XlaOp valid;           // scalar pred, or empty: always valid
};

Value LoadGradient(const Hlo& h, XlaOp grad, DataType dtype, int64_t n) {
  XlaOp bits = xla::Reshape(xla::BitcastConvertType(grad, StorageType(dtype)), {n});
  return dtype == DT_BFLOAT16 ? h.LoadBf16(bits) : Hlo::LoadF32(bits);
}

// low / high 32 bits of u64 flat indices; high left empty if all are < 2^32.
ElementIndex SplitIndex(const Hlo& h, XlaOp flat_u64, bool needs_high) {
  ElementIndex index;
  index.low = xla::ConvertElementType(
      xla::And(flat_u64, xla::ConstantR0<uint64_t>(h.builder(), 0xFFFFFFFFull)), xla::U32);
  if (needs_high) {
    index.high = xla::ConvertElementType(
        xla::ShiftRightLogical(flat_u64, xla::ConstantR0<uint64_t>(h.builder(), 32)), xla::U32);
  }
  return index;
}

absl::Status DenseUpdate(XlaOpKernelContext* ctx, Variables& vars, const Update& u,
                         const ElementMath& math) {
  xla::XlaBuilder* b = ctx->builder();
  Hlo h(b);
  const int64_t n = vars.shape().num_elements();
  std::vector<XlaOp> bits;
  TF_ASSIGN_OR_RETURN(bits, vars.ReadBits({n}));
  ElementIndex index;
  if (n <= kTwoTo32) {
    index.low = xla::Iota(b, xla::U32, n);
  } else {
    index = SplitIndex(h, xla::Iota(b, xla::U64, n), true);
  }
  const Batch batch = Batch::Make(h, u.dtype == DT_BFLOAT16, u.rounding,
                                  h.StreamKey(u.seed, u.step, u.var_id), index);
  std::vector<XlaOp> updated =
      math(batch, bits, LoadGradient(h, u.grad, u.grad_dtype, n), u.scalars);
  if (u.valid.valid()) {
    for (size_t k = 0; k < updated.size(); ++k) {
      updated[k] = xla::Select(u.valid, updated[k], bits[k]);
    }
  }
  return vars.AssignBits(updated);
}

// For each position k of `indices` (s64[N]), the number of earlier positions
// with the same index: a stable sort by index, the start of each run of equal
// indices by a prefix maximum (log2 N doubling steps), and a sort back.
XlaOp OccurrenceRanks(xla::XlaBuilder* b, XlaOp indices, int64_t num) {
  XlaOp position = xla::Iota(b, xla::S32, num);
  XlaOp by_index = xla::Sort({indices, position},
                             xla::CreateScalarLtComputation({xla::S64, xla::S32}, b), 0,
                             /*is_stable=*/true);
  XlaOp sorted = xla::GetTupleElement(by_index, 0);
  XlaOp sorted_position = xla::GetTupleElement(by_index, 1);
  XlaOp previous = xla::ConcatInDim(
      b, {xla::Slice(sorted, {0}, {1}, {1}), xla::Slice(sorted, {0}, {num - 1}, {1})}, 0);
  XlaOp run_starts_here =
      xla::Or(xla::Ne(sorted, previous), xla::Eq(position, xla::ConstantR0<int32_t>(b, 0)));
  XlaOp run_start = xla::Select(run_starts_here, position, xla::ZerosLike(position));
  for (int64_t shift = 1; shift < num; shift *= 2) {
    XlaOp shifted = xla::ConcatInDim(
        b, {xla::Broadcast(xla::ConstantR0<int32_t>(b, 0), {shift}),
            xla::Slice(run_start, {0}, {num - shift}, {1})},
        0);
    run_start = xla::Max(run_start, shifted);
  }
  XlaOp rank_sorted = xla::Sub(position, run_start);
  XlaOp back = xla::Sort({sorted_position, rank_sorted},
                         xla::CreateScalarLtComputation({xla::S32, xla::S32}, b), 0);
  return xla::GetTupleElement(back, 1);
}

absl::Status SparseUpdate(XlaOpKernelContext* ctx, Variables& vars, const Update& u,
                          XlaOp indices, int64_t num_indices, const ElementMath& math) {
  xla::XlaBuilder* b = ctx->builder();
  Hlo h(b);
  const TensorShape& shape = vars.shape();
  const int64_t rows = shape.dim_size(0);
  const int64_t n = shape.num_elements();
  const int64_t row_size = rows == 0 ? 0 : n / rows;
  // Nothing to write: no indices, or empty rows. (Indices into a variable
  // without rows are out of range: a no-op here, an error on the CPU.)
  if (num_indices == 0 || rows == 0 || row_size == 0) return absl::OkStatus();

  XlaOp index64 = xla::ConvertElementType(indices, xla::S64);
  XlaOp in_range = xla::ReduceAll(
      xla::And(xla::Ge(index64, xla::ConstantR0<int64_t>(b, 0)),
               xla::Lt(index64, xla::ConstantR0<int64_t>(b, rows))),
      xla::ConstantR0<bool>(b, true), xla::CreateScalarAndComputation(xla::PRED, b));
  XlaOp valid = u.valid.valid() ? xla::And(u.valid, in_range) : in_range;
  XlaOp row = xla::Clamp(xla::ConstantR0<int64_t>(b, 0), index64,
                         xla::ConstantR0<int64_t>(b, rows - 1));
  XlaOp rank = OccurrenceRanks(b, row, num_indices);
  XlaOp max_rank = xla::Reduce(rank, xla::ConstantR0<int32_t>(b, 0),
                               xla::CreateScalarMaxComputation(xla::S32, b), {0});

  std::vector<XlaOp> state;
  TF_ASSIGN_OR_RETURN(state, vars.ReadBits({rows, row_size}));
  const std::vector<DataType> dtypes = vars.dtypes();
  const int64_t batch_elements = num_indices * row_size;
  XlaOp grad_bits =
      xla::Reshape(xla::BitcastConvertType(u.grad, StorageType(u.grad_dtype)), {batch_elements});

  // Loop-carried values: everything the body reads (a while body cannot
  // refer to values outside it).
  enum { kRound, kMaxRank, kValid, kRow, kRank, kGrad, kKeys, kFixed };  // kKeys: the stream key
  std::vector<XlaOp> init = {xla::ConstantR0<int32_t>(b, 0), max_rank, valid, row, rank, grad_bits,
                             h.StreamKey(u.seed, u.step, u.var_id)};
  init.insert(init.end(), u.scalars.begin(), u.scalars.end());
  const size_t first_state = init.size();
  init.insert(init.end(), state.begin(), state.end());
  const size_t num_scalars = u.scalars.size();

  auto condition = [](absl::Span<const XlaOp> values,
                      xla::XlaBuilder*) -> absl::StatusOr<XlaOp> {
    return xla::Le(values[kRound], values[kMaxRank]);
  };
  auto body = [&](absl::Span<const XlaOp> values,
                  xla::XlaBuilder* bb) -> absl::StatusOr<std::vector<XlaOp>> {
    Hlo hb(bb);
    XlaOp rows_u64 = xla::ConvertElementType(values[kRow], xla::U64);
    XlaOp flat = xla::Add(
        xla::Mul(xla::BroadcastInDim(rows_u64, {num_indices, row_size}, {0}),
                 xla::ConstantR0<uint64_t>(bb, static_cast<uint64_t>(row_size))),
        xla::Iota(bb, xla::ShapeUtil::MakeShape(xla::U64, {num_indices, row_size}), 1));
    const Batch batch =
        Batch::Make(hb, u.dtype == DT_BFLOAT16, u.rounding, values[kKeys],
                    SplitIndex(hb, xla::Reshape(flat, {batch_elements}), n > kTwoTo32));
    const Value g = u.grad_dtype == DT_BFLOAT16 ? hb.LoadBf16(values[kGrad])
                                                : Hlo::LoadF32(values[kGrad]);
    std::vector<XlaOp> old_rows;
    for (size_t k = 0; k < state.size(); ++k) {
      old_rows.push_back(xla::Reshape(xla::TorchIndexSelect(values[first_state + k], values[kRow], 0),
                                      {batch_elements}));
    }
    const std::vector<XlaOp> new_rows =
        math(batch, old_rows, g, values.subspan(kFixed, num_scalars));
    XlaOp this_round = xla::And(xla::Eq(values[kRank], values[kRound]), values[kValid]);
    XlaOp take = xla::Reshape(xla::BroadcastInDim(this_round, {num_indices, row_size}, {0}),
                              {batch_elements});
    xla::ScatterDimensionNumbers dims;
    dims.add_update_window_dims(1);
    dims.add_inserted_window_dims(0);
    dims.add_scatter_dims_to_operand_dims(0);
    dims.set_index_vector_dim(1);
    std::vector<XlaOp> out(values.begin(), values.end());
    out[kRound] = xla::Add(values[kRound], xla::ConstantR0<int32_t>(bb, 1));
    for (size_t k = 0; k < state.size(); ++k) {
      const xla::PrimitiveType type = StorageType(dtypes[k]);
      // new = old + (new - old) in wrapping integer arithmetic: exact.
      XlaOp difference = xla::Select(take, xla::Sub(new_rows[k], old_rows[k]),
                                     xla::ZerosLike(old_rows[k]));
      out[first_state + k] = xla::Scatter(
          values[first_state + k], xla::Reshape(values[kRow], {num_indices, 1}),
          xla::Reshape(difference, {num_indices, row_size}),
          xla::CreateScalarAddComputation(type, bb), dims);
    }
    return out;
  };
  std::vector<XlaOp> result;
  TF_ASSIGN_OR_RETURN(result, xla::WhileLoopHelper(condition, body, init,
                                                   "tf_bf16_sparse_rounds", b));
  return vars.AssignBits(absl::MakeSpan(result).subspan(first_state));
}

// The random stream inputs.
struct Stream {
  XlaOp seed, step, var_id;
};

absl::StatusOr<Stream> ReadStream(XlaOpKernelContext* ctx) {
  for (const char* name : {"seed", "step", "var_id"}) {
    if (!TensorShapeUtils::IsScalar(ctx->InputShape(name))) {
      return errors::InvalidArgument("Input '", name, "' must be a scalar, got shape ",
                                     ctx->InputShape(name).DebugString(), ".");
    }
  }
  return Stream{ctx->Input("seed"), ctx->Input("step"), ctx->Input("var_id")};
}

// Sparse inputs: indices a vector, var of rank >= 1, grad [num_indices] + var.shape[1:].
absl::StatusOr<int64_t> CheckSparse(XlaOpKernelContext* ctx, const TensorShape& var_shape) {
  const TensorShape index_shape = ctx->InputShape("indices");
  if (!TensorShapeUtils::IsVector(index_shape)) {
    return errors::InvalidArgument("Input 'indices' must be a vector, got shape ",
                                   index_shape.DebugString(), ".");
  }
  if (var_shape.dims() < 1) {
    return errors::InvalidArgument("Sparse updates need 'var' of rank >= 1, got shape ",
                                   var_shape.DebugString(), ".");
  }
  TensorShape expected = var_shape;
  expected.set_dim(0, index_shape.dim_size(0));
  int start, stop;
  TF_RETURN_IF_ERROR(ctx->op_kernel().InputRange("grad", &start, &stop));
  TF_RETURN_IF_ERROR(CheckGradientShape(ctx, start, expected));
  return index_shape.dim_size(0);
}

// ---------------------------------------------------------------------------
// The element functions of bf16_update_math_xla.h as ElementMath: the scalars
// arrive as a span (loop-carried through the sparse rounds) in the order
// given below.

using tf_bf16::xla_math::AdamParams;
using tf_bf16::xla_math::LionParams;
using tf_bf16::xla_math::SgdParams;

// scalars: lr, momentum, weight_decay, decay.
ElementMath SgdMath(bool use_momentum, bool nesterov) {
  return [=](const Batch& e, absl::Span<const XlaOp> state, Value g,
             absl::Span<const XlaOp> s) {
    const SgdParams p{{s[0], false}, {s[1], false}, {s[2], false}, s[3], use_momentum,
                      nesterov};
    return tf_bf16::xla_math::SgdElements(e, state, g, p);
  };
}

// scalars: lr, alpha, 1 - beta1, 1 - beta2, epsilon, weight_decay, decay.
ElementMath AdamMath(bool amsgrad) {
  return [=](const Batch& e, absl::Span<const XlaOp> state, Value g,
             absl::Span<const XlaOp> s) {
    const AdamParams p{{s[0], false}, {s[1], true},  {s[2], true}, {s[3], true},
                       {s[4], false}, {s[5], false}, s[6],         amsgrad};
    return tf_bf16::xla_math::AdamElements(e, state, g, p);
  };
}

// scalars: lr, beta1, 1 - beta1, beta2, 1 - beta2, weight_decay, decay.
ElementMath LionMath() {
  return [](const Batch& e, absl::Span<const XlaOp> state, Value g,
            absl::Span<const XlaOp> s) {
    const LionParams p{{s[0], false}, {s[1], false}, {s[2], true}, {s[3], false},
                       {s[4], true},  {s[5], false}, s[6]};
    return tf_bf16::xla_math::LionElements(e, state, g, p);
  };
}

// No scalars; the "gradient" is the delta.
ElementMath AssignAddMath() {
  return [](const Batch& e, absl::Span<const XlaOp> state, Value delta,
            absl::Span<const XlaOp>) {
    return tf_bf16::xla_math::AssignAddElements(e, state, delta);
  };
}

// Scalar float32 arithmetic of the hyperparameters, rounded and flushed as
// the element math (the CPU kernels do it on the host in float32).
Value ScalarValue(XlaOp x) { return Value{x, false}; }

// weight_decay != 0, as the kernels' mask (denormals as zero, as under DAZ).
XlaOp DecayPredicate(const Hlo& h, XlaOp weight_decay) {
  return h.Ne(ScalarValue(weight_decay), h.F32(0.0f));
}

// ---------------------------------------------------------------------------
// The op kernels.

class XlaStochasticRoundOp : public XlaOpKernel {
 public:
  explicit XlaStochasticRoundOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {}

  void Compile(XlaOpKernelContext* ctx) override {
    auto stream = ReadStream(ctx);
    OP_REQUIRES_OK(ctx, stream.status());
    xla::XlaBuilder* b = ctx->builder();
    Hlo h(b);
    const TensorShape shape = ctx->InputShape("x");
    const int64_t n = shape.num_elements();
    ElementIndex index;
    if (n <= kTwoTo32) {
      index.low = xla::Iota(b, xla::U32, n);
    } else {
      index = SplitIndex(h, xla::Iota(b, xla::U64, n), true);
    }
    XlaOp hash = h.ElementHash(h.StreamKey(stream->seed, stream->step, stream->var_id), index);
    const Value x = Hlo::LoadF32(xla::Reshape(Hlo::Bits(ctx->Input("x")), {n}));
    XlaOp y = h.RoundStochasticBf16(x, h.Draw(hash, 0));
    ctx->SetOutput(0, xla::Reshape(xla::BitcastConvertType(y, xla::BF16), shape.dim_sizes()));
  }
};

class XlaRoundedAssignAddOp : public XlaOpKernel {
 public:
  explicit XlaRoundedAssignAddOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tdelta", &delta_dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    auto stream = ReadStream(ctx);
    OP_REQUIRES_OK(ctx, stream.status());
    Variables vars(*this, ctx);
    OP_REQUIRES_OK(ctx, vars.Add("var").status());
    auto num_compensation = vars.Add("compensation");
    OP_REQUIRES_OK(ctx, num_compensation.status());
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype_, *num_compensation));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype_));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16));
    int delta_index, unused;
    OP_REQUIRES_OK(ctx, InputRange("delta", &delta_index, &unused));
    OP_REQUIRES_OK(ctx, CheckGradientShape(ctx, delta_index, vars.shape(), "delta"));
    Update u{rounding_, dtype_, ctx->Input(delta_index), delta_dtype_, {},
             stream->seed, stream->step, stream->var_id, XlaOp()};
    OP_REQUIRES_OK(ctx, DenseUpdate(ctx, vars, u, AssignAddMath()));
  }

 private:
  Rounding rounding_;
  DataType dtype_, delta_dtype_;
};

template <bool kSparse>
class XlaApplySgdOp : public XlaOpKernel {
 public:
  explicit XlaApplySgdOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &use_nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tgrad", &grad_dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    auto stream = ReadStream(ctx);
    OP_REQUIRES_OK(ctx, stream.status());
    Variables vars(*this, ctx);
    OP_REQUIRES_OK(ctx, vars.Add("var").status());
    auto num_accum = vars.Add("accum");
    OP_REQUIRES_OK(ctx, num_accum.status());
    auto num_compensation = vars.Add("compensation");
    OP_REQUIRES_OK(ctx, num_compensation.status());
    OP_REQUIRES(ctx, *num_accum <= 1,
                errors::InvalidArgument("At most one 'accum' variable, got ", *num_accum));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype_, *num_compensation));
    Validation check(*this, ctx);
    auto lr = check.Scalar("lr", /*non_negative=*/true);
    OP_REQUIRES_OK(ctx, lr.status());
    auto momentum = check.Scalar("momentum");
    OP_REQUIRES_OK(ctx, momentum.status());
    auto weight_decay = check.Scalar("weight_decay");
    OP_REQUIRES_OK(ctx, weight_decay.status());
    OP_REQUIRES(ctx, !use_nesterov_ || *num_accum == 1,
                errors::InvalidArgument(
                    "use_nesterov=True needs a momentum accumulator ('accum')."));
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype_));
    OP_REQUIRES_OK(ctx, vars.Check("accum", dtype_));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16));
    int64_t num_indices = 0;
    if (kSparse) {
      auto checked = CheckSparse(ctx, vars.shape());
      OP_REQUIRES_OK(ctx, checked.status());
      num_indices = *checked;
    } else {
      int grad_index, unused;
      OP_REQUIRES_OK(ctx, InputRange("grad", &grad_index, &unused));
      OP_REQUIRES_OK(ctx, CheckGradientShape(ctx, grad_index, vars.shape()));
    }
    Hlo h(ctx->builder());
    Update u{rounding_,
             dtype_,
             ctx->Input("grad"),
             grad_dtype_,
             {*lr, *momentum, *weight_decay, DecayPredicate(h, *weight_decay)},
             stream->seed,
             stream->step,
             stream->var_id,
             check.valid()};
    ElementMath math = SgdMath(*num_accum == 1, use_nesterov_);
    OP_REQUIRES_OK(ctx, kSparse ? SparseUpdate(ctx, vars, u, ctx->Input("indices"), num_indices,
                                               math)
                                : DenseUpdate(ctx, vars, u, math));
  }

 private:
  Rounding rounding_;
  bool use_nesterov_;
  DataType dtype_, grad_dtype_;
};

// Adam's scalars, as ReadAdamScalars: checks, then alpha; 1 - beta arrives
// computed by the caller as Keras computes it (docs/rounding.md 5.3).
absl::StatusOr<std::vector<XlaOp>> AdamScalars(Validation& check, const Hlo& h) {
  std::vector<XlaOp> in;
  for (const char* name : {"beta1_power", "beta2_power", "lr", "one_minus_beta1",
                           "one_minus_beta2", "epsilon", "weight_decay"}) {
    const bool non_negative = std::string(name) == "lr" || std::string(name) == "epsilon";
    XlaOp x;
    TF_ASSIGN_OR_RETURN(x, check.Scalar(name, non_negative));
    in.push_back(x);
  }
  const XlaOp beta1_power = in[0], beta2_power = in[1], lr = in[2], one_minus_beta1 = in[3],
              one_minus_beta2 = in[4], epsilon = in[5], weight_decay = in[6];
  TF_RETURN_IF_ERROR(check.AdamStep());
  float omb1, omb2, b1p, b2p, lr_value;
  if (check.Constant("one_minus_beta1", &omb1) && check.Constant("one_minus_beta2", &omb2)) {
    TF_RETURN_IF_ERROR(bf16_ops::CheckOneMinusBetas(omb1, omb2));
  } else {
    for (XlaOp one_minus_beta : {one_minus_beta1, one_minus_beta2}) {
      // (0, 1]: not negative, not +-0, not above 1 (the scalar is finite).
      const XlaOp is_zero = xla::Eq(
          xla::And(Hlo::Bits(one_minus_beta), h.U32(tf_bf16::xla_math::kAbsMask)), h.U32(0));
      check.Require(xla::Not(xla::Or(IsNegative(h, one_minus_beta),
                                     xla::Or(is_zero, IsAboveOne(h, one_minus_beta)))));
    }
  }
  const bool constant_powers =
      check.Constant("beta1_power", &b1p) && check.Constant("beta2_power", &b2p);
  if (constant_powers) {
    TF_RETURN_IF_ERROR(bf16_ops::CheckBiasCorrectionPowers(b1p, b2p));
  } else {
    // beta1_power in [0, 1), beta2_power in [0, 1].
    check.Require(xla::Not(xla::Or(IsNegative(h, beta1_power), IsAtLeastOne(h, beta1_power))));
    check.Require(xla::Not(xla::Or(IsNegative(h, beta2_power), IsAboveOne(h, beta2_power))));
  }
  const Value one = h.F32(1.0f);
  // lr * sqrt(1 - beta2_power) / (1 - beta1_power), in that order.
  const Value alpha =
      h.Div(h.Mul(ScalarValue(lr), h.Sqrt(h.Sub(one, ScalarValue(beta2_power)))),
            h.Sub(one, ScalarValue(beta1_power)));
  if (constant_powers && check.Constant("lr", &lr_value)) {
    // As the kernels compute it (ReadAdamScalars), on the host.
    const float constant_alpha = lr_value * std::sqrt(1.0f - b2p) / (1.0f - b1p);
    TF_RETURN_IF_ERROR(bf16_ops::CheckAdamStepSize(constant_alpha, lr_value, b1p, b2p));
  } else {
    check.Require(IsFinite(h, alpha.op));
  }
  return std::vector<XlaOp>{lr,
                            alpha.op,
                            one_minus_beta1,
                            one_minus_beta2,
                            epsilon,
                            weight_decay,
                            DecayPredicate(h, weight_decay)};
}

template <bool kSparse>
class XlaApplyAdamOp : public XlaOpKernel {
 public:
  explicit XlaApplyAdamOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tgrad", &grad_dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    auto stream = ReadStream(ctx);
    OP_REQUIRES_OK(ctx, stream.status());
    Variables vars(*this, ctx);
    OP_REQUIRES_OK(ctx, vars.Add("var").status());
    OP_REQUIRES_OK(ctx, vars.Add("m").status());
    OP_REQUIRES_OK(ctx, vars.Add("v").status());
    auto num_vhat = vars.Add("vhat");
    OP_REQUIRES_OK(ctx, num_vhat.status());
    auto num_compensation = vars.Add("compensation");
    OP_REQUIRES_OK(ctx, num_compensation.status());
    OP_REQUIRES(ctx, *num_vhat <= 1,
                errors::InvalidArgument("At most one 'vhat' variable, got ", *num_vhat));
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype_, *num_compensation));
    Validation check(*this, ctx);
    Hlo h(ctx->builder());
    auto scalars = AdamScalars(check, h);
    OP_REQUIRES_OK(ctx, scalars.status());
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype_));
    for (const char* slot : {"m", "v", "vhat"}) OP_REQUIRES_OK(ctx, vars.Check(slot, dtype_));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16));
    int64_t num_indices = 0;
    if (kSparse) {
      auto checked = CheckSparse(ctx, vars.shape());
      OP_REQUIRES_OK(ctx, checked.status());
      num_indices = *checked;
    } else {
      int grad_index, unused;
      OP_REQUIRES_OK(ctx, InputRange("grad", &grad_index, &unused));
      OP_REQUIRES_OK(ctx, CheckGradientShape(ctx, grad_index, vars.shape()));
    }
    Update u{rounding_,     dtype_,       ctx->Input("grad"), grad_dtype_, *scalars,
             stream->seed, stream->step, stream->var_id,     check.valid()};
    ElementMath math = AdamMath(*num_vhat == 1);
    OP_REQUIRES_OK(ctx, kSparse ? SparseUpdate(ctx, vars, u, ctx->Input("indices"), num_indices,
                                               math)
                                : DenseUpdate(ctx, vars, u, math));
  }

 private:
  Rounding rounding_;
  DataType dtype_, grad_dtype_;
};

class XlaApplyLionOp : public XlaOpKernel {
 public:
  explicit XlaApplyLionOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseRounding(ctx, &rounding_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tgrad", &grad_dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    auto stream = ReadStream(ctx);
    OP_REQUIRES_OK(ctx, stream.status());
    Variables vars(*this, ctx);
    OP_REQUIRES_OK(ctx, vars.Add("var").status());
    OP_REQUIRES_OK(ctx, vars.Add("m").status());
    auto num_compensation = vars.Add("compensation");
    OP_REQUIRES_OK(ctx, num_compensation.status());
    OP_REQUIRES_OK(ctx, CheckCompensationCount(rounding_, dtype_, *num_compensation));
    Validation check(*this, ctx);
    Hlo h(ctx->builder());
    std::vector<XlaOp> in;
    for (const char* name : {"lr", "beta1", "beta2", "weight_decay"}) {
      auto x = check.Scalar(name, std::string(name) == "lr");
      OP_REQUIRES_OK(ctx, x.status());
      in.push_back(*x);
    }
    float b1, b2;
    if (check.Constant("beta1", &b1) && check.Constant("beta2", &b2)) {
      OP_REQUIRES_OK(ctx, bf16_ops::CheckLionBetas(b1, b2));
    } else {
      for (XlaOp beta : {in[1], in[2]}) {
        check.Require(xla::Not(xla::Or(IsNegative(h, beta), IsAboveOne(h, beta))));
      }
    }
    OP_REQUIRES_OK(ctx, vars.CheckDistinct());
    OP_REQUIRES_OK(ctx, vars.Check("var", dtype_));
    OP_REQUIRES_OK(ctx, vars.Check("m", dtype_));
    OP_REQUIRES_OK(ctx, vars.Check("compensation", DT_BFLOAT16));
    int grad_index, unused;
    OP_REQUIRES_OK(ctx, InputRange("grad", &grad_index, &unused));
    OP_REQUIRES_OK(ctx, CheckGradientShape(ctx, grad_index, vars.shape()));
    const Value one = h.F32(1.0f);
    Update u{rounding_,
             dtype_,
             ctx->Input(grad_index),
             grad_dtype_,
             {in[0], in[1], h.Sub(one, ScalarValue(in[1])).op, in[2],
              h.Sub(one, ScalarValue(in[2])).op, in[3], DecayPredicate(h, in[3])},
             stream->seed,
             stream->step,
             stream->var_id,
             check.valid()};
    OP_REQUIRES_OK(ctx, DenseUpdate(ctx, vars, u, LionMath()));
  }

 private:
  Rounding rounding_;
  DataType dtype_, grad_dtype_;
};

// ---------------------------------------------------------------------------
// Registration.
//
// REGISTER_XLA_OP records a lowering; TensorFlow turns the records into
// kernels for the XLA_*_JIT devices once, when it first creates its devices
// (XlaOpRegistry::RegisterCompilationKernels). The op library is usually
// loaded later than that (on the first tf_bf16 op), so when it finds the
// JIT kernels already registered it registers its own directly, as that
// function would have.

template <typename Kernel>
OpKernel* CreateKernel(OpKernelConstruction* ctx) {
  return new Kernel(ctx);
}

struct Lowering {
  const char* op;
  OpKernel* (*create)(OpKernelConstruction*);
};

const Lowering kLowerings[] = {
    {"TfBf16>StochasticRound", CreateKernel<XlaStochasticRoundOp>},
    {"TfBf16>ResourceRoundedAssignAdd", CreateKernel<XlaRoundedAssignAddOp>},
    {"TfBf16>ResourceApplySgd", CreateKernel<XlaApplySgdOp<false>>},
    {"TfBf16>ResourceApplyAdam", CreateKernel<XlaApplyAdamOp<false>>},
    {"TfBf16>ResourceApplyLion", CreateKernel<XlaApplyLionOp>},
    {"TfBf16>ResourceSparseApplySgd", CreateKernel<XlaApplySgdOp<true>>},
    {"TfBf16>ResourceSparseApplyAdam", CreateKernel<XlaApplyAdamOp<true>>},
};

const absl::string_view kXlaDevices[] = {DEVICE_CPU_XLA_JIT, DEVICE_GPU_XLA_JIT};

REGISTER_XLA_OP(Name("TfBf16>StochasticRound").Device(kXlaDevices), XlaStochasticRoundOp);
REGISTER_XLA_OP(Name("TfBf16>ResourceRoundedAssignAdd").Device(kXlaDevices),
                XlaRoundedAssignAddOp);
REGISTER_XLA_OP(Name("TfBf16>ResourceApplySgd").Device(kXlaDevices), XlaApplySgdOp<false>);
REGISTER_XLA_OP(Name("TfBf16>ResourceApplyAdam").Device(kXlaDevices), XlaApplyAdamOp<false>);
REGISTER_XLA_OP(Name("TfBf16>ResourceApplyLion").Device(kXlaDevices), XlaApplyLionOp);
REGISTER_XLA_OP(Name("TfBf16>ResourceSparseApplySgd").Device(kXlaDevices),
                XlaApplySgdOp<true>);
REGISTER_XLA_OP(Name("TfBf16>ResourceSparseApplyAdam").Device(kXlaDevices),
                XlaApplyAdamOp<true>);

bool HasKernelOn(absl::string_view op, absl::string_view device) {
  const KernelList kernels = GetRegisteredKernelsForOp(op);
  for (const KernelDef& def : kernels.kernel()) {
    if (def.device_type() == device) return true;
  }
  return false;
}

// NoOp has a lowering in every TensorFlow build with XLA.
const bool kLateJitKernelsRegistered = [] {
  if (!HasKernelOn("NoOp", DEVICE_CPU_XLA_JIT)) return false;  // TensorFlow will do it
  for (absl::string_view device : kXlaDevices) {
    for (const Lowering& lowering : kLowerings) {
      if (HasKernelOn(lowering.op, device)) continue;
      new kernel_factory::OpKernelRegistrar(
          KernelDefBuilder(lowering.op).Device(device.data()).Build(), "XlaJitOp",
          lowering.create);
    }
  }
  return true;
}();

}  // namespace
}  // namespace tensorflow
