// CUDA device code of basis_cuda.cu (mirrors csrc/cpu/engine.h).
//
//   dot_kernel     partial[b, i, j] = sum over block b's tiles of V_i . W_j   (j < KB)
//                  W tile staged in shared memory, read once per block; each warp owns
//                  kRowsPerWarp rows of V and keeps their KB accumulators in registers over the
//                  whole grid-stride loop, so there is a single warp-shuffle reduction at the end.
//   update_kernel  W_j[t] -= sum_s sum_i coef_s[i, j] V_s,i[t]; one t per thread per iteration
//                  (coalesced across the warp), W block in registers; optional per-block
//                  partial ||W_j||^2 / Gram of the updated block.
//   reduce_kernel  deterministic second-stage sum of the per-block partials (no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace hessfast {
namespace cuda {

constexpr int kThreads = 256;           // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 8;         // V rows per warp in dot_kernel
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 64: grid.y splits larger bases
constexpr int kTile = 512;              // n elements per shared-memory W tile (8 x 512 x 8 B = 32 KiB)
constexpr int kMaxKB = 8;

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("hessfast._C CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
}

template <typename AT>
__device__ __forceinline__ AT to_acc(float x) { return static_cast<AT>(x); }
template <typename AT>
__device__ __forceinline__ AT to_acc(double x) { return static_cast<AT>(x); }
template <typename AT>
__device__ __forceinline__ AT to_acc(__nv_bfloat16 x) { return static_cast<AT>(__bfloat162float(x)); }
template <typename AT>
__device__ __forceinline__ AT to_acc(__half x) { return static_cast<AT>(__half2float(x)); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Up to kMaxKB row pointers of a block (a subset of W's rows is just a different pointer set).
template <typename T>
struct RowPtrs {
  T* p[kMaxKB];
};

// grid = (gx, ceil(m / kRowsPerBlock)); partial: [gx, m, KB]; wsq (optional): [gx, KB].
template <typename AT, typename VT, typename WT, int KB>
__global__ void __launch_bounds__(kThreads) dot_kernel(const VT* __restrict__ V, int64_t ldv,
                                                       int64_t m, RowPtrs<const WT> W, int kb,
                                                       int64_t n, AT* __restrict__ partial,
                                                       AT* __restrict__ wsq) {
  __shared__ AT wt[KB][kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + warp * kRowsPerWarp;
  AT acc[kRowsPerWarp][KB];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int j = 0; j < KB; ++j) acc[r][j] = AT(0);
  AT sq[KB];
#pragma unroll
  for (int j = 0; j < KB; ++j) sq[j] = AT(0);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kTile; base < n;
       base += static_cast<int64_t>(gridDim.x) * kTile) {
    const int len = static_cast<int>(n - base < kTile ? n - base : kTile);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      for (int t = threadIdx.x; t < kTile; t += kThreads) {
        AT x = AT(0);
        if (j < kb && t < len) x = static_cast<AT>(W.p[j][base + t]);
        wt[j][t] = x;
        sq[j] += x * x;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = row0 + r;
      if (i >= m) break;
      const VT* vrow = V + i * ldv + base;
#pragma unroll 4
      for (int t = lane; t < len; t += 32) {
        const AT v = to_acc<AT>(vrow[t]);
#pragma unroll
        for (int j = 0; j < KB; ++j) acc[r][j] += v * wt[j][t];
      }
    }
  }
  // One reduction per (row, j) for the whole run.
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = row0 + r;
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      const AT s = warp_sum(acc[r][j]);
      if (lane == 0 && i < m) partial[(static_cast<int64_t>(blockIdx.x) * m + i) * KB + j] = s;
    }
  }
  if (wsq != nullptr && blockIdx.y == 0) {
    __shared__ AT red[kWarps][KB];
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      const AT s = warp_sum(sq[j]);
      if (lane == 0) red[warp][j] = s;
    }
    __syncthreads();
    if (threadIdx.x < KB) {
      AT s = AT(0);
      for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
      wsq[static_cast<int64_t>(blockIdx.x) * KB + threadIdx.x] = s;
    }
  }
}

// One update source: W_j -= sum_i coef[i * cs_i + j * cs_j] V_i (coef on the device, in AT).
template <typename AT, typename VT>
struct Source {
  const VT* V = nullptr;
  int64_t ldv = 0;
  int64_t m = 0;
  const AT* coef = nullptr;
  int64_t cs_i = 0, cs_j = 0;
};

