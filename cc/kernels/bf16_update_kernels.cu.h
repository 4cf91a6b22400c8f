// The CUDA kernels of every tf_bf16 update, their launchers, and the device
// validation and grouping of sparse indices. TensorFlow-free: the GPU
// functors of bf16_training_ops_gpu.cu.cc and the H200 harness
// (cc/harness/bf16_harness.cu) both include this file, so the kernels the
// harness verifies are the kernels TensorFlow runs.
//
// The per-element math is bf16_update_math.h. What this file adds is how
// elements are given to threads:
//  - Each kernel's work per thread is a __host__ __device__ function of
//    (thread index, thread count): DenseThread and SparseThread. The
//    __global__ kernels only call it with their launch geometry, and
//    HostEmulator calls it on the host for any geometry, so tests on a
//    machine without a GPU check the vector/tail/grid-stride logic bit for
//    bit against the CPU kernels (tests/test_gpu_kernel_emulation.py).
//  - Vectorised access: a thread loads kVectorWidth = 8 consecutive elements
//    of every tensor it reads (16 bytes of bfloat16, 2 x 16 bytes of float32)
//    into registers, applies the element functions to them in order, and
//    stores them back with the same widths. Elements before the end of the
//    last full chunk of 8 go in chunks; the last n % 8 elements go one by
//    one (the scalar tail). Chunks start at multiples of 8, so one never
//    straddles a 2^32-element block and has one block key.
//  - A grid-stride loop: thread t of T handles chunks t, t + T, t + 2T, ...
//    Threads share nothing and every element is written by exactly one
//    thread, so the results do not depend on the launch geometry. A thread
//    loads K chunks (K = kDefaultChunksPerTrip on the GPU) of every tensor
//    before it computes any, so that more bytes are in flight per thread;
//    K changes nothing else (the host emulation runs K = 1 and 2).
//  - Every load and store is marked streaming (evict first): each byte is
//    read once and written once.
//  - The random bits of a chunk's 8 elements cost one xor each beyond the
//    hash itself (ElementBits::FromMixed).
//  - Unaligned tensors (a base pointer not 16-byte aligned, e.g. a slice)
//    run the same code with chunks of one element.
//
// Device code rounds results of float32 arithmetic to nearest with the
// hardware conversion (bf16_update_math.h, RoundNearestComputedToBf16): the
// same bits as the formula of docs/rounding.md 2 for every value flushed
// arithmetic can produce (the H200 harness checks it, bit for bit);
// cc/harness/sass_counts.py counts the instructions per element of each
// kernel.
//
// Compile device code with --fmad=false (no fused multiply-add: the spec
// rounds after every float32 operation, docs/rounding.md 1) and --ftz=true
// (denormals flushed, as TensorFlow's CPU kernels and the reference do);
// division and square root stay IEEE (nvcc's defaults, -prec-div=true
// -prec-sqrt=true). setup.py and cc/harness/build.sh do.
#ifndef TF_BF16_CC_KERNELS_BF16_UPDATE_KERNELS_CU_H_
#define TF_BF16_CC_KERNELS_BF16_UPDATE_KERNELS_CU_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16_update_math.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <climits>
#include <cub/cub.cuh>
#define TF_BF16_UNROLL _Pragma("unroll")
#else
#define TF_BF16_UNROLL _Pragma("GCC unroll 8")
#endif

namespace tf_bf16 {
namespace kernels {

// Elements per vectorised access.
constexpr int kVectorWidth = 8;
constexpr int kThreadsPerBlock = 256;
// Default grid: 32 blocks of 256 threads per multiprocessor (four waves of
// the 2048 resident threads of sm_80/sm_90), then grid-stride; and one chunk
// per trip (DenseThread's K; the kernels have kMaxChunksPerTrip and 1). The
// H200's launch sweep (docs/bench_gpu.md, second run) chose them: K = 1 at
// 32 blocks/SM was the fastest or within 1% of it for SGD-momentum and Adam
// in every rounding, while K = 2 spills registers in Adam with stochastic
// rounding (1.43 ms against 1.07 ms at 2^28 elements).
constexpr int kBlocksPerMultiprocessor = 32;
constexpr int kMaxChunksPerTrip = 2;
constexpr int kDefaultChunksPerTrip = 1;

template <typename T>
TF_BF16_HOST_DEVICE T Min(T a, T b) {
  return a < b ? a : b;
}

// float32 variables ignore the rounding (docs/rounding.md 5): their kernels
// are the nearest ones, whatever the op was asked for.
template <Rounding R, typename S>
constexpr Rounding EffectiveRounding() {
  return std::is_same<S, float>::value ? Rounding::kNearest : R;
}

// ---------------------------------------------------------------------------
// Chunk loads and stores: V = 1 (one element) or V = kVectorWidth.

// Every tensor is read once and written once per update: device loads and
// stores are marked streaming (ld.global.cs / st.global.cs: evict first), so
// that they do not displace anything else from the caches.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint4 StreamingLoad(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void StreamingStore(void* p, uint4 x) {
  __stcs(reinterpret_cast<uint4*>(p), x);
}
#endif

TF_BF16_HOST_DEVICE void VectorLoad(const uint16_t* p, uint16_t (&out)[8]) {
#if defined(__CUDA_ARCH__)
  const uint4 x = StreamingLoad(p);
  const uint32_t words[4] = {x.x, x.y, x.z, x.w};
  TF_BF16_UNROLL
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = static_cast<uint16_t>(words[k]);
    out[2 * k + 1] = static_cast<uint16_t>(words[k] >> 16);
  }
#else
  std::memcpy(out, p, sizeof(out));
#endif
}

