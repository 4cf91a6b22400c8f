// Per-element arithmetic of every tf_bf16 update, shared by the CPU kernels,
// the CUDA kernels and (as the model the HLO is written from) the XLA
// lowering. docs/rounding.md is the specification; this file is its single
// implementation in C++. Keep the two in step.
//
// Everything here is plain integer and IEEE float32 arithmetic on registers:
// no Eigen, no TensorFlow types, so that the same code compiles for host and
// device. bfloat16 storage is handled as raw uint16_t bit patterns.
//
// Arithmetic order matters: the pure-TF reference (tf_bf16/reference.py)
// performs the same float32 operations in the same order, and the library is
// compiled with -ffp-contract=off so that no multiply-add is fused. That is
// what makes every implementation agree bit for bit.
#ifndef TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_H_
#define TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TF_BF16_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TF_BF16_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace tf_bf16 {

enum class Rounding : int { kNearest = 0, kStochastic = 1, kKahan = 2 };

TF_BF16_HOST_DEVICE uint32_t FloatToBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

TF_BF16_HOST_DEVICE float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

#if defined(__CUDA_ARCH__)
// Makes the compiler compute `value` here, in program order, instead of
// keeping what it is computed from (e.g. a NaN test's predicate) alive until
// its use: across the out-of-line slow paths of IEEE division and square root
// a live predicate is saved to a register and restored, two instructions per
// stored value of Adam. An empty asm: no instruction is emitted.
__device__ __forceinline__ void MaterializeHere(uint32_t& value) { asm volatile("" : "+r"(value)); }
__device__ __forceinline__ void MaterializeHere(uint16_t& value) { asm volatile("" : "+h"(value)); }
#endif

TF_BF16_HOST_DEVICE float Bf16ToFloat(uint16_t b) {
  return BitsToFloat(static_cast<uint32_t>(b) << 16);
}

TF_BF16_HOST_DEVICE bool BitsAreNan(uint32_t u) {
  return (u & 0x7FFFFFFFu) > 0x7F800000u;
}

// Every NaN result is the canonical quiet NaN. IEEE leaves the sign and
// payload of a NaN produced by arithmetic unspecified, and compilers and
// devices differ on them (x86 propagates an operand's, CUDA returns its own),
// so only a canonical NaN keeps all implementations bit-identical. Truncating
// a NaN could also turn it into an infinity.
constexpr uint16_t kCanonicalNanBf16 = 0x7FC0u;
constexpr uint32_t kCanonicalNanFloat = 0x7FC00000u;

// rounded, or the canonical NaN if u is a NaN. Written as a mask rather than
// a ?: so the compiler cannot sink the random-bit computation into a branch,
// which stops the loops from vectorizing.
TF_BF16_HOST_DEVICE uint16_t SelectNan(uint32_t u, uint32_t rounded) {
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(BitsAreNan(u));
  return static_cast<uint16_t>((rounded & ~nan_mask) | (kCanonicalNanBf16 & nan_mask));
}

// if_set where mask is all ones, if_clear where it is zero. For choices that
// are constant over a loop (Nesterov, weight decay): unlike a ?: on a bool,
// this bit select vectorizes.
TF_BF16_HOST_DEVICE float SelectByMask(uint32_t mask, float if_set, float if_clear) {
  return BitsToFloat((FloatToBits(if_set) & mask) | (FloatToBits(if_clear) & ~mask));
}

TF_BF16_HOST_DEVICE uint32_t MaskOf(bool flag) { return 0u - static_cast<uint32_t>(flag); }

TF_BF16_HOST_DEVICE float CanonicalizeNan(float x) {
  return x != x ? BitsToFloat(kCanonicalNanFloat) : x;
}

// Round to nearest, ties to even: TensorFlow's and Eigen's float->bfloat16.
TF_BF16_HOST_DEVICE uint16_t RoundNearestToBf16(float x) {
  const uint32_t u = FloatToBits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return SelectNan(u, rounded);
}

// RoundNearestToBf16 widened back to float32, without narrowing to 16 bits in
// between (narrowing and widening are the expensive part in vector code).
TF_BF16_HOST_DEVICE float RoundNearestInFloat(float x) {
  const uint32_t u = FloatToBits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(BitsAreNan(u));
  return BitsToFloat((rounded & ~nan_mask) | ((uint32_t{kCanonicalNanBf16} << 16) & nan_mask));
}

