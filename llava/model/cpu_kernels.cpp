// int8 weights times bf16 activations for a few rows, with AVX512-BF16 (built at first use by
// llava/model/cpu_kernels.py, which says why and where).
//
// out[m, n] = scale[n] * sum_k x[m, k] * w[n, k] for x bf16 [M, K], w int8 [N, K] (row-major, the
// layout of aten::_weight_int8pack_mm), scale fp32 [N]; out fp32 [M, N]. Each output is a dot product
// along K: 32 weights at a time are widened to bf16 (exact: |w| <= 127 needs 7 bits) and multiplied
// into 16 fp32 lanes by vdpbf16ps, each widened tile serving up to 8 input rows, so the widening is
// paid once per 8 rows and the products run at bf16's rate (ATen's kernel widens to fp32 and
// multiplies 16 at a time). Accumulation is in fp32, exactly as the products come.
//
// A decode step reads each weight from memory once, in tiles of 3-4 rows of K bytes: too short a run
// for the hardware prefetcher to get ahead of, so `step` prefetches the rows two tiles on. On the
// 2-core EPYC, weights cycled through 100 MB (as a step reads them), 8 rows: 170-185 G multiply-adds/s
// without the prefetch, 280-315 with it; ATen's kernel 115-125 (session 40).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kRowTile = 8;  // input rows per pass over a weight tile: 8 x 3 accumulators fill the registers
constexpr int kAhead = 2;    // tiles ahead that `step` prefetches: the best of 0, 1, 2, 4 and 8

inline __m512bh to_bf16(__m128i lo, __m128i hi) {  // 32 int8 (16 + 16) -> 32 bf16, in order
  const __m512 lo_f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
  const __m512 hi_f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
  return _mm512_cvtne2ps_pbh(hi_f, lo_f);  // the first argument fills the upper half
}

inline __m512bh widen(const int8_t* w) {
  return to_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)),
                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
}

inline __m512bh widen_first(const int8_t* w, __mmask32 valid) {  // the first bits of `valid` set: a tail
  return to_bf16(_mm_maskz_loadu_epi8(static_cast<__mmask16>(valid), w),
                 _mm_maskz_loadu_epi8(static_cast<__mmask16>(valid >> 16), w + 16));
}

// MB input rows by NB weight rows, over 32 columns from k (fewer, the first `valid`, at a tail).
template <int MB, int NB, bool kTail>
inline void step(__m512 (&acc)[MB][NB], const at::BFloat16* x, const int8_t* w, int64_t K, int64_t k,
                 __mmask32 valid) {
  __m512bh wv[NB];
  if (!kTail && (k & 63) == 0) {  // a cache line of each row kAhead tiles on (file comment)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (NB * kAhead + n) * K + k), _MM_HINT_T0);
    }
  }
#pragma GCC unroll 4
  for (int n = 0; n < NB; ++n) wv[n] = kTail ? widen_first(w + n * K + k, valid) : widen(w + n * K + k);
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const __m512bh xv = kTail ? (__m512bh)_mm512_maskz_loadu_epi16(valid, x + m * K + k)
                              : (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], wv[n], xv);
  }
}

// MB input rows by NB weight rows, over all of K.
template <int MB, int NB>
inline void tile(const at::BFloat16* x, const int8_t* w, int64_t K, const float* scale, float* out,
                 int64_t N) {
  __m512 acc[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step<MB, NB, false>(acc, x, w, K, k, 0);
  if (k < K) step<MB, NB, true>(acc, x, w, K, k, static_cast<__mmask32>((1u << (K - k)) - 1));
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) out[m * N + n] = _mm512_reduce_add_ps(acc[m][n]) * scale[n];
}

// Every input row against NB weight rows.
template <int NB>
void all_rows(int64_t M, const at::BFloat16* x, const int8_t* w, int64_t K, const float* scale, float* out,
              int64_t N) {
  int64_t m = 0;
  for (; m + kRowTile <= M; m += kRowTile) tile<kRowTile, NB>(x + m * K, w, K, scale, out + m * N, N);
  const auto* xm = x + m * K;
  float* om = out + m * N;
  switch (M - m) {
    case 7: tile<7, NB>(xm, w, K, scale, om, N); break;
    case 6: tile<6, NB>(xm, w, K, scale, om, N); break;
    case 5: tile<5, NB>(xm, w, K, scale, om, N); break;
    case 4: tile<4, NB>(xm, w, K, scale, om, N); break;
    case 3: tile<3, NB>(xm, w, K, scale, om, N); break;
    case 2: tile<2, NB>(xm, w, K, scale, om, N); break;
    case 1: tile<1, NB>(xm, w, K, scale, om, N); break;
    default: break;
  }
}

template <int NB>
void weight_rows(int64_t M, const at::BFloat16* x, const int8_t* w, int64_t K, const float* scale, float* out,
                 int64_t N, int64_t first, int64_t last) {
  int64_t n = first;
  for (; n + NB <= last; n += NB) all_rows<NB>(M, x, w + n * K, K, scale + n, out + n, N);
  for (; n < last; ++n) all_rows<1>(M, x, w + n * K, K, scale + n, out + n, N);
}

at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scale.dim() == 1,
              "int8_weight_mm: x [M, K], weight [N, K], scale [N]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat,
              "int8_weight_mm: x bf16, weight int8, scale fp32");
  TORCH_CHECK(x.size(1) == weight.size(1) && scale.size(0) == weight.size(0), "int8_weight_mm: shapes differ");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && scale.device().is_cpu(), "int8_weight_mm: CPU only");
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const auto sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto out = at::empty({M, N}, xc.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* wp = wc.data_ptr<int8_t>();
  const auto* sp = sc.data_ptr<float>();
  auto* op = out.data_ptr<float>();
  const int64_t nb = M <= 4 ? 4 : 3;  // measured: 4 weight rows a tile for few input rows, 3 beside 8 rows
  const int64_t grain = 64 / nb;       // tiles per task: enough work to be worth a thread
  at::parallel_for(0, (N + nb - 1) / nb, grain, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * nb, last = std::min(end * nb, N);
    if (nb == 4) weight_rows<4>(M, xp, wp, K, sp, op, N, first, last);
    else weight_rows<3>(M, xp, wp, K, sp, op, N, first, last);
  });
  return out;
}

}  // namespace

// The op's schema is defined in llava/model/cpu_kernels.py, beside its shape function for torch.compile.
TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) {
  m.impl("int8_weight_mm", &int8_weight_mm);
}
