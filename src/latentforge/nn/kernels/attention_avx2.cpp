// Multi-head attention in fp32 on AVX2 + FMA CPUs (no native bf16, so generation runs in fp32): latentforge's
// own kernel, the fp32 counterpart of attention_bf16.cpp.
//
// Why: PyTorch's flash-attention kernel computes each block product by a general GEMM call; with SD1.5's
// 40-wide heads at the UNet's first level (a fifth of a UNet step) the 40-long reductions leave those
// calls far from the FMA peak (issue 16, docs/performance.md). Here both products are register tiles
// written for these shapes:
//
//   scores: 6 query rows x 16 keys in 12 accumulators, K packed once per head as Kp[group of 8 keys][D][8]
//   output: 6 query rows x 16 output channels in 12 accumulators, V read in place (rows are contiguous)
//
// and the softmax is flash attention's online one (running maximum and sum, the fp32 output accumulator
// rescaled when the maximum grows) with e^x from avx2.h. One task = one (batch, head, block of query rows),
// computed start to end by one thread, so results do not depend on the number of threads.
//
// Layout: q, k, v are fp32 with the channel dimension innermost (stride 1) and head h at channels
// [h*D, (h+1)*D), D a multiple of 8; batch and token strides are given in elements. out is (B, Nq, H*D)
// contiguous.

#include <cmath>
#include <limits>
#include <vector>

#include "avx2.h"

