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

// Each tensor written by one op draws its random bits from its own lane, so
// the weight and its optimizer slots never share bits.
enum Lane : uint32_t {
  kWeightLane = 0,
  kFirstSlotLane = 1,   // SGD momentum accumulator, Adam first moment
  kSecondSlotLane = 2,  // Adam second moment
  kMaxSlotLane = 3,     // AMSGrad running maximum of the second moment
};

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
  const uint32_t rounded = (u + random16) >> 16;
  return SelectNan(u, rounded);
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

constexpr uint32_t kStreamKeyInit = 0x6A09E667u;  // first 32 bits of frac(sqrt(2))

// The key of one random stream: (seed, step, variable id, lane), absorbed
// 32 bits at a time. Computed once per op call, on the host.
TF_BF16_HOST_DEVICE uint32_t StreamKey(int64_t seed, int64_t step,
                                       int64_t var_id, uint32_t lane) {
  const uint64_t words[3] = {static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(step),
                             static_cast<uint64_t>(var_id)};
  uint32_t key = kStreamKeyInit;
  for (int w = 0; w < 3; ++w) {
    key = Mix32(key ^ static_cast<uint32_t>(words[w]));
    key = Mix32(key ^ static_cast<uint32_t>(words[w] >> 32));
  }
  return Mix32(key ^ lane);
}

// Elements are hashed by their flat index within the variable. The high 32
// bits of the index select a block key, constant over 2^32 elements. Two
// rounds of Mix32 per element: one round over consecutive indices leaves the
// output bytes measurably non-uniform (chi-square 480 for 255 degrees of
// freedom over 4M elements); two rounds pass (docs/rounding.md, 3.4).
TF_BF16_HOST_DEVICE uint32_t BlockKey(uint32_t stream_key, uint32_t index_high) {
  return Mix32(stream_key ^ index_high);
}

TF_BF16_HOST_DEVICE uint32_t RandomBits16(uint32_t block_key, uint32_t index_low) {
  return Mix32(Mix32(index_low ^ block_key)) >> 16;
}

// ---------------------------------------------------------------------------
// Storage. A state tensor is stored as float (exact, no rounding) or as
// bfloat16 bits; optimizer slots of bfloat16 variables are rounded to nearest
// under kNearest and stochastically otherwise (see docs/rounding.md, "State").

TF_BF16_HOST_DEVICE float Load(float x) { return x; }
TF_BF16_HOST_DEVICE float Load(uint16_t b) { return Bf16ToFloat(b); }

template <Rounding R>
TF_BF16_HOST_DEVICE void StoreState(float value, float* out, uint32_t /*block_key*/,
                                    uint32_t /*index_low*/) {
  *out = CanonicalizeNan(value);
}

template <Rounding R>
TF_BF16_HOST_DEVICE void StoreState(float value, uint16_t* out, uint32_t block_key,
                                    uint32_t index_low) {
  if (R == Rounding::kNearest) {
    *out = RoundNearestToBf16(value);
  } else {
    *out = RoundStochasticToBf16(value, RandomBits16(block_key, index_low));
  }
}

// The paper's Kahan-compensated add, every operation rounded to nearest bf16
// as a 16-bit FPU would. float32 add/sub of two bf16 values followed by one
// rounding to bf16 equals the correctly rounded bf16 result.
TF_BF16_HOST_DEVICE void KahanAdd(float weight, float delta, uint16_t* weight_out,
                                  uint16_t* compensation) {
  // delta comes from float32 arithmetic on arbitrary inputs: full NaN check.
  // Every later operand is bf16-valued, so their NaNs have zero low bits.
  const float update = RoundNearestInFloat(delta);
  const float comp = Bf16ToFloat(*compensation);
  const float y = RoundNearestInFloatBf16Operands(update - comp);
  const float s = RoundNearestInFloatBf16Operands(weight + y);
  const float s_minus_w = RoundNearestInFloatBf16Operands(s - weight);
  *compensation = RoundNearestToBf16(s_minus_w - y);
  const uint32_t s_bits = FloatToBits(s);
  *weight_out = SelectNan(s_bits, s_bits >> 16);  // s is bf16-valued: just truncate
}

// Commits weight + delta. float weights: exact float32 add. bf16 weights:
// nearest, stochastic (weight lane) or Kahan with its compensation buffer.
template <Rounding R>
TF_BF16_HOST_DEVICE void CommitWeight(float weight, float delta, float* out,
                                      uint16_t* /*compensation*/,
                                      uint32_t /*block_key*/, uint32_t /*index_low*/) {
  *out = CanonicalizeNan(weight + delta);
}

template <Rounding R>
TF_BF16_HOST_DEVICE void CommitWeight(float weight, float delta, uint16_t* out,
                                      uint16_t* compensation, uint32_t block_key,
                                      uint32_t index_low) {
  if (R == Rounding::kKahan) {
    KahanAdd(weight, delta, out, compensation);
  } else if (R == Rounding::kStochastic) {
    *out = RoundStochasticToBf16(weight + delta, RandomBits16(block_key, index_low));
  } else {
    *out = RoundNearestToBf16(weight + delta);
  }
}

// One key per lane. The stream keys of a call (MakeStreamKeys) and the block
// keys of one 2^32-element block (ForBlock) have the same shape.
struct LaneKeys {
  uint32_t weight;
  uint32_t first_slot;
  uint32_t second_slot;
  uint32_t max_slot;

