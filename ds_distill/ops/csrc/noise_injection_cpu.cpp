// Fused timestep-conditioned noise injection: CPU kernel (fp32, bf16; fp64 for gradcheck).
//
// Every op here is "per-sample affine": sample b is a contiguous block of n = numel / B elements, and
// each output element is a fixed combination of the input elements at the same index, with
// coefficients that depend only on b (derived from sigma_b). One driver streams all inputs once,
// splits the flat range over threads with at::parallel_for, and uses AVX2 for fp32/bf16 (8 lanes,
// math in fp32). Outputs of tensors far larger than the caches are written with non-temporal stores:
// the write then skips the read-for-ownership, which is a quarter of the memory traffic of
// x_t = f(x0, eps) and more of the SDE step.
//
// Built with -ffp-contract=off: no FMA contraction, so results follow the reference's op order
// (reference.py) bit for bit.

// Narrow ATen headers instead of <torch/extension.h>: the build takes a third of the time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#define DSD_HAVE_AVX2 1
#else
#define DSD_HAVE_AVX2 0
#endif

namespace {

using BF16 = c10::BFloat16;

constexpr int64_t kGrainSize = 32768;  // elements per task, as ATen's elementwise kernels use

// Bytes streamed per call (inputs + outputs) from which outputs use non-temporal stores: 4x the L3
// cache, at least 32 MiB. Below it the output is likely read again while still cached, so regular
// stores are better.
// L3 size seen by CPU 0 (sysfs first: glibc's sysconf can report the host's total under a hypervisor).
int64_t l3_cache_bytes() {
#if defined(__linux__)
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long value = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &value, &unit);
    std::fclose(f);
    if (got >= 1 && value > 0) return value << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0);
  }
#if defined(_SC_LEVEL3_CACHE_SIZE)
  const long reported = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (reported > 0) return reported;
#endif
#endif
  return 0;
}

int64_t default_streaming_store_threshold() { return std::max<int64_t>(int64_t(32) << 20, 4 * l3_cache_bytes()); }
std::atomic<int64_t> g_streaming_store_threshold{default_streaming_store_threshold()};

// Opt-in (DS_DISTILL_HUGE_PAGES=1, or set_huge_page_threshold): outputs this op allocates from this size
// up are advised to use transparent huge pages (madvise, before first touch). A fresh output this large
// is page-faulted in on first write, and with 4 KiB pages the faults cost more than the math; 2 MiB
// pages cut that by ~3x when the kernel has free huge pages. Off by default, as torch's
// THP_MEM_ALLOC_ENABLE: with THP defrag set to `madvise` (a common default) a fault in an advised region
// compacts memory synchronously, and once memory was fragmented calls took 2-3x longer than without the
// advice (seen here: medians of 1.0-1.4 s instead of 0.45 s for a 2 x 256 MiB SDE step; single calls up to 8x).
constexpr int64_t kNoHugePages = INT64_MAX;
int64_t default_huge_page_threshold() {
  const char* v = std::getenv("DS_DISTILL_HUGE_PAGES");
  return (v != nullptr && v[0] == '1' && v[1] == '\0') ? (int64_t(32) << 20) : kNoHugePages;
}
std::atomic<int64_t> g_huge_page_threshold{default_huge_page_threshold()};

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

// Same op order as reference.sigma_from_timestep: t.float() / N, clamp, shift*u / (1 + (shift-1)*u).
inline float sigma_shift(double t, double shift, int64_t num_train_timesteps) {
  float u = static_cast<float>(t) / static_cast<float>(num_train_timesteps);
  u = std::min(std::max(u, 0.0f), 1.0f);
  const float num = static_cast<float>(shift) * u;
  const float den = 1.0f + static_cast<float>(shift - 1.0) * u;
  return num / den;
}

// table[clamp(round_half_even(t), 0, len - 1)]; NaN maps to index 0 as in the reference on x86.
inline float sigma_lookup(double t, const float* table, int64_t len) {
  const double r = std::nearbyint(t);
  int64_t idx = 0;
  if (r >= static_cast<double>(len - 1)) {
    idx = len - 1;
  } else if (r > 0) {
    idx = static_cast<int64_t>(r);
  }
  return table[idx];
}

