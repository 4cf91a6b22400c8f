// tf_bf16 GPU harness: runs the CUDA kernels of
// cc/kernels/bf16_update_kernels.cu.h (the code TensorFlow's GPU functors
// run; nothing here is a copy) on up to 10^9 elements, checks every op x
// rounding x dtype BIT FOR BIT against the plain host math of
// bf16_update_math.h on the same inputs, and times each update with CUDA
// events against a device-to-device copy of the same bytes.
//
// Built with nvcc (cc/harness/build.sh): GPU mode. Built with g++ as C++
// (also build.sh, on a machine without CUDA): host mode, where the "device"
// is kernels::HostEmulator running the same per-thread functions for several
// launch geometries on small sizes, so the harness logic and the kernels'
// thread logic are checked before a GPU run. No TensorFlow anywhere.
//
// Inputs come from a hash of (tensor, element index), on the device and on
// the host alike, so no data travels. About 1 in 40 values is special (NaN
// with payloads, +-Inf, subnormal, huge, signed zero); the rest are normal
// numbers of several magnitudes.
//
//   bf16_harness [--log2n 28] [--big N] [--reps 20] [--json FILE] [--only SUBSTRING]
//                [--baseline FILE: an earlier run's --json, to print time ratios against]
//                [--corrupt: flip a result bit before comparing, to see a failure]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <omp.h>
#include <xmmintrin.h>

#include "../kernels/bf16_update_kernels.cu.h"

namespace harness {

using namespace tf_bf16;            // NOLINT
using namespace tf_bf16::kernels;   // NOLINT

#if defined(__CUDACC__)
constexpr bool kGpu = true;
#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t e_ = (expr);                                                         \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, \
                   __LINE__, #expr);                                                       \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)
#else
constexpr bool kGpu = false;
#endif

// --corrupt: flip one bit of each device result before the comparison, to
// show that the comparison fails when the bits differ.
bool g_corrupt = false;

void Corrupt(std::vector<std::vector<char>>& got) {
  if (g_corrupt && !got[0].empty()) got[0][got[0].size() / 2 & ~size_t{3}] ^= 1;
}

double Seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------
// Deterministic inputs.

TF_BF16_HOST_DEVICE uint32_t InputBits(uint32_t tensor_key, uint64_t i, bool positive) {
  const uint32_t a = Mix32(Mix32(static_cast<uint32_t>(i) ^ tensor_key) ^
                           (static_cast<uint32_t>(i >> 32) * 0x9E3779B9u));
  const uint32_t b = Mix32(a ^ 0x85EBCA6Bu);
  const uint32_t kind = a & 0xFFu;
  uint32_t bits;
  if (kind < 6) {  // special values
    const uint32_t specials[12] = {0x7FC00000u, 0xFFC12345u, 0x7F810000u, 0x7F800001u,
                                   0x7F800000u, 0xFF800000u, 0x00000001u, 0x000AE398u,
                                   0x80000000u, 0x00000000u, 0x7F7FFFFFu, 0x7F000000u};
    bits = specials[b % 12];
  } else if (kind < 10) {  // tiny: subnormal or the smallest normals
    bits = (b & 0x80FFFFFFu) & ~0x7F000000u;
  } else if (kind < 16) {  // huge
    bits = (b & 0x807FFFFFu) | ((0xF0u + (b >> 24) % 14u) << 23);
  } else {  // normal numbers from 2^-24 to 2^4
    bits = (b & 0x807FFFFFu) | ((103u + (a >> 8) % 28u) << 23);
  }
  return positive ? (bits & 0x7FFFFFFFu) : bits;
}

TF_BF16_HOST_DEVICE void StoreInput(float* out, uint32_t bits) { *out = BitsToFloat(bits); }
TF_BF16_HOST_DEVICE void StoreInput(uint16_t* out, uint32_t bits) {
  *out = static_cast<uint16_t>(bits >> 16);
}

#if defined(__CUDACC__)
template <typename T>
__global__ void FillKernel(T* out, int64_t n, uint32_t key, bool positive) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    StoreInput(out + i, InputBits(key, static_cast<uint64_t>(i), positive));
  }
}
#endif

template <typename T>
void FillHost(T* out, int64_t n, uint32_t key, bool positive) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    StoreInput(out + i, InputBits(key, static_cast<uint64_t>(i), positive));
  }
}

// Sparse indices: mostly uniform over the rows, a quarter in 64 hot rows, so
// that many rows have many duplicates.
int64_t IndexAt(uint32_t key, int64_t k, int64_t rows) {
  const uint32_t h = Mix32(Mix32(static_cast<uint32_t>(k) ^ key) + 0x632BE5ABu);
  const uint64_t wide = (static_cast<uint64_t>(Mix32(h)) << 32) | h;
  return (h & 3u) == 0 ? static_cast<int64_t>(wide % std::min<int64_t>(rows, 64))
                       : static_cast<int64_t>(wide % static_cast<uint64_t>(rows));
}

// ---------------------------------------------------------------------------
// Cases.

enum class Op { kRound, kAssignAdd, kSgd, kAdam, kLion };

struct Case {
  std::string name;
  Op op;
  Rounding rounding = Rounding::kNearest;
  bool var_bf16 = true, grad_bf16 = true;
  bool momentum = false, nesterov = false, amsgrad = false;
  float weight_decay = 0.0f;
  int64_t n = 0;                                   // elements of the variable
  int64_t rows = 0, row_size = 0, num_indices = 0; // sparse when num_indices > 0
  bool index64 = true;
  bool geometry_sweep = false;  // also check and time other launch configurations

