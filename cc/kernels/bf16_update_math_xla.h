// The per-element arithmetic of bf16_update_math.h, emitted as HLO with
// XlaBuilder for the XLA lowering (bf16_training_ops_xla.cc). Same functions,
// same operation order, same bits: docs/rounding.md is the specification and
// section 8 there says how this file keeps XLA's compilers from changing them.
//
// Three rules make the emitted HLO bit-identical to the C++ kernels on any XLA
// backend, whatever the flags:
//
// 1. Every rounding is integer arithmetic on the float's bits (bitcast-convert
//    to u32, add, shift, mask, bitcast back); bfloat16 is loaded and stored as
//    u16 bit patterns. There is no float32 -> bfloat16 convert anywhere, so
//    XLA's removal of f32 -> bf16 -> f32 round trips
//    (xla_allow_excess_precision) finds nothing to remove.
// 2. Every float32 result passes through Result(), which flushes a subnormal
//    to a signed zero with integer operations on its bits, and every operand
//    that may be subnormal is flushed first: the CPU kernels' FTZ/DAZ
//    (docs/rounding.md 1) on devices that keep subnormals. The same integer
//    select stands between every multiply and the add that consumes it, so no
//    compiler can contract the two into a fused multiply-add (XLA:CPU allows
//    FMA fusion unconditionally, LLVM's NVPTX backend fuses by default), and
//    no algebraic rewrite sees two float operations in a row.
// 3. Division and square root are computed in float64 and rounded once to
//    float32, which is the correctly rounded float32 result (53 >= 2 * 24 + 2
//    bits); XLA:GPU lowers float32 division to the approximate div.full.f32.
#ifndef TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_XLA_H_
#define TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_XLA_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "bf16_update_math.h"
#include "xla/hlo/builder/xla_builder.h"

namespace tf_bf16 {
namespace xla_math {

using xla::XlaOp;

// tf_bf16::Mix32's multipliers.
constexpr uint32_t kMix32Multiplier1 = 0x7FEB352Du;
constexpr uint32_t kMix32Multiplier2 = 0x846CA68Bu;
constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kExponentMask = 0x7F800000u;

// A float32 value of the computation, and whether it is known to hold no
// subnormal number (true for every result of the arithmetic below; false for
// values loaded from tensors and scalar inputs).
struct Value {
  XlaOp op;
  bool flushed;
};

// The flat element indices of a batch of elements (docs/rounding.md 3.3), as
// their low and high 32 bits. `high` is left empty when every index is below
// 2^32, which the shapes tell at compile time.
struct ElementIndex {
  XlaOp low;
  XlaOp high;
};

class Hlo {
 public:
  explicit Hlo(xla::XlaBuilder* b) : b_(b) {}
  xla::XlaBuilder* builder() const { return b_; }

  XlaOp U32(uint32_t v) const { return xla::ConstantR0<uint32_t>(b_, v); }
  Value F32(float v) const { return Value{xla::ConstantR0<float>(b_, v), true}; }
  static XlaOp Bits(XlaOp f) { return xla::BitcastConvertType(f, xla::U32); }
  static XlaOp FromBits(XlaOp u) { return xla::BitcastConvertType(u, xla::F32); }
  XlaOp Shr(XlaOp u, int s) const { return xla::ShiftRightLogical(u, U32(s)); }
  XlaOp Shl(XlaOp u, int s) const { return xla::ShiftLeft(u, U32(s)); }

  // on_true where pred, else on_false; scalars are broadcast to the other
  // operand's shape.
  XlaOp Select(XlaOp pred, XlaOp on_true, XlaOp on_false) const {
    return xla::Select(pred, on_true, on_false);
  }

  // --- random bits (docs/rounding.md 3) ----------------------------------

  XlaOp Mix32(XlaOp x) const {
    x = xla::Xor(x, Shr(x, 16));
    x = xla::Mul(x, U32(kMix32Multiplier1));
    x = xla::Xor(x, Shr(x, 15));
    x = xla::Mul(x, U32(kMix32Multiplier2));
    return xla::Xor(x, Shr(x, 16));
  }

