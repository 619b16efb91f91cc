// GEGLU's elementwise half in fp32 (AVX2 + FMA): out = (value + b_value) * gelu(gate + b_gate) with
// [value, gate] the two halves of each row of the projection's output h = x W^T (made without its bias,
// by MKL), GELU the exact one, g/2 (1 + erf(g / sqrt 2)). One pass reads h and writes out; PyTorch's plain
// ops made the biased product (copying the bias into it first), then GELU and the product, each a pass
// of its own (nn/native_avx2.py, docs/performance.md).

#include "avx2.h"

extern "C" int lf_geglu_fp32(const float *h, int64_t h_row, const float *bias, float *out, int64_t out_row,
                             int64_t rows, int64_t f, int threads) {
    if (rows < 0 || f <= 0 || h_row < 2 * f || out_row < f) return 1;
    const int64_t per_task = std::max<int64_t>(1, (1 << 15) / f);  // rows per task: about 32K outputs
    const int64_t tasks = (rows + per_task - 1) / per_task;
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 rsqrt2 = _mm256_set1_ps(0.70710678118654752f);
    auto geglu = [&](__m256 v, __m256 g) {
        const __m256 e = lf_erf_avx2(_mm256_mul_ps(g, rsqrt2));
        return _mm256_mul_ps(v, _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, e)));
    };
    lf_parallel(tasks, threads, [&](int64_t task) {
        const int64_t r1 = std::min(rows, (task + 1) * per_task);
        for (int64_t r = task * per_task; r < r1; ++r) {
            const float *value = h + r * h_row, *gate = value + f;
            float *o = out + r * out_row;
            int64_t j = 0;
            for (; j + 8 <= f; j += 8) {
                __m256 v = _mm256_loadu_ps(value + j), g = _mm256_loadu_ps(gate + j);
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j)), g = _mm256_add_ps(g, _mm256_loadu_ps(bias + f + j));
                _mm256_storeu_ps(o + j, geglu(v, g));
            }
            if (j < f) {  // the last f % 8 columns: lanes past them read and write nothing
                const __m256i m = lf_tail_avx2(f - j);
                __m256 v = _mm256_maskload_ps(value + j, m), g = _mm256_maskload_ps(gate + j, m);
                if (bias) v = _mm256_add_ps(v, _mm256_maskload_ps(bias + j, m)), g = _mm256_add_ps(g, _mm256_maskload_ps(bias + f + j, m));
                _mm256_maskstore_ps(o + j, m, geglu(v, g));
            }
        }
    });
    return 0;
}