  bool sparse() const { return num_indices > 0; }
  int state_bytes() const { return var_bf16 ? 2 : 4; }
  int grad_bytes() const { return op == Op::kRound ? 4 : (grad_bf16 ? 2 : 4); }
  int slots() const {
    switch (op) {
      case Op::kSgd: return momentum ? 1 : 0;
      case Op::kAdam: return amsgrad ? 3 : 2;
      case Op::kLion: return 1;
      default: return 0;
    }
  }
  bool compensation() const {
    return rounding == Rounding::kKahan && var_bf16 && op != Op::kRound;
  }
  int64_t grad_elements() const { return sparse() ? num_indices * row_size : n; }
  // Bytes an update reads plus writes, per updated element.
  double bytes_per_element() const {
    if (op == Op::kRound) return 4 + 2;
    return 2.0 * (state_bytes() * (1 + slots()) + (compensation() ? 2 : 0)) + grad_bytes();
  }
  double bytes_moved() const {
    return bytes_per_element() * static_cast<double>(sparse() ? num_indices * row_size : n);
  }
};

const char* RoundingName(Rounding r) {
  return r == Rounding::kNearest ? "nearest" : r == Rounding::kStochastic ? "stochastic" : "kahan";
}

// The roles of the tensors of a case; keys make their inputs differ.
enum Role { kVar = 0, kSlot1, kSlot2, kSlot3, kComp, kGrad, kNumRoles };
const char* kRoleNames[kNumRoles] = {"var", "slot1", "slot2", "slot3", "compensation", "grad"};

struct Tensors {
  void* p[kNumRoles] = {};
  void* indices = nullptr;
};

int64_t RoleElements(const Case& c, int role) { return role == kGrad ? c.grad_elements() : c.n; }
int RoleBytes(const Case& c, int role) {
  return role == kGrad ? c.grad_bytes() : role == kComp ? 2 : c.state_bytes();
}
bool HasRole(const Case& c, int role) {
  if (role == kVar || role == kGrad) return true;
  if (role == kComp) return c.compensation();
  return role - kSlot1 < c.slots();
}
uint32_t RoleKey(const Case& c, int role) {
  uint32_t h = 0x1234567u;
  for (char ch : c.name) h = Mix32(h ^ static_cast<uint8_t>(ch));
  return Mix32(h ^ static_cast<uint32_t>(role));
}
bool RolePositive(const Case& c, int role) {
  return c.op == Op::kAdam && (role == kSlot2 || role == kSlot3);
}

struct Scalars {
  SgdScalars sgd;
  AdamScalars adam;
  LionScalars lion;
  RandomKey stream_key;
};

Scalars MakeScalars(const Case& c) {
  Scalars s;
  const float lr = 0.0137f, wd = c.weight_decay;
  s.sgd = SgdScalars{lr, 0.9f, wd, MaskOf(c.nesterov), MaskOf(wd != 0.0f)};
  const float b1 = 0.9f, b2 = 0.999f, b1p = 0.59049f, b2p = 0.99500996f;
  s.adam.lr = lr;
  s.adam.alpha = lr * std::sqrt(1.0f - b2p) / (1.0f - b1p);
  s.adam.one_minus_beta1 = 1.0f - b1;
  s.adam.one_minus_beta2 = 1.0f - b2;
  s.adam.epsilon = 1e-7f;
  s.adam.weight_decay = wd;
  s.adam.weight_decay_mask = MaskOf(wd != 0.0f);
  s.lion = LionScalars{lr, 0.9f, 1.0f - 0.9f, 0.99f, 1.0f - 0.99f, wd, MaskOf(wd != 0.0f)};
  s.stream_key = MakeStreamKey(int64_t{1} << 33 | 7, 5, -3);
  return s;
}

// Calls fn(R, S, G) with the case's rounding and storage types as types.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename Fn>
auto WithTypes(const Case& c, const Fn& fn) {
  auto with_r = [&](auto r) {
    auto with_s = [&](auto s) {
      return c.grad_bf16 ? fn(r, s, TypeTag<uint16_t>()) : fn(r, s, TypeTag<float>());
    };
    return c.var_bf16 ? with_s(TypeTag<uint16_t>()) : with_s(TypeTag<float>());
  };
  switch (c.rounding) {
    case Rounding::kStochastic:
      return with_r(std::integral_constant<Rounding, Rounding::kStochastic>());
    case Rounding::kKahan:
      return with_r(std::integral_constant<Rounding, Rounding::kKahan>());
    default:
      return with_r(std::integral_constant<Rounding, Rounding::kNearest>());
  }
}

// One update of the case on an executor (the launchers TensorFlow calls).
template <typename Executor>
typename Executor::Status Apply(const Executor& ex, const Case& c, const Tensors& t,
                                const SparseGroupsView& groups, const Scalars& s) {
  if (c.op == Op::kRound) {
    return StochasticRound(ex, static_cast<const float*>(t.p[kGrad]),
                           static_cast<uint16_t*>(t.p[kVar]), c.n, s.stream_key);
  }
  return WithTypes(c, [&](auto r, auto st, auto gt) -> typename Executor::Status {
    constexpr Rounding R = decltype(r)::value;
    using S = typename decltype(st)::type;
    using G = typename decltype(gt)::type;
    S* var = static_cast<S*>(t.p[kVar]);
    S* s1 = static_cast<S*>(t.p[kSlot1]);
    S* s2 = static_cast<S*>(t.p[kSlot2]);
    S* s3 = static_cast<S*>(t.p[kSlot3]);
    auto* comp = static_cast<uint16_t*>(t.p[kComp]);
    const G* grad = static_cast<const G*>(t.p[kGrad]);
    if (c.sparse()) {
      if (c.op == Op::kSgd) {
        return SparseApplySgd<R>(ex, var, s1, comp, grad, groups, c.row_size, s.sgd, s.stream_key);
      }
      return SparseApplyAdam<R>(ex, var, s1, s2, s3, comp, grad, groups, c.row_size, s.adam,
                                s.stream_key);
    }
    switch (c.op) {
      case Op::kAssignAdd:
        return RoundedAssignAdd<R>(ex, var, comp, grad, c.n, s.stream_key);
      case Op::kSgd:
        return ApplySgd<R>(ex, var, s1, comp, grad, c.n, s.sgd, s.stream_key);
      case Op::kAdam:
        return ApplyAdam<R>(ex, var, s1, s2, s3, comp, grad, c.n, s.adam, s.stream_key);
      default:
        return ApplyLion<R>(ex, var, s1, comp, grad, c.n, s.lion, s.stream_key);
    }
  });
}