  // The low and high 32 bits of an int64 scalar, as u32 scalars.
  std::pair<XlaOp, XlaOp> Split64(XlaOp s64) const {
    XlaOp u = xla::BitcastConvertType(s64, xla::U64);
    XlaOp low = xla::ConvertElementType(
        xla::And(u, xla::ConstantR0<uint64_t>(b_, 0xFFFFFFFFull)), xla::U32);
    XlaOp high = xla::ConvertElementType(
        xla::ShiftRightLogical(u, xla::ConstantR0<uint64_t>(b_, 32)), xla::U32);
    return {low, high};
  }

  // tf_bf16::StreamKey, on int64 scalars known only at run time: a u32 scalar.
  XlaOp StreamKey(XlaOp seed, XlaOp step, XlaOp var_id) const {
    XlaOp key = U32(kStreamKeyInit);
    for (XlaOp word : {seed, step, var_id}) {
      auto [low, high] = Split64(word);
      key = Mix32(xla::Xor(key, low));
      key = Mix32(xla::Xor(key, high));
    }
    return Mix32(xla::Xor(key, U32(kStreamKeyFinalWord)));
  }

  // tf_bf16::MixBody and MixCore: Mix32 without its last step, and without
  // its first one either.
  XlaOp MixCore(XlaOp x) const {
    x = xla::Mul(x, U32(kMix32Multiplier1));
    x = xla::Xor(x, Shr(x, 15));
    return xla::Mul(x, U32(kMix32Multiplier2));
  }
  XlaOp MixBody(XlaOp x) const { return MixCore(xla::Xor(x, Shr(x, 16))); }

  // ElementBits::p0 for every element of `index` (h0 before its last
  // xor-shift), from the call's stream key.
  XlaOp ElementHash(XlaOp stream_key, const ElementIndex& index) const {
    XlaOp block_key = Mix32(xla::Xor(stream_key, index.high.valid() ? index.high : U32(0)));
    return MixCore(MixBody(xla::Xor(index.low, block_key)));
  }

  // ElementBits::Draw(k): draw k (0..3) of every element, from ElementHash.
  XlaOp Draw(XlaOp p0, int k) const {
    XlaOp p = k < 2 ? p0
                    : MixCore(xla::Xor(p0, U32(kSecondHashConstant ^ (kSecondHashConstant >> 16))));
    if (k % 2 == 0) return Shr(p, 16);
    return xla::And(xla::Xor(p, Shr(p, 16)), U32(0xFFFFu));
  }

  // --- denormals and NaN ------------------------------------------------

  XlaOp IsNanBits(XlaOp u) const { return xla::Gt(xla::And(u, U32(kAbsMask)), U32(kExponentMask)); }

  // u, or the signed zero when u is a subnormal: an integer select on the
  // exponent field, which no compiler can fold into a neighbouring float op.
  XlaOp FlushBits(XlaOp u) const {
    XlaOp exponent_zero = xla::Eq(xla::And(u, U32(kExponentMask)), U32(0));
    return Select(exponent_zero, xla::And(u, U32(kSignMask)), u);
  }

  Value Flush(Value x) const { return x.flushed ? x : Value{FromBits(FlushBits(Bits(x.op))), true}; }
  Value Result(XlaOp f32) const { return Value{FromBits(FlushBits(Bits(f32))), true}; }

  XlaOp IsNan(Value x) const { return IsNanBits(Bits(x.op)); }

  // float32 bits with every NaN canonical (stores of float32 state).
  XlaOp CanonicalBits(Value x) const {
    XlaOp u = Bits(x.op);
    return Select(IsNanBits(u), U32(kCanonicalNanFloat), u);
  }

  // --- float32 arithmetic, one rounding per operation, FTZ/DAZ -----------

