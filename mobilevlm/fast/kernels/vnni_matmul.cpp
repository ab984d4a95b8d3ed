// Matrix products y = x @ W^T with AVX-512 VNNI integer dot products, for group-wise int4 W and per-channel int8 W,
// the activations rounded to 8 bits on the fly (as llama.cpp's Q4_0 x Q8_0 and Q8_0 x Q8_0).
//
// int4 (`int4_mm`)
//
// Why hand-written: torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) converts every weight to bf16
// and runs bf16 FMAs, so decoding is compute-bound at about half of llama.cpp's Q4_0 speed, which quantizes
// the activations to int8 and multiplies with integer dot products. No maintained x86 kernel does int4 x int8
// (torchao's CPU int4 layout is the aten kernel). This is the same idea, on the project's own weight layout.
//
// Weight layout (built by mobilevlm/fast/native.py from the portable [out, in] 4-bit values):
//   weights  uint8 [N/16, K/8, 64]: one 64-byte chunk holds 8 input channels k0..k0+7 of 16 output rows; the
//            4 bytes of row r are (q[r, k0+i] | q[r, k0+4+i] << 4), i = 0..3, so the low nibbles of a chunk
//            are one VNNI operand (4 channels x 16 rows: one int32 lane per row) and the high nibbles another.
//   scales   bf16 [N/16, K/G, 2, 16]: per block of 16 rows and group of G channels, 16 scales then 16 zeros,
//            with w = (q - 8) * scale + zero.
// Activations are quantized per token and group of G channels to int8 (symmetric, max/127); with
// a = sa * qa:  sum_k w*a = scale * sa * (sum q*qa - 8 * sum qa) + zero * sum a.
//
// int8 (`int8_mm`)
//   weights  int8 [N/16, K/4, 64]: one 64-byte chunk holds 4 consecutive input channels of 16 rows (row r's 4 bytes
//            at 4r), the VNNI operand as it is; the portable [N, K] weight reordered in blocks of 16 rows.
//   scales   bf16 [N] (w = q * scale);  row_sums  int32 [N] = sum_k q[n, k].
// Activations are rounded per token to unsigned 8 bits over the token's range, as fbgemm's dynamic int8 linear
// does (the project's earlier int8 path, so its measured quality stands): a = sa * u + amin, and
//   sum_k w*a = scale * (sa * sum q*u + amin * row_sum).
// One scale per token (not per group) lets the int32 sums run over the whole row (at most 255 * 127 * K: no
// overflow below K = 66000) and the weights need no per-group scale reads: decoding is a pure weight stream.
//
// Both: accumulation is exact in int32, then fp32; bf16 inputs give a bf16 result (rounded to nearest even),
// other inputs an fp32 one.
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

void mobilevlm_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);  // spin_pool.cpp

namespace {

constexpr int kRows = 16;   // output rows per block: one int32 lane each
constexpr int kChunk = 8;   // input channels per 64-byte chunk

inline __m512 load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 16 activations as fp32 (the quantizers are vectorized: a scalar pass took ~7 ns an element, 5 ms of a
// 350-token prefill's 2048-wide product)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return load_bf16(reinterpret_cast<const uint16_t*>(p)); }

struct QuantizedActivations {
  std::vector<int8_t> values;  // [M, K]
  std::vector<float> scale;    // [M, K/G]: sa
  std::vector<float> offset;   // [M, K/G]: 8 * sa * sum qa (the "- 8" of the weights)
  std::vector<float> sum;      // [M, K/G]: sum a
};

template <typename In>
QuantizedActivations quantize_activations(const In* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  QuantizedActivations q{std::vector<int8_t>(M * K), std::vector<float>(M * groups),
                         std::vector<float>(M * groups), std::vector<float>(M * groups)};
  // one token's groups (16-44 at 1.7B) are too little work to wake a second thread for
  at::parallel_for(0, M * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t mg = begin; mg < end; ++mg) {
      const In* a = x + (mg / groups) * K + (mg % groups) * G;
      int8_t* qa = q.values.data() + (mg / groups) * K + (mg % groups) * G;
      // G is a multiple of 16 (checked by the caller)
      __m512 vmax = _mm512_setzero_ps(), vtotal = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 v = load16(a + k);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        vtotal = _mm512_add_ps(vtotal, v);
      }
      const float amax = _mm512_reduce_max_ps(vmax), total = _mm512_reduce_add_ps(vtotal);
      const float sa = amax / 127.f;
      const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t k = 0; k < G; k += 16) {
        // rounds to nearest even (the default rounding mode), as std::nearbyint
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(a + k), inverse));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qa + k), _mm512_cvtepi32_epi8(v));
        vsum = _mm512_add_epi32(vsum, v);
      }
      const int32_t qsum = _mm512_reduce_add_epi32(vsum);
      q.scale[mg] = sa;
      q.offset[mg] = 8.f * sa * static_cast<float>(qsum);
      q.sum[mg] = total;
    }
  });
  return q;
}


inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// fp32 -> bf16, rounding to nearest even (AVX512-BF16's instruction is missing on many VNNI CPUs)
inline void store(at::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Calls tile(std::integral_constant<int, T>{}, m) for consecutive token tiles [m, m + T) covering [0, M): tiles of
// Largest tokens, then one of 4 where Largest is larger, then the remainder.
template <int Largest, typename Tile>
void token_tiles(int64_t M, const Tile& tile) {
  int64_t m = 0;
  for (; m + Largest <= M; m += Largest) tile(std::integral_constant<int, Largest>{}, m);
  if constexpr (Largest > 4) {
    if (M - m >= 4) {
      tile(std::integral_constant<int, 4>{}, m);
      m += 4;
    }
  }
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>{}, m); break;
    case 2: tile(std::integral_constant<int, 2>{}, m); break;
    case 1: tile(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Where each token of the tile starting at token m writes the 16 outputs of the block starting at channel n0.
template <int T, typename Out>
std::array<Out*, T> tile_outputs(Out* y, int64_t N, int64_t m, int64_t n0) {
  std::array<Out*, T> out;
  for (int t = 0; t < T; ++t) out[t] = y + (m + t) * N + n0;
  return out;
}

// T tokens against one block of 16 rows: out[t][0..15] = the 16 outputs of token t.
template <int T, typename Out>
void block_tokens(const uint8_t* weights, const uint16_t* scales, const QuantizedActivations& qa,
                  int64_t m0, int64_t K, int64_t G, Out* const out[T]) {
  const int64_t groups = K / G;
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // four independent accumulators per token (low/high nibbles of even/odd chunks): with one or two tokens a
    // single dependency chain of dot products would be latency-bound, not memory-bound
    __m512i dot[T][4];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 4; ++j) dot[t][j] = _mm512_setzero_si512();
    const uint8_t* chunk = weights + g * (G / kChunk) * 64;
    for (int64_t c = 0; c < G / kChunk; c += 2, chunk += 128) {
      const __m512i packed0 = _mm512_loadu_si512(chunk), packed1 = _mm512_loadu_si512(chunk + 64);
      const __m512i lo0 = _mm512_and_si512(packed0, low_mask);
      const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(packed0, 4), low_mask);
      const __m512i lo1 = _mm512_and_si512(packed1, low_mask);
      const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(packed1, 4), low_mask);
      const int64_t k = g * G + c * kChunk;
      for (int t = 0; t < T; ++t) {
        const int8_t* a = qa.values.data() + (m0 + t) * K + k;
        dot[t][0] = _mm512_dpbusd_epi32(dot[t][0], lo0, broadcast4(a));
        dot[t][1] = _mm512_dpbusd_epi32(dot[t][1], hi0, broadcast4(a + 4));
        dot[t][2] = _mm512_dpbusd_epi32(dot[t][2], lo1, broadcast4(a + 8));
        dot[t][3] = _mm512_dpbusd_epi32(dot[t][3], hi1, broadcast4(a + 12));
      }
    }
    const __m512 scale = load_bf16(scales + g * 2 * kRows);
    const __m512 zero = load_bf16(scales + g * 2 * kRows + kRows);
    for (int t = 0; t < T; ++t) {
      const int64_t mg = (m0 + t) * groups + g;
      const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(dot[t][0], dot[t][1]), _mm512_add_epi32(dot[t][2], dot[t][3]));
      const __m512 term = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(qa.scale[mg]),
                                          _mm512_set1_ps(qa.offset[mg]));
      acc[t] = _mm512_fmadd_ps(scale, term, acc[t]);
      acc[t] = _mm512_fmadd_ps(zero, _mm512_set1_ps(qa.sum[mg]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) store(out[t], acc[t]);
}

constexpr int kTokenTile = 4;

template <typename Out>
void run_blocks(const uint8_t* wp, const uint16_t* sp, const QuantizedActivations& qa, int64_t M, int64_t K,
                int64_t G, int64_t blocks, Out* yp) {
  const int64_t N = blocks * kRows, block_bytes = (K / kChunk) * 64, block_scales = (K / G) * 2 * kRows;
  mobilevlm_parallel_for(blocks, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* wb = wp + b * block_bytes;
      const uint16_t* sb = sp + b * block_scales;
      token_tiles<kTokenTile>(M, [&](auto tokens, int64_t m) {
        constexpr int T = decltype(tokens)::value;
        block_tokens<T, Out>(wb, sb, qa, m, K, G, tile_outputs<T>(yp, N, m, b * kRows).data());
      });
    }
  });
}