// ---------------------------------------------------------------------------
// The plain host math: element functions in index order (sparse: positions
// in order), each element keyed by its own index; threads over disjoint
// elements, denormals flushed in every thread as the kernels flush them.

struct FlushDenormals {
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

void HostReference(const Case& c, const Tensors& t, const std::vector<int64_t>& indices,
                   const Scalars& s) {
  if (c.op == Op::kRound) {
    const float* x = static_cast<const float*>(t.p[kGrad]);
    uint16_t* y = static_cast<uint16_t*>(t.p[kVar]);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < c.n; ++i) {
      const RandomKey k = s.stream_key.ForBlock(static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32));
      y[i] = RoundStochasticToBf16(x[i], ElementBits::Of(k.value, static_cast<uint32_t>(i)).Draw(0));
    }
    return;
  }
  WithTypes(c, [&](auto r, auto st, auto gt) {
    constexpr Rounding R = decltype(r)::value;
    using S = typename decltype(st)::type;
    using G = typename decltype(gt)::type;
    S* var = static_cast<S*>(t.p[kVar]);
    S* s1 = static_cast<S*>(t.p[kSlot1]);
    S* s2 = static_cast<S*>(t.p[kSlot2]);
    S* s3 = static_cast<S*>(t.p[kSlot3]);
    auto* comp = static_cast<uint16_t*>(t.p[kComp]);
    const G* grad = static_cast<const G*>(t.p[kGrad]);
    auto element = [&](int64_t i, float g) {
      const RandomKey k = s.stream_key.ForBlock(static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32));
      const ElementBits bits = ElementBits::Of(k.value, static_cast<uint32_t>(i));
      switch (c.op) {
        case Op::kAssignAdd:
          AssignAddElement<R>(var, comp, g, i, bits);
          break;
        case Op::kSgd:
          if (c.momentum) {
            SgdElement<R, true>(var, s1, comp, g, i, s.sgd, bits);
          } else {
            SgdElement<R, false>(var, s1, comp, g, i, s.sgd, bits);
          }
          break;
        case Op::kAdam:
          if (c.amsgrad) {
            AdamElement<R, true>(var, s1, s2, s3, comp, g, i, s.adam, bits);
          } else {
            AdamElement<R, false>(var, s1, s2, s3, comp, g, i, s.adam, bits);
          }
          break;
        default:
          LionElement<R>(var, s1, comp, g, i, s.lion, bits);
      }
    };
    if (c.sparse()) {
      // Positions in order; within a position, columns in parallel.
#pragma omp parallel
      {
        FlushDenormals flush;
        for (int64_t p = 0; p < c.num_indices; ++p) {
#pragma omp for schedule(static)
          for (int64_t j = 0; j < c.row_size; ++j) {
            element(indices[p] * c.row_size + j, Load(grad[p * c.row_size + j]));
          }
        }
      }
    } else {
#pragma omp parallel
      {
        FlushDenormals flush;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < c.n; ++i) element(i, Load(grad[i]));
      }
    }
    return 0;
  });
}

// Host-side grouping, as the CPU functor does it: the expected output of the
// device grouping, and the grouping the host-mode harness runs with.
struct HostGroups {
  std::vector<int64_t> order, starts, rows;
  SparseGroupsView View() const {
    return SparseGroupsView{order.data(), starts.data(), rows.data(),
                            static_cast<int64_t>(rows.size())};
  }
};

HostGroups GroupOnHost(const std::vector<int64_t>& idx) {
  HostGroups g;
  g.order.resize(idx.size());
  std::iota(g.order.begin(), g.order.end(), 0);
  std::stable_sort(g.order.begin(), g.order.end(),
                   [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
  for (size_t p = 0; p < idx.size(); ++p) {
    if (p == 0 || idx[g.order[p]] != idx[g.order[p - 1]]) {
      g.starts.push_back(static_cast<int64_t>(p));
      g.rows.push_back(idx[g.order[p]]);
    }
  }
  g.starts.push_back(static_cast<int64_t>(idx.size()));
  return g;
}

// ---------------------------------------------------------------------------
// Results.

struct Result {
  std::string name;
  int64_t elements = 0;
  double bytes_per_element = 0;
  int64_t mismatches = 0;
  std::string first_mismatch;
  double ms = 0, copy_ms = 0;  // medians
  double tbps = 0, copy_tbps = 0;
  std::string note;
  std::vector<std::pair<std::string, double>> sweep;  // launch configuration, median ms
};

template <typename T>
int64_t CountMismatches(const T* got, const T* want, int64_t n, std::string* first,
                        const char* role) {
  int64_t count = 0;
  int64_t first_i = -1;
#pragma omp parallel for reduction(+ : count) schedule(static)
  for (int64_t i = 0; i < n; ++i) count += std::memcmp(got + i, want + i, sizeof(T)) != 0;
  if (count > 0) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::memcmp(got + i, want + i, sizeof(T)) != 0) {
        first_i = i;
        break;
      }
    }
    uint32_t g = 0, w = 0;
    std::memcpy(&g, got + first_i, sizeof(T));
    std::memcpy(&w, want + first_i, sizeof(T));
    char buf[200];
    std::snprintf(buf, sizeof(buf), "%s[%lld]: device %#x, host %#x", role,
                  static_cast<long long>(first_i), g, w);
    if (first->empty()) *first = buf;
  }
  return count;
}