  Value Add(Value a, Value b) const { return Result(xla::Add(Flush(a).op, Flush(b).op)); }
  Value Sub(Value a, Value b) const { return Result(xla::Sub(Flush(a).op, Flush(b).op)); }
  Value Mul(Value a, Value b) const { return Result(xla::Mul(Flush(a).op, Flush(b).op)); }
  Value Div(Value a, Value b) const {
    XlaOp q = xla::Div(xla::ConvertElementType(Flush(a).op, xla::F64),
                       xla::ConvertElementType(Flush(b).op, xla::F64));
    return Result(xla::ConvertElementType(q, xla::F32));
  }
  Value Sqrt(Value a) const {
    XlaOp r = xla::Sqrt(xla::ConvertElementType(Flush(a).op, xla::F64));
    return Result(xla::ConvertElementType(r, xla::F32));
  }
  // A sign flip (no arithmetic, as the kernels' negation).
  static Value Neg(Value a) { return Value{xla::Neg(a.op), a.flushed}; }

  // Comparisons see denormals as zero, as under DAZ.
  XlaOp Gt(Value a, Value b) const { return xla::Gt(Flush(a).op, Flush(b).op); }
  XlaOp Lt(Value a, Value b) const { return xla::Lt(Flush(a).op, Flush(b).op); }
  XlaOp Ne(Value a, Value b) const { return xla::Ne(Flush(a).op, Flush(b).op); }

  Value Select(XlaOp pred, Value on_true, Value on_false) const {
    return Value{Select(pred, on_true.op, on_false.op), on_true.flushed && on_false.flushed};
  }

  // --- loading and rounding (docs/rounding.md 2) -------------------------

  Value LoadBf16(XlaOp u16) const {
    return Value{FromBits(Shl(xla::ConvertElementType(u16, xla::U32), 16)), false};
  }
  static Value LoadF32(XlaOp u32) { return Value{FromBits(u32), false}; }

  // RoundNearestToBf16 / RoundStochasticToBf16, as u16 bit patterns.
  XlaOp RoundNearestBf16(Value x) const {
    XlaOp u = Bits(x.op);
    XlaOp rounded = Shr(xla::Add(xla::Add(u, U32(0x7FFFu)), xla::And(Shr(u, 16), U32(1))), 16);
    return ToBf16Bits(u, rounded);
  }
  XlaOp RoundStochasticBf16(Value x, XlaOp random16) const {
    XlaOp u = Bits(x.op);
    return ToBf16Bits(u, Shr(xla::Add(u, random16), 16));
  }
  // RoundNearestInFloat: the nearest bf16 value, as a float32.
  Value RoundNearestInFloat(Value x) const {
    XlaOp u = Bits(x.op);
    XlaOp rounded =
        xla::And(xla::Add(xla::Add(u, U32(0x7FFFu)), xla::And(Shr(u, 16), U32(1))),
                 U32(0xFFFF0000u));
    // Rounding a float that is no subnormal to bf16 gives no subnormal.
    return Value{FromBits(Select(IsNanBits(u), U32(uint32_t{kCanonicalNanBf16} << 16), rounded)),
                 x.flushed};
  }

 private:
  XlaOp ToBf16Bits(XlaOp u, XlaOp rounded) const {
    return xla::ConvertElementType(Select(IsNanBits(u), U32(kCanonicalNanBf16), rounded),
                                   xla::U16);
  }

  xla::XlaBuilder* b_;
};

// The storage and the random bits of one batch of elements of one update: how
// state is loaded, stored and committed (docs/rounding.md 5). Tensors are flat
// storage bits: u32 for float32, u16 for bfloat16.
struct Batch {
  const Hlo& h;
  bool bf16;           // the variable's (and its slots') dtype
  Rounding rounding;
  XlaOp hash;          // ElementBits::p0 of every element; only when a rounding draws

