// The transforms of Winograd's F(2x2, 3x3) in fp32 (AVX2): the input transform V = B^T d B of every 4x4
// input tile and the output transform A^T M A of the products, for nn/winograd.py's conv3x3_fp32, which
// runs the 16 products in between as one batched MKL product. Done in PyTorch ops, each transform took
// several passes over memory (padding the input, the rows, then the columns; the output's row sums, then
// its columns, then the bias): a third of the convolution's time at SD1.5's first level. Here each is one
// pass, the zero padding read as zeros instead of written, the bias added on the way out.
//
// Layout: x is NHWC (a channels-last (N, C, H, W) tensor), H and W even, C and Cout multiples of 8. Tiles of
// a band of tile rows [ty0, ty1) are numbered t = (n * (ty1 - ty0) + ty - ty0) * (W / 2) + tx; V is (16, tiles,
// C) and M (16, tiles, Cout) with position p = 4i + j of the 4x4 transformed tile; out is NHWC (N, H, W, Cout).

#include <algorithm>
#include <cmath>
#include <vector>

#include "avx2.h"

namespace {

// silu(x a + b) per channel of the 4 input rows of tile row ty (rows outside the map and the columns either
// side of it zeros: the convolution pads the normalised map), into buf (4, w + 2, c)
void normalise_rows(const float *x, int64_t b, int64_t h, int64_t w, int64_t c, int64_t ty, const float *scale,
                    const float *shift, float *buf) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < 4; ++i) {
        float *row = buf + i * (w + 2) * c;
        const int64_t y = 2 * ty - 1 + i;
        std::fill(row, row + c, 0.0f);
        std::fill(row + (w + 1) * c, row + (w + 2) * c, 0.0f);
        if (y < 0 || y >= h) {
            std::fill(row + c, row + (w + 1) * c, 0.0f);
            continue;
        }
        const float *src = x + (b * h + y) * w * c;
        for (int64_t xx = 0; xx < w; ++xx)
            for (int64_t c0 = 0; c0 < c; c0 += 8) {
                const __m256 z = _mm256_fmadd_ps(_mm256_loadu_ps(src + xx * c + c0), _mm256_loadu_ps(scale + c0),
                                                 _mm256_loadu_ps(shift + c0));
                const __m256 e = lf_exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), z));  // silu(z) = z / (1 + e^-z)
                _mm256_storeu_ps(row + (xx + 1) * c + c0, _mm256_div_ps(z, _mm256_add_ps(one, e)));
            }
    }
}

}  // namespace

// scale, shift: nullptr, or (n, c) arrays: the input is then silu(x scale + shift) per image and channel
// (a GroupNorm folded into an affine map by lf_groupnorm_affine_fp32, and the SiLU after it), made for the
// tile row's 4 input rows as it is transformed, so the normalised map is never written out
extern "C" int lf_wino_input_fp32(const float *x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t ty0,
                                  int64_t ty1, float *v, const float *scale, const float *shift, int threads) {
    if (h % 2 || w % 2 || c % 8 || ty0 < 0 || ty1 > h / 2 || ty0 >= ty1 || (!scale != !shift)) return 1;
    const int64_t tw = w / 2, rows = ty1 - ty0, tiles = n * rows * tw;
    lf_parallel(n * rows, threads, [&](int64_t task) {
        const int64_t b = task / rows, ty = ty0 + task % rows;
        static thread_local std::vector<float> buf;
        if (scale) {
            buf.resize((size_t)4 * (w + 2) * c);
            normalise_rows(x, b, h, w, c, ty, scale + b * c, shift + b * c, buf.data());
        }
        for (int64_t tx = 0; tx < tw; ++tx) {
            const int64_t t = task * tw + tx;
            const float *src[4][4];  // the 16 input pixels of the tile (nullptr: the zero padding)
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) {
                    const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
                    if (scale)
                        src[i][j] = buf.data() + (i * (w + 2) + xx + 1) * c;
                    else
                        src[i][j] = (y < 0 || y >= h || xx < 0 || xx >= w) ? nullptr : x + ((b * h + y) * w + xx) * c;
                }
            for (int64_t c0 = 0; c0 < c; c0 += 8) {
                __m256 d[4][4];
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j)
                        d[i][j] = src[i][j] ? _mm256_loadu_ps(src[i][j] + c0) : _mm256_setzero_ps();
                __m256 r[4][4];  // B^T d: rows
                for (int j = 0; j < 4; ++j) {
                    r[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
                    r[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
                    r[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
                    r[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
                }
                for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns
                    float *dst = v + ((int64_t)(4 * i) * tiles + t) * c + c0;
                    _mm256_storeu_ps(dst, _mm256_sub_ps(r[i][0], r[i][2]));
                    _mm256_storeu_ps(dst + tiles * c, _mm256_add_ps(r[i][1], r[i][2]));
                    _mm256_storeu_ps(dst + 2 * tiles * c, _mm256_sub_ps(r[i][2], r[i][1]));
                    _mm256_storeu_ps(dst + 3 * tiles * c, _mm256_sub_ps(r[i][1], r[i][3]));
                }
            }
        }
    });
    return 0;
}

extern "C" int lf_wino_output_fp32(const float *m, const float *bias, float *out, int64_t n, int64_t h, int64_t w,
                                   int64_t k, int64_t ty0, int64_t ty1, int threads) {
    if (h % 2 || w % 2 || k % 8 || ty0 < 0 || ty1 > h / 2 || ty0 >= ty1) return 1;
    const int64_t tw = w / 2, rows = ty1 - ty0, tiles = n * rows * tw;
    lf_parallel(n * rows, threads, [&](int64_t task) {
        const int64_t b = task / rows, ty = ty0 + task % rows;
        for (int64_t tx = 0; tx < tw; ++tx) {
            const int64_t t = task * tw + tx;
            float *dst = out + ((b * h + 2 * ty) * w + 2 * tx) * k;
            for (int64_t k0 = 0; k0 < k; k0 += 8) {
                __m256 s[2][4];  // A^T M: rows; A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
                for (int j = 0; j < 4; ++j) {
                    const float *p = m + ((int64_t)j * tiles + t) * k + k0;
                    const __m256 m0 = _mm256_loadu_ps(p), m1 = _mm256_loadu_ps(p + 4 * tiles * k);
                    const __m256 m2 = _mm256_loadu_ps(p + 8 * tiles * k), m3 = _mm256_loadu_ps(p + 12 * tiles * k);
                    s[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
                    s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
                }
                const __m256 bv = bias ? _mm256_loadu_ps(bias + k0) : _mm256_setzero_ps();
                for (int a = 0; a < 2; ++a) {  // (A^T M) A: columns, then the bias
                    float *row = dst + a * w * k + k0;
                    _mm256_storeu_ps(row, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[a][0], s[a][1]), s[a][2]), bv));
                    _mm256_storeu_ps(row + k, _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[a][1], s[a][2]), s[a][3]), bv));
                }
            }
        }
    });
    return 0;
}