int64_t Compare(const Case& c, const std::vector<std::vector<char>>& got,
                const std::vector<std::vector<char>>& want, std::string* first) {
  int64_t total = 0;
  for (int role = 0; role < kNumRoles; ++role) {
    if (!HasRole(c, role) || role == kGrad) continue;
    const int64_t n = RoleElements(c, role);
    if (RoleBytes(c, role) == 2) {
      total += CountMismatches(reinterpret_cast<const uint16_t*>(got[role].data()),
                               reinterpret_cast<const uint16_t*>(want[role].data()), n, first,
                               kRoleNames[role]);
    } else {
      total += CountMismatches(reinterpret_cast<const uint32_t*>(got[role].data()),
                               reinterpret_cast<const uint32_t*>(want[role].data()), n, first,
                               kRoleNames[role]);
    }
  }
  return total;
}

// Host copies of a case's inputs, and the reference result.
struct HostState {
  std::vector<std::vector<char>> buffers = std::vector<std::vector<char>>(kNumRoles);
  std::vector<int64_t> indices;
  Tensors tensors;
};

HostState MakeHostInputs(const Case& c) {
  HostState h;
  for (int role = 0; role < kNumRoles; ++role) {
    if (!HasRole(c, role)) continue;
    const int64_t n = RoleElements(c, role);
    h.buffers[role].resize(static_cast<size_t>(n) * RoleBytes(c, role) + 64);
    void* p = h.buffers[role].data();
    if (RoleBytes(c, role) == 2) {
      FillHost(static_cast<uint16_t*>(p), n, RoleKey(c, role), RolePositive(c, role));
    } else {
      FillHost(static_cast<float*>(p), n, RoleKey(c, role), RolePositive(c, role));
    }
    h.tensors.p[role] = p;
  }
  if (c.sparse()) {
    h.indices.resize(c.num_indices);
    for (int64_t k = 0; k < c.num_indices; ++k) h.indices[k] = IndexAt(RoleKey(c, 99), k, c.rows);
  }
  return h;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

#if defined(__CUDACC__)
// ---------------------------------------------------------------------------
// GPU mode.

struct Device {
  int multiprocessors = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start, stop;
};

template <typename Fn>
double TimeMs(Device& d, int reps, const Fn& fn) {
  for (int w = 0; w < 3; ++w) fn();
  CHECK_CUDA(cudaStreamSynchronize(d.stream));
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    CHECK_CUDA(cudaEventRecord(d.start, d.stream));
    fn();
    CHECK_CUDA(cudaEventRecord(d.stop, d.stream));
    CHECK_CUDA(cudaEventSynchronize(d.stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, d.start, d.stop));
    times.push_back(ms);
  }
  return Median(times);
}

struct DeviceTensors {
  Tensors t;
  void* workspace = nullptr;
  ~DeviceTensors() {
    for (void* p : t.p) cudaFree(p);
    cudaFree(t.indices);
    cudaFree(workspace);
  }
};

void FillDevice(Device& d, const Case& c, DeviceTensors& dt) {
  for (int role = 0; role < kNumRoles; ++role) {
    if (!HasRole(c, role)) continue;
    const int64_t n = RoleElements(c, role);
    const int blocks = d.multiprocessors * 8;
    if (RoleBytes(c, role) == 2) {
      FillKernel<<<blocks, 256, 0, d.stream>>>(static_cast<uint16_t*>(dt.t.p[role]), n,
                                               RoleKey(c, role), RolePositive(c, role));
    } else {
      FillKernel<<<blocks, 256, 0, d.stream>>>(static_cast<float*>(dt.t.p[role]), n,
                                               RoleKey(c, role), RolePositive(c, role));
    }
    CHECK_CUDA(cudaGetLastError());
  }
}

// Validation and grouping of device indices; checks the groups against the
// host's stable sort. Returns the device view.
template <typename Index>
SparseGroupsView GroupOnDevice(Device& d, const Case& c, DeviceTensors& dt,
                               const std::vector<int64_t>& indices, std::string* problem) {
  std::vector<Index> host(indices.begin(), indices.end());
  if (dt.t.indices == nullptr) {
    CHECK_CUDA(cudaMalloc(&dt.t.indices, std::max<size_t>(1, host.size() * sizeof(Index))));
  }
  CHECK_CUDA(cudaMemcpy(dt.t.indices, host.data(), host.size() * sizeof(Index),
                        cudaMemcpyHostToDevice));
  IndexGrouping<Index> grouping(c.num_indices);
  if (dt.workspace == nullptr) CHECK_CUDA(cudaMalloc(&dt.workspace, grouping.WorkspaceBytes()));
  SparseGroupsView view;
  IndexGroupingResult result;
  CHECK_CUDA(grouping.Run(static_cast<const Index*>(dt.t.indices), c.rows, dt.workspace,
                          d.stream, d.multiprocessors, &view, &result));
  const HostGroups want = GroupOnHost(indices);
  if (result.first_bad != ~0ull) *problem += " grouping reported a bad index;";
  if (view.num_groups != static_cast<int64_t>(want.rows.size())) {
    *problem += " group count " + std::to_string(view.num_groups) + " != " +
                std::to_string(want.rows.size()) + ";";
    return view;
  }
  std::vector<int64_t> order(c.num_indices), starts(view.num_groups + 1), rows(view.num_groups);
  CHECK_CUDA(cudaMemcpy(order.data(), view.order, order.size() * 8, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(starts.data(), view.group_starts, starts.size() * 8,
                        cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(rows.data(), view.group_rows, rows.size() * 8, cudaMemcpyDeviceToHost));
  if (order != want.order) *problem += " order differs from the host's stable sort;";
  if (starts != want.starts) *problem += " group starts differ;";
  if (rows != want.rows) *problem += " group rows differ;";
  return view;
}

// Bad indices: the first bad position and its value, as the CPU kernel says.
template <typename Index>
std::string CheckBadIndices(Device& d) {
  std::string problems;
  const std::vector<std::vector<int64_t>> lists = {
      {3, 1, 4, 1, 5, -1, 2, 100, 6}, {0, 1, 2, 99, 98, 10, 7}, {-5}, {4, 4, 4, 4}};
  const std::vector<long long> want_pos = {5, 7, 0, -1}, want_val = {-1, 10, -5, 0};
  for (size_t t = 0; t < lists.size(); ++t) {
    std::vector<Index> host(lists[t].begin(), lists[t].end());
    Index* dev;
    CHECK_CUDA(cudaMalloc(&dev, host.size() * sizeof(Index)));
    CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(Index), cudaMemcpyHostToDevice));
    IndexGrouping<Index> grouping(static_cast<int64_t>(host.size()));
    void* ws;
    CHECK_CUDA(cudaMalloc(&ws, grouping.WorkspaceBytes()));
    SparseGroupsView view;
    IndexGroupingResult result;
    CHECK_CUDA(grouping.Run(dev, 10, ws, d.stream, d.multiprocessors, &view, &result));
    const long long pos = result.first_bad == ~0ull ? -1 : static_cast<long long>(result.first_bad);
    if (pos != want_pos[t] || (pos >= 0 && result.bad_value != want_val[t])) {
      problems += " list " + std::to_string(t) + ": first bad " + std::to_string(pos) + " = " +
                  std::to_string(result.bad_value) + ";";
    }
    if (pos < 0 && view.num_groups != 1) problems += " list 3: groups;";
    cudaFree(dev);
    cudaFree(ws);
  }
  return problems;
}

