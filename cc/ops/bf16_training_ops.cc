// Op definitions of tf_bf16: stochastic rounding and in-place bf16 updates of
// resource variables. Kernels: cc/kernels/bf16_training_ops.cc (OpKernels and
// CPU functors) and bf16_training_ops_gpu.cu.cc (GPU functors).
// Rounding specification: docs/rounding.md.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {

using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

namespace {

// Inputs named here must be scalars; a rank error at graph construction time
// names the input instead of failing later inside the kernel.
absl::Status ScalarInputs(InferenceContext* c, std::initializer_list<const char*> names) {
  for (const char* name : names) {
    std::vector<ShapeHandle> shapes;
    TF_RETURN_IF_ERROR(c->input(name, &shapes));
    for (const ShapeHandle& s : shapes) {
      ShapeHandle unused;
      absl::Status status = c->WithRank(s, 0, &unused);
      if (!status.ok()) {
        return errors::InvalidArgument("Input '", name, "' must be a scalar: ",
                                       status.message());
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfBf16>StochasticRound")
    .Input("x: float")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Output("y: bfloat16")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(ScalarInputs(c, {"seed", "step", "var_id"}));
      return shape_inference::UnchangedShape(c);
    })
    .Doc(R"doc(
Stochastically rounds float32 `x` to bfloat16.

The random bits are a counter-based hash of (seed, step, var_id, element
index); see docs/rounding.md. Stateless: the same inputs give the same output
on every device and for every thread count.
)doc");

REGISTER_OP("TfBf16>ResourceRoundedAssignAdd")
    .Input("var: resource")
    .Input("compensation: num_compensation * resource")
    .Input("delta: Tdelta")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Attr("T: {float, bfloat16}")
    .Attr("Tdelta: {float, bfloat16}")
    .Attr("num_compensation: int >= 0")
    .Attr("rounding: {'nearest', 'stochastic', 'kahan'}")
    .SetShapeFn([](InferenceContext* c) {
      return ScalarInputs(c, {"seed", "step", "var_id"});
    })
    .Doc(R"doc(
var += delta, rounded to var's dtype as `rounding` says. `kahan` needs exactly
one bfloat16 compensation variable of var's shape; the other roundings none.
float32 variables are updated exactly.
)doc");

REGISTER_OP("TfBf16>ResourceApplySgd")
    .Input("var: resource")
    .Input("accum: num_accum * resource")
    .Input("compensation: num_compensation * resource")
    .Input("lr: float")
    .Input("grad: Tgrad")
    .Input("momentum: float")
    .Input("weight_decay: float")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Attr("T: {float, bfloat16}")
    .Attr("Tgrad: {float, bfloat16}")
    .Attr("num_accum: int >= 0")
    .Attr("num_compensation: int >= 0")
    .Attr("rounding: {'nearest', 'stochastic', 'kahan'}")
    .Attr("use_nesterov: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      return ScalarInputs(
          c, {"lr", "momentum", "weight_decay", "seed", "step", "var_id"});
    })
    .Doc(R"doc(
Fused SGD step, in place, one pass over memory, in Keras's formulation
(tf.raw_ops.ResourceApplyKerasMomentum): accum = accum * momentum - grad * lr;
var += accum (Nesterov: var += accum * momentum - grad * lr), with decoupled
weight decay var -= var * weight_decay * lr folded in. Without `accum`
(num_accum = 0), var -= grad * lr. Math in float32; var and accum rounded once.
)doc");

REGISTER_OP("TfBf16>ResourceApplyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("vhat: num_vhat * resource")
    .Input("compensation: num_compensation * resource")
    .Input("beta1_power: float")
    .Input("beta2_power: float")
    .Input("lr: float")
    .Input("one_minus_beta1: float")
    .Input("one_minus_beta2: float")
    .Input("epsilon: float")
    .Input("weight_decay: float")
    .Input("grad: Tgrad")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Attr("T: {float, bfloat16}")
    .Attr("Tgrad: {float, bfloat16}")
    .Attr("num_vhat: int >= 0")
    .Attr("num_compensation: int >= 0")
    .Attr("rounding: {'nearest', 'stochastic', 'kahan'}")
    .SetShapeFn([](InferenceContext* c) {
      return ScalarInputs(c, {"beta1_power", "beta2_power", "lr", "one_minus_beta1",
                              "one_minus_beta2", "epsilon", "weight_decay", "seed", "step",
                              "var_id"});
    })
    .Doc(R"doc(
Fused Adam/AdamW step (AMSGrad when `vhat` is given), in place, one pass:
m += (grad - m) * one_minus_beta1; v += (grad^2 - v) * one_minus_beta2;
var -= alpha * m / (sqrt(v) + epsilon) with
alpha = lr * sqrt(1 - beta2_power) / (1 - beta1_power) in float32, and
decoupled weight decay var -= var * weight_decay * lr folded in.
`one_minus_beta1/2` are 1 - beta as the caller computes it (Keras: in float64
for a Python float, then rounded to float32), so that the constants are Keras's.
)doc");

REGISTER_OP("TfBf16>ResourceApplyLion")
    .Input("var: resource")
    .Input("m: resource")
    .Input("compensation: num_compensation * resource")
    .Input("lr: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("weight_decay: float")
    .Input("grad: Tgrad")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Attr("T: {float, bfloat16}")
    .Attr("Tgrad: {float, bfloat16}")
    .Attr("num_compensation: int >= 0")
    .Attr("rounding: {'nearest', 'stochastic', 'kahan'}")
    .SetShapeFn([](InferenceContext* c) {
      return ScalarInputs(c, {"lr", "beta1", "beta2", "weight_decay", "seed", "step",
                              "var_id"});
    })
    .Doc(R"doc(
Fused Lion step (Chen et al. 2023), in place, one pass:
var -= lr * sign(m * beta1 + grad * (1 - beta1)); m = m * beta2 + grad * (1 - beta2),
with decoupled weight decay var -= var * weight_decay * lr folded in.
)doc");

REGISTER_OP("TfBf16>ResourceSparseApplySgd")
    .Input("var: resource")
    .Input("accum: num_accum * resource")
    .Input("compensation: num_compensation * resource")
    .Input("lr: float")
    .Input("grad: Tgrad")
    .Input("indices: Tindices")
    .Input("momentum: float")
    .Input("weight_decay: float")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Attr("T: {float, bfloat16}")
    .Attr("Tgrad: {float, bfloat16}")
    .Attr("Tindices: {int32, int64}")
    .Attr("num_accum: int >= 0")
    .Attr("num_compensation: int >= 0")
    .Attr("rounding: {'nearest', 'stochastic', 'kahan'}")
    .Attr("use_nesterov: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      return ScalarInputs(
          c, {"lr", "momentum", "weight_decay", "seed", "step", "var_id"});
    })
    .Doc(R"doc(
ResourceApplySgd on the rows `indices` of var (and its slots) only, with
grad[k] the gradient of row indices[k]. Duplicate indices are applied one after
another in the order given, as tf.raw_ops.ResourceSparseApplyKerasMomentum does.
)doc");

REGISTER_OP("TfBf16>ResourceSparseApplyAdam")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("vhat: num_vhat * resource")
    .Input("compensation: num_compensation * resource")
    .Input("beta1_power: float")
    .Input("beta2_power: float")
    .Input("lr: float")
    .Input("one_minus_beta1: float")
    .Input("one_minus_beta2: float")
    .Input("epsilon: float")
    .Input("weight_decay: float")
    .Input("grad: Tgrad")
    .Input("indices: Tindices")
    .Input("seed: int64")
    .Input("step: int64")
    .Input("var_id: int64")
    .Attr("T: {float, bfloat16}")
    .Attr("Tgrad: {float, bfloat16}")
    .Attr("Tindices: {int32, int64}")
    .Attr("num_vhat: int >= 0")
    .Attr("num_compensation: int >= 0")
    .Attr("rounding: {'nearest', 'stochastic', 'kahan'}")
    .SetShapeFn([](InferenceContext* c) {
      return ScalarInputs(c, {"beta1_power", "beta2_power", "lr", "one_minus_beta1",
                              "one_minus_beta2", "epsilon", "weight_decay", "seed", "step",
                              "var_id"});
    })
    .Doc(R"doc(
ResourceApplyAdam on the rows `indices` only ("lazy" Adam: untouched rows and
their moments are neither read nor written). Duplicate indices are applied one
after another in the order given.
)doc");

}  // namespace tensorflow
