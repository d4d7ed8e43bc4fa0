// Weight-only and dynamic int8, and weight-only int4, products for a few rows on AVX-512 CPUs, and the
// decode step's attention (built at first use by llava/model/cpu_kernels.py, which says why and where,
// with the figures).
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
#include <cmath>
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

// int4 weights, asymmetric in groups of 32 inputs: w = (code - 8) * scale + zero = code * scale + (zero -
// 8 * scale), codes 0..15, bf16 (scale, zero) pairs.
//
// The activations are taken as int8 codes per group of 32 columns (llama.cpp's q8_0 beside its q4_0):
// x ~= x_scale * q, x_scale = max |x| / 127 over the group, q = round(x / x_scale). Then vpdpbusd (VNNI)
// multiplies 4 codes of a weight row by 4 activation codes at once, 64 products an instruction against
// vdpbf16ps's 32 beside bf16 activations, and the unsigned weight codes need no widening: per group,
// sum_k w x = scale * x_scale * sum_k code q + (zero - 8 * scale) * sum_k x, the last sum taken over the
// exact activations.
//
// llava's row-block layout (`int4_weight_mm`), one stream a block of 16 output rows: per group of 32
// inputs, four 64-byte vectors of codes, then the 16 rows' (scale, zero) pairs (64 bytes), 320 bytes in
// all, so [N / 16, K / 32, 320] uint8. In vector c, dword r holds row r's codes of columns 8c..8c+7: byte
// j the code of column 8c + j in its low nibble and of column 8c + 4 + j in its high one. One vpand and
// one shift give two vectors of 16 rows x 4 columns, each ready for vpdpbusd: no permutation (ATen's
// int4pack layout, column-major in blocks of 64 rows, took two per 4 columns), and the hardware
// prefetcher follows one stream rather than two (ATen keeps the scales [K / 32, N, 2]). bench-200m's and
// bench-1b's layers read from memory as a decode step reads them, Zen 5 EPYC: one row 39-42 GB/s against
// 33-36 from the int4pack bytes, 8 rows 26-30 against 26-29, 512 rows 10% faster.
constexpr int kGroup = 32;
constexpr int kGroupBytes = 320;  // a group of a 16-row block: 4 x 64 bytes of codes, 16 (scale, zero) pairs
constexpr int kBlocks = 4;        // 16-row blocks a tile: 64 output rows, up to 4 x 4 accumulators
constexpr int kInt4Ahead = 4;     // groups ahead that `int4_tile` prefetches: 2, 4 and 8 tried, 2-4 best

// Each row's activations as codes per group (q8_0): codes [M, K] int8, per group x_scale and sum_k x.
struct ActivationCodes {
  std::vector<int8_t> codes;
  std::vector<float> scales, sums;  // [M, K / kGroup]
};

ActivationCodes activation_codes(const at::BFloat16* x, int64_t M, int64_t K) {
  const int64_t groups = M * (K / kGroup);
  ActivationCodes a{std::vector<int8_t>(M * K), std::vector<float>(groups), std::vector<float>(groups)};
  for (int64_t i = 0; i < groups; ++i) {
    const auto* group = reinterpret_cast<const __m256i*>(x + i * kGroup);
    const __m512 first = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(group));
    const __m512 second = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(group + 1));
    a.sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
    const float scale = top / 127.0f;
    a.scales[i] = scale;
    const __m512 divisor = _mm512_set1_ps(scale > 0 ? scale : 1.0f);  // an all-zero group: codes 0
    // x / scale rounded to nearest, ties to even (the default rounding mode), as torch.round.
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_div_ps(first, divisor));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_div_ps(second, divisor));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.codes.data() + i * kGroup), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.codes.data() + i * kGroup + 16), _mm512_cvtsepi32_epi8(q1));
  }
  return a;
}

// A group's 16 (scale, zero) bf16 pairs at `pairs` -> per row the scale, and the value of code 0:
// the weight is code * scale + (zero - 8 * scale).
inline void scales_and_bases(const uint8_t* pairs, __m512& scale, __m512& base) {
  const __m512i pair = _mm512_loadu_si512(pairs);
  scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
  const __m512i upper_halves = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, upper_halves));
  base = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero);
}

