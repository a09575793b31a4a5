// Causal depthwise convolution (the Canon layer) for XLA:CPU through the XLA FFI: forward and backward, float32.
//
// Layout (canon_jax.ops.conv): x [B, T, C] channels-last, w [K, C] (w[K-1] multiplies the current token), bias [C],
// prev [B, H, C] with H = max(K-1, 1): the K-1 raw inputs before x (oldest first; only the first K-1 rows are used).
//   pre[b,t,c] = bias[c] + sum_j w[j,c] * xh[b,t+j,c]     with xh = concat(prev[:, :K-1], x) along time
//   y          = act(pre) (+ x if residual)               act = identity or SiLU
// The backward returns dx, dw, dbias and dprev (the gradient of the history rows). Work items are blocks of time
// steps of one sequence (kRows forward, kBwdRows backward), spread over XLA's intra-op thread pool. A backward item
// sums dw and dbias in float32 over kRows rows at a time and adds those sums into its double partials; the items'
// partials are then added in a fixed order in double precision (deterministic results).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Team {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::function<void(int64_t)> work;
};

// Runs work(i) for i in [0, n) on the caller plus up to num_threads-1 pool tasks. The caller takes chunks itself and
// only waits for chunks another thread has already started, so it never waits on a task that has not run yet (no
// deadlock when the pool is saturated). Late tasks find no chunk left and return without touching `work`.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> work) {
  if (n <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) work(i);
    return;
  }
  auto team = std::make_shared<Team>();
  team->n = n;
  team->work = std::move(work);
  auto drain = [](const std::shared_ptr<Team>& tm) {
    for (;;) {
      int64_t i = tm->next.fetch_add(1);
      if (i >= tm->n) return;
      tm->work(i);
      if (tm->done.fetch_add(1) + 1 == tm->n) {
        std::lock_guard<std::mutex> lock(tm->mu);
        tm->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([team, drain]() { drain(team); });
  drain(team);
  std::unique_lock<std::mutex> lock(team->mu);
  team->cv.wait(lock, [&] { return team->done.load() == team->n; });
}

struct Dims {
  int64_t B, T, C, K, H;
};

ffi::Error CheckDims(const Dims& d, ffi::Span<const int64_t> w_dims, ffi::Span<const int64_t> b_dims,
                     ffi::Span<const int64_t> p_dims) {
  if (w_dims.size() != 2 || w_dims[1] != d.C) return ffi::Error::InvalidArgument("canon_conv: weight must be [K, C]");
  if (b_dims.size() != 1 || b_dims[0] != d.C) return ffi::Error::InvalidArgument("canon_conv: bias must be [C]");
  if (p_dims.size() != 3 || p_dims[0] != d.B || p_dims[1] != std::max<int64_t>(d.K - 1, 1) || p_dims[2] != d.C)
    return ffi::Error::InvalidArgument("canon_conv: prev must be [B, max(K-1, 1), C]");
  return ffi::Error::Success();
}

// The channel loops below read rows through arrays of pointers, which the compiler cannot prove disjoint from the
// rows they write; they are (inputs and outputs are distinct XLA buffers), so tell it to vectorise anyway.
#if defined(__clang__)
#define CANON_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define CANON_IVDEP _Pragma("GCC ivdep")
#else
#define CANON_IVDEP
#endif

constexpr int64_t kRows = 32;  // time steps per forward work item (work items never straddle two sequences)
// Time steps per backward work item: each item keeps its own (K+1) x C partial sums of dw and dbias, so longer items
// mean fewer partials to zero and reduce (at [8, 512, 768], K = 4: 32 items instead of 128).
constexpr int64_t kBwdRows = 128;

// Row pointer of xh[b, s] (s in [0, T + K - 1)).
inline const float* XhRow(const float* x, const float* prev, const Dims& d, int64_t b, int64_t s) {
  return s < d.K - 1 ? prev + (b * d.H + s) * d.C : x + (b * d.T + (s - (d.K - 1))) * d.C;
}

// Kernel bodies are templates on the kernel size: KK > 0 is a compile-time K (the tap loops unroll and each channel's
// sums stay in registers while the channel loop vectorises); KK == 0 is the generic runtime-K version.
template <int KK>
inline int64_t Taps(const Dims& d) {
  return KK > 0 ? KK : d.K;
}

// src[j] = row pointer of xh[b, t + j] for j < K
template <int KK>
inline void SrcRows(const float* x, const float* prev, const Dims& d, int64_t b, int64_t t, const float** src) {
  for (int64_t j = 0; j < Taps<KK>(d); ++j) src[j] = XhRow(x, prev, d, b, t + j);
}

// acc[c] = bias[c] + sum_j w[j, c] * xh[b, t + j, c]  (the pre-activation of row (b, t)), plus x[b, t, c] when RES
// (the Canon residual, added in the same pass: x[b, t] is the row xh[b, t + K - 1]).
template <int KK, bool RES = false>
inline void PreRow(const float* x, const float* __restrict__ w, const float* __restrict__ bias, const float* prev,
                   const Dims& d, int64_t b, int64_t t, float* __restrict__ acc) {
  const int64_t K = Taps<KK>(d), C = d.C;
  const float* src[KK > 0 ? KK : 64];
  if (KK > 0 || K <= 64) {
    SrcRows<KK>(x, prev, d, b, t, src);
    const float* __restrict__ cur = src[K - 1];
    CANON_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      float a = bias[c];
      for (int64_t j = 0; j < K; ++j) a += w[j * C + c] * src[j][c];
      acc[c] = RES ? a + cur[c] : a;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) acc[c] = bias[c];
  for (int64_t j = 0; j < K; ++j) {
    const float* __restrict__ s = XhRow(x, prev, d, b, t + j);
    const float* __restrict__ wj = w + j * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += wj[c] * s[c];
  }
  if (RES) {
    const float* __restrict__ cur = XhRow(x, prev, d, b, t + K - 1);
    for (int64_t c = 0; c < C; ++c) acc[c] += cur[c];
  }
}

inline float Sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

template <int KK>
void FwdItem(const float* xp, const float* wp, const float* bp, const float* pp, float* yp, const Dims& d,
             bool silu, bool residual, int64_t b, int64_t t0, int64_t t1) {
  const int64_t C = d.C;
  if (!silu) {  // pre-activation (and residual) straight into the output rows
    for (int64_t t = t0; t < t1; ++t) {
      float* out = yp + (b * d.T + t) * C;
      if (residual)
        PreRow<KK, true>(xp, wp, bp, pp, d, b, t, out);
      else
        PreRow<KK, false>(xp, wp, bp, pp, d, b, t, out);
    }
    return;
  }
  std::vector<float> acc(C);
  for (int64_t t = t0; t < t1; ++t) {
    float* __restrict__ out = yp + (b * d.T + t) * C;
    const float* __restrict__ xr = xp + (b * d.T + t) * C;
    float* __restrict__ a = acc.data();
    PreRow<KK>(xp, wp, bp, pp, d, b, t, a);
    if (residual)
      for (int64_t c = 0; c < C; ++c) out[c] = a[c] * Sigmoid(a[c]) + xr[c];
    else
      for (int64_t c = 0; c < C; ++c) out[c] = a[c] * Sigmoid(a[c]);
  }
}

ffi::Error ConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> prev, ffi::ResultBuffer<ffi::F32> y,
                       int32_t silu, int32_t residual) {
  auto xd = x.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("canon_conv: x must be [B, T, C]");
  Dims d{xd[0], xd[1], xd[2], w.dimensions()[0], std::max<int64_t>(w.dimensions()[0] - 1, 1)};
  if (auto err = CheckDims(d, w.dimensions(), bias.dimensions(), prev.dimensions()); err.failure()) return err;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* bp = bias.typed_data();
  const float* pp = prev.typed_data();
  float* yp = y->typed_data();
  const int64_t per_seq = (d.T + kRows - 1) / kRows;
  ParallelFor(pool, d.B * per_seq, [&](int64_t item) {
    const int64_t b = item / per_seq, t0 = (item % per_seq) * kRows, t1 = std::min(d.T, t0 + kRows);
    switch (d.K) {
      case 1: return FwdItem<1>(xp, wp, bp, pp, yp, d, silu, residual, b, t0, t1);
      case 2: return FwdItem<2>(xp, wp, bp, pp, yp, d, silu, residual, b, t0, t1);
      case 3: return FwdItem<3>(xp, wp, bp, pp, yp, d, silu, residual, b, t0, t1);
      case 4: return FwdItem<4>(xp, wp, bp, pp, yp, d, silu, residual, b, t0, t1);
      default: return FwdItem<0>(xp, wp, bp, pp, yp, d, silu, residual, b, t0, t1);
    }
  });
  return ffi::Error::Success();
}

// pdd[c] += block[c]; block[c] = 0  (a float32 block of partial sums into the double partials)
inline void FlushPartials(float* __restrict__ block, double* __restrict__ pdd, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    pdd[c] += block[c];
    block[c] = 0.0f;
  }
}