Result RunCaseGpu(Device& d, const Case& c, int reps) {
  Result res;
  res.name = c.name;
  res.elements = c.sparse() ? c.num_indices * c.row_size : c.n;
  res.bytes_per_element = c.bytes_per_element();
  const Scalars s = MakeScalars(c);
  const double t0 = Seconds();
  DeviceTensors dt;
  for (int role = 0; role < kNumRoles; ++role) {
    if (!HasRole(c, role)) continue;
    CHECK_CUDA(cudaMalloc(&dt.t.p[role], static_cast<size_t>(RoleElements(c, role)) *
                                             RoleBytes(c, role) + 64));
  }
  // Host inputs and reference, computed while the device fills its own.
  FillDevice(d, c, dt);
  HostState host = MakeHostInputs(c);
  SparseGroupsView groups{};
  std::string problem;
  if (c.sparse()) {
    groups = c.index64 ? GroupOnDevice<int64_t>(d, c, dt, host.indices, &problem)
                       : GroupOnDevice<int32_t>(d, c, dt, host.indices, &problem);
  }
  const GpuExecutor ex{d.stream, d.multiprocessors};
  CHECK_CUDA(Apply(ex, c, dt.t, groups, s));
  CHECK_CUDA(cudaStreamSynchronize(d.stream));
  std::vector<std::vector<char>> got(kNumRoles);
  for (int role = 0; role < kNumRoles; ++role) {
    if (!HasRole(c, role) || role == kGrad) continue;
    got[role].resize(host.buffers[role].size());
    CHECK_CUDA(cudaMemcpy(got[role].data(), dt.t.p[role],
                          static_cast<size_t>(RoleElements(c, role)) * RoleBytes(c, role),
                          cudaMemcpyDeviceToHost));
  }
  HostReference(c, host.tensors, host.indices, s);
  Corrupt(got);
  res.mismatches = Compare(c, got, host.buffers, &res.first_mismatch);
  res.note = problem;
  const double t_check = Seconds() - t0;

  // Timing: the update (sparse: the update alone; grouping shown apart), then
  // a device-to-device copy moving the same bytes (half read, half written).
  res.ms = TimeMs(d, reps, [&] { CHECK_CUDA(Apply(ex, c, dt.t, groups, s)); });
  const size_t copy_bytes = static_cast<size_t>(c.bytes_moved() / 2);
  void *src, *dst;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  CHECK_CUDA(cudaMemsetAsync(src, 0x5A, copy_bytes, d.stream));
  res.copy_ms = TimeMs(d, reps, [&] {
    CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, d.stream));
  });
  cudaFree(src);
  cudaFree(dst);
  res.tbps = c.bytes_moved() / (res.ms * 1e-3) / 1e12;
  res.copy_tbps = 2.0 * copy_bytes / (res.copy_ms * 1e-3) / 1e12;
  if (c.sparse()) {
    // The validation and grouping alone (it ends with a wait for the host).
    auto time_grouping = [&](auto index_tag) {
      using Index = decltype(index_tag);
      const IndexGrouping<Index> grouping(c.num_indices);
      SparseGroupsView view;
      IndexGroupingResult result;
      return TimeMs(d, reps, [&] {
        CHECK_CUDA(grouping.Run(static_cast<const Index*>(dt.t.indices), c.rows, dt.workspace,
                                d.stream, d.multiprocessors, &view, &result));
      });
    };
    const double group_ms = c.index64 ? time_grouping(int64_t{}) : time_grouping(int32_t{});
    char buf[160];
    std::snprintf(buf, sizeof(buf), " validating and grouping %lld indices: %.3f ms;",
                  static_cast<long long>(c.num_indices), group_ms);
    res.note += buf;
  }
  if (c.geometry_sweep) {
    // Other launch configurations: the same bits (fresh inputs, same
    // reference), and their times. K: chunks a thread loads before it
    // computes (GpuExecutor::chunks_per_trip); grid: blocks per
    // multiprocessor, or one trip of K chunks per thread (no grid-stride).
    struct Config {
      const char* name;
      int chunks_per_trip;
      int blocks_per_sm;  // 0: one trip per thread
    };
    // (The default is K=1 at 32 blocks/SM; K=2 at 8 blocks/SM was the default
    // of the first two H200 runs.)
    const Config configs[] = {{"K=1 8xSM", 1, 8},   {"K=1 128xSM", 1, 128},
                              {"K=1 1 chunk/thread", 1, 0},
                              {"K=2 8xSM", 2, 8},   {"K=2 32xSM", 2, 32},
                              {"K=2 1 trip/thread", 2, 0}};
    for (const Config& config : configs) {
      GpuExecutor other = ex;
      other.chunks_per_trip = config.chunks_per_trip;
      other.max_blocks = config.blocks_per_sm > 0 ? d.multiprocessors * config.blocks_per_sm
                                                  : INT_MAX;
      FillDevice(d, c, dt);
      CHECK_CUDA(Apply(other, c, dt.t, groups, s));
      CHECK_CUDA(cudaStreamSynchronize(d.stream));
      for (int role = 0; role < kNumRoles; ++role) {
        if (!HasRole(c, role) || role == kGrad) continue;
        CHECK_CUDA(cudaMemcpy(got[role].data(), dt.t.p[role],
                              static_cast<size_t>(RoleElements(c, role)) * RoleBytes(c, role),
                              cudaMemcpyDeviceToHost));
      }
      std::string first;
      const int64_t bad = Compare(c, got, host.buffers, &first);
      res.mismatches += bad;
      const double ms = TimeMs(d, reps, [&] { CHECK_CUDA(Apply(other, c, dt.t, groups, s)); });
      res.sweep.emplace_back(config.name, ms);
      char buf[160];
      std::snprintf(buf, sizeof(buf), " %s: %.3f ms%s;", config.name, ms,
                    bad ? " BITS DIFFER" : "");
      res.note += buf;
    }
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), " check %.1f s", t_check);
  res.note += buf;
  return res;
}
#endif  // __CUDACC__