  // The block keys for elements whose flat index has high 32 bits index_high.
  TF_BF16_HOST_DEVICE LaneKeys ForBlock(uint32_t index_high) const {
    return LaneKeys{BlockKey(weight, index_high), BlockKey(first_slot, index_high),
                    BlockKey(second_slot, index_high), BlockKey(max_slot, index_high)};
  }
};

inline LaneKeys MakeStreamKeys(int64_t seed, int64_t step, int64_t var_id) {
  return LaneKeys{StreamKey(seed, step, var_id, kWeightLane),
                  StreamKey(seed, step, var_id, kFirstSlotLane),
                  StreamKey(seed, step, var_id, kSecondSlotLane),
                  StreamKey(seed, step, var_id, kMaxSlotLane)};
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
// tensor) and `lo` its low 32 bits (which key the random bits; passed
// separately so loops keep a 32-bit induction variable, which vectorizes);
// `g` is its gradient, already loaded, because sparse updates read gradients
// at other positions.

template <Rounding R>
TF_BF16_HOST_DEVICE uint16_t* KahanBuffer(uint16_t* compensation, int64_t i) {
  return R == Rounding::kKahan ? compensation + i : nullptr;
}

template <Rounding R, bool kUseMomentum, typename S>
TF_BF16_HOST_DEVICE void SgdElement(S* var, S* accum, uint16_t* compensation, float g,
                                    int64_t i, uint32_t lo, const SgdScalars& p,
                                    const LaneKeys& keys) {
  const float w = Load(var[i]);
  float update;  // added to w
  if (kUseMomentum) {
    // Keras's formulation: the accumulator holds the rate-scaled step, so a
    // learning-rate schedule changes only the new gradient's contribution.
    const float a = Load(accum[i]) * p.momentum - g * p.lr;
    StoreState<R>(a, &accum[i], keys.first_slot, lo);
    const float nesterov_update = a * p.momentum - g * p.lr;
    update = SelectByMask(p.nesterov_mask, nesterov_update, a);
  } else {
    update = -(g * p.lr);
  }
  const float delta = MaybeDecayedDelta(p.weight_decay_mask, update, w, p.weight_decay, p.lr);
  CommitWeight<R>(w, delta, &var[i], KahanBuffer<R>(compensation, i), keys.weight, lo);
}

// NaN-propagating maximum: a NaN second moment must not be hidden by AMSGrad.
// A bit select, so the compiler cannot turn it into a max instruction (which
// would drop the NaN or, under denormal flushing, a subnormal running max).
TF_BF16_HOST_DEVICE float NanMax(float running_max, float value) {
  return SelectByMask(MaskOf(value != value || value > running_max), value, running_max);
}

template <Rounding R, bool kAmsgrad, typename S>
TF_BF16_HOST_DEVICE void AdamElement(S* var, S* m, S* v, S* vhat, uint16_t* compensation,
                                     float g, int64_t i, uint32_t lo, const AdamScalars& p,
                                     const LaneKeys& keys) {
  const float w = Load(var[i]);
  const float m_old = Load(m[i]);
  const float v_old = Load(v[i]);
  const float m_new = m_old + (g - m_old) * p.one_minus_beta1;
  const float v_new = v_old + (g * g - v_old) * p.one_minus_beta2;
  StoreState<R>(m_new, &m[i], keys.first_slot, lo);
  StoreState<R>(v_new, &v[i], keys.second_slot, lo);
  float v_used = v_new;
  if (kAmsgrad) {
    v_used = NanMax(Load(vhat[i]), v_new);
    StoreState<R>(v_used, &vhat[i], keys.max_slot, lo);
  }
  const float step = (m_new * p.alpha) / (sqrtf(v_used) + p.epsilon);
  const float delta = MaybeDecayedDelta(p.weight_decay_mask, -step, w, p.weight_decay, p.lr);
  CommitWeight<R>(w, delta, &var[i], KahanBuffer<R>(compensation, i), keys.weight, lo);
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
                                     int64_t i, uint32_t lo, const LionScalars& p,
                                     const LaneKeys& keys) {
  const float w = Load(var[i]);
  const float m_old = Load(m[i]);
  const float c = m_old * p.beta1 + g * p.one_minus_beta1;
  const float m_new = m_old * p.beta2 + g * p.one_minus_beta2;
  StoreState<R>(m_new, &m[i], keys.first_slot, lo);
  const float delta =
      MaybeDecayedDelta(p.weight_decay_mask, -(p.lr * SignKeepNan(c)), w, p.weight_decay, p.lr);
  CommitWeight<R>(w, delta, &var[i], KahanBuffer<R>(compensation, i), keys.weight, lo);
}

template <Rounding R, typename S>
TF_BF16_HOST_DEVICE void AssignAddElement(S* var, uint16_t* compensation, float delta,
                                          int64_t i, uint32_t lo, const LaneKeys& keys) {
  CommitWeight<R>(Load(var[i]), delta, &var[i], KahanBuffer<R>(compensation, i), keys.weight,
                  lo);
}

}  // namespace tf_bf16

#endif  // TF_BF16_CC_KERNELS_BF16_UPDATE_MATH_H_