// One work item of the backward: rows [t0, t1) of sequence b. Writes dx (and dprev for the first item of a
// sequence) and this item's partial sums of dw (K rows) and dbias (1 row) into pdd. They are summed in float32 over
// blocks of kRows rows and the block sums are added in double, so longer items do not lose precision.
template <int KK>
void BwdItem(const float* gp0, const float* xp, const float* wp, const float* bp, const float* pp, float* dxp,
             float* dpp, double* __restrict__ pdd, const Dims& d, bool silu, bool residual, int64_t b, int64_t t0,
             int64_t t1) {
  const int64_t K = Taps<KK>(d), C = d.C;
  const int64_t s1 = std::min(d.T, t1 + K - 1);  // rows of gp this item reads: [t0, s1)
  // gp = g * act'(pre): for SiLU computed into a buffer, else g itself
  std::vector<float> gbuf(silu ? (s1 - t0) * C : 0), acc(C);
  auto gp = [&](int64_t s) -> const float* {
    return silu ? gbuf.data() + (s - t0) * C : gp0 + (b * d.T + s) * C;
  };
  if (silu) {
    for (int64_t s = t0; s < s1; ++s) {
      PreRow<KK>(xp, wp, bp, pp, d, b, s, acc.data());
      const float* __restrict__ gr = gp0 + (b * d.T + s) * C;
      float* __restrict__ o = gbuf.data() + (s - t0) * C;
      const float* __restrict__ a = acc.data();
      for (int64_t c = 0; c < C; ++c) {
        const float sg = Sigmoid(a[c]);
        o[c] = gr[c] * sg * (1.0f + a[c] * (1.0f - sg));
      }
    }
  }
  std::vector<float> block((K + 1) * C, 0.0f);
  float* __restrict__ pdw = block.data();
  float* __restrict__ pdb = pdw + K * C;
  for (int64_t c = 0; c < (K + 1) * C; ++c) pdd[c] = 0.0;
  const bool fast = KK > 0;  // compile-time K: one fused channel loop per row
  for (int64_t t = t0; t < t1; ++t) {
    if (t > t0 && (t - t0) % kRows == 0) FlushPartials(block.data(), pdd, (K + 1) * C);
    const float* __restrict__ gr = gp(t);
    const float* __restrict__ graw = gp0 + (b * d.T + t) * C;
    float* __restrict__ out = dxp + (b * d.T + t) * C;
    if (fast && t + K - 1 < d.T) {
      // dw[j] += gp[t] * xh[t + j];  dx[t] = (g[t] if residual) + sum_j w[j] * gp[t + K-1-j]
      const float* src[KK > 0 ? KK : 1];
      const float* gs[KK > 0 ? KK : 1];
      SrcRows<KK>(xp, pp, d, b, t, src);
      for (int64_t j = 0; j < K; ++j) gs[j] = gp(t + K - 1 - j);
      CANON_IVDEP
      for (int64_t c = 0; c < C; ++c) {
        const float gv = gr[c];
        pdb[c] += gv;
        float o = residual ? graw[c] : 0.0f;
        for (int64_t j = 0; j < K; ++j) {
          pdw[j * C + c] += gv * src[j][c];
          o += wp[j * C + c] * gs[j][c];
        }
        out[c] = o;
      }
      continue;
    }
    for (int64_t c = 0; c < C; ++c) pdb[c] += gr[c];
    for (int64_t j = 0; j < K; ++j) {
      const float* __restrict__ src = XhRow(xp, pp, d, b, t + j);
      float* __restrict__ dwj = pdw + j * C;
      for (int64_t c = 0; c < C; ++c) dwj[c] += gr[c] * src[c];
    }
    if (residual)
      for (int64_t c = 0; c < C; ++c) out[c] = graw[c];
    else
      for (int64_t c = 0; c < C; ++c) out[c] = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t s = t + K - 1 - j;
      if (s >= d.T) continue;
      const float* __restrict__ gsj = gp(s);
      const float* __restrict__ wj = wp + j * C;
      for (int64_t c = 0; c < C; ++c) out[c] += wj[c] * gsj[c];
    }
  }
  FlushPartials(block.data(), pdd, (K + 1) * C);
  if (t0 == 0) {  // dprev[i] = sum_{j <= i, i - j < T} w[j] * gp[i - j]; padding rows (i >= K-1) are zero
    for (int64_t i = 0; i < d.H; ++i) {
      float* __restrict__ out = dpp + (b * d.H + i) * C;
      for (int64_t c = 0; c < C; ++c) out[c] = 0.0f;
      if (i >= K - 1) continue;
      for (int64_t j = 0; j <= i; ++j) {
        const int64_t s = i - j;
        if (s >= d.T) continue;
        const float* __restrict__ gsj = gp(s);  // s < K-1 <= s1 here
        const float* __restrict__ wj = wp + j * C;
        for (int64_t c = 0; c < C; ++c) out[c] += wj[c] * gsj[c];
      }
    }
  }
}

