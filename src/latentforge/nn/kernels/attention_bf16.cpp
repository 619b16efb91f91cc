// Multi-head attention for bf16 on CPUs with AVX512-BF16 (no AMX): latentforge's own kernel.
//
// Why: on such CPUs PyTorch's flash-attention kernel runs SD's narrow heads (40 wide at the UNet's first
// level) at a third of the bf16 matmul peak; its block products go through a general GEMM call whose
// packing and call overhead dominate when the reduction is 40 long (issue 16, docs/performance.md).
// Here both products use VDPBF16PS directly on operands packed once per head:
//
//   K -> Kp[group of 16 keys][D/2][16]  (uint32 = a pair of bf16 along D: one VDPBF16PS lane)
//   V -> Vp[pair of keys][Dp]           (uint32 = the same column of two consecutive keys; Dp = D
//                                         rounded up to 16, padded with zeros)
//
// and the softmax is the online one of flash attention (running max, exp2 with the scale folded in,
// rescaling the fp32 output accumulator), in fp32, probabilities rounded to bf16 for the second product
// as PyTorch does. The row maxima come from the score tiles' registers (no extra pass over the scores),
// 2^x is a degree-3 polynomial (enough for bf16 probabilities), and a head width of 40 (SD1.5's first
// level) runs its last 8 output channels 256 bits wide instead of padding them to 16. One task = one (batch, head, block of query rows), computed start to end by one
// thread, so results do not depend on the number of threads.
//
// Layout: q, k, v are bf16 with the channel dimension innermost (stride 1) and head h at channels
// [h*D, (h+1)*D); batch and token strides are given in elements. out is (B, Nq, H*D) contiguous.
// Built by latentforge.nn.native with -mavx512f -mavx512bf16 -mavx512bw -mavx512vl -mfma.

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

#ifndef LF_QB
#define LF_QB 64
#endif
#ifndef LF_KB
#define LF_KB 256
#endif
constexpr int QB = LF_QB;    // query rows per task
constexpr int KB = LF_KB;   // keys per softmax block (multiple of 16)

struct Problem {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    int64_t B, H, Nq, Nk, D;
    int64_t q_sb, q_sn, k_sb, k_sn, v_sb, v_sn;
    float scale_log2;  // scale * log2(e)
    int64_t Dp, groups, pairs;  // padded width, key groups of 16, key pairs
    uint32_t *kp, *vp;          // packed K and V of every (batch, head)
};

inline uint32_t pair_at(const uint16_t *p) {
    uint32_t x;
    std::memcpy(&x, p, 4);
    return x;
}

void pack_head(const Problem &pr, int64_t bh) {
    const int64_t b = bh / pr.H, h = bh % pr.H, D = pr.D, half = D / 2;
    const uint16_t *k = pr.k + b * pr.k_sb + h * D;
    const uint16_t *v = pr.v + b * pr.v_sb + h * D;
    uint32_t *kp = pr.kp + bh * pr.groups * half * 16;
    uint32_t *vp = pr.vp + bh * pr.pairs * pr.Dp;
    for (int64_t g = 0; g < pr.groups; ++g)
        for (int64_t lane = 0; lane < 16; ++lane) {
            const int64_t j = g * 16 + lane;
            for (int64_t p = 0; p < half; ++p)
                kp[(g * half + p) * 16 + lane] = j < pr.Nk ? pair_at(k + j * pr.k_sn + 2 * p) : 0u;
        }
    for (int64_t jp = 0; jp < pr.pairs; ++jp) {
        uint32_t *row = vp + jp * pr.Dp;
        const int64_t j0 = 2 * jp, j1 = 2 * jp + 1;
        for (int64_t d = 0; d < pr.Dp; ++d) {
            uint32_t lo = (d < D && j0 < pr.Nk) ? v[j0 * pr.v_sn + d] : 0u;
            uint32_t hi = (d < D && j1 < pr.Nk) ? v[j1 * pr.v_sn + d] : 0u;
            row[d] = lo | (hi << 16);
        }
    }
}