template <typename V, size_t N>
using Arr = std::array<V, N>;

// NI inputs and NO outputs of B * n elements each, plus K coefficients per sample.
template <typename T, size_t NI, size_t NO, size_t K>
struct Job {
  Arr<const T*, NI> in;
  Arr<T*, NO> out;
  int64_t batch;
  int64_t per_sample;
  const typename Compute<T>::type* coef;  // [batch][K]
};

#if DSD_HAVE_AVX2
struct V8 {
  __m256 v;
};
inline V8 operator+(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 operator-(V8 a, V8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V8 operator*(V8 a, V8 b) { return {_mm256_mul_ps(a.v, b.v)}; }

// 16 elements as two fp32 vectors. For bf16 the halves hold elements {0-3, 8-11} and {4-7, 12-15}
// (unpack within 128-bit lanes); store16 packs them back in the same lane order, so the order is
// restored for free and the math, being elementwise, does not care.
inline void load16(const float* p, V8& a, V8& b) {
  a.v = _mm256_loadu_ps(p);
  b.v = _mm256_loadu_ps(p + 8);
}
inline void load16(const BF16* p, V8& a, V8& b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i z = _mm256_setzero_si256();
  a.v = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x));
  b.v = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x));
}

template <bool NT>
inline void store16(float* p, V8 a, V8 b) {
  if constexpr (NT) {
    _mm256_stream_ps(p, a.v);
    _mm256_stream_ps(p + 8, b.v);
  } else {
    _mm256_storeu_ps(p, a.v);
    _mm256_storeu_ps(p + 8, b.v);
  }
}

// fp32 -> bf16 bits (in the low half of each 32-bit lane) with round-to-nearest-even and NaN -> 0x7FC0,
// exactly as c10::BFloat16(float).
inline __m256i bf16_bits(V8 x) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

template <bool NT>
inline void store16(BF16* p, V8 a, V8 b) {
  const __m256i packed = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));
  if constexpr (NT) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
}
#endif

// Elements [lo, hi) of one sample, whose coefficients are k.
template <typename T, size_t NI, size_t NO, size_t K, typename Op>
inline void run_segment(const Job<T, NI, NO, K>& job, int64_t lo, int64_t hi,
                        const Arr<typename Compute<T>::type, K>& k, const Op& op, bool nt) {
  using C = typename Compute<T>::type;
  int64_t i = lo;
  auto scalar_step = [&](int64_t j) {
    Arr<C, NI> x;
    for (size_t a = 0; a < NI; ++a) x[a] = static_cast<C>(job.in[a][j]);
    Arr<C, NO> y;
    op(x, k, y);
    for (size_t o = 0; o < NO; ++o) job.out[o][j] = static_cast<T>(y[o]);
  };
#if DSD_HAVE_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, BF16>) {
    // U chunks of 16 elements per step, so that each output gets a whole 64-byte line per step (bf16: 2).
    // Streaming stores to half lines, alternating between outputs, can flush partly filled write-combining
    // buffers: the two-output SDE step in bf16 ran at half speed that way.
    constexpr int64_t U = 64 / (16 * sizeof(T));
    constexpr int64_t W = 16 * U;
    Arr<V8, K> kv;
    for (size_t c = 0; c < K; ++c) kv[c] = V8{_mm256_set1_ps(k[c])};
    auto vec_step = [&](int64_t j, auto nt_tag) {
      Arr<Arr<V8, NO>, U> ya, yb;
      for (int64_t u = 0; u < U; ++u) {
        Arr<V8, NI> xa, xb;
        for (size_t a = 0; a < NI; ++a) load16(job.in[a] + j + 16 * u, xa[a], xb[a]);
        op(xa, kv, ya[u]);
        op(xb, kv, yb[u]);
      }
      for (size_t o = 0; o < NO; ++o) {
        for (int64_t u = 0; u < U; ++u) {
          store16<decltype(nt_tag)::value>(job.out[o] + j + 16 * u, ya[u][o], yb[u][o]);
        }
      }
    };
    if (nt && hi - i >= 4 * W) {
      // streaming stores need aligned addresses (whole lines: 64 bytes): peel scalars until out[0] is
      constexpr uintptr_t A = 64;
      for (int64_t h = 0; h < W && (reinterpret_cast<uintptr_t>(job.out[0] + i) % A) != 0; ++h, ++i) {
        scalar_step(i);
      }
      bool aligned = true;
      for (size_t o = 0; o < NO; ++o) aligned = aligned && (reinterpret_cast<uintptr_t>(job.out[o] + i) % A) == 0;
      if (aligned) {
        for (; i + W <= hi; i += W) vec_step(i, std::true_type{});
      }
    }
    for (; i + W <= hi; i += W) vec_step(i, std::false_type{});
  }
