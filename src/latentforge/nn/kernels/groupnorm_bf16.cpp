// GroupNorm (Wu & He 2018), optionally followed by SiLU, on channels-last bf16 activations in two passes
// (statistics, then normalise + affine + SiLU + store) instead of PyTorch's group_norm and silu
// kernels' four (issue 16: "GroupNorm + SiLU fused"). x is (N, HW, C) in memory (NHWC), group g holds
// channels [g*C/G, (g+1)*C/G). Statistics: per-channel fp32 sums over blocks of pixels, added into
// double per group, variance E[x^2] - E[x]^2 in double (biased, as GroupNorm defines it). Output:
// y = x * a_c + s_c with a_c = rstd_g * w_c and s_c = b_c - mean_g * a_c, then silu(y) = y / (1 + e^-y),
// rounded once to bf16. Built with the other kernels (latentforge.nn.native).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t PIXELS = 256;  // pixels per task

}  // namespace

extern "C" int lf_groupnorm_bf16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                                 int64_t N, int64_t HW, int64_t C, int64_t G, float eps, int silu, int threads) {
    if (N <= 0 || HW <= 0 || C <= 0 || G <= 0 || C % G != 0) return 1;
    const int64_t per_group = C / G, chunks = (HW + PIXELS - 1) / PIXELS, tasks = N * chunks;
    std::vector<double> partial((size_t)(tasks * G * 2), 0.0);  // [task][group][sum, sum of squares]
    lf_parallel(tasks, threads, [&](int64_t task) {
        const int64_t n = task / chunks, p0 = (task % chunks) * PIXELS, p1 = std::min(HW, p0 + PIXELS);
        std::vector<float> s((size_t)C, 0.0f), q((size_t)C, 0.0f);
        for (int64_t p = p0; p < p1; ++p) {
            const uint16_t *row = x + (n * HW + p) * C;
            for (int64_t c = 0; c < C; c += 16) {
                const __mmask16 m = lf_tail(C - c);
                __m512 v = lf_load_bf16(row + c, m);
                _mm512_mask_storeu_ps(s.data() + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, s.data() + c), v));
                _mm512_mask_storeu_ps(q.data() + c, m,
                                      _mm512_fmadd_ps(v, v, _mm512_maskz_loadu_ps(m, q.data() + c)));
            }
        }
        double *out_stats = partial.data() + task * G * 2;
        for (int64_t c = 0; c < C; ++c) {
            out_stats[(c / per_group) * 2] += s[(size_t)c];
            out_stats[(c / per_group) * 2 + 1] += q[(size_t)c];
        }
    });
    // per (n, channel): scale and shift
    std::vector<float> scale((size_t)(N * C)), shift((size_t)(N * C));
    const double count = (double)HW * (double)per_group;
    for (int64_t n = 0; n < N; ++n)
        for (int64_t g = 0; g < G; ++g) {
            double sum = 0.0, sq = 0.0;
            for (int64_t t = 0; t < chunks; ++t) {
                sum += partial[(size_t)(((n * chunks + t) * G + g) * 2)];
                sq += partial[(size_t)(((n * chunks + t) * G + g) * 2 + 1)];
            }
            const double mean = sum / count, var = std::max(0.0, sq / count - mean * mean);
            const double rstd = 1.0 / std::sqrt(var + (double)eps);
            for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
                uint32_t wb = weight ? ((uint32_t)weight[c] << 16) : 0x3F800000u;  // 1.0f without weight
                uint32_t bb = bias ? ((uint32_t)bias[c] << 16) : 0u;
                float w, b;
                std::memcpy(&w, &wb, 4);
                std::memcpy(&b, &bb, 4);
                const double a = rstd * (double)w;
                scale[(size_t)(n * C + c)] = (float)a;
                shift[(size_t)(n * C + c)] = (float)((double)b - mean * a);
            }
        }
    const __m512 one = _mm512_set1_ps(1.0f), neg_log2e = _mm512_set1_ps(-1.4426950408889634f);
    lf_parallel(tasks, threads, [&](int64_t task) {
        const int64_t n = task / chunks, p0 = (task % chunks) * PIXELS, p1 = std::min(HW, p0 + PIXELS);
        const float *a = scale.data() + n * C, *s = shift.data() + n * C;
        for (int64_t p = p0; p < p1; ++p) {
            const uint16_t *row = x + (n * HW + p) * C;
            uint16_t *dst = out + (n * HW + p) * C;
            for (int64_t c = 0; c < C; c += 16) {
                const __mmask16 m = lf_tail(C - c);
                __m512 y = _mm512_fmadd_ps(lf_load_bf16(row + c, m), _mm512_maskz_loadu_ps(m, a + c),
                                           _mm512_maskz_loadu_ps(m, s + c));
                if (silu) y = _mm512_div_ps(y, _mm512_add_ps(one, lf_exp2(_mm512_mul_ps(y, neg_log2e))));
                _mm256_mask_storeu_epi16(dst + c, m, (__m256i)_mm512_cvtneps_pbh(y));
            }
        }
    });
    return 0;
}