TF_BF16_HOST_DEVICE void VectorStore(uint16_t* p, const uint16_t (&in)[8]) {
#if defined(__CUDA_ARCH__)
  uint32_t words[4];
  TF_BF16_UNROLL
  for (int k = 0; k < 4; ++k) {
    words[k] = static_cast<uint32_t>(in[2 * k]) | (static_cast<uint32_t>(in[2 * k + 1]) << 16);
  }
  StreamingStore(p, make_uint4(words[0], words[1], words[2], words[3]));
#else
  std::memcpy(p, in, sizeof(in));
#endif
}

TF_BF16_HOST_DEVICE void VectorLoad(const float* p, float (&out)[8]) {
#if defined(__CUDA_ARCH__)
  const float4 a = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
#else
  std::memcpy(out, p, sizeof(out));
#endif
}

TF_BF16_HOST_DEVICE void VectorStore(float* p, const float (&in)[8]) {
#if defined(__CUDA_ARCH__)
  __stcs(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
  __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(in[4], in[5], in[6], in[7]));
#else
  std::memcpy(p, in, sizeof(in));
#endif
}

template <int V, typename T>
TF_BF16_HOST_DEVICE void LoadChunk(const T* p, T (&out)[V]) {
  static_assert(V == 1 || V == kVectorWidth, "chunks are 1 or kVectorWidth elements");
  if constexpr (V == 1) {
    out[0] = *p;
  } else {
    VectorLoad(p, out);
  }
}

template <int V, typename T>
TF_BF16_HOST_DEVICE void StoreChunk(T* p, const T (&in)[V]) {
  static_assert(V == 1 || V == kVectorWidth, "chunks are 1 or kVectorWidth elements");
  if constexpr (V == 1) {
    *p = in[0];
  } else {
    VectorStore(p, in);
  }
}

// Vectorised access needs every tensor's base address 16-byte aligned
// (chunks then start at multiples of 16 bytes).
TF_BF16_HOST_DEVICE bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename... Ptrs>
bool AllAligned16(const Ptrs*... ptrs) {
  return (Aligned16(ptrs) && ...);
}

// Nesterov and weight decay as compile-time masks, so the compiler drops the
// arithmetic of the branch not taken (as the CPU kernels do); kConstantMasks
// false keeps the run-time masks of the scalars.
template <bool kConstantMasks, bool kNesterov, bool kDecay, typename Scalars>
TF_BF16_HOST_DEVICE Scalars WithMasks(Scalars p) {
  if constexpr (kConstantMasks) {
    p.weight_decay_mask = kDecay ? ~0u : 0u;
    if constexpr (std::is_same<Scalars, SgdScalars>::value) p.nesterov_mask = kNesterov ? ~0u : 0u;
  }
  return p;
}

// The random bits of element j of a chunk: `mixed` is ChunkMixed of the
// chunk's first index (ElementBits::FromMixed says why one xor suffices).
TF_BF16_HOST_DEVICE uint32_t ChunkMixed(RandomKey block, uint32_t lo) {
  return ElementBits::FirstStep(lo ^ block.value);
}
TF_BF16_HOST_DEVICE ElementBits ChunkElementBits(uint32_t mixed, int j) {
  return ElementBits::FromMixed(mixed ^ static_cast<uint32_t>(j));
}

// ---------------------------------------------------------------------------
// Updates. Each holds an op's tensors and scalars and says, for a chunk of V
// elements starting at flat index i: which state it loads into registers
// (Load), how a gradient chunk changes that state (Step, the element
// functions of bf16_update_math.h applied in order), and what it stores
// (Store). `grad` is the tensor read at the gradient's positions (x for
// stochastic_round, delta for rounded_assign_add). `lo` is the low 32 bits of
// the chunk's first flat index (a multiple of V), `block` the block key of its
// 2^32 block.

struct StochasticRoundUpdate {
  using Grad = float;
  const float* grad;  // x
  uint16_t* y;
  RandomKey stream_key;

  template <int V>
  struct State {
    uint16_t y[V];
  };
  template <int V>
  TF_BF16_HOST_DEVICE void Load(int64_t, State<V>&) const {}
  template <int V>
  TF_BF16_HOST_DEVICE void Step(State<V>& s, const float (&x)[V], uint32_t lo,
                                RandomKey block) const {
    const uint32_t mixed = ChunkMixed(block, lo);
    TF_BF16_UNROLL
    for (int j = 0; j < V; ++j) {
      s.y[j] = RoundStochasticToBf16(x[j], ChunkElementBits(mixed, j).Draw(0));
    }
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Store(int64_t i, const State<V>& s) const {
    StoreChunk<V>(y + i, s.y);
  }
};

template <Rounding R, typename S, typename D>
struct AssignAddUpdate {
  using Grad = D;
  static constexpr bool kKahan = R == Rounding::kKahan;
  S* var;
  uint16_t* compensation;
  const D* grad;  // delta
  RandomKey stream_key;

