// CPU engine of the basis ops: n is cut into chunks, each OpenMP thread owns a
// contiguous range of chunks, and within a chunk every basis row is read from memory exactly once
// while the small block W (k rows x kChunk) stays in L1/L2.
//
// Inner kernels are templated on a compile-time block of KB rows of W and RB rows of V so the
// accumulators live in registers: KB x RB x one SIMD vector. AVX2 has 16 registers; KB*RB <= 8
// leaves room for the W and V loads. KB=4,RB=2 measured ~2x faster than KB=8,RB=1 for the
// bf16 dot on the 2-core dev box (the latter is load-port bound).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "common.h"

namespace hessfast {
namespace cpu {

// 4096 elements: 16 KiB per fp32 row segment (long enough for the hardware prefetcher to stream),
// while the W chunk (k * 16 KiB for k <= 8) stays in the 512 KiB-1 MiB L2.
constexpr int64_t kChunk = 4096;

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
template <typename AT>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(AT));

template <typename To, typename From>
inline To bit_cast_(From x) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// bfloat16 is the top half of a float32: the conversion is exact.
inline float bf16_to_f32(uint16_t h) { return bit_cast_<float>(static_cast<uint32_t>(h) << 16); }

// Exact IEEE half -> float without F16C, written with selects so the loop vectorises.
inline float f16_to_f32_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  const uint32_t exp = mag >> 10;
  // normal numbers: rebias the exponent (15 -> 127) and widen the mantissa (10 -> 23 bits)
  const uint32_t normal = (mag << 13) + (112u << 23);
  // inf / nan: all-ones exponent, mantissa (nan payload) kept
  const uint32_t special = 0x7f800000u | ((mag & 0x3ffu) << 13);
  // zero / subnormal: value = mag * 2^-24, exact in float
  const uint32_t tiny = bit_cast_<uint32_t>(static_cast<float>(mag) * 5.9604644775390625e-08f);
  const uint32_t bits = exp == 0 ? tiny : (exp == 31 ? special : normal);
  return bit_cast_<float>(bits | sign);
}

// Convert `len` elements of a row segment into AT; returns a pointer to AT data (the source itself
// when it already has type AT, so fp32/fp64 storage costs no copy).
template <typename AT>
inline const AT* load_chunk(const char* src, int dtype, int64_t len, AT* buf) {
  switch (dtype) {
    case kFloat32: {
      const float* s = reinterpret_cast<const float*>(src);
      if constexpr (std::is_same_v<AT, float>) {
        return s;
      } else {
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) buf[t] = static_cast<AT>(s[t]);
        return buf;
      }
    }
    case kFloat64: {
      const double* s = reinterpret_cast<const double*>(src);
      if constexpr (std::is_same_v<AT, double>) {
        return s;
      } else {
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) buf[t] = static_cast<AT>(s[t]);
        return buf;
      }
    }
    case kBFloat16: {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
      int64_t t = 0;
      if constexpr (std::is_same_v<AT, float>) {
        // 8 at a time: widen to 32 bits, shift into the high half, reinterpret as float.
        typedef uint16_t u16x8 __attribute__((vector_size(16)));
        typedef uint32_t u32x8 __attribute__((vector_size(32)));
        for (; t + 8 <= len; t += 8) {
          u16x8 h;
          std::memcpy(&h, s + t, sizeof(h));
          const u32x8 u = __builtin_convertvector(h, u32x8) << 16;
          std::memcpy(buf + t, &u, sizeof(u));
        }
      }
      for (; t < len; ++t) buf[t] = static_cast<AT>(bf16_to_f32(s[t]));
      return buf;
    }
    default: {  // kFloat16
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
      int64_t t = 0;
#if defined(__F16C__) && defined(__AVX__)
      if constexpr (std::is_same_v<AT, float>) {
        for (; t + 8 <= len; t += 8) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + t));
          _mm256_storeu_ps(buf + t, _mm256_cvtph_ps(h));
        }
      }
#endif
#pragma omp simd
      for (int64_t i = t; i < len; ++i) buf[i] = static_cast<AT>(f16_to_f32_soft(s[i]));
      return buf;
    }
  }
}