// S[r][c] = q_r . k_c for 4 rows and 4 groups of 16 keys (64 columns): 16 accumulators. The rows'
// running maxima over this block of keys are kept in rmax (16 lanes each) from the accumulators, so the
// softmax does not read S an extra time for them; `last` masks the key lanes past the end of the keys
// in the tile's last group (they are zero padding, not scores).
template <int NG>
inline void scores_tile(const uint16_t *const *qrows, const uint32_t *kp, int64_t half, __mmask16 last, float *s,
                        int64_t s_stride, __m512 *rmax) {
    __m512 acc[4][NG];
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < NG; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < half; ++p) {
        __m512i kv[NG];
        for (int c = 0; c < NG; ++c) kv[c] = _mm512_loadu_si512(kp + (c * half + p) * 16);
        for (int r = 0; r < 4; ++r) {
            __m512bh qb = (__m512bh)_mm512_set1_epi32((int)pair_at(qrows[r] + 2 * p));
            for (int c = 0; c < NG; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, (__m512bh)kv[c]);
        }
    }
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < 4; ++r) {
        __m512 mx = rmax[r];
        for (int c = 0; c < NG; ++c) {
            _mm512_storeu_ps(s + r * s_stride + c * 16, acc[r][c]);
            mx = _mm512_max_ps(mx, c == NG - 1 ? _mm512_mask_mov_ps(neg_inf, last, acc[r][c]) : acc[r][c]);
        }
        rmax[r] = mx;
    }
}

inline void scores_4x4(const uint16_t *const *qrows, const uint32_t *kp, int64_t half, int64_t ngroups,
                       __mmask16 last, float *s, int64_t s_stride, __m512 *rmax) {
    switch (ngroups) {
        case 1: return scores_tile<1>(qrows, kp, half, last, s, s_stride, rmax);
        case 2: return scores_tile<2>(qrows, kp, half, last, s, s_stride, rmax);
        case 3: return scores_tile<3>(qrows, kp, half, last, s, s_stride, rmax);
        default: return scores_tile<4>(qrows, kp, half, last, s, s_stride, rmax);
    }
}

// 2^x for the softmax's x <= 0 (scores minus their running maximum): clamped below at -127 (e^-88: zero
// after the rounding to bf16 and against the row's maximum, which is 1), a degree-3 polynomial on the
// fraction (relative error 7.7e-5, a fiftieth of bf16's rounding of the probabilities) and VSCALEFPS.
constexpr float SOFTMAX_EXP2[] = {7.7907164e-2f, 2.2623319e-1f, 6.9577710e-1f, 9.9992783e-1f};

inline __m512 softmax_exp2(__m512 x) {
    return lf_exp2_in_range(_mm512_max_ps(x, _mm512_set1_ps(-127.0f)), SOFTMAX_EXP2);
}

// O[r][0:16*NV] += sum_j P[r][j] V[j][...] for R rows, over `pairs` key pairs. HALF: the last of the NV
// vectors holds at most 8 output channels (a head width of 40 = 16 + 16 + 8) and runs 256 bits wide,
// half the work of a padded 512-bit vector.
template <int NV, int R, bool HALF>
inline void pv_tile(const uint16_t *P, int64_t p_stride, const uint32_t *vp, int64_t Dp, int64_t pairs, float *O,
                    int64_t o_stride) {
    constexpr int NF = HALF ? NV - 1 : NV;  // full-width vectors
    __m512 acc[R][NF > 0 ? NF : 1];
    __m256 acch[R];
    for (int r = 0; r < R; ++r) {
        for (int v = 0; v < NF; ++v) acc[r][v] = _mm512_loadu_ps(O + r * o_stride + v * 16);
        if (HALF) acch[r] = _mm256_loadu_ps(O + r * o_stride + NF * 16);
    }
    for (int64_t jp = 0; jp < pairs; ++jp) {
        __m512i vv[NF > 0 ? NF : 1];
        for (int v = 0; v < NF; ++v) vv[v] = _mm512_loadu_si512(vp + jp * Dp + v * 16);
        __m256i vh = HALF ? _mm256_loadu_si256((const __m256i *)(vp + jp * Dp + NF * 16)) : _mm256_setzero_si256();
        for (int r = 0; r < R; ++r) {
            __m512i pb = _mm512_set1_epi32((int)pair_at(P + r * p_stride + 2 * jp));
            for (int v = 0; v < NF; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)pb, (__m512bh)vv[v]);
            if (HALF) acch[r] = _mm256_dpbf16_ps(acch[r], (__m256bh)_mm512_castsi512_si256(pb), (__m256bh)vh);
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int v = 0; v < NF; ++v) _mm512_storeu_ps(O + r * o_stride + v * 16, acc[r][v]);
        if (HALF) _mm256_storeu_ps(O + r * o_stride + NF * 16, acch[r]);
    }
}

