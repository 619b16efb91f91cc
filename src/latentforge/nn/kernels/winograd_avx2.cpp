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

#include "avx2.h"

extern "C" int lf_wino_input_fp32(const float *x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t ty0,
                                  int64_t ty1, float *v, int threads) {
    if (h % 2 || w % 2 || c % 8 || ty0 < 0 || ty1 > h / 2 || ty0 >= ty1) return 1;
    const int64_t tw = w / 2, rows = ty1 - ty0, tiles = n * rows * tw;
    lf_parallel(n * rows, threads, [&](int64_t task) {
        const int64_t b = task / rows, ty = ty0 + task % rows;
        for (int64_t tx = 0; tx < tw; ++tx) {
            const int64_t t = task * tw + tx;
            const float *src[4][4];  // the 16 input pixels of the tile (nullptr: the zero padding)
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) {
                    const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
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
