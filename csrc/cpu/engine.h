// CPU engine shared by the basis and Lanczos ops: n is cut into chunks, each OpenMP thread owns a
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
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) buf[t] = static_cast<AT>(bf16_to_f32(s[t]));
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

// out[r * ldo + j] += sum_t v[r][t] * w[j][t] for r < RB, j < KB.
// Accumulators are kLanes-wide per (r, j); lanes are summed once per chunk, and chunk sums are
// added in float64 (free, and it keeps fp32 accumulation error at the chunk level).
template <typename AT, int RB, int KB>
inline void dot_block(const AT* const* v, const AT* const* w, int64_t len, double* out,
                      int64_t ldo) {
  constexpr int L = kLanes<AT>;
  AT acc[RB][KB][L];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < KB; ++j)
      for (int l = 0; l < L; ++l) acc[r][j][l] = AT(0);
  const AT* vr[RB];
  const AT* wj[KB];
  for (int r = 0; r < RB; ++r) vr[r] = v[r];
  for (int j = 0; j < KB; ++j) wj[j] = w[j];
  int64_t t = 0;
  for (; t + L <= len; t += L) {
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < KB; ++j)
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[r][j][l] += vr[r][t + l] * wj[j][t + l];
  }
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < KB; ++j) {
      AT s = AT(0);
      for (int l = 0; l < L; ++l) s += acc[r][j][l];
      for (int64_t u = t; u < len; ++u) s += vr[r][u] * wj[j][u];
      out[r * ldo + j] += static_cast<double>(s);
    }
  }
}

// w[j][t] -= sum_r coef[r * ldc + j] * v[r][t] for r < RB, j < KB (W block updated in place).
template <typename AT, int RB, int KB>
inline void axpy_block(const AT* const* v, const AT* coef, int64_t ldc, AT* const* w,
                       int64_t len) {
  AT c[RB][KB];
  const AT* vr[RB];
  AT* wj[KB];
  for (int r = 0; r < RB; ++r) {
    vr[r] = v[r];
    for (int j = 0; j < KB; ++j) c[r][j] = coef[r * ldc + j];
  }
  for (int j = 0; j < KB; ++j) wj[j] = w[j];
  // W rows and V rows never overlap (checked at the boundary), so the lanes are independent.
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) {
    AT x[RB];
    for (int r = 0; r < RB; ++r) x[r] = vr[r][t];
    for (int j = 0; j < KB; ++j) {
      AT s = wj[j][t];
      for (int r = 0; r < RB; ++r) s -= c[r][j] * x[r];
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
template <typename AT>
inline void dot_rows(const AT* const* v, int rb, const AT* const* w, int64_t k, int64_t len,
                     double* out, int64_t ldo) {
  int64_t j = 0;
  auto run = [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
    constexpr int RB = rows_per_block<KB>();
    int r = 0;
    for (; r + RB <= rb; r += RB) dot_block<AT, RB, KB>(v + r, w + j, len, out + r * ldo + j, ldo);
    for (; r < rb; ++r) dot_block<AT, 1, KB>(v + r, w + j, len, out + r * ldo + j, ldo);
  };
  for (; j + 4 <= k; j += 4) run(std::integral_constant<int, 4>{});
  for (; j + 2 <= k; j += 2) run(std::integral_constant<int, 2>{});
  for (; j < k; ++j) run(std::integral_constant<int, 1>{});
}

// w_j -= sum_r coef[r, j] v_r for r < rb (rb <= 4), all j < k.
template <typename AT>
inline void axpy_rows(const AT* const* v, int rb, const AT* coef, int64_t ldc, AT* const* w,
                      int64_t k, int64_t len) {
  int64_t j = 0;
  auto run = [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
    constexpr int RB = rows_per_block<KB>();
    int r = 0;
    for (; r + RB <= rb; r += RB) axpy_block<AT, RB, KB>(v + r, coef + r * ldc + j, ldc, w + j, len);
    for (; r < rb; ++r) axpy_block<AT, 1, KB>(v + r, coef + r * ldc + j, ldc, w + j, len);
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
    std::vector<AT> wbuf(static_cast<size_t>(k * kChunk)), vbuf(kRowGroup * kChunk);
    std::vector<const AT*> wp(static_cast<size_t>(k));
    const AT* vp[kRowGroup];
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
      for (int64_t i = 0; i < m; i += kRowGroup) {
        const int rb = static_cast<int>(std::min<int64_t>(kRowGroup, m - i));
        for (int r = 0; r < rb; ++r)
          vp[r] = load_chunk<AT>(V.ptr[i + r] + off * V.esize, V.dtype, len, vbuf.data() + r * kChunk);
        dot_rows<AT>(vp, rb, wp.data(), k, len, myC + i * k, k);
      }
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
    std::vector<AT> wbuf(static_cast<size_t>(k * kChunk)), vbuf(kRowGroup * kChunk);
    std::vector<AT*> wp(static_cast<size_t>(k));
    const AT* vp[kRowGroup];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      for (int64_t j = 0; j < k; ++j)
        wp[j] = load_chunk_mut<AT>(W.ptr[j] + off * W.esize, W.dtype, len, wbuf.data() + j * kChunk);
      for (const auto& src : sources) {
        const Rows& V = *src.V;
        for (int64_t i = 0; i < V.size(); i += kRowGroup) {
          const int rb = static_cast<int>(std::min<int64_t>(kRowGroup, V.size() - i));
          for (int r = 0; r < rb; ++r)
            vp[r] = load_chunk<AT>(V.ptr[i + r] + off * V.esize, V.dtype, len, vbuf.data() + r * kChunk);
          axpy_rows<AT>(vp, rb, src.coef + i * k, k, wp.data(), k, len);
        }
      }
      if (gram) {
        // G = W W^T on the updated chunk; the diagonal doubles as the squared norms.
        for (int64_t i = 0; i < k; i += kRowGroup) {
          const int rb = static_cast<int>(std::min<int64_t>(kRowGroup, k - i));
          dot_rows<AT>(const_cast<const AT* const*>(wp.data() + i), rb,
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
