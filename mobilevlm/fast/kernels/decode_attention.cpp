// Attention of one new token over a bf16 KV cache, with AVX-512: out[h] = softmax(q[h] . K^T * scale) . V.
//
// Why hand-written: on the CPU, SDPA's flash kernel is slow for bf16 inputs (0.5-0.8 ms a layer at ~230
// positions) and fast for fp32 ones, but then the cache has to be upcast every step; together ~12 ms of a 47 ms
// int4 decode step at 1.7B on one thread. Reading the bf16 cache once and converting in registers is what the
// step's memory traffic allows. Grouped-query attention: head h reads kv head h / (heads / kv_heads).
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <vector>

void mobilevlm_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);  // spin_pool.cpp

namespace {

inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// q [heads, D] (fp32), k/v [kv_heads, capacity, D] bf16 (the cache; positions [0, length) are read),
// returns [heads, D] fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length,
                            double scale) {
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.dim() == 3 &&
                  k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous(),
              "decode_attention: k and v must be contiguous bf16 [kv_heads, capacity, D]");
  TORCH_CHECK(q.dim() == 2, "decode_attention: q must be [heads, D]");
  const int64_t heads = q.size(0), D = q.size(1), kv_heads = k.size(0), capacity = k.size(1);
  TORCH_CHECK(D == k.size(2) && D % 16 == 0 && kv_heads > 0 && heads % kv_heads == 0 && length > 0 &&
                  length <= capacity,
              "decode_attention: shapes do not fit (q ", q.sizes(), ", k ", k.sizes(), ", length ", length, ")");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({heads, D}, qf.options());
  const float* qp = qf.data_ptr<float>();
  const at::BFloat16* kp = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v.data_ptr<at::BFloat16>();
  float* op = out.data_ptr<float>();
  const int64_t group = heads / kv_heads, vectors = D / 16;
  mobilevlm_parallel_for(heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    std::vector<__m512> query(vectors), acc(vectors);
    for (int64_t h = begin; h < end; ++h) {
      const at::BFloat16* keys = kp + (h / group) * capacity * D;
      const at::BFloat16* values = vp + (h / group) * capacity * D;
      for (int64_t i = 0; i < vectors; ++i) query[i] = _mm512_mul_ps(_mm512_loadu_ps(qp + h * D + 16 * i),
                                                                    _mm512_set1_ps(static_cast<float>(scale)));
      float top = -INFINITY;
      for (int64_t t = 0; t < length; ++t) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t i = 0; i < vectors; ++i) dot = _mm512_fmadd_ps(query[i], load16(keys + t * D + 16 * i), dot);
        scores[t] = _mm512_reduce_add_ps(dot);
        top = std::fmax(top, scores[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < length; ++t) {
        scores[t] = std::exp(scores[t] - top);
        total += scores[t];
      }
      for (int64_t i = 0; i < vectors; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t t = 0; t < length; ++t) {
        const __m512 weight = _mm512_set1_ps(scores[t]);
        for (int64_t i = 0; i < vectors; ++i) acc[i] = _mm512_fmadd_ps(weight, load16(values + t * D + 16 * i), acc[i]);
      }
      const __m512 norm = _mm512_set1_ps(1.f / total);
      for (int64_t i = 0; i < vectors; ++i) _mm512_storeu_ps(op + h * D + 16 * i, _mm512_mul_ps(acc[i], norm));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mobilevlm_attention, m) {
  m.def("decode(Tensor q, Tensor k, Tensor v, int length, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilevlm_attention, CPU, m) {
  m.impl("decode", &decode_attention);
}
