// Weight-only and dynamic int8, and weight-only int4, products for a few rows on AVX-512 CPUs (built at
// first use by llava/model/cpu_kernels.py, which says why and where, with the figures).
//
// int8 weights [N, K] (row-major: the layout of aten::_weight_int8pack_mm and of our int8-dynamic
// layers), per-row fp32 scales. Each output is a dot product along K, over MB input rows by NB weight
// rows at a time, each weight vector serving up to 8 input rows:
// - times bf16 activations (`Bf16Rows`): 32 weights at a time widened to bf16 (exact: |w| <= 127 needs
//   7 bits) and multiplied into 16 fp32 lanes by vdpbf16ps (ATen's kernel widens to fp32 and multiplies
//   16 at a time); fp32 sums, exact products.
// - times activation codes (`CodeRows`: int8-dynamic's per-row codes + 128, as uint8): 64 at a time by
//   vpdpbusd into int32, exact; the 128 offset comes off as 128 * sum_k w (per row, precomputed).
// A decode step reads each weight from memory once, in tiles of 3-4 rows of K bytes: too short a run
// for the hardware prefetcher to get ahead of, so `step` prefetches the rows two tiles on. On the
// 2-core EPYC, bf16 x int8, weights cycled through 100 MB (as a step reads them), 8 rows: 170-185 G
// multiply-adds/s without the prefetch, 280-315 with it; ATen's kernel 115-125 (session 40).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kRowTile = 8;  // input rows per pass over a weight tile: 8 x 3 accumulators fill the registers
constexpr int kAhead = 2;    // tiles ahead that `step` prefetches: the best of 0, 1, 2, 4 and 8

struct Bf16Rows {  // x bf16; out = scale[n] * sum_k x w, fp32
  using X = at::BFloat16;
  using Out = float;
  static constexpr auto kOut = at::kFloat;
  using Acc = __m512;
  using W = __m512bh;
  static constexpr int kStep = 32;  // columns per vector
  const float* scale;

  static Acc zero() { return _mm512_setzero_ps(); }
  static W weights(const int8_t* w, uint64_t valid) {  // a tail loads the first `valid` columns only
    const auto lo = _mm_maskz_loadu_epi8(static_cast<__mmask16>(valid), w);
    const auto hi = _mm_maskz_loadu_epi8(static_cast<__mmask16>(valid >> 16), w + 16);
    const __m512 lo_f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
    const __m512 hi_f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
    return _mm512_cvtne2ps_pbh(hi_f, lo_f);  // 32 bf16 in order: the first argument fills the upper half
  }
  static W weights(const int8_t* w) { return weights(w, ~uint64_t(0)); }
  static __m512bh inputs(const X* x, uint64_t valid) {
    return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>(valid), x);
  }
  static __m512bh inputs(const X* x) { return (__m512bh)_mm512_loadu_si512(x); }
  static Acc madd(Acc acc, W w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
  float finish(Acc acc, int64_t n) const { return _mm512_reduce_add_ps(acc) * scale[n]; }
};

struct CodeRows {  // x uint8 (codes + 128); out = sum_k x w - 128 * sum_k w, int32: exact
  using X = uint8_t;
  using Out = int32_t;
  static constexpr auto kOut = at::kInt;
  using Acc = __m512i;
  using W = __m512i;
  static constexpr int kStep = 64;
  const int32_t* weight_sums;

  static Acc zero() { return _mm512_setzero_si512(); }
  static W weights(const int8_t* w, uint64_t valid) { return _mm512_maskz_loadu_epi8(valid, w); }
  static W weights(const int8_t* w) { return _mm512_loadu_si512(w); }
  static __m512i inputs(const X* x, uint64_t valid) { return _mm512_maskz_loadu_epi8(valid, x); }
  static __m512i inputs(const X* x) { return _mm512_loadu_si512(x); }
  static Acc madd(Acc acc, W w, __m512i x) { return _mm512_dpbusd_epi32(acc, x, w); }
  int32_t finish(Acc acc, int64_t n) const { return _mm512_reduce_add_epi32(acc) - 128 * weight_sums[n]; }
};