// ---------------------------------------------------------------------------
// Host mode: HostEmulator for several grids vs the plain host math.

Result RunCaseHost(const Case& c) {
  Result res;
  res.name = c.name;
  res.elements = c.sparse() ? c.num_indices * c.row_size : c.n;
  res.bytes_per_element = c.bytes_per_element();
  const Scalars s = MakeScalars(c);
  HostState want = MakeHostInputs(c);
  HostReference(c, want.tensors, want.indices, s);
  const HostGroups groups = GroupOnHost(want.indices);
  for (uint64_t threads : {uint64_t{1}, uint64_t{7}, uint64_t{132} * 8 * 256}) {
    for (int variant = 0; variant < 3; ++variant) {  // vectorised K = 1, K = 2; scalar
      HostState got = MakeHostInputs(c);
      HostEmulator ex;
      ex.threads = threads;
      ex.reverse_order = threads == 7;
      ex.allow_vector = variant < 2;
      ex.chunks_per_trip = variant == 1 ? kMaxChunksPerTrip : 1;
      FlushDenormals flush;
      Apply(ex, c, got.tensors, groups.View(), s);
      Corrupt(got.buffers);
      res.mismatches += Compare(c, got.buffers, want.buffers, &res.first_mismatch);
    }
  }
  return res;
}

// ---------------------------------------------------------------------------
// The case list: every op x rounding for bf16 variables with bf16 gradients
// (pure bf16 training), float32 gradients for the fullest SGD and Adam,
// float32 variables (which ignore the rounding), and sparse updates.

std::vector<Case> MakeCases(int64_t n, int64_t big) {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  Case round;
  round.name = "stochastic_round f32->bf16";
  round.op = Op::kRound;
  round.rounding = Rounding::kStochastic;
  round.n = n;
  add(round);
  const Rounding roundings[3] = {Rounding::kNearest, Rounding::kStochastic, Rounding::kKahan};
  struct Variant {
    const char* name;
    Op op;
    bool momentum, nesterov, amsgrad;
    float wd;
  };
  const Variant variants[] = {
      {"rounded_assign_add", Op::kAssignAdd, false, false, false, 0.0f},
      {"sgd", Op::kSgd, false, false, false, 0.0f},
      {"sgd_momentum", Op::kSgd, true, false, false, 0.0f},
      {"sgd_nesterov_wd", Op::kSgd, true, true, false, 0.04f},
      {"adam", Op::kAdam, false, false, false, 0.0f},
      {"adamw_amsgrad", Op::kAdam, false, false, true, 0.04f},
      {"lion_wd", Op::kLion, false, false, false, 0.04f},
  };
  for (const Variant& v : variants) {
    for (Rounding r : roundings) {
      for (bool grad_bf16 : {true, false}) {
        const bool fullest = v.nesterov || v.amsgrad;
        if (!grad_bf16 && !fullest) continue;
        Case c;
        c.op = v.op;
        c.rounding = r;
        c.grad_bf16 = grad_bf16;
        c.momentum = v.momentum;
        c.nesterov = v.nesterov;
        c.amsgrad = v.amsgrad;
        c.weight_decay = v.wd;
        c.n = n;
        c.geometry_sweep = grad_bf16 && (std::string(v.name) == "sgd_momentum" ||
                                         std::string(v.name) == "adam");
        c.name = std::string(v.name) + " bf16/" + (grad_bf16 ? "bf16 " : "f32 ") + RoundingName(r);
        add(c);
      }
    }
    Case f = cases.back();
    f.var_bf16 = false;
    f.grad_bf16 = false;
    f.rounding = Rounding::kNearest;
    f.geometry_sweep = false;
    f.name = std::string(v.name) + " f32/f32";
    add(f);
  }
  // Sparse: an embedding of n elements in rows of 256; n/4096 indices (a
  // quarter in 64 hot rows), int32 and int64.
  for (int opi = 0; opi < 2; ++opi) {
    for (Rounding r : roundings) {
      Case c;
      c.op = opi == 0 ? Op::kSgd : Op::kAdam;
      c.momentum = opi == 0;
      c.nesterov = opi == 0;
      c.amsgrad = opi == 1;
      c.weight_decay = 0.04f;
      c.rounding = r;
      c.row_size = n >= 4096 ? 256 : 3;
      c.rows = n / c.row_size;
      c.n = c.rows * c.row_size;
      c.num_indices = std::max<int64_t>(c.rows / 16, 5);
      c.index64 = r != Rounding::kStochastic;
      c.name = std::string(opi == 0 ? "sparse_sgd_nesterov_wd" : "sparse_adamw_amsgrad") +
               " bf16/bf16 " + RoundingName(r) + (c.index64 ? " int64" : " int32");
      add(c);
    }
  }
  if (big > 0) {
    Case c;
    c.op = Op::kSgd;
    c.momentum = true;
    c.rounding = Rounding::kStochastic;
    c.n = big;
    c.name = "sgd_momentum bf16/bf16 stochastic (big)";
    add(c);
  }
  return cases;
}