#endif
  for (; i < hi; ++i) scalar_step(i);
}

// `outputs_given`: every output is a caller's `out=` tensor. Only those get streaming stores: a fresh
// output's pages are zeroed by the kernel at first touch, which leaves each page in the cache just before
// we write it, so plain stores hit the cache there, and streaming stores ran ~10% slower (SDE step).
template <typename T, size_t NI, size_t NO, size_t K, typename Op>
void run(const Job<T, NI, NO, K>& job, const Op& op, bool outputs_given) {
  using C = typename Compute<T>::type;
  const int64_t total = job.batch * job.per_sample;
  if (total == 0) return;
  const int64_t bytes = total * static_cast<int64_t>(sizeof(T) * (NI + NO));
  const bool nt = outputs_given && bytes >= g_streaming_store_threshold.load(std::memory_order_relaxed);
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / job.per_sample;
      const int64_t hi = std::min(end, (b + 1) * job.per_sample);
      Arr<C, K> k;
      for (size_t c = 0; c < K; ++c) k[c] = job.coef[b * static_cast<int64_t>(K) + c];
      run_segment(job, i, hi, k, op, nt);
      i = hi;
    }
#if DSD_HAVE_AVX2
    if (nt) _mm_sfence();  // make this thread's streaming stores visible before the op returns
#endif
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), ", expected ", like.sizes());
}

void check_dtype(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kDouble,
              "noise injection CPU kernel supports float32, bfloat16 and float64, got ", st);
  TORCH_CHECK(t.dim() >= 1, "inputs need a batch dimension (rank >= 1)");
}

void advise_huge_pages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes < g_huge_page_threshold.load(std::memory_order_relaxed)) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)data;
  (void)nbytes;
#endif
}

bool given(const c10::optional<at::Tensor>& out) { return out.has_value() && out->defined(); }

// The output tensor: `out` when given (must be contiguous, same dtype and shape), else a new one.
at::Tensor output_like(const at::Tensor& like, const c10::optional<at::Tensor>& out, const char* name) {
  if (given(out)) {
    check_like(*out, name, like);
    TORCH_CHECK(out->is_contiguous(), name, " must be contiguous");
    return *out;
  }
  at::Tensor fresh = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(fresh.data_ptr(), fresh.nbytes());
  return fresh;
}

// [B] fp32 tensor on the CPU, contiguous.
at::Tensor per_sample_sigma(const at::Tensor& s, int64_t batch, const char* name) {
  check_cpu(s, name);
  TORCH_CHECK(s.numel() == batch, name, " has ", s.numel(), " values, expected ", batch);
  return s.reshape({batch}).to(at::kFloat).contiguous();
}

int64_t per_sample_numel(const at::Tensor& x) {
  const int64_t batch = x.size(0);
  return batch == 0 ? 0 : x.numel() / batch;
}

}  // namespace