// MB input rows by NB weight rows, over kStep columns from k (the first `valid` only, at a tail).
template <class Kind, int MB, int NB, bool kTail>
inline void step(typename Kind::Acc (&acc)[MB][NB], const typename Kind::X* x, const int8_t* w, int64_t K,
                 int64_t k, uint64_t valid) {
  typename Kind::W wv[NB];
  if (!kTail && (k & 63) == 0) {  // a cache line of each row kAhead tiles on (file comment)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (NB * kAhead + n) * K + k), _MM_HINT_T0);
    }
  }
#pragma GCC unroll 4
  for (int n = 0; n < NB; ++n) wv[n] = kTail ? Kind::weights(w + n * K + k, valid) : Kind::weights(w + n * K + k);
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const auto xv = kTail ? Kind::inputs(x + m * K + k, valid) : Kind::inputs(x + m * K + k);
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[m][n] = Kind::madd(acc[m][n], wv[n], xv);
  }
}

// MB input rows by NB weight rows, over all of K.
template <class Kind, int MB, int NB>
inline void tile(const Kind& kind, const typename Kind::X* x, const int8_t* w, int64_t K, int64_t n0,
                 typename Kind::Out* out, int64_t N) {
  typename Kind::Acc acc[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[m][n] = Kind::zero();
  int64_t k = 0;
  for (; k + Kind::kStep <= K; k += Kind::kStep) step<Kind, MB, NB, false>(acc, x, w, K, k, 0);
  if (k < K) step<Kind, MB, NB, true>(acc, x, w, K, k, (uint64_t(1) << (K - k)) - 1);
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) out[m * N + n0 + n] = kind.finish(acc[m][n], n0 + n);
}

// Every input row against NB weight rows from n0.
template <class Kind, int NB>
void all_rows(const Kind& kind, int64_t M, const typename Kind::X* x, const int8_t* w, int64_t K, int64_t n0,
              typename Kind::Out* out, int64_t N) {
  int64_t m = 0;
  for (; m + kRowTile <= M; m += kRowTile) tile<Kind, kRowTile, NB>(kind, x + m * K, w, K, n0, out + m * N, N);
  const auto* xm = x + m * K;
  auto* om = out + m * N;
  switch (M - m) {
    case 7: tile<Kind, 7, NB>(kind, xm, w, K, n0, om, N); break;
    case 6: tile<Kind, 6, NB>(kind, xm, w, K, n0, om, N); break;
    case 5: tile<Kind, 5, NB>(kind, xm, w, K, n0, om, N); break;
    case 4: tile<Kind, 4, NB>(kind, xm, w, K, n0, om, N); break;
    case 3: tile<Kind, 3, NB>(kind, xm, w, K, n0, om, N); break;
    case 2: tile<Kind, 2, NB>(kind, xm, w, K, n0, om, N); break;
    case 1: tile<Kind, 1, NB>(kind, xm, w, K, n0, om, N); break;
    default: break;
  }
}

template <class Kind, int NB>
void weight_rows(const Kind& kind, int64_t M, const typename Kind::X* x, const int8_t* w, int64_t K,
                 typename Kind::Out* out, int64_t N, int64_t first, int64_t last) {
  int64_t n = first;
  for (; n + NB <= last; n += NB) all_rows<Kind, NB>(kind, M, x, w + n * K, K, n, out, N);
  for (; n < last; ++n) all_rows<Kind, 1>(kind, M, x, w + n * K, K, n, out, N);
}

// out [M, N] from x [M, K] and int8 weight [N, K], across the threads in tiles of weight rows.
template <class Kind>
at::Tensor int8_rows_mm(const Kind& kind, const at::Tensor& x, const at::Tensor& weight) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(Kind::kOut));
  if (M == 0 || N == 0) return out;
  const auto* xp = x.data_ptr<typename Kind::X>();
  const auto* wp = weight.data_ptr<int8_t>();
  auto* op = out.data_ptr<typename Kind::Out>();
  const int64_t nb = M <= 4 ? 4 : 3;  // measured: 4 weight rows a tile for few input rows, 3 beside 8 rows
  const int64_t grain = 64 / nb;       // tiles per task: enough work to be worth a thread
  at::parallel_for(0, (N + nb - 1) / nb, grain, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * nb, last = std::min(end * nb, N);
    if (nb == 4) weight_rows<Kind, 4>(kind, M, xp, wp, K, op, N, first, last);
    else weight_rows<Kind, 3>(kind, M, xp, wp, K, op, N, first, last);
  });
  return out;
}