// ---------------------------------------------------------------------------
// An earlier run's --json (e.g. docs/h200/harness.json, the first H200 run):
// per case name, its median ms and effective bandwidth against its copy.

struct Baseline {
  double ms = 0, tbps = 0, copy_tbps = 0;
};

double JsonNumber(const std::string& line, const std::string& key) {
  const size_t at = line.find("\"" + key + "\": ");
  return at == std::string::npos ? 0 : std::atof(line.c_str() + at + key.size() + 4);
}

std::vector<std::pair<std::string, Baseline>> ReadBaseline(const std::string& path) {
  std::vector<std::pair<std::string, Baseline>> out;
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) {
    std::printf("baseline %s: cannot read it\n", path.c_str());
    return out;
  }
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), f)) {
    const std::string line = buf;
    const size_t at = line.find("\"name\": \"");
    if (at == std::string::npos) continue;
    const size_t end = line.find('"', at + 9);
    Baseline b;
    b.ms = JsonNumber(line, "ms");
    b.tbps = JsonNumber(line, "tbps");
    b.copy_tbps = JsonNumber(line, "copy_tbps");
    out.emplace_back(line.substr(at + 9, end - at - 9), b);
  }
  std::fclose(f);
  return out;
}

// Time and bandwidth against the baseline's, case by case, and the
// stochastic/nearest ratios of both runs.
void PrintComparison(const std::vector<Result>& results, const std::string& path) {
  const auto baseline = ReadBaseline(path);
  if (baseline.empty()) return;
  auto find = [&](const std::string& name) -> const Baseline* {
    for (const auto& [n, b] : baseline) {
      if (n == name) return &b;
    }
    return nullptr;
  };
  std::printf("\nagainst %s (median ms then and now; %%copy: effective bandwidth as a "
              "share of the copy's, each run its own copy):\n", path.c_str());
  std::printf("  %-50s %9s %9s %8s %8s %8s\n", "case", "ms then", "ms now", "speedup",
              "%copy", "%copy");
  std::printf("  %-50s %9s %9s %8s %8s %8s\n", "", "", "", "", "then", "now");
  for (const Result& r : results) {
    const Baseline* b = find(r.name);
    if (!b || b->ms <= 0) continue;
    if (r.ms <= 0) {  // host mode: nothing timed, the baseline alone
      std::printf("  %-50s %9.4f %9s %8s %7.1f%% %8s\n", r.name.c_str(), b->ms, "-", "-",
                  100.0 * b->tbps / b->copy_tbps, "-");
      continue;
    }
    std::printf("  %-50s %9.4f %9.4f %7.2fx %7.1f%% %7.1f%%\n", r.name.c_str(), b->ms, r.ms,
                b->ms / r.ms, 100.0 * b->tbps / b->copy_tbps, 100.0 * r.tbps / r.copy_tbps);
  }
  std::printf("\n  stochastic / nearest time, then and now:\n");
  for (const Result& sr : results) {
    const size_t at = sr.name.find(" stochastic");
    if (at == std::string::npos || sr.name.find("(big)") != std::string::npos) continue;
    const std::string nearest = sr.name.substr(0, at) + " nearest" + sr.name.substr(at + 11);
    const Baseline* b_sr = find(sr.name);
    const Baseline* b_nr = find(nearest);
    for (const Result& nr : results) {
      if (nr.name != nearest) continue;
      char then[16] = "-", now[16] = "-";
      if (b_sr && b_nr && b_nr->ms > 0) std::snprintf(then, sizeof(then), "%.3f", b_sr->ms / b_nr->ms);
      if (nr.ms > 0) std::snprintf(now, sizeof(now), "%.3f", sr.ms / nr.ms);
      std::printf("  %-44s %6s %6s\n", sr.name.substr(0, at).c_str(), then, now);
    }
  }
}

}  // namespace harness

int main(int argc, char** argv) {
  using namespace harness;  // NOLINT
  int log2n = kGpu ? 28 : 14;
  int64_t big = 0;
  int reps = 20;
  std::string json_path, only, baseline_path;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    auto next = [&]() -> std::string {
      if (a + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++a];
    };
    if (arg == "--log2n") log2n = std::stoi(next());
    else if (arg == "--big") big = std::stoll(next());
    else if (arg == "--reps") reps = std::stoi(next());
    else if (arg == "--json") json_path = next();
    else if (arg == "--only") only = next();
    else if (arg == "--baseline") baseline_path = next();
    else if (arg == "--corrupt") g_corrupt = true;
    else {
      std::fprintf(stderr, "usage: %s [--log2n N] [--big ELEMENTS] [--reps N] [--json FILE] "
                           "[--only SUBSTRING] [--baseline FILE] [--corrupt]\n", argv[0]);
      return 2;
    }
  }
  const int64_t n = (int64_t{1} << log2n) + (kGpu ? 0 : 5);  // host mode: odd sizes, a tail
  std::vector<Case> cases = MakeCases(n, big);
  std::printf("bf16_harness: %s mode, %d OpenMP threads, n = %lld (2^%d%s), %d reps\n",
              kGpu ? "GPU" : "host (kernels::HostEmulator)", omp_get_max_threads(),
              static_cast<long long>(n), log2n, kGpu ? "" : " + 5", reps);
  std::vector<Result> results;
  std::string extra_problems;
