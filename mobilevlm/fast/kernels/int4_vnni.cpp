// int4 x int8 matrix multiplication with AVX-512 VNNI dot products: y = x @ W^T for group-wise int4 W.
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
// Accumulation is fp32; bf16 inputs give a bf16 result (rounded to nearest even), other inputs an fp32 one.
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRows = 16;   // output rows per block: one int32 lane each
constexpr int kChunk = 8;   // input channels per 64-byte chunk

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
      float amax = 0.f, total = 0.f;
      for (int64_t k = 0; k < G; ++k) {
        const float v = static_cast<float>(a[k]);
        amax = std::fmax(amax, std::fabs(v));
        total += v;
      }
      const float sa = amax / 127.f;
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qsum = 0;
      for (int64_t k = 0; k < G; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(a[k]) * inverse));
        qa[k] = static_cast<int8_t>(v);
        qsum += v;
      }
      q.scale[mg] = sa;
      q.offset[mg] = 8.f * sa * static_cast<float>(qsum);
      q.sum[mg] = total;
    }
  });
  return q;
}

inline __m512 load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
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

template <int T, typename Out>
void run_tile(const uint8_t* w, const uint16_t* s, const QuantizedActivations& qa, int64_t m0, int64_t K, int64_t G,
              Out* y, int64_t N, int64_t n0) {
  Out* out[T];
  for (int t = 0; t < T; ++t) out[t] = y + (m0 + t) * N + n0;
  block_tokens<T, Out>(w, s, qa, m0, K, G, out);
}

template <typename Out>
void run_blocks(const uint8_t* wp, const uint16_t* sp, const QuantizedActivations& qa, int64_t M, int64_t K,
                int64_t G, int64_t blocks, Out* yp) {
  const int64_t N = blocks * kRows, block_bytes = (K / kChunk) * 64, block_scales = (K / G) * 2 * kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* wb = wp + b * block_bytes;
      const uint16_t* sb = sp + b * block_scales;
      int64_t m = 0;
      for (; m + kTokenTile <= M; m += kTokenTile) run_tile<kTokenTile>(wb, sb, qa, m, K, G, yp, N, b * kRows);
      switch (M - m) {
        case 3: run_tile<3>(wb, sb, qa, m, K, G, yp, N, b * kRows); break;
        case 2: run_tile<2>(wb, sb, qa, m, K, G, yp, N, b * kRows); break;
        case 1: run_tile<1>(wb, sb, qa, m, K, G, yp, N, b * kRows); break;
        default: break;
      }
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

}  // namespace

TORCH_LIBRARY(mobilevlm_int4, m) {
  m.def("mm(Tensor x, Tensor weights, Tensor scales, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilevlm_int4, CPU, m) {
  m.impl("mm", &int4_vnni_mm);
}