// W is float32 or float64: either used in place (same type as AT) or converted into buf and
// written back by store_chunk.
template <typename AT>
inline AT* load_chunk_mut(char* src, int dtype, int64_t len, AT* buf) {
  if ((dtype == kFloat32 && std::is_same_v<AT, float>) ||
      (dtype == kFloat64 && std::is_same_v<AT, double>)) {
    return reinterpret_cast<AT*>(src);
  }
  load_chunk<AT>(src, dtype, len, buf);
  return buf;
}

template <typename AT>
inline void store_chunk(char* dst, int dtype, int64_t len, const AT* buf) {
  if (reinterpret_cast<const char*>(buf) == dst) return;
  if (dtype == kFloat32) {
    float* d = reinterpret_cast<float*>(dst);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) d[t] = static_cast<float>(buf[t]);
  } else {
    double* d = reinterpret_cast<double*>(dst);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) d[t] = static_cast<double>(buf[t]);
  }
}

// Storage element types of the basis as distinct C++ types, so kernels can be templated on them.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

template <typename AT>
inline AT to_acc(float x) { return static_cast<AT>(x); }
template <typename AT>
inline AT to_acc(double x) { return static_cast<AT>(x); }
template <typename AT>
inline AT to_acc(bf16_t x) { return static_cast<AT>(bf16_to_f32(x.bits)); }
template <typename AT>
inline AT to_acc(f16_t x) { return static_cast<AT>(f16_to_f32_soft(x.bits)); }

// Calls f(VT{}) with VT the C++ type of a storage dtype code.
template <typename F>
inline void with_storage(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kBFloat16: f(bf16_t{}); break;
    default: f(f16_t{}); break;
  }
}

// GCC/Clang vector extensions: one SIMD register per value, whatever the ISA (-march=native gives
// AVX2/AVX-512; a portable build gets SSE2 pairs). Plain loops with `omp simd` left the
// accumulators in memory (GCC 12: 8.5 GB/s fp32 dot vs 2x that with registers).
template <typename AT>
struct Vec {
  typedef AT type __attribute__((vector_size(kVecBytes)));
};
template <typename AT>
using vec_t = typename Vec<AT>::type;
template <typename T, int Bytes>
struct VecN {
  typedef T type __attribute__((vector_size(Bytes)));
};