  template <int V>
  struct State {
    S w[V];
    uint16_t c[kKahan ? V : 1];
  };
  template <int V>
  TF_BF16_HOST_DEVICE void Load(int64_t i, State<V>& s) const {
    LoadChunk<V>(var + i, s.w);
    if constexpr (kKahan) LoadChunk<V>(compensation + i, s.c);
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Step(State<V>& s, const D (&delta)[V], uint32_t lo,
                                RandomKey block) const {
    const uint32_t mixed = ChunkMixed(block, lo);
    TF_BF16_UNROLL
    for (int j = 0; j < V; ++j) {
      AssignAddElement<R>(s.w, s.c, tf_bf16::Load(delta[j]), j, ChunkElementBits(mixed, j));
    }
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Store(int64_t i, const State<V>& s) const {
    StoreChunk<V>(var + i, s.w);
    if constexpr (kKahan) StoreChunk<V>(compensation + i, s.c);
  }
};

template <Rounding R, bool kMomentum, bool kConstantMasks, bool kNesterov, bool kDecay,
          typename S, typename G>
struct SgdUpdate {
  using Grad = G;
  static constexpr bool kKahan = R == Rounding::kKahan;
  S* var;
  S* accum;
  uint16_t* compensation;
  const G* grad;
  SgdScalars scalars;
  RandomKey stream_key;

  template <int V>
  struct State {
    S w[V];
    S a[kMomentum ? V : 1];
    uint16_t c[kKahan ? V : 1];
  };
  template <int V>
  TF_BF16_HOST_DEVICE void Load(int64_t i, State<V>& s) const {
    LoadChunk<V>(var + i, s.w);
    if constexpr (kMomentum) LoadChunk<V>(accum + i, s.a);
    if constexpr (kKahan) LoadChunk<V>(compensation + i, s.c);
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Step(State<V>& s, const G (&g)[V], uint32_t lo,
                                RandomKey block) const {
    const SgdScalars p = WithMasks<kConstantMasks, kNesterov, kDecay>(scalars);
    const uint32_t mixed = ChunkMixed(block, lo);
    TF_BF16_UNROLL
    for (int j = 0; j < V; ++j) {
      SgdElement<R, kMomentum>(s.w, s.a, s.c, tf_bf16::Load(g[j]), j, p,
                               ChunkElementBits(mixed, j));
    }
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Store(int64_t i, const State<V>& s) const {
    StoreChunk<V>(var + i, s.w);
    if constexpr (kMomentum) StoreChunk<V>(accum + i, s.a);
    if constexpr (kKahan) StoreChunk<V>(compensation + i, s.c);
  }
};

template <Rounding R, bool kAmsgrad, bool kConstantMasks, bool kDecay, typename S, typename G>
struct AdamUpdate {
  using Grad = G;
  static constexpr bool kKahan = R == Rounding::kKahan;
  S* var;
  S* m;
  S* v;
  S* vhat;
  uint16_t* compensation;
  const G* grad;
  AdamScalars scalars;
  RandomKey stream_key;

  template <int V>
  struct State {
    S w[V];
    S m[V];
    S v[V];
    S vhat[kAmsgrad ? V : 1];
    uint16_t c[kKahan ? V : 1];
  };
  template <int V>
  TF_BF16_HOST_DEVICE void Load(int64_t i, State<V>& s) const {
    LoadChunk<V>(var + i, s.w);
    LoadChunk<V>(m + i, s.m);
    LoadChunk<V>(v + i, s.v);
    if constexpr (kAmsgrad) LoadChunk<V>(vhat + i, s.vhat);
    if constexpr (kKahan) LoadChunk<V>(compensation + i, s.c);
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Step(State<V>& s, const G (&g)[V], uint32_t lo,
                                RandomKey block) const {
    const AdamScalars p = WithMasks<kConstantMasks, false, kDecay>(scalars);
    const uint32_t mixed = ChunkMixed(block, lo);
    TF_BF16_UNROLL
    for (int j = 0; j < V; ++j) {
      AdamElement<R, kAmsgrad>(s.w, s.m, s.v, s.vhat, s.c, tf_bf16::Load(g[j]), j, p,
                               ChunkElementBits(mixed, j));
    }
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Store(int64_t i, const State<V>& s) const {
    StoreChunk<V>(var + i, s.w);
    StoreChunk<V>(m + i, s.m);
    StoreChunk<V>(v + i, s.v);
    if constexpr (kAmsgrad) StoreChunk<V>(vhat + i, s.vhat);
    if constexpr (kKahan) StoreChunk<V>(compensation + i, s.c);
  }
};

template <Rounding R, bool kConstantMasks, bool kDecay, typename S, typename G>
struct LionUpdate {
  using Grad = G;
  static constexpr bool kKahan = R == Rounding::kKahan;
  S* var;
  S* m;
  uint16_t* compensation;
  const G* grad;
  LionScalars scalars;
  RandomKey stream_key;

  template <int V>
  struct State {
    S w[V];
    S m[V];
    uint16_t c[kKahan ? V : 1];
  };
  template <int V>
  TF_BF16_HOST_DEVICE void Load(int64_t i, State<V>& s) const {
    LoadChunk<V>(var + i, s.w);
    LoadChunk<V>(m + i, s.m);
    if constexpr (kKahan) LoadChunk<V>(compensation + i, s.c);
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Step(State<V>& s, const G (&g)[V], uint32_t lo,
                                RandomKey block) const {
    const LionScalars p = WithMasks<kConstantMasks, false, kDecay>(scalars);
    const uint32_t mixed = ChunkMixed(block, lo);
    TF_BF16_UNROLL
    for (int j = 0; j < V; ++j) {
      LionElement<R>(s.w, s.m, s.c, tf_bf16::Load(g[j]), j, p, ChunkElementBits(mixed, j));
    }
  }
  template <int V>
  TF_BF16_HOST_DEVICE void Store(int64_t i, const State<V>& s) const {
    StoreChunk<V>(var + i, s.w);
    StoreChunk<V>(m + i, s.m);
    if constexpr (kKahan) StoreChunk<V>(compensation + i, s.c);
  }
};

// ---------------------------------------------------------------------------
// The work of one thread.

// K chunks of a dense update, starting at flat indices first[0..K): load the
// state and gradient of all K (so that K loads of every tensor are in flight
// at once), then step and store each.
template <int V, int K, typename U>
TF_BF16_HOST_DEVICE void DenseChunks(const U& u, const int64_t (&first)[K], RandomKey block) {
  typename U::template State<V> s[K];
  typename U::Grad g[K][V];
  TF_BF16_UNROLL
  for (int k = 0; k < K; ++k) {
    u.template Load<V>(first[k], s[k]);
    LoadChunk<V>(u.grad + first[k], g[k]);
  }
  TF_BF16_UNROLL
  for (int k = 0; k < K; ++k) {
    u.template Step<V>(s[k], g[k], static_cast<uint32_t>(first[k]), block);
    u.template Store<V>(first[k], s[k]);
  }
}

// Thread `thread` of `threads` updates its share of the flat indices
// [begin, end) (begin a multiple of V; the kernels use [0, n)): for each
// 2^32-element block, the block key once, then every threads-th chunk of V
// elements (K of them per trip: chunks c, c + threads, ..., c + (K - 1) *
// threads, then the next K; fewer on the last trip), then every threads-th
// element of the tail of fewer than V. K changes only how many loads are in
// flight, never which thread writes an element.
template <int V, int K, typename U>
TF_BF16_HOST_DEVICE void DenseThread(const U& u, int64_t begin, int64_t end, uint64_t thread,
                                     uint64_t threads) {
  for (int64_t block_first = begin; block_first < end;) {
    const uint64_t high = static_cast<uint64_t>(block_first) >> 32;
    const int64_t block_end = Min(end, static_cast<int64_t>((high + 1) << 32));
    const RandomKey block = u.stream_key.ForBlock(static_cast<uint32_t>(high));
    const uint64_t chunks = static_cast<uint64_t>(block_end - block_first) / V;
    uint64_t c = thread;
    if constexpr (K > 1) {
      for (; c + (K - 1) * threads < chunks; c += K * threads) {
        int64_t first[K];
        TF_BF16_UNROLL
        for (int k = 0; k < K; ++k) {
          first[k] = block_first + static_cast<int64_t>((c + k * threads) * V);
        }
        DenseChunks<V, K>(u, first, block);
      }
    }
    for (; c < chunks; c += threads) {
      const int64_t first[1] = {block_first + static_cast<int64_t>(c * V)};
      DenseChunks<V, 1>(u, first, block);
    }
    if constexpr (V > 1) {
      const int64_t tail_first = block_first + static_cast<int64_t>(chunks * V);
      for (int64_t i = tail_first + static_cast<int64_t>(thread); i < block_end;
           i += static_cast<int64_t>(threads)) {
        const int64_t first[1] = {i};
        DenseChunks<1, 1>(u, first, block);
      }
    }
    block_first = block_end;
  }
}

// Grouped sparse indices (see functor::SparseIndexGroups): positions of
// `indices` stably sorted by index, run boundaries and the row of each run.
struct SparseGroupsView {
  const int64_t* order;
  const int64_t* group_starts;  // num_groups + 1 entries
  const int64_t* group_rows;
  int64_t num_groups;
};

// Thread `thread` of `threads` takes every threads-th (group, column chunk)
// pair: it loads that chunk of the group's row of every state tensor, steps
// it with the gradient rows of the group's positions in their order
// (duplicates applied in order), and stores it once. V > 1 needs row_size a
// multiple of V, so that chunks start at multiples of V.
template <int V, typename U>
TF_BF16_HOST_DEVICE void SparseThread(const U& u, const SparseGroupsView& groups,
                                      int64_t row_size, uint64_t thread, uint64_t threads) {
  if (row_size <= 0) return;
  const uint64_t chunks_per_row = static_cast<uint64_t>(row_size) / V;
  const uint64_t items = static_cast<uint64_t>(groups.num_groups) * chunks_per_row;
  for (uint64_t item = thread; item < items; item += threads) {
    const uint64_t group = item / chunks_per_row;
    const int64_t column = static_cast<int64_t>((item - group * chunks_per_row) * V);
    const int64_t first = groups.group_rows[group] * row_size + column;
    const RandomKey block =
        u.stream_key.ForBlock(static_cast<uint32_t>(static_cast<uint64_t>(first) >> 32));
    typename U::template State<V> s;
    u.template Load<V>(first, s);
    for (int64_t pos = groups.group_starts[group]; pos < groups.group_starts[group + 1]; ++pos) {
      typename U::Grad g[V];
      LoadChunk<V>(u.grad + groups.order[pos] * row_size + column, g);
      u.template Step<V>(s, g, static_cast<uint32_t>(first), block);
    }
    u.template Store<V>(first, s);
  }
}

// ---------------------------------------------------------------------------
// Executors: where the per-thread work runs. GpuExecutor launches kernels;
// HostEmulator calls the same per-thread functions on the host, one emulated
// thread after another, for any geometry.

struct HostEmulator {
  using Status = int;  // the chunk width V the launcher chose, so tests can see the path taken
  uint64_t threads = 1;        // emulated grid size (blocks x threads per block)
  bool reverse_order = false;  // run the emulated threads last to first
  bool allow_vector = true;    // false: chunks of one element even when aligned
  // Tests only: the n elements are elements [first_index, first_index + n)
  // of a larger variable (a multiple of kVectorWidth; the pointers given to
  // the launchers are then the variable's base, address of element 0), so
  // that a test can cross a 2^32-element block without 2^32 elements.
  int64_t first_index = 0;
  int chunks_per_trip = 1;     // 1 or kMaxChunksPerTrip (DenseThread's K)

  bool Vectorize(bool aligned) const { return aligned && allow_vector; }

  template <typename Fn>
  void ForThreads(const Fn& fn) const {
    for (uint64_t k = 0; k < threads; ++k) fn(reverse_order ? threads - 1 - k : k);
  }
  template <int V, typename U>
  Status Dense(const U& u, int64_t n) const {
    ForThreads([&](uint64_t t) {
      if constexpr (V > 1) {
        if (chunks_per_trip > 1) {
          DenseThread<V, kMaxChunksPerTrip>(u, first_index, first_index + n, t, threads);
          return;
        }
      }
      DenseThread<V, 1>(u, first_index, first_index + n, t, threads);
    });
    return V;
  }
  template <int V, typename U>
  Status Sparse(const U& u, const SparseGroupsView& groups, int64_t row_size) const {
    ForThreads([&](uint64_t t) { SparseThread<V>(u, groups, row_size, t, threads); });
    return V;
  }
};

#if defined(__CUDACC__)

template <int V, int K, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock) DenseKernel(const U u, int64_t n) {
  DenseThread<V, K>(u, 0, n, static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                    static_cast<uint64_t>(gridDim.x) * blockDim.x);
}

template <int V, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock)
    SparseKernel(const U u, const SparseGroupsView groups, int64_t row_size) {
  SparseThread<V>(u, groups, row_size,
                  static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                  static_cast<uint64_t>(gridDim.x) * blockDim.x);
}

struct GpuExecutor {
  using Status = cudaError_t;
  cudaStream_t stream;
  int multiprocessors;  // of the device the stream belongs to
  int max_blocks = 0;   // grid size cap; 0: multiprocessors * kBlocksPerMultiprocessor
  int chunks_per_trip = kDefaultChunksPerTrip;  // DenseThread's K: 1 or kMaxChunksPerTrip

  bool Vectorize(bool aligned) const { return aligned; }

  int Blocks(uint64_t work_items) const {
    const uint64_t cap = max_blocks > 0
                             ? static_cast<uint64_t>(max_blocks)
                             : static_cast<uint64_t>(multiprocessors) * kBlocksPerMultiprocessor;
    const uint64_t needed = (work_items + kThreadsPerBlock - 1) / kThreadsPerBlock;
    return static_cast<int>(Min<uint64_t>(Min<uint64_t>(needed, cap), INT_MAX));
  }
  template <int V, typename U>
  Status Dense(const U& u, int64_t n) const {
    if (n <= 0) return cudaSuccess;
    // Threads with work: one per trip of K chunks, or one per element of a
    // lone tail.
    const uint64_t chunks = static_cast<uint64_t>(n) / V;
    if constexpr (V > 1) {
      if (chunks_per_trip > 1 && chunks > 0) {
        const uint64_t trips = (chunks + kMaxChunksPerTrip - 1) / kMaxChunksPerTrip;
        DenseKernel<V, kMaxChunksPerTrip, U>
            <<<Blocks(trips), kThreadsPerBlock, 0, stream>>>(u, n);
        return cudaGetLastError();
      }
    }
    const uint64_t work = chunks > 0 ? chunks : static_cast<uint64_t>(n);
    DenseKernel<V, 1, U><<<Blocks(work), kThreadsPerBlock, 0, stream>>>(u, n);
    return cudaGetLastError();
  }
  template <int V, typename U>
  Status Sparse(const U& u, const SparseGroupsView& groups, int64_t row_size) const {
    if (groups.num_groups <= 0 || row_size <= 0) return cudaSuccess;
    const uint64_t work = static_cast<uint64_t>(groups.num_groups) * (row_size / V);
    SparseKernel<V, U><<<Blocks(work), kThreadsPerBlock, 0, stream>>>(u, groups, row_size);
    return cudaGetLastError();
  }
};

#endif  // __CUDACC__

// ---------------------------------------------------------------------------
// Launchers: choose the kernel for the call (vectorised when every tensor is
// aligned; the optional tensors and run-time flags as template parameters,
// as the CPU kernels do) and run it on an executor. Shared by TensorFlow's
// GPU functors, the harness and the host emulation.

template <typename Fn>
auto WithBool(bool flag, const Fn& fn) {
  return flag ? fn(std::true_type()) : fn(std::false_type());
}

template <typename Executor>
typename Executor::Status StochasticRound(const Executor& ex, const float* x, uint16_t* y,
                                          int64_t n, RandomKey stream_key) {
  const StochasticRoundUpdate u{x, y, stream_key};
  if (ex.Vectorize(AllAligned16(x, y))) return ex.template Dense<kVectorWidth>(u, n);
  return ex.template Dense<1>(u, n);
}

template <Rounding R, typename S, typename D, typename Executor>
typename Executor::Status RoundedAssignAdd(const Executor& ex, S* var, uint16_t* compensation,
                                           const D* delta, int64_t n, RandomKey stream_key) {
  constexpr Rounding kR = EffectiveRounding<R, S>();
  const AssignAddUpdate<kR, S, D> u{var, compensation, delta, stream_key};
  const bool vector =
      ex.Vectorize(AllAligned16(var, delta) && (kR != Rounding::kKahan || Aligned16(compensation)));
  if (vector) return ex.template Dense<kVectorWidth>(u, n);
  return ex.template Dense<1>(u, n);
}

template <Rounding R, typename S, typename G, typename Executor>
typename Executor::Status ApplySgd(const Executor& ex, S* var, S* accum, uint16_t* compensation,
                                   const G* grad, int64_t n, const SgdScalars& p,
                                   RandomKey stream_key) {
  constexpr Rounding kR = EffectiveRounding<R, S>();
  const bool vector =
      ex.Vectorize(AllAligned16(var, grad) && (accum == nullptr || Aligned16(accum)) &&
                   (kR != Rounding::kKahan || Aligned16(compensation)));
  return WithBool(accum != nullptr, [&](auto momentum) {
    constexpr bool kMomentum = decltype(momentum)::value;
    if (!vector) {
      const SgdUpdate<kR, kMomentum, false, false, false, S, G> u{var, accum, compensation,
                                                                  grad, p, stream_key};
      return ex.template Dense<1>(u, n);
    }
    return WithBool(kMomentum && p.nesterov_mask != 0, [&](auto nesterov) {
      return WithBool(p.weight_decay_mask != 0, [&](auto decay) {
        const SgdUpdate<kR, kMomentum, true, decltype(nesterov)::value && kMomentum,
                        decltype(decay)::value, S, G>
            u{var, accum, compensation, grad, p, stream_key};
        return ex.template Dense<kVectorWidth>(u, n);
      });
    });
  });
}

template <Rounding R, typename S, typename G, typename Executor>
typename Executor::Status ApplyAdam(const Executor& ex, S* var, S* m, S* v, S* vhat,
                                    uint16_t* compensation, const G* grad, int64_t n,
                                    const AdamScalars& p, RandomKey stream_key) {
  constexpr Rounding kR = EffectiveRounding<R, S>();
  const bool vector =
      ex.Vectorize(AllAligned16(var, m, v, grad) && (vhat == nullptr || Aligned16(vhat)) &&
                   (kR != Rounding::kKahan || Aligned16(compensation)));
  return WithBool(vhat != nullptr, [&](auto amsgrad) {
    constexpr bool kAmsgrad = decltype(amsgrad)::value;
    if (!vector) {
      const AdamUpdate<kR, kAmsgrad, false, false, S, G> u{var, m, v, vhat, compensation,
                                                           grad, p, stream_key};
      return ex.template Dense<1>(u, n);
    }
    return WithBool(p.weight_decay_mask != 0, [&](auto decay) {
      const AdamUpdate<kR, kAmsgrad, true, decltype(decay)::value, S, G> u{
          var, m, v, vhat, compensation, grad, p, stream_key};
      return ex.template Dense<kVectorWidth>(u, n);
    });
  });
}

template <Rounding R, typename S, typename G, typename Executor>
typename Executor::Status ApplyLion(const Executor& ex, S* var, S* m, uint16_t* compensation,
                                    const G* grad, int64_t n, const LionScalars& p,
                                    RandomKey stream_key) {
  constexpr Rounding kR = EffectiveRounding<R, S>();
  const bool vector = ex.Vectorize(AllAligned16(var, m, grad) &&
                                   (kR != Rounding::kKahan || Aligned16(compensation)));
  if (!vector) {
    const LionUpdate<kR, false, false, S, G> u{var, m, compensation, grad, p, stream_key};
    return ex.template Dense<1>(u, n);
  }
  return WithBool(p.weight_decay_mask != 0, [&](auto decay) {
    const LionUpdate<kR, true, decltype(decay)::value, S, G> u{var, m, compensation, grad, p,
                                                               stream_key};
    return ex.template Dense<kVectorWidth>(u, n);
  });
}

// Sparse launchers keep Nesterov and weight decay as run-time masks: the
// rows are scattered, so memory, not arithmetic, sets their speed.
template <Rounding R, typename S, typename G, typename Executor>
typename Executor::Status SparseApplySgd(const Executor& ex, S* var, S* accum,
                                         uint16_t* compensation, const G* grad,
                                         const SparseGroupsView& groups, int64_t row_size,
                                         const SgdScalars& p, RandomKey stream_key) {
  constexpr Rounding kR = EffectiveRounding<R, S>();
  const bool vector = ex.Vectorize(row_size % kVectorWidth == 0 && AllAligned16(var, grad) &&
                                   (accum == nullptr || Aligned16(accum)) &&
                                   (kR != Rounding::kKahan || Aligned16(compensation)));
  return WithBool(accum != nullptr, [&](auto momentum) {
    const SgdUpdate<kR, decltype(momentum)::value, false, false, false, S, G> u{
        var, accum, compensation, grad, p, stream_key};
    if (vector) return ex.template Sparse<kVectorWidth>(u, groups, row_size);
    return ex.template Sparse<1>(u, groups, row_size);
  });
}

template <Rounding R, typename S, typename G, typename Executor>
typename Executor::Status SparseApplyAdam(const Executor& ex, S* var, S* m, S* v, S* vhat,
                                          uint16_t* compensation, const G* grad,
                                          const SparseGroupsView& groups, int64_t row_size,
                                          const AdamScalars& p, RandomKey stream_key) {
  constexpr Rounding kR = EffectiveRounding<R, S>();
  const bool vector = ex.Vectorize(row_size % kVectorWidth == 0 && AllAligned16(var, m, v, grad) &&
                                   (vhat == nullptr || Aligned16(vhat)) &&
                                   (kR != Rounding::kKahan || Aligned16(compensation)));
  return WithBool(vhat != nullptr, [&](auto amsgrad) {
    const AdamUpdate<kR, decltype(amsgrad)::value, false, false, S, G> u{
        var, m, v, vhat, compensation, grad, p, stream_key};
    if (vector) return ex.template Sparse<kVectorWidth>(u, groups, row_size);
    return ex.template Sparse<1>(u, groups, row_size);
  });
}

#if defined(__CUDACC__)

// ---------------------------------------------------------------------------
// Sparse indices on the device: validation and grouping, for indices that
// live in device memory.
//
//   1. every position k < n: positions[k] = k, and an index outside [0, rows)
//      lowers result.first_bad to k (atomicMin: the first bad position, as
//      the CPU kernel reports it);
//   2. cub's radix sort (stable) sorts (index, position) pairs by index:
//      `order` lists the positions of equal indices in their original order;
//   3. a position starts a group where its sorted index differs from the one
//      before; cub's select compacts those starts into group_starts and
//      counts them;
//   4. group_rows[g] = the sorted index at group_starts[g], the sentinel
//      group_starts[num_groups] = n, and the first bad index's value;
//   5. the result (24 bytes) is copied to the host, which waits for it: the
//      op must know whether an index is bad before it writes anything.

struct IndexGroupingResult {
  unsigned long long first_bad;  // ULLONG_MAX when every index is in range
  long long bad_value;
  int num_groups;
  int unused;
};

template <typename Index>
__global__ void ValidateIndicesKernel(const Index* indices, int64_t n, int64_t rows,
                                      int64_t* positions, IndexGroupingResult* result) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    positions[k] = k;
    const int64_t index = static_cast<int64_t>(indices[k]);
    if (index < 0 || index >= rows) {
      atomicMin(&result->first_bad, static_cast<unsigned long long>(k));
    }
  }
}

template <typename Index>
__global__ void MarkGroupStartsKernel(const Index* sorted, int64_t n, uint8_t* starts) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    starts[p] = p == 0 || sorted[p] != sorted[p - 1];
  }
}

template <typename Index>
__global__ void FinishGroupsKernel(const Index* indices, const Index* sorted, int64_t n,
                                   int64_t* group_starts, int64_t* group_rows,
                                   IndexGroupingResult* result) {
  const int num_groups = result->num_groups;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t g = thread; g < num_groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    group_rows[g] = static_cast<int64_t>(sorted[group_starts[g]]);
  }
  if (thread == 0) {
    group_starts[num_groups] = n;
    if (result->first_bad < static_cast<unsigned long long>(n)) {
      result->bad_value = static_cast<long long>(indices[result->first_bad]);
    }
  }
}

// One device workspace holds everything; Plan says where each array goes.
template <typename Index>
class IndexGrouping {
 public:
  static constexpr int64_t kMaxIndices = INT_MAX;  // cub's item counts are int