// RoundNearestInFloat for operands whose NaNs, if any, have zero low 16 bits.
// Adding the rounding bias then cannot carry out of a NaN's mantissa, so the
// NaN check can be left out. Holds for arithmetic on bf16-valued floats on
// x86, which propagates an operand's NaN or returns 0xFFC00000; not on CUDA,
// whose arithmetic NaN is 0x7FFFFFFF, so device code keeps the check.
TF_BF16_HOST_DEVICE float RoundNearestInFloatBf16Operands(float x) {
#if defined(__CUDA_ARCH__)
  return RoundNearestInFloat(x);
#else
  const uint32_t u = FloatToBits(x);
  return BitsToFloat((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
#endif
}

// Stochastic rounding: adding a uniform 16-bit integer to the 16 bits that
// bfloat16 drops carries into the kept bits with probability equal to the
// dropped fraction, so E[result] = x and the result is always one of the two
// bf16 neighbours of x. Exact values (low half zero) never carry. +-Inf has a
// zero low half, so it stays +-Inf; the largest finite values may carry into
// +-Inf exactly as rounding up past the largest bf16 does.
TF_BF16_HOST_DEVICE uint16_t RoundStochasticToBf16(float x, uint32_t random16) {
  const uint32_t u = FloatToBits(x);
#if defined(__CUDA_ARCH__)
  // A float comparison (one instruction) finds the NaN; the shift of the
  // selected 32-bit value can merge into the packing of two results.
  uint32_t word = x != x ? kCanonicalNanFloat : u + random16;
  MaterializeHere(word);
  return static_cast<uint16_t>(word >> 16);
#else
  const uint32_t rounded = (u + random16) >> 16;
  return SelectNan(u, rounded);
#endif
}

// Roundings of results of float32 arithmetic. The kernels compute with
// denormals flushed (FTZ on every device, docs/rounding.md 1), so such a value
// is never subnormal, and device code can use the hardware conversion
// cvt.rn.bf16.f32: round to nearest even, which for every normal, zero and
// infinite input is exactly the bit formula above (a bf16 has float32's
// exponent range, so no rounding of a normal value is subnormal), and whose
// NaN (a NaN, of whatever pattern) is replaced by the canonical one. Values
// loaded from tensors, which may be subnormal, use the bit formula everywhere.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint16_t HardwareRoundNearest(float x) {
  unsigned short r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
#endif

TF_BF16_HOST_DEVICE uint16_t RoundNearestComputedToBf16(float x) {
#if defined(__CUDA_ARCH__)
  uint16_t r = x != x ? kCanonicalNanBf16 : HardwareRoundNearest(x);
  MaterializeHere(r);
  return r;
#else
  return RoundNearestToBf16(x);
#endif
}

// RoundNearestInFloat of a result of float32 arithmetic whose NaN, if it is
// one, need only stay a NaN (an intermediate of the Kahan step: every stored
// result is canonicalized later). On the host, operands are bf16-valued and
// x86 arithmetic propagates an operand's NaN or returns 0xFFC00000, so adding
// the rounding bias cannot carry out of a NaN's mantissa; on the device the
// hardware conversion keeps a NaN a NaN.
TF_BF16_HOST_DEVICE float RoundNearestComputedInFloat(float x) {
#if defined(__CUDA_ARCH__)
  return BitsToFloat(static_cast<uint32_t>(HardwareRoundNearest(x)) << 16);
#else
  return RoundNearestInFloatBf16Operands(x);
#endif
}

// Chris Wellons' "lowbias32" integer hash: a bijection on 32 bits with two
// multiplies and three xor-shifts; every output bit depends on every input bit.
TF_BF16_HOST_DEVICE uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Mix32 without its first and last steps (x ^= x >> 16):
// Mix32(x) = y ^ (y >> 16) with y = MixCore(x ^ (x >> 16)).
TF_BF16_HOST_DEVICE uint32_t MixCore(uint32_t x) {
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  return x * 0x846CA68Bu;
}

constexpr uint32_t kStreamKeyInit = 0x6A09E667u;  // first 32 bits of frac(sqrt(2))
// The stream key absorbs this word after (seed, step, var_id): version 1 of
// the specification absorbed the lane of the tensor written (0 for the
// weight); keeping 0 keeps draw 0 equal to version 1's weight bits.
constexpr uint32_t kStreamKeyFinalWord = 0u;
// Odd constant that separates an element's second hash from its first
// (2^32 / golden ratio).
constexpr uint32_t kSecondHashConstant = 0x9E3779B9u;

// The key of one op call's random stream: (seed, step, variable id),
// absorbed 32 bits at a time (docs/rounding.md 3.2). Computed once per call,
// on the host.
TF_BF16_HOST_DEVICE uint32_t StreamKey(int64_t seed, int64_t step, int64_t var_id) {
  const uint64_t words[3] = {static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(step),
                             static_cast<uint64_t>(var_id)};
  uint32_t key = kStreamKeyInit;
  for (int w = 0; w < 3; ++w) {
    key = Mix32(key ^ static_cast<uint32_t>(words[w]));
    key = Mix32(key ^ static_cast<uint32_t>(words[w] >> 32));
  }
  return Mix32(key ^ kStreamKeyFinalWord);
}

// Elements are hashed by their flat index within the variable. The high 32
// bits of the index select a block key, constant over 2^32 elements.
TF_BF16_HOST_DEVICE uint32_t BlockKey(uint32_t stream_key, uint32_t index_high) {
  return Mix32(stream_key ^ index_high);
}

// The random bits of one element (docs/rounding.md 3.3): one hash chain
//   h0 = Mix32(Mix32(index_low ^ block_key)),  h1 = Mix32(h0 ^ C),
// whose 16-bit halves are the element's draws d0 = h0 >> 16, d1 = h0 & 0xFFFF,
// d2 = h1 >> 16, d3 = h1 & 0xFFFF. Two rounds, not one: one round over
// consecutive indices leaves the output bytes measurably non-uniform
// (chi-square 480 for 255 degrees of freedom over 4M elements).
//
// Computed without the xor-shifts that cancel: x ^= x >> 16 is an involution
// (the second application sees the first's unchanged high half), so the last
// step of the inner Mix32 and the first of the outer one undo each other, and
// likewise the last step of h0 and the first of h1 (after h0 ^ C):
//   h0 = p0 ^ (p0 >> 16) with p0 = MixCore(MixCore(S(index_low ^ block_key))),
//   h1 = p1 ^ (p1 >> 16) with p1 = MixCore(p0 ^ C ^ (C >> 16)).
// (S: x ^= x >> 16). d0 and d2 are then the high halves of p0 and p1. Only what a caller reads
// is computed (the rest is dead code the compiler drops).
struct ElementBits {
  uint32_t p0;

  // The element with flat index low half `index_low` in the 2^32-element
  // block keyed `block_key`.
  TF_BF16_HOST_DEVICE static ElementBits Of(uint32_t block_key, uint32_t index_low) {
    return FromMixed(FirstStep(index_low ^ block_key));
  }

  // From FirstStep(index_low ^ block_key). For the V elements first + j of a
  // chunk (V a power of two up to 2^16, first a multiple of V), first + j is
  // first ^ j and FirstStep((first ^ block_key) ^ j) is
  // FirstStep(first ^ block_key) ^ j (j has no high half): one xor each.
  TF_BF16_HOST_DEVICE static ElementBits FromMixed(uint32_t mixed) {
    return ElementBits{MixCore(MixCore(mixed))};
  }

  // Mix32's first step, x ^= x >> 16.
  TF_BF16_HOST_DEVICE static uint32_t FirstStep(uint32_t x) { return x ^ (x >> 16); }

  // Draw k (0..3), a uniform 16-bit integer.
  TF_BF16_HOST_DEVICE uint32_t Draw(int k) const {
    if (k < 2) return HalfOf(p0, k);
    return HalfOf(MixCore(p0 ^ (kSecondHashConstant ^ (kSecondHashConstant >> 16))), k - 2);
  }

 private:
  // The high (half 0) or low (half 1) 16 bits of p ^ (p >> 16).
  TF_BF16_HOST_DEVICE static uint32_t HalfOf(uint32_t p, int half) {
    return half == 0 ? p >> 16 : (p ^ (p >> 16)) & 0xFFFFu;
  }
};

// The key of an op call's random stream (MakeStreamKey), or of one
// 2^32-element block of its elements (ForBlock).
struct RandomKey {
  uint32_t value;

  // The block key for elements whose flat index has high 32 bits index_high.
  TF_BF16_HOST_DEVICE RandomKey ForBlock(uint32_t index_high) const {
    return RandomKey{BlockKey(value, index_high)};
  }
};

inline RandomKey MakeStreamKey(int64_t seed, int64_t step, int64_t var_id) {
  return RandomKey{StreamKey(seed, step, var_id)};
}

// Which draw a tensor of an op call takes (docs/rounding.md 3.3): the weight
// takes d0 when it is rounded stochastically; the optimizer slots, in input
// order, take the draws after it (SGD: accum; Adam: m, v, vhat; Lion: m).
#if defined(__CUDACC__)
#define TF_BF16_CONSTEXPR_HOST_DEVICE constexpr __host__ __device__
#else
#define TF_BF16_CONSTEXPR_HOST_DEVICE constexpr
#endif

template <Rounding R>
TF_BF16_CONSTEXPR_HOST_DEVICE int SlotDraw(int slot) {
  return (R == Rounding::kStochastic ? 1 : 0) + slot;
}

// ---------------------------------------------------------------------------
// Storage. A state tensor is stored as float (exact, no rounding) or as
// bfloat16 bits; optimizer slots of bfloat16 variables are rounded to nearest
// under kNearest and stochastically otherwise (see docs/rounding.md, "State").

TF_BF16_HOST_DEVICE float Load(float x) { return x; }
TF_BF16_HOST_DEVICE float Load(uint16_t b) { return Bf16ToFloat(b); }

// `random16` is the tensor's draw; unused (and not computed) under kNearest.
template <Rounding R>
TF_BF16_HOST_DEVICE void StoreState(float value, float* out, uint32_t /*random16*/) {
  *out = CanonicalizeNan(value);
}

// `value` is a result of float32 arithmetic (RoundNearestComputedToBf16).
template <Rounding R>
TF_BF16_HOST_DEVICE void StoreState(float value, uint16_t* out, uint32_t random16) {
  if (R == Rounding::kNearest) {
    *out = RoundNearestComputedToBf16(value);
  } else {
    *out = RoundStochasticToBf16(value, random16);
  }
}

// The paper's Kahan-compensated add, every operation rounded to nearest bf16
// as a 16-bit FPU would. float32 add/sub of two bf16 values followed by one
// rounding to bf16 equals the correctly rounded bf16 result. kRawDelta: delta
// is a value loaded from a tensor (rounded_assign_add), which may be
// subnormal or any NaN; otherwise it is a result of float32 arithmetic.
template <bool kRawDelta>
TF_BF16_HOST_DEVICE void KahanAdd(float weight, float delta, uint16_t* weight_out,
                                  uint16_t* compensation) {
  // delta's NaN may have any low bits (a raw value, or x86 arithmetic, which
  // propagates an operand's payload): the full check, except for a device
  // result, which the hardware conversion handles. Every later operand is
  // bf16-valued or such a conversion's result: a NaN there only has to stay
  // a NaN.
#if defined(__CUDA_ARCH__)
  const float update = kRawDelta ? RoundNearestInFloat(delta) : RoundNearestComputedInFloat(delta);
#else
  const float update = RoundNearestInFloat(delta);
#endif
  const float comp = Bf16ToFloat(*compensation);
  const float y = RoundNearestComputedInFloat(update - comp);
  const float s = RoundNearestComputedInFloat(weight + y);
  const float s_minus_w = RoundNearestComputedInFloat(s - weight);
  *compensation = RoundNearestComputedToBf16(s_minus_w - y);
  const uint32_t s_bits = FloatToBits(s);
  *weight_out = SelectNan(s_bits, s_bits >> 16);  // s is bf16-valued: just truncate
}

// Commits weight + delta. float weights: exact float32 add. bf16 weights:
// nearest, stochastic (with the weight's draw `random16`, d0) or Kahan with
// its compensation buffer.
// kRawDelta: delta was loaded from a tensor, not computed (KahanAdd).
template <Rounding R, bool kRawDelta = false>
TF_BF16_HOST_DEVICE void CommitWeight(float weight, float delta, float* out,
                                      uint16_t* /*compensation*/, uint32_t /*random16*/) {
  *out = CanonicalizeNan(weight + delta);
}

template <Rounding R, bool kRawDelta = false>
TF_BF16_HOST_DEVICE void CommitWeight(float weight, float delta, uint16_t* out,
                                      uint16_t* compensation, uint32_t random16) {
  if (R == Rounding::kKahan) {
    KahanAdd<kRawDelta>(weight, delta, out, compensation);
  } else if (R == Rounding::kStochastic) {
    *out = RoundStochasticToBf16(weight + delta, random16);
  } else {
    *out = RoundNearestComputedToBf16(weight + delta);
  }
}

// ---------------------------------------------------------------------------
// Optimizer math. Formulations follow TensorFlow's training_ops so that
// float32 variables get exactly tf.raw_ops.ResourceApplyKerasMomentum /
// ResourceApplyAdam results.

struct SgdScalars {
  float lr;
  float momentum;
  float weight_decay;
  uint32_t nesterov_mask;      // MaskOf(use_nesterov)
  uint32_t weight_decay_mask;  // MaskOf(weight_decay != 0): 0 * Inf must not reach w
};

struct AdamScalars {
  float lr;
  float alpha;  // lr * sqrt(1 - beta2_power) / (1 - beta1_power), in float32
  float one_minus_beta1;
  float one_minus_beta2;
  float epsilon;
  float weight_decay;
  uint32_t weight_decay_mask;  // MaskOf(weight_decay != 0)
};

struct LionScalars {
  float lr;
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float weight_decay;
  uint32_t weight_decay_mask;  // MaskOf(weight_decay != 0)
};

// Decoupled weight decay as Keras applies it: w - (w * wd) * lr, folded into
// the delta so the weight is rounded once. Skipped when weight_decay == 0
// (0 * Inf must not reach the weight) by a mask select, so loops vectorize.
TF_BF16_HOST_DEVICE float MaybeDecayedDelta(uint32_t weight_decay_mask, float delta,
                                            float weight, float weight_decay, float lr) {
  const float decayed = delta - (weight * weight_decay) * lr;
  return SelectByMask(weight_decay_mask, decayed, delta);
}

// The element functions below are called in loops over millions of elements.
// What is constant over a call and changes which tensors are touched (a
// momentum accumulator, AMSGrad's maximum, the Kahan buffer through R) is a
// template parameter; what only changes arithmetic (Nesterov, weight decay)
// is a select. Both keep the CPU loops free of control flow, so they
// vectorize.
//
// `i` is the element's flat index in the variable (it addresses every state
// tensor); `bits` its random bits (ElementBits::Of(block key, low 32 bits of
// the index): the caller computes them, so that loops keep a 32-bit induction
// variable, which vectorizes, and chunks share work); `g` is its gradient,
// already loaded, because sparse updates read gradients at other positions.
// The element's draws are computed only as far as its roundings need them:
// none under kNearest (ElementBits is then dead code), d0..d3 for
// stochastic AMSGrad.

template <Rounding R>
TF_BF16_HOST_DEVICE uint16_t* KahanBuffer(uint16_t* compensation, int64_t i) {
  return R == Rounding::kKahan ? compensation + i : nullptr;
}

template <Rounding R, bool kUseMomentum, typename S>
TF_BF16_HOST_DEVICE void SgdElement(S* var, S* accum, uint16_t* compensation, float g,
                                    int64_t i, const SgdScalars& p, ElementBits bits) {
  const float w = Load(var[i]);
  float update;  // added to w
  if (kUseMomentum) {
    // Keras's formulation: the accumulator holds the rate-scaled step, so a
    // learning-rate schedule changes only the new gradient's contribution.
    const float a = Load(accum[i]) * p.momentum - g * p.lr;
    StoreState<R>(a, &accum[i], bits.Draw(SlotDraw<R>(0)));
    const float nesterov_update = a * p.momentum - g * p.lr;
    update = SelectByMask(p.nesterov_mask, nesterov_update, a);
  } else {
    update = -(g * p.lr);
  }
  const float delta = MaybeDecayedDelta(p.weight_decay_mask, update, w, p.weight_decay, p.lr);
  CommitWeight<R>(w, delta, &var[i], KahanBuffer<R>(compensation, i), bits.Draw(0));
}

// NaN-propagating maximum: a NaN second moment must not be hidden by AMSGrad.
// The mask of "value replaces running_max", for bit selects, so the compiler
// cannot turn the maximum into a max instruction (which would drop the NaN
// or, under denormal flushing, a subnormal running max).
TF_BF16_HOST_DEVICE uint32_t NanMaxTakesValue(float running_max, float value) {
  return MaskOf(value != value || value > running_max);
}

// A state's stored value where `mask` is set, else `kept`, a value loaded
// from the same tensor (bf16: canonical if a NaN, as any rounding leaves it).
TF_BF16_HOST_DEVICE float SelectStored(uint32_t mask, float stored, float kept) {
  return SelectByMask(mask, stored, CanonicalizeNan(kept));
}
TF_BF16_HOST_DEVICE uint16_t SelectStored(uint32_t mask, uint16_t stored, uint16_t kept) {
  const uint32_t k = kept;
  const uint16_t canonical_kept = SelectNan(k << 16, k);
  return static_cast<uint16_t>((stored & mask) | (canonical_kept & ~mask));
}

template <Rounding R, bool kAmsgrad, typename S>
TF_BF16_HOST_DEVICE void AdamElement(S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                                     float g, int64_t i, const AdamScalars& p,
                                     ElementBits bits) {
  const float w = Load(var[i]);
  const float m_old = Load(m[i]);
  const float v_old = Load(v[i]);
  const float m_new = m_old + (g - m_old) * p.one_minus_beta1;
  const float v_new = v_old + (g * g - v_old) * p.one_minus_beta2;
  StoreState<R>(m_new, &m[i], bits.Draw(SlotDraw<R>(0)));
  StoreState<R>(v_new, &v[i], bits.Draw(SlotDraw<R>(1)));
  float v_used = v_new;
  if (kAmsgrad) {
    const S vhat_old = vhat[i];
    const uint32_t take_new = NanMaxTakesValue(Load(vhat_old), v_new);
    v_used = SelectByMask(take_new, v_new, Load(vhat_old));
    // StoreState of v_used, written as a select: a kept maximum is
    // bf16-valued, and so stored as it was (rounding it changes nothing but
    // a NaN's pattern); it may be subnormal, which StoreState's rounding of
    // computed values must not see.
    StoreState<R>(v_new, &vhat[i], bits.Draw(SlotDraw<R>(2)));
    vhat[i] = SelectStored(take_new, vhat[i], vhat_old);
  }
  const float step = (m_new * p.alpha) / (sqrtf(v_used) + p.epsilon);
  const float delta = MaybeDecayedDelta(p.weight_decay_mask, -step, w, p.weight_decay, p.lr);
  CommitWeight<R>(w, delta, &var[i], KahanBuffer<R>(compensation, i), bits.Draw(0));
}

// tf.sign, as Keras's Lion uses it (sign(-0) = +0), except that NaN stays
// NaN: a NaN moment must reach the weight, not become 0.
TF_BF16_HOST_DEVICE float SignKeepNan(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x ? x : 0.0f));
}