template <typename AT>
inline vec_t<AT> vload(const AT* p) {
  vec_t<AT> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename AT>
inline void vstore(AT* p, vec_t<AT> x) {
  std::memcpy(p, &x, sizeof(x));
}

// Load kLanes<AT> consecutive storage elements and widen/narrow them to AT in registers: the
// basis is converted on the fly and never written back to memory (a convert-to-buffer pass
// first cost ~0.4 cycles/element, halving bf16 throughput on the dev box).
template <typename AT, typename VT>
inline vec_t<AT> vload_as(const VT* p) {
  constexpr int L = kLanes<AT>;
  if constexpr (std::is_same_v<AT, VT>) {
    return vload(p);
  } else if constexpr (std::is_same_v<VT, bf16_t> || std::is_same_v<VT, f16_t>) {
    using u16v = typename VecN<uint16_t, 2 * L>::type;
    using u32v = typename VecN<uint32_t, 4 * L>::type;
    using f32v = typename VecN<float, 4 * L>::type;
    f32v f;
    if constexpr (std::is_same_v<VT, bf16_t>) {
      u16v h;
      std::memcpy(&h, p, sizeof(h));
      const u32v u = __builtin_convertvector(h, u32v) << 16;
      std::memcpy(&f, &u, sizeof(f));
    } else {
#if defined(__F16C__) && defined(__AVX__)
      if constexpr (L == 8) {
        const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        std::memcpy(&f, &x, sizeof(f));
      } else
#endif
      {
        for (int l = 0; l < L; ++l) f[l] = f16_to_f32_soft(p[l].bits);
      }
    }
    if constexpr (std::is_same_v<AT, float>) {
      return f;
    } else {
      return __builtin_convertvector(f, vec_t<AT>);
    }
  } else {  // float <-> double
    using src_v = typename VecN<VT, static_cast<int>(sizeof(VT)) * L>::type;
    src_v x;
    std::memcpy(&x, p, sizeof(x));
    return __builtin_convertvector(x, vec_t<AT>);
  }
}

// out[r * ldo + j] += sum_t v[r][t] * w[j][t] for r < RB, j < KB.
// Accumulators: one register per (r, j); lanes are summed once per chunk, and chunk sums are
// added in float64 (free, and it bounds fp32 accumulation error at the chunk level).
template <typename AT, typename VT, int RB, int KB>
inline void dot_block(const VT* const* v, const AT* const* w, int64_t len, double* out,
                      int64_t ldo) {
  constexpr int L = kLanes<AT>;
  using V = vec_t<AT>;
  V acc[RB][KB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < KB; ++j) acc[r][j] = V{} ;
  const VT* vr[RB];
  const AT* wj[KB];
  for (int r = 0; r < RB; ++r) vr[r] = v[r];
  for (int j = 0; j < KB; ++j) wj[j] = w[j];
  int64_t t = 0;
  for (; t + L <= len; t += L) {
    V x[RB];
    for (int r = 0; r < RB; ++r) x[r] = vload_as<AT>(vr[r] + t);
    for (int j = 0; j < KB; ++j) {
      const V y = vload(wj[j] + t);
      for (int r = 0; r < RB; ++r) acc[r][j] += x[r] * y;
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < KB; ++j) {
      AT s = AT(0);
      for (int l = 0; l < L; ++l) s += acc[r][j][l];
      for (int64_t u = t; u < len; ++u) s += to_acc<AT>(vr[r][u]) * wj[j][u];
      out[r * ldo + j] += static_cast<double>(s);
    }
  }
}

// w[j][t] -= sum_r coef[r * ldc + j] * v[r][t] for r < RB, j < KB (W block updated in place).
template <typename AT, typename VT, int RB, int KB>
inline void axpy_block(const VT* const* v, const AT* coef, int64_t ldc, AT* const* w,
                       int64_t len) {
  constexpr int L = kLanes<AT>;
  using V = vec_t<AT>;
  V c[RB][KB];
  AT cs[RB][KB];
  const VT* vr[RB];
  AT* wj[KB];
  for (int r = 0; r < RB; ++r) {
    vr[r] = v[r];
    for (int j = 0; j < KB; ++j) {
      cs[r][j] = coef[r * ldc + j];
      c[r][j] = V{} + cs[r][j];
    }
  }
  for (int j = 0; j < KB; ++j) wj[j] = w[j];
  int64_t t = 0;
  for (; t + L <= len; t += L) {
    V x[RB];
    for (int r = 0; r < RB; ++r) x[r] = vload_as<AT>(vr[r] + t);
    for (int j = 0; j < KB; ++j) {
      V s = vload(wj[j] + t);
      for (int r = 0; r < RB; ++r) s -= c[r][j] * x[r];
      vstore(wj[j] + t, s);
    }
  }
  for (; t < len; ++t) {
    for (int j = 0; j < KB; ++j) {
      AT s = wj[j][t];
      for (int r = 0; r < RB; ++r) s -= cs[r][j] * to_acc<AT>(vr[r][t]);
      wj[j][t] = s;
    }
  }
}

// Rows per register block for a given KB (accumulators RB * KB <= 8 vectors).
template <int KB>
constexpr int rows_per_block() {
  return KB >= 4 ? 2 : 4;
}

// out[r, j] += v_r . w_j for r < rb (rb <= 4), all j < k, in KB = 4/2/1 column blocks.
template <typename AT, typename VT>
inline void dot_rows(const VT* const* v, int rb, const AT* const* w, int64_t k, int64_t len,
                     double* out, int64_t ldo) {
  int64_t j = 0;
  auto run = [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
    constexpr int RB = rows_per_block<KB>();
    int r = 0;
    for (; r + RB <= rb; r += RB) dot_block<AT, VT, RB, KB>(v + r, w + j, len, out + r * ldo + j, ldo);
    for (; r < rb; ++r) dot_block<AT, VT, 1, KB>(v + r, w + j, len, out + r * ldo + j, ldo);
  };
  for (; j + 4 <= k; j += 4) run(std::integral_constant<int, 4>{});
  for (; j + 2 <= k; j += 2) run(std::integral_constant<int, 2>{});
  for (; j < k; ++j) run(std::integral_constant<int, 1>{});
}

// w_j -= sum_r coef[r, j] v_r for r < rb (rb <= 4), all j < k.
template <typename AT, typename VT>
inline void axpy_rows(const VT* const* v, int rb, const AT* coef, int64_t ldc, AT* const* w,
                      int64_t k, int64_t len) {
  int64_t j = 0;
  auto run = [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
    constexpr int RB = rows_per_block<KB>();
    int r = 0;
    for (; r + RB <= rb; r += RB) axpy_block<AT, VT, RB, KB>(v + r, coef + r * ldc + j, ldc, w + j, len);
    for (; r < rb; ++r) axpy_block<AT, VT, 1, KB>(v + r, coef + r * ldc + j, ldc, w + j, len);
  };
  for (; j + 4 <= k; j += 4) run(std::integral_constant<int, 4>{});
  for (; j + 2 <= k; j += 2) run(std::integral_constant<int, 2>{});
  for (; j < k; ++j) run(std::integral_constant<int, 1>{});
}

// Row pointers of a matrix (optionally a subset of its rows).
struct Rows {
  std::vector<char*> ptr;
  int dtype = kFloat32;
  int64_t esize = 4;
  int64_t size() const { return static_cast<int64_t>(ptr.size()); }
};

inline Rows rows_of(const Mat& a) {
  Rows r;
  r.dtype = a.dtype;
  r.esize = dtype_size(a.dtype);
  r.ptr.resize(static_cast<size_t>(a.rows));
  for (int64_t i = 0; i < a.rows; ++i)
    r.ptr[static_cast<size_t>(i)] = reinterpret_cast<char*>(a.ptr) + i * a.ld * r.esize;
  return r;
}

inline int threads_for(int64_t nchunks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), nchunks)));
}