// MB activation rows against NB consecutive 16-row blocks. The high nibbles are shifted down, so both
// halves of a vector add into one int32 sum a row and block (summing the high nibbles apart, masked in
// place as 16 x the code, took a second set of accumulators and ran 8 rows 10% slower); each sum takes
// the group's scales once the group is done.
template <int MB, int NB>
void int4_tile(const ActivationCodes& a, int64_t m0, int64_t K, const uint8_t* blocks, int64_t N, int64_t row0,
               float* out) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const int64_t groups = K / kGroup, block_bytes = groups * kGroupBytes;
  __m512 totals[MB][NB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) totals[m][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = blocks + g * kGroupBytes;
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b)
#pragma GCC unroll 5
      for (int line = 0; line < kGroupBytes / 64; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(group + b * block_bytes + kInt4Ahead * kGroupBytes) + 64 * line,
                     _MM_HINT_T0);
    __m512i sums[MB][NB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) sums[m][b] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      __m512i first[NB], second[NB];  // columns 8c..8c+3 and 8c+4..8c+7 of each block's 16 rows
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const __m512i codes = _mm512_loadu_si512(group + b * block_bytes + 64 * c);
        first[b] = _mm512_and_si512(codes, low_nibbles);
        second[b] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low_nibbles);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        int32_t q[2];
        std::memcpy(q, a.codes.data() + (m0 + m) * K + g * kGroup + 8 * c, sizeof(q));
        const __m512i q_first = _mm512_set1_epi32(q[0]), q_second = _mm512_set1_epi32(q[1]);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          sums[m][b] = _mm512_dpbusd_epi32(sums[m][b], first[b], q_first);
          sums[m][b] = _mm512_dpbusd_epi32(sums[m][b], second[b], q_second);
        }
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      __m512 scale, base;
      scales_and_bases(group + b * block_bytes + 256, scale, base);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const int64_t i = (m0 + m) * groups + g;
        const __m512 product = _mm512_mul_ps(scale, _mm512_set1_ps(a.scales[i]));
        totals[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[m][b]), product, totals[m][b]);
        totals[m][b] = _mm512_fmadd_ps(base, _mm512_set1_ps(a.sums[i]), totals[m][b]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + (m0 + m) * N + row0 + 16 * b, totals[m][b]);
}

// Every activation row against NB blocks: 4 rows at a time (a second pass reads the blocks from the
// cache), then the 1-3 left.
template <int NB>
void int4_blocks(const ActivationCodes& a, int64_t M, int64_t K, const uint8_t* blocks, int64_t N, int64_t row0,
                 float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) int4_tile<4, NB>(a, m, K, blocks, N, row0, out);
  if (M - m == 3) int4_tile<3, NB>(a, m, K, blocks, N, row0, out);
  if (M - m == 2) int4_tile<2, NB>(a, m, K, blocks, N, row0, out);
  if (M - m == 1) int4_tile<1, NB>(a, m, K, blocks, N, row0, out);
}

at::Tensor int4_weight_mm(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_weight_mm: x bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kGroupBytes,
              "int4_weight_mm: packed uint8 [N / 16, K / 32, 320] (llava's row-block layout)");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(packed.size(1) * kGroup == K, "int4_weight_mm: shapes differ");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "int4_weight_mm: CPU only");
  const auto xc = x.contiguous();
  const auto pc = packed.contiguous();
  auto out = at::empty({M, N}, xc.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  const ActivationCodes a = activation_codes(xc.data_ptr<at::BFloat16>(), M, K);
  const auto* pp = pc.data_ptr<uint8_t>();
  auto* op = out.data_ptr<float>();
  const int64_t blocks = N / 16, block_bytes = K / kGroup * kGroupBytes;
  at::parallel_for(0, (blocks + kBlocks - 1) / kBlocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kBlocks;
      const uint8_t* tile = pp + first * block_bytes;
      switch (std::min<int64_t>(kBlocks, blocks - first)) {
        case 4: int4_blocks<4>(a, M, K, tile, N, 16 * first, op); break;
        case 3: int4_blocks<3>(a, M, K, tile, N, 16 * first, op); break;
        case 2: int4_blocks<2>(a, M, K, tile, N, 16 * first, op); break;
        default: int4_blocks<1>(a, M, K, tile, N, 16 * first, op); break;
      }
    }
  });
  return out;
}