  // stream_key: the call's (u32 scalar); index: the elements' flat indices.
  static Batch Make(const Hlo& h, bool bf16, Rounding rounding, XlaOp stream_key,
                    const ElementIndex& index) {
    const bool draws = bf16 && rounding != Rounding::kNearest;
    return Batch{h, bf16, rounding, draws ? h.ElementHash(stream_key, index) : XlaOp()};
  }

  // A Kahan compensation buffer is updated (and is the last state tensor).
  bool kahan() const { return bf16 && rounding == Rounding::kKahan; }

  Value Load(XlaOp bits) const { return bf16 ? h.LoadBf16(bits) : Hlo::LoadF32(bits); }

  // The draw of optimizer slot `slot` (tf_bf16::SlotDraw).
  int SlotDraw(int slot) const { return (rounding == Rounding::kStochastic ? 1 : 0) + slot; }

  // StoreState of optimizer slot `slot`: float32 exact (canonical NaN); bf16
  // nearest or stochastic.
  XlaOp StoreState(Value value, int slot) const {
    if (!bf16) return h.CanonicalBits(value);
    if (rounding == Rounding::kNearest) return h.RoundNearestBf16(value);
    return h.RoundStochasticBf16(value, h.Draw(hash, SlotDraw(slot)));
  }

  // CommitWeight: returns the new weight bits and, for Kahan, sets
  // *compensation to the new compensation bits.
  XlaOp CommitWeight(Value weight, Value delta, XlaOp* compensation) const {
    if (!bf16) return h.CanonicalBits(h.Add(weight, delta));
    if (rounding == Rounding::kKahan) return KahanAdd(weight, delta, compensation);
    if (rounding == Rounding::kStochastic) {
      return h.RoundStochasticBf16(h.Add(weight, delta), h.Draw(hash, 0));
    }
    return h.RoundNearestBf16(h.Add(weight, delta));
  }

  // tf_bf16::KahanAdd.
  XlaOp KahanAdd(Value weight, Value delta, XlaOp* compensation) const {
    const Value update = h.RoundNearestInFloat(delta);
    const Value comp = h.LoadBf16(*compensation);
    const Value y = h.RoundNearestInFloat(h.Sub(update, comp));
    const Value s = h.RoundNearestInFloat(h.Add(weight, y));
    const Value s_minus_w = h.RoundNearestInFloat(h.Sub(s, weight));
    *compensation = h.RoundNearestBf16(h.Sub(s_minus_w, y));
    return h.RoundNearestBf16(s);  // s is bf16-valued: exact
  }