namespace {

constexpr int MR = 6;     // query rows per register tile
#ifndef LF_QB
#define LF_QB 48
#endif
#ifndef LF_KB
#define LF_KB 256
#endif
constexpr int QB = LF_QB;    // query rows per task (a multiple of MR)
constexpr int KB = LF_KB;   // keys per softmax block (a multiple of 16)

struct Problem {
    const float *q, *k, *v;
    float *out;
    int64_t B, H, Nq, Nk, D;
    int64_t q_sb, q_sn, k_sb, k_sn, v_sb, v_sn;
    float scale;
    int64_t groups;  // groups of 8 keys (Nk rounded up; the padding keys are zeros)
    float *kp;       // packed K of every (batch, head): [B*H][groups][D][8]
};

void pack_head(const Problem &pr, int64_t bh) {
    const int64_t b = bh / pr.H, h = bh % pr.H, D = pr.D;
    const float *k = pr.k + b * pr.k_sb + h * D;
    float *kp = pr.kp + bh * pr.groups * D * 8;
    for (int64_t j = 0; j < pr.groups * 8; ++j) {
        float *dst = kp + (j / 8) * D * 8 + j % 8;
        const float *src = k + j * pr.k_sn;
        for (int64_t d = 0; d < D; ++d) dst[d * 8] = j < pr.Nk ? src[d] : 0.0f;
    }
}

// scores of R query rows against W groups of 8 keys (kp: the first group's panel), into s (row stride ld)
template <int R, int W>
inline void qk_tile(const float *const *q, const float *kp, int64_t D, float *s, int64_t ld) {
    __m256 acc[R][W];
    for (int r = 0; r < R; ++r)
        for (int w = 0; w < W; ++w) acc[r][w] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        __m256 kv[W];
        for (int w = 0; w < W; ++w) kv[w] = _mm256_loadu_ps(kp + (w * D + d) * 8);
        for (int r = 0; r < R; ++r) {
            const __m256 qb = _mm256_broadcast_ss(q[r] + d);
            for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(qb, kv[w], acc[r][w]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int w = 0; w < W; ++w) _mm256_storeu_ps(s + r * ld + w * 8, acc[r][w]);
}

// o[r][0 : 8W] += sum over n keys of p[r][j] * v[j][0 : 8W] for R rows (p row stride ld, o row stride ldo)
template <int R, int W>
inline void pv_tile(const float *p, int64_t ld, int64_t n, const float *v, int64_t v_sn, float *o, int64_t ldo) {
    __m256 acc[R][W];
    for (int r = 0; r < R; ++r)
        for (int w = 0; w < W; ++w) acc[r][w] = _mm256_loadu_ps(o + r * ldo + w * 8);
    for (int64_t j = 0; j < n; ++j) {
        __m256 vv[W];
        for (int w = 0; w < W; ++w) vv[w] = _mm256_loadu_ps(v + j * v_sn + w * 8);
        for (int r = 0; r < R; ++r) {
            const __m256 pb = _mm256_broadcast_ss(p + r * ld + j);
            for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(pb, vv[w], acc[r][w]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int w = 0; w < W; ++w) _mm256_storeu_ps(o + r * ldo + w * 8, acc[r][w]);
}

template <int R>
void rows_qk(const float *const *q, const float *kp, int64_t groups, int64_t D, float *s) {
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) qk_tile<R, 2>(q, kp + g * D * 8, D, s + g * 8, KB);
    if (g < groups) qk_tile<R, 1>(q, kp + g * D * 8, D, s + g * 8, KB);
}

template <class F>
void by_rows(int r, F &&fn) {  // fn(std::integral_constant<int, r>) for r in [1, MR]
    switch (r) {
        case 1: return fn(std::integral_constant<int, 1>());
        case 2: return fn(std::integral_constant<int, 2>());
        case 3: return fn(std::integral_constant<int, 3>());
        case 4: return fn(std::integral_constant<int, 4>());
        case 5: return fn(std::integral_constant<int, 5>());
        default: return fn(std::integral_constant<int, 6>());
    }
}

// o[r][d : d + 8W] += p[r] v[:, d : d + 8W] for all rows, a chunk of output channels at a time: the chunk
// of V (kn x 8W) stays in L1 while every row tile passes over it
template <int W>
void pv_chunk(const float *p, int64_t rows, int64_t kn, const float *v, int64_t v_sn, float *o, int64_t D) {
    for (int64_t r0 = 0; r0 < rows; r0 += MR)
        by_rows((int)std::min<int64_t>(MR, rows - r0),
                [&](auto R) { pv_tile<R(), W>(p + r0 * KB, KB, kn, v, v_sn, o + r0 * D, D); });
}

void run_task(const Problem &pr, int64_t task) {
    const int64_t blocks = (pr.Nq + QB - 1) / QB;
    const int64_t bh = task / blocks, i0 = (task % blocks) * QB, rows = std::min<int64_t>(QB, pr.Nq - i0);
    const int64_t b = bh / pr.H, h = bh % pr.H, D = pr.D;
    static thread_local std::vector<float> buf;
    const size_t need = (size_t)QB * KB + (size_t)QB * D + 2 * QB;
    if (buf.size() < need) buf.resize(need);
    float *s = buf.data(), *o = s + QB * KB, *m = o + QB * D, *l = m + QB;
    std::fill(o, o + rows * D, 0.0f);
    std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
    std::fill(l, l + rows, 0.0f);
    const float *qrow[QB];
    for (int64_t r = 0; r < rows; ++r) qrow[r] = pr.q + b * pr.q_sb + (i0 + r) * pr.q_sn + h * D;
    const float *kp_head = pr.kp + bh * pr.groups * D * 8;
    const float *v_head = pr.v + b * pr.v_sb + h * D;
    const float scale_log2 = pr.scale * 1.44269504088896341f;  // e^(scale x) = 2^(scale log2(e) x)
    const __m256 scale = _mm256_set1_ps(scale_log2);
    for (int64_t j0 = 0; j0 < pr.Nk; j0 += KB) {
        const int64_t kn = std::min<int64_t>(KB, pr.Nk - j0), groups = (kn + 7) / 8;
        const float *kp = kp_head + (j0 / 8) * D * 8;
        for (int64_t r0 = 0; r0 < rows; r0 += MR)
            by_rows((int)std::min<int64_t>(MR, rows - r0), [&](auto R) {
                rows_qk<R()>(qrow + r0, kp, groups, D, s + r0 * KB);
            });
        for (int64_t r = 0; r < rows; ++r) {  // the online softmax: s becomes the probabilities
            float *sr = s + r * KB;
            __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
            int64_t j = 0;
            for (; j + 8 <= kn; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sr + j));
            float hi[8];
            _mm256_storeu_ps(hi, mv);
            float mx = *std::max_element(hi, hi + 8);
            for (; j < kn; ++j) mx = std::max(mx, sr[j]);
            const float m_new = std::max(m[r], mx);
            const float alpha = std::exp2((m[r] - m_new) * scale_log2);
            if (alpha != 1.0f) {
                l[r] *= alpha;
                for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
            }
            m[r] = m_new;
            const __m256 shift = _mm256_set1_ps(m_new * scale_log2);
            __m256 sum = _mm256_setzero_ps();
            for (j = 0; j + 8 <= kn; j += 8) {
                const __m256 e = lf_exp2_nonpositive_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(sr + j), scale, shift));
                _mm256_storeu_ps(sr + j, e);
                sum = _mm256_add_ps(sum, e);
            }
            if (j < kn) {
                const __m256i mask = lf_tail_avx2(kn - j);
                const __m256 e = lf_exp2_nonpositive_avx2(_mm256_fmsub_ps(_mm256_maskload_ps(sr + j, mask), scale, shift));
                const __m256 kept = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
                _mm256_maskstore_ps(sr + j, mask, kept);
                sum = _mm256_add_ps(sum, kept);
            }
            _mm256_storeu_ps(hi, sum);
            float total = 0.0f;
            for (float x : hi) total += x;
            l[r] += total;
        }
        const float *v = v_head + j0 * pr.v_sn;
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) pv_chunk<2>(s, rows, kn, v + d, pr.v_sn, o + d, D);
        if (d < D) pv_chunk<1>(s, rows, kn, v + d, pr.v_sn, o + d, D);
    }
    float *out = pr.out + (b * pr.Nq + i0) * pr.H * D + h * D;
    for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < D; ++d) out[r * pr.H * D + d] = o[r * D + d] * inv;
    }
}

}  // namespace

extern "C" int lf_attention_fp32(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t H,
                                 int64_t Nq, int64_t Nk, int64_t D, int64_t q_sb, int64_t q_sn, int64_t k_sb,
                                 int64_t k_sn, int64_t v_sb, int64_t v_sn, float scale, int threads) {
    if (B <= 0 || H <= 0 || Nq <= 0 || Nk <= 0 || D <= 0 || D % 8) return 1;
    Problem pr{q, k, v, out, B, H, Nq, Nk, D, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, scale, (Nk + 7) / 8, nullptr};
    std::vector<float> kp((size_t)(B * H) * pr.groups * D * 8);
    pr.kp = kp.data();
    lf_parallel(B * H, threads, [&](int64_t bh) { pack_head(pr, bh); });
    const int64_t blocks = (Nq + QB - 1) / QB;
    lf_parallel(B * H * blocks, threads, [&](int64_t task) { run_task(pr, task); });
    return 0;
}