// stats (optional): per-block partials [gridDim.x, KB * KB] of the Gram of the updated block
// (or, with want_gram == false, [gridDim.x, KB] of the squared norms).
template <typename AT, typename VT, typename WT, int KB>
__global__ void __launch_bounds__(kThreads) update_kernel(Source<AT, VT> s0, Source<AT, VT> s1,
                                                          RowPtrs<WT> W, int kb, int64_t n,
                                                          AT* __restrict__ stats, bool want_gram) {
  AT g[KB][KB];
#pragma unroll
  for (int j = 0; j < KB; ++j)
#pragma unroll
    for (int l = 0; l < KB; ++l) g[j][l] = AT(0);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    AT w[KB];
#pragma unroll
    for (int j = 0; j < KB; ++j) w[j] = j < kb ? static_cast<AT>(W.p[j][t]) : AT(0);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const Source<AT, VT>& src = s == 0 ? s0 : s1;
#pragma unroll 4
      for (int64_t i = 0; i < src.m; ++i) {
        const AT v = to_acc<AT>(src.V[i * src.ldv + t]);
        const AT* c = src.coef + i * src.cs_i;
#pragma unroll
        for (int j = 0; j < KB; ++j)
          if (j < kb) w[j] -= c[j * src.cs_j] * v;
      }
    }
#pragma unroll
    for (int j = 0; j < KB; ++j)
      if (j < kb) W.p[j][t] = static_cast<WT>(w[j]);
    if (stats != nullptr) {
#pragma unroll
      for (int j = 0; j < KB; ++j) {
        if (want_gram) {
#pragma unroll
          for (int l = 0; l <= j; ++l) g[j][l] += w[j] * w[l];
        } else {
          g[j][j] += w[j] * w[j];
        }
      }
    }
  }
  if (stats == nullptr) return;
  __shared__ AT red[kWarps][KB * KB];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < KB; ++j) {
#pragma unroll
    for (int l = 0; l <= j; ++l) {
      if (!want_gram && l != j) continue;
      const AT s = warp_sum(g[j][l]);
      if (lane == 0) red[warp][j * KB + l] = s;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < KB * KB; e += kThreads) {
    const int j = e / KB, l = e % KB;
    const int jj = j >= l ? j : l, ll = j >= l ? l : j;  // mirror the lower triangle
    if (!want_gram && jj != ll) continue;
    AT s = AT(0);
    for (int w = 0; w < kWarps; ++w) s += red[w][jj * KB + ll];
    if (want_gram)
      stats[static_cast<int64_t>(blockIdx.x) * KB * KB + e] = s;
    else
      stats[static_cast<int64_t>(blockIdx.x) * KB + j] = s;
  }
}

// out[(e / width) * ld_out + off + e % width] (+)= sum_b part[b * count + (e / width) * pw + e % width]
// for e < rows * width: sums gx per-block partials laid out [gx, rows, pw] into a strided output.
template <typename AT>
__global__ void reduce_kernel(const AT* __restrict__ part, int gx, int64_t rows, int pw, int width,
                              AT* __restrict__ out, int64_t ld_out, int64_t off, bool add) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * width) return;
  const int64_t r = e / width, c = e % width;
  AT s = AT(0);
  for (int b = 0; b < gx; ++b) s += part[(static_cast<int64_t>(b) * rows + r) * pw + c];
  AT* dst = out + r * ld_out + off + c;
  *dst = add ? *dst + s : s;
}