  // MaybeDecayedDelta: delta - (w * wd) * lr where decay (a scalar pred) holds.
  Value MaybeDecayed(XlaOp decay, Value delta, Value weight, Value weight_decay,
                     Value lr) const {
    return h.Select(decay, h.Sub(delta, h.Mul(h.Mul(weight, weight_decay), lr)), delta);
  }
};

// tf_bf16::NanMax.
inline Value NanMax(const Hlo& h, Value running_max, Value value) {
  return h.Select(xla::Or(h.IsNan(value), h.Gt(value, running_max)), value, running_max);
}

// tf_bf16::SignKeepNan.
inline Value SignKeepNan(const Hlo& h, Value x) {
  const Value zero = h.F32(0.0f);
  return h.Select(h.Gt(x, zero), h.F32(1.0f),
                  h.Select(h.Lt(x, zero), h.F32(-1.0f),
                           h.Select(h.IsNan(x), x, zero)));
}

// ---------------------------------------------------------------------------
// The element functions: tf_bf16::SgdElement, AdamElement, LionElement and
// AssignAddElement over a batch. `state` holds the storage bits of the tensors
// an update reads, in lane order (var, its slots, then the Kahan compensation
// when batch.kahan()); the result holds their new bits in the same order.

struct SgdParams {  // SgdScalars
  Value lr, momentum, weight_decay;
  XlaOp decay;  // scalar pred: weight_decay != 0
  bool use_momentum, nesterov;
};

struct AdamParams {  // AdamScalars
  Value lr, alpha, one_minus_beta1, one_minus_beta2, epsilon, weight_decay;
  XlaOp decay;
  bool amsgrad;
};

struct LionParams {  // LionScalars
  Value lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay;
  XlaOp decay;
};

// Commits the weight (state[0]) and appends its new bits, and the new
// compensation when there is one, to *out (whose first entry is reserved).
inline void CommitInto(const Batch& e, absl::Span<const XlaOp> state, Value w, Value delta,
                       std::vector<XlaOp>* out) {
  XlaOp compensation = e.kahan() ? state.back() : XlaOp();
  (*out)[0] = e.CommitWeight(w, delta, &compensation);
  if (e.kahan()) out->push_back(compensation);
}

inline std::vector<XlaOp> SgdElements(const Batch& e, absl::Span<const XlaOp> state, Value g,
                                      const SgdParams& p) {
  const Hlo& h = e.h;
  const Value w = e.Load(state[0]);
  std::vector<XlaOp> out = {XlaOp()};
  Value update;
  if (p.use_momentum) {
    const Value a = h.Sub(h.Mul(e.Load(state[1]), p.momentum), h.Mul(g, p.lr));
    out.push_back(e.StoreState(a, 0));
    update = p.nesterov ? h.Sub(h.Mul(a, p.momentum), h.Mul(g, p.lr)) : a;
  } else {
    update = Hlo::Neg(h.Mul(g, p.lr));
  }
  CommitInto(e, state, w, e.MaybeDecayed(p.decay, update, w, p.weight_decay, p.lr), &out);
  return out;
}

inline std::vector<XlaOp> AdamElements(const Batch& e, absl::Span<const XlaOp> state, Value g,
                                       const AdamParams& p) {
  const Hlo& h = e.h;
  const Value w = e.Load(state[0]);
  const Value m_old = e.Load(state[1]);
  const Value v_old = e.Load(state[2]);
  const Value m_new = h.Add(m_old, h.Mul(h.Sub(g, m_old), p.one_minus_beta1));
  const Value v_new = h.Add(v_old, h.Mul(h.Sub(h.Mul(g, g), v_old), p.one_minus_beta2));
  std::vector<XlaOp> out = {XlaOp(), e.StoreState(m_new, 0), e.StoreState(v_new, 1)};
  Value v_used = v_new;
  if (p.amsgrad) {
    v_used = NanMax(h, e.Load(state[3]), v_new);
    out.push_back(e.StoreState(v_used, 2));
  }
  const Value step = h.Div(h.Mul(m_new, p.alpha), h.Add(h.Sqrt(v_used), p.epsilon));
  CommitInto(e, state, w, e.MaybeDecayed(p.decay, Hlo::Neg(step), w, p.weight_decay, p.lr),
             &out);
  return out;
}

inline std::vector<XlaOp> LionElements(const Batch& e, absl::Span<const XlaOp> state, Value g,
                                       const LionParams& p) {
  const Hlo& h = e.h;
  const Value w = e.Load(state[0]);
  const Value m_old = e.Load(state[1]);
  const Value c = h.Add(h.Mul(m_old, p.beta1), h.Mul(g, p.one_minus_beta1));
  const Value m_new = h.Add(h.Mul(m_old, p.beta2), h.Mul(g, p.one_minus_beta2));
  std::vector<XlaOp> out = {XlaOp(), e.StoreState(m_new, 0)};
  const Value update = Hlo::Neg(h.Mul(p.lr, SignKeepNan(h, c)));
  CommitInto(e, state, w, e.MaybeDecayed(p.decay, update, w, p.weight_decay, p.lr), &out);
  return out;
}

inline std::vector<XlaOp> AssignAddElements(const Batch& e, absl::Span<const XlaOp> state,
                                            Value delta) {
  std::vector<XlaOp> out = {XlaOp()};
  CommitInto(e, state, e.Load(state[0]), delta, &out);
  return out;
}

}  // namespace xla_math
}  // namespace tf_bf16

#endif  // TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_XLA_H_