ffi::Error ConvBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> prev,
                       ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                       ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dprev, int32_t silu,
                       int32_t residual) {
  auto xd = x.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("canon_conv: x must be [B, T, C]");
  Dims d{xd[0], xd[1], xd[2], w.dimensions()[0], std::max<int64_t>(w.dimensions()[0] - 1, 1)};
  if (auto err = CheckDims(d, w.dimensions(), bias.dimensions(), prev.dimensions()); err.failure()) return err;
  const float* gp0 = g.typed_data();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* bp = bias.typed_data();
  const float* pp = prev.typed_data();
  float* dxp = dx->typed_data();
  float* dpp = dprev->typed_data();
  const int64_t K = d.K, C = d.C;
  const int64_t per_seq = (d.T + kBwdRows - 1) / kBwdRows, items = d.B * per_seq;
  // Per work item partial sums of dw (K rows) and dbias (1 row), reduced in double precision at the end; each item
  // zeroes its own partials. Up to kScratchDoubles they live in the calling thread's scratch, kept between calls (no
  // fresh pages to fault in on every call); larger ones get a buffer of their own, freed after the call.
  constexpr size_t kScratchDoubles = size_t{2} << 20;  // 16 MiB
  const size_t need = static_cast<size_t>(items * (K + 1) * C);
  thread_local std::vector<double> scratch;
  std::unique_ptr<double[]> own;
  double* partial;
  if (need <= kScratchDoubles) {
    if (scratch.size() < need) scratch.resize(need);
    partial = scratch.data();
  } else {
    own.reset(new double[need]);
    partial = own.get();
  }
  ParallelFor(pool, items, [&](int64_t item) {
    const int64_t b = item / per_seq, t0 = (item % per_seq) * kBwdRows, t1 = std::min(d.T, t0 + kBwdRows);
    double* pdd = partial + item * (K + 1) * C;
    switch (d.K) {
      case 1: return BwdItem<1>(gp0, xp, wp, bp, pp, dxp, dpp, pdd, d, silu, residual, b, t0, t1);
      case 2: return BwdItem<2>(gp0, xp, wp, bp, pp, dxp, dpp, pdd, d, silu, residual, b, t0, t1);
      case 3: return BwdItem<3>(gp0, xp, wp, bp, pp, dxp, dpp, pdd, d, silu, residual, b, t0, t1);
      case 4: return BwdItem<4>(gp0, xp, wp, bp, pp, dxp, dpp, pdd, d, silu, residual, b, t0, t1);
      default: return BwdItem<0>(gp0, xp, wp, bp, pp, dxp, dpp, pdd, d, silu, residual, b, t0, t1);
    }
  });
  // deterministic reduction of the partial sums (fixed item order, double accumulators), split over column blocks
  float* dwp = dw->typed_data();
  float* dbp = db->typed_data();
  const int64_t cols = (K + 1) * C, kCols = 512, col_blocks = (cols + kCols - 1) / kCols;
  ParallelFor(pool, col_blocks, [&](int64_t blk) {
    const int64_t c0 = blk * kCols, c1 = std::min(cols, c0 + kCols);
    double tot[kCols] = {0.0};
    for (int64_t item = 0; item < items; ++item) {
      const double* __restrict__ part = partial + item * cols;
      for (int64_t c = c0; c < c1; ++c) tot[c - c0] += part[c];
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (c < K * C)
        dwp[c] = static_cast<float>(tot[c - c0]);
      else
        dbp[c - K * C] = static_cast<float>(tot[c - c0]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CanonConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // prev
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Attr<int32_t>("silu")
                                  .Attr<int32_t>("residual"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CanonConvBwd, ConvBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // prev
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dprev
                                  .Attr<int32_t>("silu")
                                  .Attr<int32_t>("residual"));

// The hash of this file that the build passed in: the loader refuses a library built from another version of it.
#ifndef CANON_CONV_SOURCE_HASH
#define CANON_CONV_SOURCE_HASH "unknown"
#endif
extern "C" const char* CanonConvSourceHash() { return CANON_CONV_SOURCE_HASH; }