at::Tensor int4_vnni_mm(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "int4_vnni_mm: x must be [M, K]");
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.dim() == 3 && weights.size(2) == 64,
              "int4_vnni_mm: weights must be uint8 [N/16, K/8, 64]");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.dim() == 4 && scales.size(2) == 2 &&
                  scales.size(3) == kRows,
              "int4_vnni_mm: scales must be bf16 [N/16, K/G, 2, 16]");
  const int64_t M = x.size(0), K = x.size(1), blocks = weights.size(0), N = blocks * kRows;
  TORCH_CHECK(weights.size(1) * kChunk == K && group > 0 && group % (2 * kChunk) == 0 && K % group == 0 &&
                  scales.size(0) == blocks && scales.size(1) == K / group,
              "int4_vnni_mm: shapes do not match (x ", x.sizes(), ", weights ", weights.sizes(), ", scales ",
              scales.sizes(), ", group ", group, ")");
  // bf16 activations are read as they are and the result is written in bf16 (no fp32 copies of either);
  // anything else goes through fp32.
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor xc = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  const at::Tensor w = weights.contiguous(), s = scales.contiguous();
  const QuantizedActivations qa = bf16 ? quantize_activations(xc.data_ptr<at::BFloat16>(), M, K, group)
                                       : quantize_activations(xc.data_ptr<float>(), M, K, group);
  at::Tensor y = at::empty({M, N}, xc.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  if (bf16) {
    run_blocks(wp, sp, qa, M, K, group, blocks, y.data_ptr<at::BFloat16>());
  } else {
    run_blocks(wp, sp, qa, M, K, group, blocks, y.data_ptr<float>());
  }
  return y;
}


// ---------------------------------------------------------------------------------------------------------------
// int8 weights

constexpr int kChannels8 = 4;  // input channels per 64-byte chunk
constexpr int kTokenTile8 = 8;

struct TokenBytes {
  std::vector<uint8_t> values;  // [M, K]: u
  std::vector<float> scale;     // [M]: sa
  std::vector<float> low;       // [M]: amin
};

template <typename In>
TokenBytes quantize_tokens(const In* x, int64_t M, int64_t K) {
  TokenBytes q{std::vector<uint8_t>(M * K), std::vector<float>(M), std::vector<float>(M)};
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const In* a = x + m * K;
      uint8_t* u = q.values.data() + m * K;
      __m512 vlow = _mm512_set1_ps(INFINITY), vhigh = _mm512_set1_ps(-INFINITY);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m512 v = load16(a + k);
        vlow = _mm512_min_ps(vlow, v);
        vhigh = _mm512_max_ps(vhigh, v);
      }
      float low = _mm512_reduce_min_ps(vlow), high = _mm512_reduce_max_ps(vhigh);
      for (; k < K; ++k) {
        low = std::fmin(low, static_cast<float>(a[k]));
        high = std::fmax(high, static_cast<float>(a[k]));
      }
      const float scale = (high - low) / 255.f;
      const float inverse = high > low ? 255.f / (high - low) : 0.f;
      const __m512 vinverse = _mm512_set1_ps(inverse), vlowest = _mm512_set1_ps(low);
      const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
      for (k = 0; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(a + k), vlowest), vinverse);
        const __m512i r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), zero), top);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(u + k), _mm512_cvtepi32_epi8(r));
      }
      for (; k < K; ++k) {
        const float v = std::nearbyint((static_cast<float>(a[k]) - low) * inverse);
        u[k] = static_cast<uint8_t>(std::fmin(std::fmax(v, 0.f), 255.f));
      }
      q.scale[m] = scale;
      q.low[m] = low;
    }
  });
  return q;
}