template <int NV, bool HALF>
void pv_rows(int64_t rows, const uint16_t *P, int64_t p_stride, const uint32_t *vp, int64_t Dp, int64_t pairs,
             float *O, int64_t o_stride) {
    constexpr int R = NV <= 3 ? 8 : (NV <= 4 ? 6 : (NV <= 6 ? 4 : 3));
    int64_t r = 0;
    for (; r + R <= rows; r += R)
        pv_tile<NV, R, HALF>(P + r * p_stride, p_stride, vp, Dp, pairs, O + r * o_stride, o_stride);
    for (; r < rows; ++r) pv_tile<NV, 1, HALF>(P + r * p_stride, p_stride, vp, Dp, pairs, O + r * o_stride, o_stride);
}

template <bool HALF>
void pv_chunk_t(int nv, int64_t rows, const uint16_t *P, int64_t p_stride, const uint32_t *vp, int64_t Dp,
                int64_t pairs, float *O, int64_t o_stride) {
    switch (nv) {
        case 1: return pv_rows<1, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        case 2: return pv_rows<2, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        case 3: return pv_rows<3, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        case 4: return pv_rows<4, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        case 5: return pv_rows<5, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        case 6: return pv_rows<6, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        case 7: return pv_rows<7, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
        default: return pv_rows<8, HALF>(rows, P, p_stride, vp, Dp, pairs, O, o_stride);
    }
}

void pv_chunk(int nv, bool half, int64_t rows, const uint16_t *P, int64_t p_stride, const uint32_t *vp, int64_t Dp,
              int64_t pairs, float *O, int64_t o_stride) {
    if (half) return pv_chunk_t<true>(nv, rows, P, p_stride, vp, Dp, pairs, O, o_stride);
    pv_chunk_t<false>(nv, rows, P, p_stride, vp, Dp, pairs, O, o_stride);
}