constexpr int kRowGroup = 4;  // V rows converted and consumed together (<= max RB)

// C[i, j] = V_i . W_j (float64 out, [m, k]); optionally wsq[j] = ||W_j||^2.
template <typename AT>
void dot_pass(const Rows& V, const Rows& W, int64_t n, double* C, double* wsq) {
  const int64_t m = V.size(), k = W.size();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int nt = threads_for(nchunks);
  const int64_t per = m * k + k;
  std::vector<double> part(static_cast<size_t>(nt * per), 0.0);
#pragma omp parallel num_threads(nt)
  {
    double* myC = part.data() + omp_get_thread_num() * per;
    double* mysq = myC + m * k;
    std::vector<AT> wbuf(static_cast<size_t>(k * kChunk));
    std::vector<const AT*> wp(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      for (int64_t j = 0; j < k; ++j)
        wp[j] = load_chunk<AT>(W.ptr[j] + off * W.esize, W.dtype, len, wbuf.data() + j * kChunk);
      if (wsq) {
        for (int64_t j = 0; j < k; ++j) {
          const AT* x = wp[j];
          AT s = AT(0);
#pragma omp simd reduction(+ : s)
          for (int64_t t = 0; t < len; ++t) s += x[t] * x[t];
          mysq[j] += static_cast<double>(s);
        }
      }
      with_storage(V.dtype, [&](auto vt_tag) {
        using VT = decltype(vt_tag);
        const VT* vp[kRowGroup];
        for (int64_t i = 0; i < m; i += kRowGroup) {
          const int rb = static_cast<int>(std::min<int64_t>(kRowGroup, m - i));
          for (int r = 0; r < rb; ++r)
            vp[r] = reinterpret_cast<const VT*>(V.ptr[i + r] + off * V.esize);
          dot_rows<AT, VT>(vp, rb, wp.data(), k, len, myC + i * k, k);
        }
      });
    }
  }
  // Partials summed in thread order: deterministic for a fixed thread count.
  std::fill(C, C + m * k, 0.0);
  if (wsq) std::fill(wsq, wsq + k, 0.0);
  for (int p = 0; p < nt; ++p) {
    const double* src = part.data() + p * per;
    for (int64_t e = 0; e < m * k; ++e) C[e] += src[e];
    if (wsq)
      for (int64_t j = 0; j < k; ++j) wsq[j] += src[m * k + j];
  }
}

// One source of an update: W_j -= sum_i coef[i, j] V_i  (coef [rows(V), k], row-major, AT).
template <typename AT>
struct UpdateSource {
  const Rows* V;
  const AT* coef;
};