// GroupNorm of NHWC x (n, hw pixels, c channels in `groups` groups) folded into a per-image, per-channel
// affine map: scale = gamma rstd, shift = beta - mean scale ((n, c) each; gamma, beta nullptr: 1 and 0), the
// statistics in double (the biased variance, as GroupNorm's). Tasks sum blocks of pixels per channel;
// the blocks' sums are added in a fixed order, so the result does not depend on the thread count.
extern "C" int lf_groupnorm_affine_fp32(const float *x, int64_t n, int64_t hw, int64_t c, int64_t groups, float eps,
                                        const float *gamma, const float *beta, float *scale, float *shift,
                                        int threads) {
    if (n <= 0 || hw <= 0 || c % 8 || groups <= 0 || c % groups) return 1;
    const int64_t block = 256, blocks = (hw + block - 1) / block;
    std::vector<double> sums((size_t)n * blocks * c * 2);
    lf_parallel(n * blocks, threads, [&](int64_t task) {
        const int64_t b = task / blocks, p0 = (task % blocks) * block, p1 = std::min(hw, p0 + block);
        double *s = sums.data() + task * c * 2;  // (c sums, c sums of squares)
        for (int64_t c0 = 0; c0 < c; c0 += 8) {
            __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), q0 = s0, q1 = s0;
            for (int64_t p = p0; p < p1; ++p) {
                const __m256 v = _mm256_loadu_ps(x + (b * hw + p) * c + c0);
                const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
                s0 = _mm256_add_pd(s0, lo), s1 = _mm256_add_pd(s1, hi);
                q0 = _mm256_fmadd_pd(lo, lo, q0), q1 = _mm256_fmadd_pd(hi, hi, q1);
            }
            _mm256_storeu_pd(s + c0, s0), _mm256_storeu_pd(s + c0 + 4, s1);
            _mm256_storeu_pd(s + c + c0, q0), _mm256_storeu_pd(s + c + c0 + 4, q1);
        }
    });
    const int64_t per = c / groups;
    for (int64_t b = 0; b < n; ++b)
        for (int64_t g = 0; g < groups; ++g) {
            double sum = 0.0, sq = 0.0;
            for (int64_t k = 0; k < blocks; ++k) {
                const double *s = sums.data() + (b * blocks + k) * c * 2;
                for (int64_t ch = g * per; ch < (g + 1) * per; ++ch) sum += s[ch], sq += s[c + ch];
            }
            const double count = (double)hw * per, mean = sum / count;
            const double var = std::max(0.0, sq / count - mean * mean), rstd = 1.0 / std::sqrt(var + eps);
            for (int64_t ch = g * per; ch < (g + 1) * per; ++ch) {
                const double a = (gamma ? gamma[ch] : 1.0) * rstd;
                scale[b * c + ch] = (float)a;
                shift[b * c + ch] = (float)((beta ? beta[ch] : 0.0) - mean * a);
            }
        }
    return 0;
}