// Scoped device + stream-ordered scratch memory (freed on the stream when the call returns).
class Scope {
 public:
  Scope(int device, std::uintptr_t stream) : stream_(reinterpret_cast<cudaStream_t>(stream)) {
    cuda_check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
    device_ = device;
    cuda_check(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
  }
  ~Scope() {
    for (void* p : allocs_) cudaFreeAsync(p, stream_);
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

  template <typename T>
  T* alloc(int64_t count) {
    void* p = nullptr;
    cuda_check(cudaMallocAsync(&p, static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T),
                               stream_),
               "cudaMallocAsync");
    allocs_.push_back(p);
    return static_cast<T*>(p);
  }
  cudaStream_t stream() const { return stream_; }
  int sms() const { return sms_; }

 private:
  cudaStream_t stream_;
  int prev_ = 0, device_ = 0, sms_ = 1;
  std::vector<void*> allocs_;
};

inline void launched(const char* what) { cuda_check(cudaGetLastError(), what); }

// Blocks along n: enough to fill the GPU (4 blocks/SM), never more than there are tiles.
inline int grid_n(const Scope& sc, int64_t n, int64_t per_block, int y = 1) {
  const int64_t tiles = (n + per_block - 1) / per_block;
  const int64_t want = std::max<int64_t>(1, (4LL * sc.sms()) / std::max(y, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min(tiles, want)));
}

template <typename F>
inline void with_storage(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: f(__half{}); break;
  }
}
template <typename F>
inline void with_work(int dtype, F&& f) {
  if (dtype == kFloat32) f(float{}); else f(double{});
}
// Smallest compiled column block >= kb (1, 4 or 8): three instantiations keep the build short.
template <typename F>
inline void with_kb(int kb, F&& f) {
  if (kb <= 1) f(std::integral_constant<int, 1>{});
  else if (kb <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

// C[i, off + j] (+)= V_i . W_j for the rows in `rows` (<= kMaxKB), C row stride ldc.
// wsq_out (optional, device, [kb]): ||W_j||^2.
template <typename AT>
void dot_block(Scope& sc, const Mat& V, int wdtype, const std::vector<char*>& rows, int64_t n,
               AT* C, int64_t ldc, int64_t off, AT* wsq_out) {
  const int kb = static_cast<int>(rows.size());
  const int64_t m = V.rows;
  with_kb(kb, [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
    const int gy = static_cast<int>((m + kRowsPerBlock - 1) / kRowsPerBlock);
    const int gx = grid_n(sc, n, kTile, gy);
    AT* part = sc.alloc<AT>(static_cast<int64_t>(gx) * m * KB);
    AT* sq = wsq_out ? sc.alloc<AT>(static_cast<int64_t>(gx) * KB) : nullptr;
    with_storage(V.dtype, [&](auto vt) {
      using VT = decltype(vt);
      with_work(wdtype, [&](auto wt) {
        using WT = decltype(wt);
        RowPtrs<const WT> wp{};
        for (int j = 0; j < kb; ++j) wp.p[j] = reinterpret_cast<const WT*>(rows[j]);
        dot_kernel<AT, VT, WT, KB><<<dim3(gx, gy), kThreads, 0, sc.stream()>>>(
            reinterpret_cast<const VT*>(V.ptr), V.ld, m, wp, kb, n, part, sq);
        launched("dot_kernel");
      });
    });
    if (m > 0) {
      reduce_kernel<AT><<<static_cast<int>((m * kb + 255) / 256), 256, 0, sc.stream()>>>(
          part, gx, m, KB, kb, C, ldc, off, false);
      launched("reduce_kernel");
    }
    if (wsq_out) {
      reduce_kernel<AT><<<1, 32, 0, sc.stream()>>>(sq, gx, 1, KB, kb, wsq_out, 0, 0, false);
      launched("reduce_kernel");
    }
  });
}

// W_j -= sum_s coef_s^T V_s for the rows in `rows` (<= kMaxKB); coefficient column offset is
// folded into the Source pointers by the caller. stats_out (optional, device): Gram [kb, kb]
// (row stride ld_stats) when want_gram, else squared norms [kb].
template <typename AT>
void update_block(Scope& sc, const Mat& V0, const Mat& V1, const AT* c0, int64_t c0i, int64_t c0j,
                  const AT* c1, int64_t c1i, int64_t c1j, int wdtype,
                  const std::vector<char*>& rows, int64_t n, AT* stats_out, int64_t ld_stats,
                  bool want_gram) {
  const int kb = static_cast<int>(rows.size());
  with_kb(kb, [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
    const int gx = grid_n(sc, n, kThreads);
    const int pw = want_gram ? KB * KB : KB;
    AT* part = stats_out ? sc.alloc<AT>(static_cast<int64_t>(gx) * pw) : nullptr;
    with_storage(V0.dtype, [&](auto vt) {
      using VT = decltype(vt);
      with_work(wdtype, [&](auto wt) {
        using WT = decltype(wt);
        RowPtrs<WT> wp{};
        for (int j = 0; j < kb; ++j) wp.p[j] = reinterpret_cast<WT*>(rows[j]);
        Source<AT, VT> s0, s1;
        s0.V = reinterpret_cast<const VT*>(V0.ptr);
        s0.ldv = V0.ld;
        s0.m = V0.rows;
        s0.coef = c0;
        s0.cs_i = c0i;
        s0.cs_j = c0j;
        if (V1.rows > 0) {
          s1.V = reinterpret_cast<const VT*>(V1.ptr);
          s1.ldv = V1.ld;
          s1.m = V1.rows;
          s1.coef = c1;
          s1.cs_i = c1i;
          s1.cs_j = c1j;
        }
        update_kernel<AT, VT, WT, KB><<<gx, kThreads, 0, sc.stream()>>>(s0, s1, wp, kb, n, part,
                                                                         want_gram);
        launched("update_kernel");
      });
    });
    if (stats_out) {
      if (want_gram) {
        // [gx, KB, KB] -> rows kb x cols kb of stats_out
        reduce_kernel<AT><<<static_cast<int>((kb * kb + 255) / 256), 256, 0, sc.stream()>>>(
            part, gx, KB, KB, kb, stats_out, ld_stats, 0, false);
      } else {
        reduce_kernel<AT><<<1, 32, 0, sc.stream()>>>(part, gx, 1, KB, kb, stats_out, 0, 0, false);
      }
      launched("reduce_kernel");
    }
  });
}

}  // namespace cuda
}  // namespace hessfast

namespace hessfast {
namespace cuda {

template <typename AT>
__global__ void sqrt_kernel(const AT* __restrict__ in, AT* __restrict__ out, int64_t count) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < count) out[e] = sqrt(in[e]);
}

template <typename AT>
inline void sqrt_into(Scope& sc, const AT* in, AT* out, int64_t count) {
  sqrt_kernel<AT><<<static_cast<int>((count + 255) / 256), 256, 0, sc.stream()>>>(in, out, count);
  launched("sqrt_kernel");
}

}  // namespace cuda
}  // namespace hessfast