// The weights themselves, transposed, for a prefill's GEMM on CPUs with AMX (x @ W^T, many rows): bf16
// [K, N]. Each code vector of a block holds 16 rows x 8 columns, so each column comes out as 16
// consecutive outputs; a tile of 4 blocks writes 128 contiguous bytes a column (one block at a time
// wrote 32, and bench-200m's 6144 x 768 weight took 9x as long as its 2304 x 768 one). One pass: 0.625
// bytes read and 2 written a weight.
void int4_dequantize_tile(const uint8_t* blocks, int nb, int64_t K, int64_t N, int64_t row0, at::BFloat16* out) {
  const __m512i low_nibble = _mm512_set1_epi32(0x0F);
  const int64_t block_bytes = K / kGroup * kGroupBytes;
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512 scale[kBlocks], base[kBlocks];  // the weight is code * scale + (zero - 8 * scale)
    for (int b = 0; b < nb; ++b) {
      scales_and_bases(blocks + b * block_bytes + g * kGroupBytes + 256, scale[b], base[b]);
    }
    for (int c = 0; c < 4; ++c) {
      __m512i dwords[kBlocks];  // row r's codes of columns 8c..8c+7, per block
      for (int b = 0; b < nb; ++b) dwords[b] = _mm512_loadu_si512(blocks + b * block_bytes + g * kGroupBytes + 64 * c);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // column 8c + j: byte j % 4, the high nibble from j = 4 on
        at::BFloat16* column = out + (g * kGroup + 8 * c + j) * N + row0;
        for (int b = 0; b < nb; ++b) {
          const __m512i codes = _mm512_and_si512(_mm512_srli_epi32(dwords[b], 8 * (j % 4) + 4 * (j / 4)), low_nibble);
          const __m256bh value = _mm512_cvtneps_pbh(_mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), scale[b], base[b]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(column + 16 * b), (__m256i)value);
        }
      }
    }
  }
}

at::Tensor int4_dequantize_t(const at::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == kGroupBytes,
              "int4_dequantize_t: packed uint8 [N / 16, K / 32, 320] (llava's row-block layout)");
  TORCH_CHECK(packed.device().is_cpu(), "int4_dequantize_t: CPU only");
  const int64_t blocks = packed.size(0), K = packed.size(1) * kGroup, N = blocks * 16;
  const auto pc = packed.contiguous();
  auto out = at::empty({K, N}, pc.options().dtype(at::kBFloat16));
  const auto* pp = pc.data_ptr<uint8_t>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t block_bytes = K / kGroup * kGroupBytes;
  at::parallel_for(0, (blocks + kBlocks - 1) / kBlocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kBlocks;
      const int nb = static_cast<int>(std::min<int64_t>(kBlocks, blocks - first));
      int4_dequantize_tile(pp + first * block_bytes, nb, K, N, 16 * first, op);
    }
  });
  return out;
}

// Decode attention: each head's new query rows (the G query heads sharing a KV head) against the cache's
// filled columns, in fp32 as `attend_one_row` computes it, for one (batch row, KV head) a task. The cache
// is read once per query head (G is 1 for most LLaVA language models; its rows stay in L1/L2 for the
// next), bf16 widened to fp32 by a shift. Scores are one dot product a column (C vectors of 16 and a
// reduction), the softmax's exponentials 16 at a time (`exp_nonpositive`), and the output a sum of value
// rows weighted by them.

// exp(x) for x <= 0 (scores minus their maximum): 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by
// its Taylor series to r^6 (relative error ~1e-7, fp32's own); x below -104 (e^x under fp32's least
// denormal) and -inf give 0.
inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~zero), p, n);
}

constexpr int64_t kKeysAhead = 48;  // 8, 24 and 48 tried: 24 and 48 alike, both ahead of 8