  explicit IndexGrouping(int64_t n) : n_(n) {
    size_t sort_bytes = 0, select_bytes = 0;
    const int items = static_cast<int>(n);
    cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const Index*>(nullptr),
                                    static_cast<Index*>(nullptr),
                                    static_cast<const int64_t*>(nullptr),
                                    static_cast<int64_t*>(nullptr), items);
    cub::DeviceSelect::Flagged(nullptr, select_bytes, static_cast<const int64_t*>(nullptr),
                               static_cast<const uint8_t*>(nullptr),
                               static_cast<int64_t*>(nullptr), static_cast<int*>(nullptr),
                               items);
    cub_bytes_ = sort_bytes > select_bytes ? sort_bytes : select_bytes;
    size_t at = 0;
    result_at_ = Take(&at, sizeof(IndexGroupingResult));
    positions_at_ = Take(&at, n * sizeof(int64_t));
    order_at_ = Take(&at, n * sizeof(int64_t));
    starts_at_ = Take(&at, (n + 1) * sizeof(int64_t));
    rows_at_ = Take(&at, n * sizeof(int64_t));
    sorted_at_ = Take(&at, n * sizeof(Index));
    flags_at_ = Take(&at, n * sizeof(uint8_t));
    cub_at_ = Take(&at, cub_bytes_);
    bytes_ = at;
  }