void attend(const Problem &pr, int64_t task) {
    const int64_t qblocks = (pr.Nq + QB - 1) / QB;
    const int64_t bh = task / qblocks, qb = task % qblocks;
    const int64_t b = bh / pr.H, h = bh % pr.H, D = pr.D, half = D / 2, Dp = pr.Dp;
    const int64_t r0 = qb * QB, rows = std::min<int64_t>(QB, pr.Nq - r0);
    const int64_t rows4 = (rows + 3) / 4 * 4;
    const uint32_t *kp = pr.kp + bh * pr.groups * half * 16;
    const uint32_t *vp = pr.vp + bh * pr.pairs * Dp;

    thread_local std::vector<float> S, O;
    thread_local std::vector<uint16_t> P;
    S.resize(QB * KB);
    P.resize(QB * KB);
    O.assign(QB * Dp, 0.0f);
    float m[QB], l[QB];
    __m512 rmax[QB];
    for (int r = 0; r < QB; ++r) m[r] = -INFINITY, l[r] = 0.0f;

    const uint16_t *qbase = pr.q + b * pr.q_sb + h * D;
    const __m512 scale = _mm512_set1_ps(pr.scale_log2);
    for (int64_t c0 = 0; c0 < pr.Nk; c0 += KB) {
        const int64_t cols = std::min<int64_t>(KB, pr.Nk - c0);
        const int64_t cgroups = (cols + 15) / 16;
        const __mmask16 last = lf_tail(cols - (cgroups - 1) * 16);  // valid keys of the block's last group
        // scores for this block of keys, and each row's maximum over them
        for (int64_t r = 0; r < rows4; r += 4) {
            const uint16_t *qrows[4];
            for (int i = 0; i < 4; ++i) {
                qrows[i] = qbase + (r0 + std::min<int64_t>(r + i, rows - 1)) * pr.q_sn;
                rmax[r + i] = _mm512_set1_ps(-INFINITY);
            }
            for (int64_t g = 0; g < cgroups; g += 4) {
                const int64_t ng = std::min<int64_t>(4, cgroups - g);
                scores_4x4(qrows, kp + (c0 / 16 + g) * half * 16, half, ng, g + ng == cgroups ? last : 0xFFFF,
                           S.data() + r * KB + g * 16, KB, rmax + r);
            }
        }
        // online softmax: probabilities (bf16) and the rescaled accumulator
        const int64_t pcols = (cols + 1) / 2 * 2;
        const int64_t full = cols / 32 * 32;  // columns taken 32 at a time: no masks, one conversion
        for (int64_t r = 0; r < rows; ++r) {
            float *s = S.data() + r * KB;
            const float mrow = _mm512_reduce_max_ps(rmax[r]) * pr.scale_log2;
            const float mnew = std::max(m[r], mrow);
            const float alpha = std::exp2(m[r] - mnew);  // 0 on the first block (m = -inf)
            const __m512 mv = _mm512_set1_ps(mnew);
            __m512 sum = _mm512_setzero_ps(), sum2 = _mm512_setzero_ps();
            uint16_t *p = P.data() + r * KB;
            int64_t c = 0;
            for (; c < full; c += 32) {
                const __m512 e0 = softmax_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), scale, mv));
                const __m512 e1 = softmax_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s + c + 16), scale, mv));
                sum = _mm512_add_ps(sum, e0);
                sum2 = _mm512_add_ps(sum2, e1);
                _mm512_storeu_si512(p + c, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            for (; c < pcols; c += 16) {
                const int64_t n = std::min<int64_t>(16, cols - c);
                const __mmask16 mask = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
                __m512 x = _mm512_maskz_loadu_ps(mask, s + c);
                __m512 e = _mm512_maskz_mov_ps(mask, softmax_exp2(_mm512_fmsub_ps(x, scale, mv)));
                sum = _mm512_add_ps(sum, e);
                __m256bh eb = _mm512_cvtneps_pbh(e);
                const int64_t store = std::min<int64_t>(16, pcols - c);
                _mm256_mask_storeu_epi16(p + c, (__mmask16)((1u << store) - 1), (__m256i)eb);
            }
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(sum, sum2));
            m[r] = mnew;
            if (alpha != 1.0f) {
                float *o = O.data() + r * Dp;
                const __m512 av = _mm512_set1_ps(alpha);
                for (int64_t d = 0; d < Dp; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
            }
        }
        // O += P V, in chunks of at most 8 vectors of 16 output channels
        const uint32_t *vblock = vp + (c0 / 2) * Dp;
        for (int64_t d0 = 0; d0 < Dp; d0 += 128) {
            const int nv = (int)std::min<int64_t>(8, (Dp - d0) / 16);
            const bool half_last = d0 + 16 * nv == Dp && Dp - D >= 8;  // the last vector holds <= 8 channels
            pv_chunk(nv, half_last, rows, P.data(), KB, vblock + d0, Dp, pcols / 2, O.data() + d0, Dp);
        }
    }
    // normalise and store bf16
    const int64_t C = pr.H * D;
    for (int64_t r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        const float *o = O.data() + r * Dp;
        uint16_t *dst = pr.out + (b * pr.Nq + r0 + r) * C + h * D;
        for (int64_t d = 0; d < D; d += 16) {
            const int64_t n = std::min<int64_t>(16, D - d);
            __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), inv));
            _mm256_mask_storeu_epi16(dst + d, (__mmask16)(n >= 16 ? 0xFFFFu : ((1u << n) - 1)), (__m256i)y);
        }
    }
}

}  // namespace

extern "C" int lf_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B,
                                 int64_t H, int64_t Nq, int64_t Nk, int64_t D, int64_t q_sb, int64_t q_sn,
                                 int64_t k_sb, int64_t k_sn, int64_t v_sb, int64_t v_sn, float scale, int threads) {
    if (D <= 0 || D % 2 != 0 || Nq <= 0 || Nk <= 0 || B <= 0 || H <= 0) return 1;
    Problem pr{q, k, v, out, B, H, Nq, Nk, D, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, scale * 1.4426950408889634f};
    pr.Dp = (D + 15) / 16 * 16;
    pr.groups = (Nk + 15) / 16;
    pr.pairs = (Nk + 1) / 2;
    // whole KB blocks are read by the kernels: pad the packed keys to a multiple of KB
    const int64_t groups_alloc = (Nk + KB - 1) / KB * (KB / 16);
    const int64_t pairs_alloc = groups_alloc * 8;
    std::vector<uint32_t> kp((size_t)(B * H * groups_alloc * (D / 2) * 16));
    std::vector<uint32_t> vp((size_t)(B * H * pairs_alloc * pr.Dp));
    pr.groups = groups_alloc;
    pr.pairs = pairs_alloc;
    pr.kp = kp.data();
    pr.vp = vp.data();
    lf_parallel(B * H, threads, [&](int64_t bh) { pack_head(pr, bh); });
    const int64_t qblocks = (Nq + QB - 1) / QB;
    lf_parallel(B * H * qblocks, threads, [&](int64_t t) { attend(pr, t); });
    return 0;
}