#if defined(__CUDACC__)
  Device d;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  d.multiprocessors = prop.multiProcessorCount;
  CHECK_CUDA(cudaStreamCreate(&d.stream));
  CHECK_CUDA(cudaEventCreate(&d.start));
  CHECK_CUDA(cudaEventCreate(&d.stop));
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf("device: %s, sm_%d%d, %d multiprocessors, %.1f GiB, driver %d, runtime %d\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0, driver, runtime);
  std::printf("launch: %d threads per block, %d blocks per multiprocessor, grid-stride, "
              "%d chunk(s) of %d elements loaded per trip\n",
              kThreadsPerBlock, kBlocksPerMultiprocessor, kDefaultChunksPerTrip, kVectorWidth);
  extra_problems += CheckBadIndices<int32_t>(d) + CheckBadIndices<int64_t>(d);
  std::printf("bad-index validation (int32, int64): %s\n",
              extra_problems.empty() ? "first bad position and value as the CPU kernel reports"
                                     : extra_problems.c_str());
#endif
  std::printf("%-48s %12s %5s %9s %8s %8s %7s %s\n", "case", "elements", "B/el", "ms",
              "TB/s", "copyTB/s", "%copy", "bits");
  for (const Case& c : cases) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    const double t0 = Seconds();
#if defined(__CUDACC__)
    Result r = RunCaseGpu(d, c, reps);
#else
    Result r = RunCaseHost(c);
#endif
    results.push_back(r);
    if (kGpu) {
      std::printf("%-48s %12lld %5.0f %9.4f %8.3f %8.3f %6.1f%% %s  [%.0f s]%s%s\n",
                  r.name.c_str(), static_cast<long long>(r.elements), r.bytes_per_element,
                  r.ms, r.tbps, r.copy_tbps, 100.0 * r.tbps / r.copy_tbps,
                  r.mismatches ? "DIFFER" : "identical", Seconds() - t0,
                  r.first_mismatch.empty() ? "" : ("  first: " + r.first_mismatch).c_str(),
                  r.note.empty() ? "" : ("\n    " + r.note).c_str());
    } else {
      std::printf("%-48s %12lld %5.0f %s%s\n", r.name.c_str(), static_cast<long long>(r.elements),
                  r.bytes_per_element, r.mismatches ? "DIFFER" : "identical (9 emulated grids)",
                  r.first_mismatch.empty() ? "" : ("  first: " + r.first_mismatch).c_str());
    }
    std::fflush(stdout);
  }
  // Summary: bits, bandwidth against the copy, SR against nearest.
  int identical = 0, below = 0;
  for (const Result& r : results) {
    identical += r.mismatches == 0 && r.note.find("differ") == std::string::npos &&
                 r.note.find("bad") == std::string::npos;
    below += kGpu && r.tbps < 0.95 * r.copy_tbps && r.name.find("sparse") == std::string::npos;
  }
  if (kGpu) {
    std::printf("\nstochastic / nearest time (same op, dtypes):\n");
    for (const Result& sr : results) {
      const size_t at = sr.name.find(" stochastic");
      if (at == std::string::npos || sr.name.find("(big)") != std::string::npos) continue;
      for (const Result& nr : results) {
        if (nr.name == sr.name.substr(0, at) + " nearest" + sr.name.substr(at + 11)) {
          std::printf("  %-44s %.3f\n", sr.name.substr(0, at).c_str(), sr.ms / nr.ms);
        }
      }
    }
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f) {
      std::fprintf(f, "{\"mode\": \"%s\", \"n\": %lld, \"reps\": %d, \"cases\": [\n",
                   kGpu ? "gpu" : "host", static_cast<long long>(n), reps);
      for (size_t k = 0; k < results.size(); ++k) {
        const Result& r = results[k];
        std::string sweep;
        for (const auto& [config, ms] : r.sweep) {
          char item[96];
          std::snprintf(item, sizeof(item), "%s\"%s\": %.5f", sweep.empty() ? "" : ", ",
                        config.c_str(), ms);
          sweep += item;
        }
        std::fprintf(f,
                     "  {\"name\": \"%s\", \"elements\": %lld, \"bytes_per_element\": %.1f, "
                     "\"mismatches\": %lld, \"ms\": %.5f, \"copy_ms\": %.5f, \"tbps\": %.4f, "
                     "\"copy_tbps\": %.4f, \"sweep_ms\": {%s}, \"note\": \"%s\"}%s\n",
                     r.name.c_str(), static_cast<long long>(r.elements), r.bytes_per_element,
                     static_cast<long long>(r.mismatches), r.ms, r.copy_ms, r.tbps, r.copy_tbps,
                     sweep.c_str(), r.note.c_str(), k + 1 < results.size() ? "," : "");
      }
      std::fprintf(f, "]}\n");
      std::fclose(f);
    }
  }
  if (!baseline_path.empty()) PrintComparison(results, baseline_path);
  const bool ok = identical == static_cast<int>(results.size()) && extra_problems.empty();
  std::printf("\nbf16_harness: %s: %d of %zu cases bit-identical to the host math%s\n",
              ok ? "OK" : "FAILED", identical, results.size(),
              kGpu ? (", " + std::to_string(below) +
                      " dense updates below 95% of the copy's bandwidth").c_str()
                   : "");
  return ok ? 0 : 1;
}