// Applies every source to W in one pass over n. Optionally, on the updated chunk while it is in
// cache: wsq[j] = ||W_j||^2 and gram[j, l] = W_j . W_l ([k, k]).
template <typename AT>
void update_pass(const std::vector<UpdateSource<AT>>& sources, const Rows& W, int64_t n,
                 double* wsq, double* gram) {
  const int64_t k = W.size();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int nt = threads_for(nchunks);
  const int64_t per = k * k + k;
  const bool want = wsq != nullptr || gram != nullptr;
  std::vector<double> part(want ? static_cast<size_t>(nt * per) : 0, 0.0);
#pragma omp parallel num_threads(nt)
  {
    double* mine = want ? part.data() + omp_get_thread_num() * per : nullptr;
    std::vector<AT> wbuf(static_cast<size_t>(k * kChunk));
    std::vector<AT*> wp(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      for (int64_t j = 0; j < k; ++j)
        wp[j] = load_chunk_mut<AT>(W.ptr[j] + off * W.esize, W.dtype, len, wbuf.data() + j * kChunk);
      for (const auto& src : sources) {
        const Rows& V = *src.V;
        with_storage(V.dtype, [&](auto vt_tag) {
          using VT = decltype(vt_tag);
          const VT* vp[kRowGroup];
          for (int64_t i = 0; i < V.size(); i += kRowGroup) {
            const int rb = static_cast<int>(std::min<int64_t>(kRowGroup, V.size() - i));
            for (int r = 0; r < rb; ++r)
              vp[r] = reinterpret_cast<const VT*>(V.ptr[i + r] + off * V.esize);
            axpy_rows<AT, VT>(vp, rb, src.coef + i * k, k, wp.data(), k, len);
          }
        });
      }
      if (gram) {
        // G = W W^T on the updated chunk; the diagonal doubles as the squared norms.
        for (int64_t i = 0; i < k; i += kRowGroup) {
          const int rb = static_cast<int>(std::min<int64_t>(kRowGroup, k - i));
          dot_rows<AT, AT>(const_cast<const AT* const*>(wp.data() + i), rb,
                       const_cast<const AT* const*>(wp.data()), k, len, mine + i * k, k);
        }
      } else if (wsq) {
        for (int64_t j = 0; j < k; ++j) {
          const AT* x = wp[j];
          AT s = AT(0);
#pragma omp simd reduction(+ : s)
          for (int64_t t = 0; t < len; ++t) s += x[t] * x[t];
          mine[k * k + j] += static_cast<double>(s);
        }
      }
      for (int64_t j = 0; j < k; ++j)
        store_chunk<AT>(W.ptr[j] + off * W.esize, W.dtype, len, wp[j]);
    }
  }
  if (!want) return;
  std::vector<double> tot(static_cast<size_t>(per), 0.0);
  for (int p = 0; p < nt; ++p)
    for (int64_t e = 0; e < per; ++e) tot[e] += part[p * per + e];
  if (gram) {
    for (int64_t e = 0; e < k * k; ++e) gram[e] = tot[e];
    if (wsq)
      for (int64_t j = 0; j < k; ++j) wsq[j] = tot[j * k + j];
  } else {
    for (int64_t j = 0; j < k; ++j) wsq[j] = tot[k * k + j];
  }
}

template <typename T>
inline void write_as(std::uintptr_t dst, int acc, const T* src, int64_t count) {
  if (acc == kFloat32) {
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t e = 0; e < count; ++e) d[e] = static_cast<float>(src[e]);
  } else {
    double* d = reinterpret_cast<double*>(dst);
    for (int64_t e = 0; e < count; ++e) d[e] = static_cast<double>(src[e]);
  }
}

template <typename AT>
inline std::vector<AT> read_as(std::uintptr_t src, int acc, int64_t count) {
  std::vector<AT> out(static_cast<size_t>(count));
  if (acc == kFloat32) {
    const float* s = reinterpret_cast<const float*>(src);
    for (int64_t e = 0; e < count; ++e) out[e] = static_cast<AT>(s[e]);
  } else {
    const double* s = reinterpret_cast<const double*>(src);
    for (int64_t e = 0; e < count; ++e) out[e] = static_cast<AT>(s[e]);
  }
  return out;
}

}  // namespace cpu
}  // namespace hessfast