// Lion (Chen et al. 2023), Keras's formulation: the update is the sign of an
// interpolation of momentum and gradient; the momentum is an EMA.
template <Rounding R, typename S>
TF_BF16_HOST_DEVICE void LionElement(S* var, S* m, uint16_t* compensation, float g,
                                     int64_t i, const LionScalars& p, ElementBits bits) {
  const float w = Load(var[i]);
  const float m_old = Load(m[i]);
  const float c = m_old * p.beta1 + g * p.one_minus_beta1;
  const float m_new = m_old * p.beta2 + g * p.one_minus_beta2;
  StoreState<R>(m_new, &m[i], bits.Draw(SlotDraw<R>(0)));
  const float delta =
      MaybeDecayedDelta(p.weight_decay_mask, -(p.lr * SignKeepNan(c)), w, p.weight_decay, p.lr);
  CommitWeight<R>(w, delta, &var[i], KahanBuffer<R>(compensation, i), bits.Draw(0));
}

template <Rounding R, typename S>
TF_BF16_HOST_DEVICE void AssignAddElement(S* var, uint16_t* compensation, float delta,
                                          int64_t i, ElementBits bits) {
  CommitWeight<R, true>(Load(var[i]), delta, &var[i], KahanBuffer<R>(compensation, i),
                        bits.Draw(0));
}

}  // namespace tf_bf16

#endif  // TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_H_