// 16 cache values from `row` as fp32.
template <class T>
inline __m512 load16(const T* row);
template <>
inline __m512 load16<float>(const float* row) { return _mm512_loadu_ps(row); }
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* row) {
  const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

// One query row q [C * 16] against `span` cache columns: out [C * 16] = softmax(q K^T * scale + mask) V.
// `scores` holds span floats.
template <class T, int C>
void attend_row(const float* q, const T* keys, const T* values, int64_t column_stride, const float* mask,
                int64_t span, float scale, float* scores, float* out) {
  __m512 qv[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
  float top = -INFINITY;
  constexpr int64_t kLines = 16 * C * sizeof(T) / 64;  // cache lines a column
  for (int64_t j = 0; j < span; ++j) {
    const T* key = keys + j * column_stride;
    // The cache comes from memory (a step reads ~100 MB of weights between two reads of a layer's cache):
    // prefetch the keys kKeysAhead columns on, and this column's values for the second pass.
#pragma GCC unroll 8
    for (int64_t line = 0; line < kLines; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(key + kKeysAhead * column_stride) + 64 * line, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(values + j * column_stride) + 64 * line, _MM_HINT_T1);
    }
    __m512 acc = _mm512_mul_ps(qv[0], load16(key));
#pragma GCC unroll 8
    for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], load16(key + 16 * c), acc);
    scores[j] = _mm512_reduce_add_ps(acc) + mask[j];
    top = std::max(top, scores[j]);
  }
  __m512 total = _mm512_setzero_ps();
  const __m512 top_v = _mm512_set1_ps(top);
  int64_t j = 0;
  for (; j + 16 <= span; j += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j), top_v));
    _mm512_storeu_ps(scores + j, e);
    total = _mm512_add_ps(total, e);
  }
  if (j < span) {
    const auto valid = static_cast<__mmask16>((1u << (span - j)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + j), top_v));
    _mm512_mask_storeu_ps(scores + j, valid, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, e));
  }
  __m512 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (j = 0; j < span; ++j) {
    const T* value = values + j * column_stride;
    const __m512 weight = _mm512_set1_ps(scores[j]);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(weight, load16(value + 16 * c), acc[c]);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inverse));
}

template <class T, int C>
void attend_all(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), span = mask.size(1);
  const auto* qp = q.data_ptr<float>();
  const auto* kp = keys.data_ptr<T>();
  const auto* vp = values.data_ptr<T>();
  const auto* mp = mask.data_ptr<float>();
  auto* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(span);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const T* k = kp + b * keys.stride(0) + h * keys.stride(1);
      const T* v = vp + b * values.stride(0) + h * values.stride(1);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = (task * G + g) * D;
        attend_row<T, C>(qp + row, k, v, keys.stride(2), mp + b * span, span, scale, scores.data(), op + row);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && mask.dim() == 2 && mask.scalar_type() == at::kFloat,
              "decode_attention: q fp32 [B, kv_heads, group, dim], mask fp32 [B, span]");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.strides() == values.strides() &&
                  keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
              "decode_attention: keys and values alike, fp32 or bf16 [B, kv_heads, capacity, dim]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), span = mask.size(1);
  TORCH_CHECK(keys.size(0) == B && keys.size(1) == H && keys.size(3) == D && mask.size(0) == B &&
                  span >= 1 && span <= keys.size(2) && keys.stride(3) == 1,
              "decode_attention: shapes differ");
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && mask.device().is_cpu(), "decode_attention: CPU only");
  const auto qc = q.contiguous();
  const auto mc = mask.contiguous();
  auto out = at::empty(q.sizes(), qc.options());
  const bool bf16 = keys.scalar_type() == at::kBFloat16;
  const auto f = static_cast<float>(scale);
  switch (D) {
#define LLAVA_ATTEND(C)                                                      \
  case 16 * C:                                                               \
    if (bf16) attend_all<at::BFloat16, C>(qc, keys, values, mc, f, out);     \
    else attend_all<float, C>(qc, keys, values, mc, f, out);                 \
    break;
    LLAVA_ATTEND(1) LLAVA_ATTEND(2) LLAVA_ATTEND(4) LLAVA_ATTEND(5) LLAVA_ATTEND(6) LLAVA_ATTEND(8)
#undef LLAVA_ATTEND
    default: TORCH_CHECK(false, "decode_attention: head dim ", D, " is not 16, 32, 64, 80, 96 or 128");
  }
  return out;
}

}  // namespace

// The op's schema is defined in llava/model/cpu_kernels.py, beside its shape function for torch.compile.
TORCH_LIBRARY_IMPL(llava_cpu, CPU, m) {
  m.impl("int8_weight_mm", &int8_weight_mm);
  m.impl("int8_codes_mm", &int8_codes_mm);
  m.impl("int4_weight_mm", &int4_weight_mm);
  m.impl("int4_dequantize_t", &int4_dequantize_t);
  m.impl("decode_attention", &decode_attention);
}