// T tokens against one block of 16 rows, with C independent dot-product chains per token: one or two tokens
// need four chains to be limited by the weight stream rather than by the latency of one chain; a prefill's
// token tile of 8 hides that latency itself, and two chains keep its 16 accumulators in registers.
template <int T, int C, typename Out>
void block_tokens8(const int8_t* weights, const uint16_t* scales, const int32_t* row_sums, const TokenBytes& qa,
                   int64_t m0, int64_t K, Out* const out[T]) {
  __m512i dot[T][C];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < C; ++j) dot[t][j] = _mm512_setzero_si512();
  const int64_t chunks = K / kChannels8;
  const uint8_t* tokens = qa.values.data() + m0 * K;
  int64_t c = 0;
  for (; c + C <= chunks; c += C) {
    __m512i w[C];
    for (int j = 0; j < C; ++j) w[j] = _mm512_loadu_si512(weights + (c + j) * 64);
    for (int t = 0; t < T; ++t) {
      const int8_t* a = reinterpret_cast<const int8_t*>(tokens + t * K + c * kChannels8);
      for (int j = 0; j < C; ++j) dot[t][j] = _mm512_dpbusd_epi32(dot[t][j], broadcast4(a + 4 * j), w[j]);
    }
  }
  for (; c < chunks; ++c) {
    const __m512i w0 = _mm512_loadu_si512(weights + c * 64);
    for (int t = 0; t < T; ++t) {
      const int8_t* a = reinterpret_cast<const int8_t*>(tokens + t * K + c * kChannels8);
      dot[t][0] = _mm512_dpbusd_epi32(dot[t][0], broadcast4(a), w0);
    }
  }
  const __m512 scale = load_bf16(scales);
  const __m512 sums = _mm512_cvtepi32_ps(_mm512_loadu_si512(row_sums));
  for (int t = 0; t < T; ++t) {
    __m512i total = dot[t][0];
    for (int j = 1; j < C; ++j) total = _mm512_add_epi32(total, dot[t][j]);
    const __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(qa.scale[m0 + t]),
                                         _mm512_mul_ps(sums, _mm512_set1_ps(qa.low[m0 + t])));
    store(out[t], _mm512_mul_ps(scale, value));
  }
}

template <typename Out>
void run_blocks8(const int8_t* wp, const uint16_t* sp, const int32_t* rp, const TokenBytes& qa, int64_t M, int64_t K,
                 int64_t blocks, Out* yp) {
  const int64_t N = blocks * kRows, block_bytes = K * kRows;
  mobilevlm_parallel_for(blocks, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* wb = wp + b * block_bytes;
      const uint16_t* sb = sp + b * kRows;
      const int32_t* rb = rp + b * kRows;
      token_tiles<kTokenTile8>(M, [&](auto tokens, int64_t m) {
        constexpr int T = decltype(tokens)::value;
        block_tokens8<T, (T > 4 ? 2 : 4), Out>(wb, sb, rb, qa, m, K, tile_outputs<T>(yp, N, m, b * kRows).data());
      });
    }
  });
}

at::Tensor int8_vnni_mm(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& scales,
                        const at::Tensor& row_sums) {
  TORCH_CHECK(x.dim() == 2, "int8_mm: x must be [M, K]");
  TORCH_CHECK(weights.scalar_type() == at::kChar && weights.dim() == 3 && weights.size(2) == 64,
              "int8_mm: weights must be int8 [N/16, K/4, 64]");
  const int64_t M = x.size(0), K = x.size(1), blocks = weights.size(0), N = blocks * kRows;
  TORCH_CHECK(weights.size(1) * kChannels8 == K, "int8_mm: x ", x.sizes(), " does not fit weights ", weights.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.dim() == 1 && scales.size(0) == N,
              "int8_mm: scales must be bf16 [", N, "], got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(row_sums.scalar_type() == at::kInt && row_sums.dim() == 1 && row_sums.size(0) == N,
              "int8_mm: row_sums must be int32 [", N, "], got ", row_sums.scalar_type(), " ", row_sums.sizes());
  TORCH_CHECK(K > 0, "int8_mm: empty input channels");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor xc = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  const at::Tensor w = weights.contiguous(), s = scales.contiguous(), r = row_sums.contiguous();
  const TokenBytes qa = bf16 ? quantize_tokens(xc.data_ptr<at::BFloat16>(), M, K)
                             : quantize_tokens(xc.data_ptr<float>(), M, K);
  at::Tensor y = at::empty({M, N}, xc.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  const int32_t* rp = r.data_ptr<int32_t>();
  if (bf16) {
    run_blocks8(wp, sp, rp, qa, M, K, blocks, y.data_ptr<at::BFloat16>());
  } else {
    run_blocks8(wp, sp, rp, qa, M, K, blocks, y.data_ptr<float>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(mobilevlm_vnni, m) {
  m.def("int4_mm(Tensor x, Tensor weights, Tensor scales, int group) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor weights, Tensor scales, Tensor row_sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilevlm_vnni, CPU, m) {
  m.impl("int4_mm", &int4_vnni_mm);
  m.impl("int8_mm", &int8_vnni_mm);
}