  // Bytes of device memory Run needs.
  size_t WorkspaceBytes() const { return bytes_; }

  // Validates and groups `indices` (n of them, in device memory) against
  // [0, rows) on `stream`, and waits for the result. On success *groups
  // points into `workspace`, which must outlive its use.
  cudaError_t Run(const Index* indices, int64_t rows, void* workspace, cudaStream_t stream,
                  int multiprocessors, SparseGroupsView* groups,
                  IndexGroupingResult* result) const {
    char* base = static_cast<char*>(workspace);
    auto* result_dev = reinterpret_cast<IndexGroupingResult*>(base + result_at_);
    auto* positions = reinterpret_cast<int64_t*>(base + positions_at_);
    auto* order = reinterpret_cast<int64_t*>(base + order_at_);
    auto* starts = reinterpret_cast<int64_t*>(base + starts_at_);
    auto* group_rows = reinterpret_cast<int64_t*>(base + rows_at_);
    auto* sorted = reinterpret_cast<Index*>(base + sorted_at_);
    auto* flags = reinterpret_cast<uint8_t*>(base + flags_at_);
    void* cub_temp = base + cub_at_;
    size_t cub_bytes = cub_bytes_;
    const int items = static_cast<int>(n_);
    const int blocks = static_cast<int>(Min<int64_t>(
        (n_ + kThreadsPerBlock - 1) / kThreadsPerBlock,
        static_cast<int64_t>(multiprocessors) * kBlocksPerMultiprocessor));
    cudaError_t e = cudaMemsetAsync(result_dev, 0xFF, sizeof(IndexGroupingResult), stream);
    if (e == cudaSuccess && n_ > 0) {
      ValidateIndicesKernel<<<blocks, kThreadsPerBlock, 0, stream>>>(indices, n_, rows,
                                                                     positions, result_dev);
      e = cudaGetLastError();
      if (e == cudaSuccess) {
        e = cub::DeviceRadixSort::SortPairs(cub_temp, cub_bytes, indices, sorted, positions,
                                            order, items, 0, static_cast<int>(sizeof(Index) * 8),
                                            stream);
      }
      if (e == cudaSuccess) {
        MarkGroupStartsKernel<<<blocks, kThreadsPerBlock, 0, stream>>>(sorted, n_, flags);
        e = cudaGetLastError();
      }
      if (e == cudaSuccess) {
        cub_bytes = cub_bytes_;
        e = cub::DeviceSelect::Flagged(cub_temp, cub_bytes, positions, flags, starts,
                                       &result_dev->num_groups, items, stream);
      }
    } else if (e == cudaSuccess) {
      e = cudaMemsetAsync(&result_dev->num_groups, 0, sizeof(int), stream);
    }
    if (e == cudaSuccess) {
      FinishGroupsKernel<<<blocks > 0 ? blocks : 1, kThreadsPerBlock, 0, stream>>>(
          indices, sorted, n_, starts, group_rows, result_dev);
      e = cudaGetLastError();
    }
    if (e == cudaSuccess) {
      e = cudaMemcpyAsync(result, result_dev, sizeof(IndexGroupingResult),
                          cudaMemcpyDeviceToHost, stream);
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) return e;
    *groups = SparseGroupsView{order, starts, group_rows, result->num_groups};
    return cudaSuccess;
  }

 private:
  static size_t Take(size_t* at, size_t bytes) {
    const size_t start = (*at + 255) & ~size_t{255};
    *at = start + bytes;
    return start;
  }

  int64_t n_;
  size_t cub_bytes_ = 0, bytes_ = 0;
  size_t result_at_, positions_at_, order_at_, starts_at_, rows_at_, sorted_at_, flags_at_,
      cub_at_;
};

#endif  // __CUDACC__

}  // namespace kernels
}  // namespace tf_bf16

#undef TF_BF16_UNROLL

#endif  // TF_BF16_CC_KERNELS_BF16_UPDATE_KERNELS_CU_H_