// x [M, K] and weight [N, K] int8, with a per-row vector of weight.size(0) in `per_row_type`.
void check_int8(const char* op, const at::Tensor& x, at::ScalarType x_type, const at::Tensor& weight,
                const at::Tensor& per_row, at::ScalarType per_row_type) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && per_row.dim() == 1, op, ": x [M, K], weight [N, K], [N]");
  TORCH_CHECK(x.scalar_type() == x_type && weight.scalar_type() == at::kChar && per_row.scalar_type() == per_row_type,
              op, ": x ", x_type, ", weight int8, per row ", per_row_type);
  TORCH_CHECK(x.size(1) == weight.size(1) && per_row.size(0) == weight.size(0), op, ": shapes differ");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && per_row.device().is_cpu(), op, ": CPU only");
}

at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  check_int8("int8_weight_mm", x, at::kBFloat16, weight, scale, at::kFloat);
  const auto sc = scale.contiguous();
  return int8_rows_mm(Bf16Rows{sc.data_ptr<float>()}, x.contiguous(), weight.contiguous());
}

at::Tensor int8_codes_mm(const at::Tensor& codes, const at::Tensor& weight, const at::Tensor& weight_sums) {
  check_int8("int8_codes_mm", codes, at::kByte, weight, weight_sums, at::kInt);
  const auto ws = weight_sums.contiguous();
  return int8_rows_mm(CodeRows{ws.data_ptr<int32_t>()}, codes.contiguous(), weight.contiguous());
}

// int4: ATen's CPU int4pack layout (`_convert_weight_to_int4pack_for_cpu`): per block of `block` output
// rows (64 on AVX-512) and per input column k, block / 2 bytes whose low nibbles are the block's first
// half of rows and high nibbles the rest; bf16 (scale, zero) pairs [K / 32, N, 2], the weight being
// (code - 8) * scale + zero. Here the lanes run over 16 output rows and vdpbf16ps multiplies a pair of
// columns (k, k + 1) by x[m, k], x[m, k + 1] broadcast. A code c widens to the bf16 of 128 + c by setting
// it into the mantissa of 128.0 (bits 0x4300: in [128, 256) bf16 steps by 1), a mask-and-or; so per group
// of 32 columns p = sum_k x (128 + c), and the group adds scale * p + (zero - 136 * scale) * sum_k x.
// The affine map costs two multiply-adds per group and 16 rows, not one per weight; p's 128 * sum x
// costs ~4 of fp32's 24 bits, far below the activations' bf16.
constexpr int kGroup = 32;
constexpr int kBlock = 64;  // output rows per packed block: ATen's layout on AVX-512 CPUs

// Bytes 0-15 (half 0) or 16-31 (half 1) of a 64-row block at columns k, k + 1: for each of 16 rows a
// dword holding its byte at k in bits 0-7 and at k + 1 in bits 16-23. The low nibbles are one 16-row
// part (0 or 1), the high nibbles another (2 or 3).
inline __m512i int4_bytes(const uint8_t* block, int64_t k, int half) {
  const uint8_t* column = block + k * (kBlock / 2) + half * 16;
  const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column)));
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + kBlock / 2)));
  return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}

// One part's 16 pairs of bf16 (128 + code) from `int4_bytes`: (bytes >> shift & 0x000F000F) | 0x43004300,
// each code set into the mantissa of bf16 128.0.
inline __m512bh int4_pairs(__m512i bytes, bool high) {
  if (high) bytes = _mm512_srli_epi32(bytes, 4);
  return (__m512bh)_mm512_ternarylogic_epi32(bytes, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300),
                                             0xEA);
}