// sigma per sample (fp32 [B]) from timesteps (any real dtype, [B]): shifted schedule or table lookup.
at::Tensor sigma_from_timestep(const at::Tensor& timesteps, const c10::optional<at::Tensor>& sigma_table, double shift,
                               int64_t num_train_timesteps) {
  check_cpu(timesteps, "timesteps");
  const at::Tensor t = timesteps.reshape({-1}).to(at::kDouble).contiguous();
  const int64_t batch = t.numel();
  at::Tensor sigma = at::empty({batch}, t.options().dtype(at::kFloat));
  const double* tp = t.data_ptr<double>();
  float* sp = sigma.data_ptr<float>();
  if (sigma_table.has_value() && sigma_table->defined()) {
    check_cpu(*sigma_table, "sigma_table");
    const at::Tensor table = sigma_table->reshape({-1}).to(at::kFloat).contiguous();
    const int64_t len = table.numel();
    TORCH_CHECK(len > 0, "sigma_table is empty");
    const float* tab = table.data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) sp[b] = sigma_lookup(tp[b], tab, len);
  } else {
    TORCH_CHECK(num_train_timesteps > 0, "num_train_timesteps must be positive");
    for (int64_t b = 0; b < batch; ++b) sp[b] = sigma_shift(tp[b], shift, num_train_timesteps);
  }
  return sigma;
}

// x_t = (1 - sigma)*x0 + sigma*eps, sigma per sample from the timesteps. Returns {x_t, sigma}.
std::vector<at::Tensor> add_noise_fwd(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& timesteps,
                                      const c10::optional<at::Tensor>& sigma_table, double shift,
                                      int64_t num_train_timesteps, const c10::optional<at::Tensor>& out) {
  check_cpu(x0, "x0");
  check_dtype(x0);
  check_like(eps, "eps", x0);
  const int64_t batch = x0.size(0);
  TORCH_CHECK(timesteps.numel() == batch, "timesteps has ", timesteps.numel(), " values, expected ", batch);
  const at::Tensor sigma = sigma_from_timestep(timesteps, sigma_table, shift, num_train_timesteps);
  const at::Tensor x0c = x0.contiguous();
  const at::Tensor ec = eps.contiguous();
  at::Tensor y = output_like(x0, out, "out");
  const float* sp = sigma.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x0.scalar_type(), "add_noise_fwd", [&] {
    using C = typename Compute<scalar_t>::type;
    std::vector<C> coef(2 * batch);
    for (int64_t b = 0; b < batch; ++b) {
      const C s = static_cast<C>(sp[b]);
      coef[2 * b] = C(1) - s;
      coef[2 * b + 1] = s;
    }
    Job<scalar_t, 2, 1, 2> job{{x0c.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>()}, {y.data_ptr<scalar_t>()},
                               batch, per_sample_numel(x0), coef.data()};
    run(job, [](const auto& x, const auto& k, auto& r) { r[0] = k[0] * x[0] + k[1] * x[1]; }, given(out));
  });
  return {y, sigma};
}

// Backward of add_noise: {grad_x0, grad_eps} = {(1 - sigma)*g, sigma*g}.
std::vector<at::Tensor> add_noise_bwd(const at::Tensor& grad, const at::Tensor& sigma) {
  check_cpu(grad, "grad");
  check_dtype(grad);
  const int64_t batch = grad.size(0);
  const at::Tensor s32 = per_sample_sigma(sigma, batch, "sigma");
  const at::Tensor gc = grad.contiguous();
  at::Tensor gx0 = output_like(grad, c10::nullopt, "grad_x0");
  at::Tensor geps = output_like(grad, c10::nullopt, "grad_eps");
  const float* sp = s32.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "add_noise_bwd", [&] {
    using C = typename Compute<scalar_t>::type;
    std::vector<C> coef(2 * batch);
    for (int64_t b = 0; b < batch; ++b) {
      const C s = static_cast<C>(sp[b]);
      coef[2 * b] = C(1) - s;
      coef[2 * b + 1] = s;
    }
    Job<scalar_t, 1, 2, 2> job{{gc.data_ptr<scalar_t>()}, {gx0.data_ptr<scalar_t>(), geps.data_ptr<scalar_t>()},
                               batch, per_sample_numel(grad), coef.data()};
    run(job, [](const auto& x, const auto& k, auto& r) {
      r[0] = k[0] * x[0];
      r[1] = k[1] * x[0];
    }, false);
  });
  return {gx0, geps};
}