// MB input rows by the 4 16-row parts of one block. U sets of group sums, for alternating column
// pairs, keep U * MB * 4 products in flight (vdpbf16ps's latency would leave a single input row
// waiting); the running totals, touched once per group, stay in memory so that the registers hold sums.
template <int MB, int U>
inline void int4_tile(const at::BFloat16* x, int64_t K, const uint8_t* block, const at::BFloat16* scales_zeros,
                      int64_t N, int64_t row0, const float* x_sums, float* out) {
  constexpr int kParts = kBlock / 16;
  const __m512i upper_halves = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 offset = _mm512_set1_ps(136.0f);  // 128 + 8: the widening's and the codes' offsets
  const int64_t groups = K / kGroup;
  alignas(64) float totals[MB][kParts][16] = {};
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sums[U][MB][kParts];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
        for (int p = 0; p < kParts; ++p) sums[u][m][p] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2 * U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m512i low = int4_bytes(block, k + 2 * u, 0), high = int4_bytes(block, k + 2 * u, 1);
        const __m512bh w[kParts] = {int4_pairs(low, false), int4_pairs(high, false), int4_pairs(low, true),
                                    int4_pairs(high, true)};  // each half's bytes read once for its two parts
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          int32_t xk;
          std::memcpy(&xk, x + m * K + k + 2 * u, sizeof(xk));  // x[m, k'] and x[m, k' + 1]
          const __m512bh xb = (__m512bh)_mm512_set1_epi32(xk);
#pragma GCC unroll 4
          for (int p = 0; p < kParts; ++p) sums[u][m][p] = _mm512_dpbf16_ps(sums[u][m][p], w[p], xb);
        }
      }
    }
#pragma GCC unroll 4
    for (int p = 0; p < kParts; ++p) {
      const __m512i pair = _mm512_loadu_si512(scales_zeros + (g * N + row0 + p * 16) * 2);  // 16 (scale, zero)
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, upper_halves));
      const __m512 per_sum = _mm512_fnmadd_ps(offset, scale, zero);  // zero - 136 * scale
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        __m512 sum = sums[0][m][p];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, sums[u][m][p]);
        __m512 total = _mm512_fmadd_ps(sum, scale, _mm512_load_ps(totals[m][p]));
        total = _mm512_fmadd_ps(per_sum, _mm512_set1_ps(x_sums[m * groups + g]), total);
        _mm512_store_ps(totals[m][p], total);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < kParts; ++p) _mm512_storeu_ps(out + m * N + row0 + p * 16, _mm512_load_ps(totals[m][p]));
}

// Every input row against one 64-row block, in shapes that keep 8-16 products in flight: 4 rows at a
// time (8 rows as twice 4 measured faster than 8 by two 32-row halves: 240-320 G multiply-adds/s against
// 215-290, the block's bytes coming from the cache the second time), then 2, then 1.
void int4_block(int64_t M, const at::BFloat16* x, int64_t K, const uint8_t* block,
                const at::BFloat16* scales_zeros, int64_t N, int64_t row0, const float* x_sums, float* out) {
  const int64_t groups = K / kGroup;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    int4_tile<4, 1>(x + m * K, K, block, scales_zeros, N, row0, x_sums + m * groups, out + m * N);
  }
  for (; m + 2 <= M; m += 2) {
    int4_tile<2, 2>(x + m * K, K, block, scales_zeros, N, row0, x_sums + m * groups, out + m * N);
  }
  if (m < M) int4_tile<1, 2>(x + m * K, K, block, scales_zeros, N, row0, x_sums + m * groups, out + m * N);
}