// SDE step: x0_hat = x_t - sigma_t*v; x_next = (1 - sigma_next)*x0_hat + sigma_next*eps (x0_hat kept in
// fp32 between the two). Without eps only x0_hat is computed and x_next comes back undefined (None).
std::vector<at::Tensor> sde_fwd(const at::Tensor& x_t, const at::Tensor& v, const c10::optional<at::Tensor>& eps,
                                const at::Tensor& sigma_t, const at::Tensor& sigma_next,
                                const c10::optional<at::Tensor>& out_x0, const c10::optional<at::Tensor>& out_next) {
  check_cpu(x_t, "x_t");
  check_dtype(x_t);
  check_like(v, "v", x_t);
  const int64_t batch = x_t.size(0);
  const int64_t n = per_sample_numel(x_t);
  const at::Tensor st = per_sample_sigma(sigma_t, batch, "sigma_t");
  const at::Tensor xc = x_t.contiguous();
  const at::Tensor vc = v.contiguous();
  at::Tensor x0_hat = output_like(x_t, out_x0, "out_x0_hat");
  const float* stp = st.data_ptr<float>();
  if (!(eps.has_value() && eps->defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_t.scalar_type(), "sde_fwd_last", [&] {
      using C = typename Compute<scalar_t>::type;
      std::vector<C> coef(batch);
      for (int64_t b = 0; b < batch; ++b) coef[b] = static_cast<C>(stp[b]);
      Job<scalar_t, 2, 1, 1> job{{xc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>()}, {x0_hat.data_ptr<scalar_t>()},
                                 batch, n, coef.data()};
      run(job, [](const auto& x, const auto& k, auto& r) { r[0] = x[0] - k[0] * x[1]; }, given(out_x0));
    });
    return {x0_hat, at::Tensor()};
  }
  check_like(*eps, "eps", x_t);
  const at::Tensor sn = per_sample_sigma(sigma_next, batch, "sigma_next");
  const at::Tensor ec = eps->contiguous();
  at::Tensor x_next = output_like(x_t, out_next, "out_x_next");
  const float* snp = sn.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x_t.scalar_type(), "sde_fwd", [&] {
    using C = typename Compute<scalar_t>::type;
    std::vector<C> coef(3 * batch);
    for (int64_t b = 0; b < batch; ++b) {
      const C s_next = static_cast<C>(snp[b]);
      coef[3 * b] = static_cast<C>(stp[b]);
      coef[3 * b + 1] = C(1) - s_next;
      coef[3 * b + 2] = s_next;
    }
    Job<scalar_t, 3, 2, 3> job{{xc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>()},
                               {x0_hat.data_ptr<scalar_t>(), x_next.data_ptr<scalar_t>()},
                               batch,
                               n,
                               coef.data()};
    run(job, [](const auto& x, const auto& k, auto& r) {
      r[0] = x[0] - k[0] * x[1];
      r[1] = k[1] * r[0] + k[2] * x[2];
    }, given(out_x0) && given(out_next));
  });
  return {x0_hat, x_next};
}