at::Tensor int4_weight_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                          int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_weight_mm: x bf16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales_zeros.scalar_type() == at::kBFloat16 &&
                  scales_zeros.dim() == 3 && scales_zeros.size(2) == 2,
              "int4_weight_mm: packed uint8, scales_zeros bf16 [K / 32, N, 2]");
  TORCH_CHECK(block == kBlock, "int4_weight_mm: blocks of 64 rows (ATen's AVX-512 layout)");
  const int64_t M = x.size(0), K = x.size(1), N = scales_zeros.size(1);
  TORCH_CHECK(K % kGroup == 0 && N % kBlock == 0 && scales_zeros.size(0) == K / kGroup &&
                  packed.numel() * 2 == N * K,
              "int4_weight_mm: shapes differ");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales_zeros.device().is_cpu(),
              "int4_weight_mm: CPU only");
  const auto xc = x.contiguous();
  const auto pc = packed.contiguous();
  const auto sc = scales_zeros.contiguous();
  auto out = at::empty({M, N}, xc.options().dtype(at::kFloat));
  if (M == 0) return out;
  const auto* xp = xc.data_ptr<at::BFloat16>();
  const auto* pp = pc.data_ptr<uint8_t>();
  const auto* sp = sc.data_ptr<at::BFloat16>();
  std::vector<float> x_sums(M * (K / kGroup));  // each row's sum over each group (at::sum costs ~6 us a call)
  for (int64_t i = 0; i < static_cast<int64_t>(x_sums.size()); ++i) {
    const auto* group = reinterpret_cast<const __m256i*>(xp + i * kGroup);
    const __m512 first = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(group));
    const __m512 second = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(group + 1));
    x_sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
  }
  const float* xs = x_sums.data();
  auto* op = out.data_ptr<float>();
  at::parallel_for(0, N / kBlock, 2, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) int4_block(M, xp, K, pp + b * K * (kBlock / 2), sp, N, b * kBlock, xs, op);
  });
  return out;
}

// The weights themselves, transposed, for a prefill's GEMM (x @ W^T, many rows): bf16 [K, N], the 16 rows
// of a part being 16 consecutive outputs at each column, so each column of a block is written as 128
// contiguous bytes. One pass: 0.5 bytes read and 2 written a weight.
void int4_dequantize_block(const uint8_t* block, int64_t K, const at::BFloat16* scales_zeros, int64_t N,
                           int64_t row0, at::BFloat16* out) {
  const __m512i upper_halves = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512i low_nibble = _mm512_set1_epi32(0x0F);
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512 scale[4], base[4];  // per part: the weight is code * scale + (zero - 8 * scale)
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i pair = _mm512_loadu_si512(scales_zeros + (g * N + row0 + p * 16) * 2);
      scale[p] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      base[p] = _mm512_fnmadd_ps(eight, scale[p], _mm512_castsi512_ps(_mm512_and_si512(pair, upper_halves)));
    }
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) {
      const uint8_t* column = block + k * (kBlock / 2);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(column + (p & 1) * 16)));
        if (p >= 2) codes = _mm512_srli_epi32(codes, 4);
        const __m512 code = _mm512_cvtepi32_ps(_mm512_and_si512(codes, low_nibble));
        const __m256bh value = _mm512_cvtneps_pbh(_mm512_fmadd_ps(code, scale[p], base[p]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k * N + row0 + p * 16), (__m256i)value);
      }
    }
  }
}

at::Tensor int4_dequantize_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t block) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales_zeros.scalar_type() == at::kBFloat16 &&
                  scales_zeros.dim() == 3 && scales_zeros.size(2) == 2 && block == kBlock,
              "int4_dequantize_t: packed uint8 in blocks of 64 rows, scales_zeros bf16 [K / 32, N, 2]");
  TORCH_CHECK(packed.device().is_cpu() && scales_zeros.device().is_cpu(), "int4_dequantize_t: CPU only");
  const int64_t K = scales_zeros.size(0) * kGroup, N = scales_zeros.size(1);
  TORCH_CHECK(N % kBlock == 0 && packed.numel() * 2 == N * K, "int4_dequantize_t: shapes differ");
  const auto pc = packed.contiguous();
  const auto sc = scales_zeros.contiguous();
  auto out = at::empty({K, N}, sc.options());
  const auto* pp = pc.data_ptr<uint8_t>();
  const auto* sp = sc.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) int4_dequantize_block(pp + b * K * (kBlock / 2), K, sp, N, b * kBlock, op);
  });
  return out;
}

}  // namespace

// The op's schema is defined in llava/model/cpu_kernels.py, beside its shape function for torch.compile.
TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) {
  m.impl("int8_weight_mm", &int8_weight_mm);
  m.impl("int8_codes_mm", &int8_codes_mm);
  m.impl("int4_weight_mm", &int4_weight_mm);
  m.impl("int4_dequantize_t", &int4_dequantize_t);
}