// Backward of the SDE step. With G = g_x0_hat + (1 - sigma_next)*g_next:
// grad_x_t = G, grad_v = -sigma_t*G, grad_eps = sigma_next*g_next (undefined without g_next).
std::vector<at::Tensor> sde_bwd(const at::Tensor& g_x0, const c10::optional<at::Tensor>& g_next,
                                const at::Tensor& sigma_t, const at::Tensor& sigma_next) {
  check_cpu(g_x0, "grad_x0_hat");
  check_dtype(g_x0);
  const int64_t batch = g_x0.size(0);
  const int64_t n = per_sample_numel(g_x0);
  const at::Tensor st = per_sample_sigma(sigma_t, batch, "sigma_t");
  const at::Tensor g0 = g_x0.contiguous();
  const float* stp = st.data_ptr<float>();
  at::Tensor gv = output_like(g_x0, c10::nullopt, "grad_v");
  if (!(g_next.has_value() && g_next->defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g_x0.scalar_type(), "sde_bwd_last", [&] {
      using C = typename Compute<scalar_t>::type;
      std::vector<C> coef(batch);
      for (int64_t b = 0; b < batch; ++b) coef[b] = -static_cast<C>(stp[b]);
      Job<scalar_t, 1, 1, 1> job{{g0.data_ptr<scalar_t>()}, {gv.data_ptr<scalar_t>()}, batch, n, coef.data()};
      run(job, [](const auto& x, const auto& k, auto& r) { r[0] = k[0] * x[0]; }, false);
    });
    return {g0, gv, at::Tensor()};
  }
  check_like(*g_next, "grad_x_next", g_x0);
  const at::Tensor sn = per_sample_sigma(sigma_next, batch, "sigma_next");
  const at::Tensor gn = g_next->contiguous();
  at::Tensor gx = output_like(g_x0, c10::nullopt, "grad_x_t");
  at::Tensor geps = output_like(g_x0, c10::nullopt, "grad_eps");
  const float* snp = sn.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g_x0.scalar_type(), "sde_bwd", [&] {
    using C = typename Compute<scalar_t>::type;
    std::vector<C> coef(3 * batch);
    for (int64_t b = 0; b < batch; ++b) {
      const C s_next = static_cast<C>(snp[b]);
      coef[3 * b] = -static_cast<C>(stp[b]);
      coef[3 * b + 1] = C(1) - s_next;
      coef[3 * b + 2] = s_next;
    }
    Job<scalar_t, 2, 3, 3> job{{g0.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>()},
                               {gx.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), geps.data_ptr<scalar_t>()},
                               batch,
                               n,
                               coef.data()};
    run(job, [](const auto& x, const auto& k, auto& r) {
      r[0] = x[0] + k[1] * x[1];
      r[1] = k[0] * r[0];
      r[2] = k[2] * x[1];
    }, false);
  });
  return {gx, gv, geps};
}

int64_t streaming_store_threshold() { return g_streaming_store_threshold.load(); }

void set_streaming_store_threshold(int64_t bytes) { g_streaming_store_threshold.store(bytes); }

int64_t huge_page_threshold() { return g_huge_page_threshold.load(); }

void set_huge_page_threshold(int64_t bytes) { g_huge_page_threshold.store(bytes); }

bool has_avx2() { return DSD_HAVE_AVX2 != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_distill fused noise injection, CPU kernel";
  m.def("sigma_from_timestep", &sigma_from_timestep, "sigma per sample from timesteps", py::arg("timesteps"),
        py::arg("sigma_table") = py::none(), py::arg("shift") = 1.0, py::arg("num_train_timesteps") = 1000);
  m.def("add_noise_fwd", &add_noise_fwd, "x_t = (1-sigma)*x0 + sigma*eps; returns [x_t, sigma]", py::arg("x0"),
        py::arg("eps"), py::arg("timesteps"), py::arg("sigma_table") = py::none(), py::arg("shift") = 1.0,
        py::arg("num_train_timesteps") = 1000, py::arg("out") = py::none());
  m.def("add_noise_bwd", &add_noise_bwd, "[(1-sigma)*g, sigma*g]", py::arg("grad"), py::arg("sigma"));
  m.def("sde_fwd", &sde_fwd, "[x0_hat, x_next]", py::arg("x_t"), py::arg("v"), py::arg("eps"), py::arg("sigma_t"),
        py::arg("sigma_next"), py::arg("out_x0_hat") = py::none(), py::arg("out_x_next") = py::none());
  m.def("sde_bwd", &sde_bwd, "[grad_x_t, grad_v, grad_eps]", py::arg("grad_x0_hat"), py::arg("grad_x_next"),
        py::arg("sigma_t"), py::arg("sigma_next"));
  m.def("streaming_store_threshold", &streaming_store_threshold,
        "bytes per call from which outputs use non-temporal stores");
  m.def("set_streaming_store_threshold", &set_streaming_store_threshold, py::arg("bytes"));
  m.def("huge_page_threshold", &huge_page_threshold,
        "output bytes from which freshly allocated outputs are advised to use transparent huge pages");
  m.def("set_huge_page_threshold", &set_huge_page_threshold, py::arg("bytes"));
  m.def("has_avx2", &has_avx2, "whether this build uses the AVX2 path");
}
