// 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016)
// for channels-last bf16 on CPUs with AVX512-BF16: latentforge's own kernel (issue 16).
//
// Why: the UNet's 3x3 convolutions are nearly half of an SD step on the CPU and oneDNN already runs them
// close to the bf16 peak, so the only way to make them faster is fewer multiplications. F(2x2, 3x3)
// computes each 2x2 block of outputs from a 4x4 block of inputs with 16 products per input/output channel
// pair instead of 36 (2.25x fewer), at the cost of two cheap transforms (additions only):
//
//   V = B^T d B   (input tile d, 4x4, per channel)      B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   U = G g G^T   (filter g, 3x3 -> 4x4; done once, in PyTorch, by nn/winograd.py)
//   M[k] = sum_c V[k][c] U[k][c]   (16 matrix products over the channels, k = 4x4 position)
//   Y = A^T M A   (2x2 outputs)                         A^T = [1 1 1 0; 0 1 -1 -1]
//
// lf_wino_input_bf16 writes V for every tile, rounded to bf16, as V[group][k][r][C] (tile = group * 14 + r:
// the 16 matrices of a group of 14 tiles are contiguous). lf_wino_conv_bf16 does
// the products with VDPBF16PS (fp32 accumulation; a register tile of 14 tiles x 32 output channels, the
// left operand read in place with a pair of channels broadcast, the right one packed as
// U[Cout/32][k][C/2][32] uint32 pairs), keeps the 16 partial results of a register tile in a small fp32
// buffer, applies the output transform, adds the bias and an optional residual and rounds once to bf16.
// One task = (block of 32 output channels, run of tiles), start to end on one thread, so results do not
// depend on the number of threads. The error is that of rounding V and U to bf16 (they are sums of
// bf16 values): measured against float64 in tests/test_winograd.py and on whole images by
// benchmarks/bench_winograd.py.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

constexpr int RT = 14;  // tiles per register tile (14 x 2 accumulators)

// which loop lf_wino_conv_bf16 takes: 0 chosen by shape, 1 the few-tiles loop, 2 the many-tiles loop (set
// by lf_wino_set_loop for benchmarks/bench_winograd.py --loops and the tests; both give the same bits)
std::atomic<int> wino_loop{0};

struct Wino {
    const uint16_t *V;
    const uint32_t *U;
    const float *bias;
    const uint16_t *residual;
    uint16_t *out;
    int64_t N, H, W, C, Cout, ty0, BT, TW, T;  // tile rows [ty0, ty0 + BT) of each image
};

inline uint32_t pair_at(const uint16_t *p) {
    uint32_t x;
    std::memcpy(&x, p, 4);
    return x;
}

// acc[r][j] = sum_p V_k[t0 + r][2p, 2p+1] . U_k[p][lanes of vector j] for R tiles, stored to buf[r][32]
template <int R>
inline void product(const uint16_t *a, int64_t C, const uint32_t *u, float *buf) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t K = C / 2;
    for (int64_t p = 0; p < K; ++p) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(u + p * 32);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(u + p * 32 + 16);
        const uint16_t *ap = a + 2 * p;
#pragma GCC unroll 14
        for (int r = 0; r < R; ++r) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)pair_at(ap + r * C));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b, w1);
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(buf + r * 32, acc[r][0]);
        _mm512_storeu_ps(buf + r * 32 + 16, acc[r][1]);
    }
}

void product_any(int64_t R, const uint16_t *a, int64_t C, const uint32_t *u, float *buf) {
    switch (R) {
        case 1: return product<1>(a, C, u, buf);
        case 2: return product<2>(a, C, u, buf);
        case 3: return product<3>(a, C, u, buf);
        case 4: return product<4>(a, C, u, buf);
        case 5: return product<5>(a, C, u, buf);
        case 6: return product<6>(a, C, u, buf);
        case 7: return product<7>(a, C, u, buf);
        case 8: return product<8>(a, C, u, buf);
        case 9: return product<9>(a, C, u, buf);
        case 10: return product<10>(a, C, u, buf);
        case 11: return product<11>(a, C, u, buf);
        case 12: return product<12>(a, C, u, buf);
        case 13: return product<13>(a, C, u, buf);
        default: return product<RT>(a, C, u, buf);
    }
}

// Y = A^T M A for the tiles t0 .. t0+R-1 and output channels [oc, oc+32): M from buf[k][r][32]
void output_tiles(const Wino &w, int64_t t0, int64_t R, int64_t oc, const float *buf) {
    for (int64_t r = 0; r < R; ++r) {
        const int64_t t = t0 + r, n = t / (w.BT * w.TW), ty = w.ty0 + (t / w.TW) % w.BT, tx = t % w.TW;
        for (int v = 0; v < 2; ++v) {
            __m512 m[16];
            for (int k = 0; k < 16; ++k) m[k] = _mm512_loadu_ps(buf + (k * RT + r) * 32 + v * 16);
            __m512 s[2][4];  // A^T M: rows
            for (int j = 0; j < 4; ++j) {
                s[0][j] = _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j]);
                s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
            }
            const __m512 b = w.bias ? _mm512_loadu_ps(w.bias + oc + v * 16) : _mm512_setzero_ps();
            for (int i = 0; i < 2; ++i) {
                const int64_t y = 2 * ty + i;
                if (y >= w.H) continue;
                __m512 o[2];
                o[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), b);
                o[1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), b);
                for (int j = 0; j < 2; ++j) {
                    const int64_t x = 2 * tx + j;
                    if (x >= w.W) continue;
                    const int64_t at = ((n * w.H + y) * w.W + x) * w.Cout + oc + v * 16;
                    __m512 val = o[j];
                    if (w.residual) val = _mm512_add_ps(val, lf_load_bf16(w.residual + at, 0xFFFF));
                    _mm256_storeu_si256((__m256i *)(w.out + at), (__m256i)_mm512_cvtneps_pbh(val));
                }
            }
        }
    }
}

inline __m128i bf16_rne8(__m256 f) {  // 8 floats -> 8 bf16, nearest-even, NaN kept quiet
    const __m256i b = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd), 16);
    const __mmask8 nan = _mm256_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm256_mask_or_epi32(r, nan, _mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
    return _mm256_cvtepi32_epi16(r);
}

}  // namespace

extern "C" {

void lf_wino_set_loop(int loop) { wino_loop.store(loop, std::memory_order_relaxed); }

// V[group][k][r][c] = (B^T d B)[k] for every 4x4 input tile d (rows 2ty-1 .. 2ty+2, columns 2tx-1 .. 2tx+2,
// zero outside the image) of x (N, H, W, C) bf16 channels-last, for the band of tile rows [ty0, ty1) of
// ceil(H/2) (a band bounds V's size); tiles numbered (n, ty - ty0, tx), tx < TW = ceil(W/2)
int lf_wino_input_bf16(const uint16_t *x, uint16_t *V, int64_t N, int64_t H, int64_t W, int64_t C, int64_t ty0,
                       int64_t ty1, int threads) {
    if (N <= 0 || H <= 0 || W <= 0 || C <= 0 || ty0 < 0 || ty1 <= ty0 || ty1 > (H + 1) / 2) return 1;
    const int64_t BT = ty1 - ty0, TW = (W + 1) / 2;
    lf_parallel(N * BT, threads, [&](int64_t task) {
        const int64_t n = task / BT, ty = ty0 + task % BT;
        for (int64_t tx = 0; tx < TW; ++tx) {
            const int64_t t = (n * BT + ty - ty0) * TW + tx;
            for (int64_t c = 0; c < C; c += 16) {
                const __mmask16 mask = lf_tail(C - c);
                __m512 d[4][4];
                for (int i = 0; i < 4; ++i) {
                    const int64_t y = 2 * ty - 1 + i;
                    for (int j = 0; j < 4; ++j) {
                        const int64_t xx = 2 * tx - 1 + j;
                        d[i][j] = (y >= 0 && y < H && xx >= 0 && xx < W)
                                      ? lf_load_bf16(x + ((n * H + y) * W + xx) * C + c, mask)
                                      : _mm512_setzero_ps();
                    }
                }
                __m512 r[4][4];  // B^T d
                for (int j = 0; j < 4; ++j) {
                    r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                    r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                    r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                    r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
                }
                for (int i = 0; i < 4; ++i) {  // (B^T d) B
                    const __m512 v[4] = {_mm512_sub_ps(r[i][0], r[i][2]), _mm512_add_ps(r[i][1], r[i][2]),
                                         _mm512_sub_ps(r[i][2], r[i][1]), _mm512_sub_ps(r[i][1], r[i][3])};
                    for (int j = 0; j < 4; ++j)
                        _mm256_mask_storeu_epi16(V + (((t / RT) * 16 + i * 4 + j) * RT + t % RT) * C + c, mask,
                                                 (__m256i)_mm512_cvtneps_pbh(v[j]));
                }
            }
        }
    });
    return 0;
}

// out (N, H, W, Cout) bf16 channels-last = A^T (sum_c V U) A + bias + residual for the output rows of the
// tile rows [ty0, ty1); V from lf_wino_input_bf16 for the same band, U the packed transformed filters
// (nn/winograd.py), bias fp32 (Cout) or null, residual like out or null
int lf_wino_conv_bf16(const uint16_t *V, const uint32_t *U, const float *bias, const uint16_t *residual,
                      uint16_t *out, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Cout, int64_t ty0,
                      int64_t ty1, int threads) {
    if (N <= 0 || H <= 0 || W <= 0 || C <= 0 || C % 2 || Cout <= 0 || Cout % 32) return 1;
    if (ty0 < 0 || ty1 <= ty0 || ty1 > (H + 1) / 2) return 1;
    const int64_t BT = ty1 - ty0, TW = (W + 1) / 2, T = N * BT * TW;
    const Wino w{V, U, bias, residual, out, N, H, W, C, Cout, ty0, BT, TW, T};
    const int64_t groups = (T + RT - 1) / RT, blocks = Cout / 32, K = C / 2;
    const int loop = wino_loop.load(std::memory_order_relaxed);
    if (loop == 1 || (loop == 0 && 4 * T < Cout)) {
        // Few tiles, many filters (SD1.5's 16x16 level at batch 2: 128 tiles, 1280 output channels; the
        // filters 52 MB, V 5 MB): the loop below would stream every block's filters once per tile group
        // from memory. Here a task is one block of 32 output channels and a batch of up to GB groups: for
        // each position k the block's U[ob][k] (64 C bytes) stays in L2 while the batch's groups pass over
        // it, so the filters are read once per batch and V once per block; the 16 partial results of each
        // group wait in bufs (GB x 28 KB on the stack). The products and their order are the same, so the
        // result is bit for bit the loop's below. With caches cold, as inside a UNet step
        // (benchmarks/bench_winograd.py --loops): 10-20% faster on those shapes, and up to 5% slower where
        // the tiles are as many as the output channels, hence the condition.
        constexpr int64_t GB = 16;
        const int64_t batches = (groups + GB - 1) / GB, per_batch = (groups + batches - 1) / batches;
        lf_parallel(blocks * batches, threads, [&](int64_t task) {
            const int64_t ob = task / batches, g0 = (task % batches) * per_batch;
            const int64_t g1 = std::min(groups, g0 + per_batch);
            alignas(64) float bufs[GB][16 * RT * 32];
            for (int k = 0; k < 16; ++k) {
                const uint32_t *u = U + (ob * 16 + k) * K * 32;
                for (int64_t g = g0; g < g1; ++g)
                    product_any(std::min<int64_t>(RT, T - g * RT), V + (g * 16 + k) * RT * C, C, u,
                                bufs[g - g0] + k * RT * 32);
            }
            for (int64_t g = g0; g < g1; ++g)
                output_tiles(w, g * RT, std::min<int64_t>(RT, T - g * RT), ob * 32, bufs[g - g0]);
        });
        return 0;
    }
    // A task takes a run of tile groups whose V (16 x RT x C bf16 each) stays in the core's L2 while every
    // block of output channels in its share passes over it: V is read from memory once, the filters
    // (smaller per block) from the shared cache. With few groups the output channels are split too.
    const int64_t per = std::max<int64_t>(1, std::min<int64_t>(4, (256 << 10) / (16 * RT * C * 2)));
    const int64_t runs = (groups + per - 1) / per;
    const int64_t want = 4 * (int64_t)std::max(threads, 1);
    const int64_t chunks = std::min(blocks, std::max<int64_t>(1, (want + runs - 1) / runs));
    const int64_t per_chunk = (blocks + chunks - 1) / chunks;
    lf_parallel(runs * chunks, threads, [&](int64_t task) {
        const int64_t run = task / chunks, chunk = task % chunks;
        alignas(64) float buf[16 * RT * 32];
        const int64_t g_end = std::min(groups, (run + 1) * per);
        const int64_t ob_end = std::min(blocks, (chunk + 1) * per_chunk);
        for (int64_t ob = chunk * per_chunk; ob < ob_end; ++ob)
            for (int64_t g = run * per; g < g_end; ++g) {
                const int64_t t0 = g * RT, R = std::min<int64_t>(RT, T - t0);
                for (int k = 0; k < 16; ++k)
                    product_any(R, V + (g * 16 + k) * RT * C, C, U + (ob * 16 + k) * K * 32, buf + k * RT * 32);
                output_tiles(w, t0, R, ob * 32, buf);
            }
    });
    return 0;
}

// U = G g G^T of every 3x3 filter g (bf16, element strides so_, si, sh, sw: any layout), in double,
// rounded to nearest-even bf16 and packed as U[Cout/32][k = 4i + j][C/2][32][2]: lane l of block ob is
// output channel 32 ob + l, member e of pair p input channel 2p + e.     G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
// Sums of at most nine bf16 values halved twice are exact in double; each is rounded to float, then to
// bf16 (PyTorch's float64 -> bf16 conversion rounds the same two steps). For a pair p the 64 filters
// (lane, e) are gathered as floats into S[tap][2 lane + e], then transformed eight at a time in AVX-512
// doubles: their 16 outputs are rows of 8 contiguous bf16 in U.
int lf_wino_filter_bf16(const uint16_t *g, int64_t so_, int64_t si, int64_t sh, int64_t sw, uint16_t *U,
                        int64_t Cout, int64_t C, int threads) {
    if (Cout <= 0 || Cout % 32 || C <= 0 || C % 2) return 1;
    const int64_t pairs = C / 2;
    // a task fills whole 128-byte rows U[ob][k][p][0:32][0:2] for a run of channel pairs: 32 pairs are one
    // 4 KiB page per position k (U is page-aligned and SD's pair counts are multiples of 32), so no two
    // threads fault on the same fresh page (with 8 pairs they did: 1.8x the faults, 1.5x the time)
    constexpr int64_t PAIRS_PER_TASK = 32;
    const int64_t runs = (pairs + PAIRS_PER_TASK - 1) / PAIRS_PER_TASK;
    lf_parallel((Cout / 32) * runs, threads, [&](int64_t task) {
        const int64_t ob = task / runs, p_end = std::min(pairs, (task % runs + 1) * PAIRS_PER_TASK);
        alignas(64) float S[9][64];
        for (int64_t p = (task % runs) * PAIRS_PER_TASK; p < p_end; ++p) {
            for (int64_t lane = 0; lane < 32; ++lane)
                for (int64_t e = 0; e < 2; ++e) {
                    const uint16_t *f = g + (ob * 32 + lane) * so_ + (2 * p + e) * si;
                    for (int i = 0; i < 3; ++i)
                        for (int j = 0; j < 3; ++j) {
                            const uint32_t b = (uint32_t)f[i * sh + j * sw] << 16;
                            std::memcpy(&S[i * 3 + j][lane * 2 + e], &b, 4);
                        }
                }
            for (int f0 = 0; f0 < 64; f0 += 8) {
                __m512d w[3][3], t[4][3];
                for (int i = 0; i < 3; ++i)
                    for (int j = 0; j < 3; ++j) w[i][j] = _mm512_cvtps_pd(_mm256_load_ps(&S[i * 3 + j][f0]));
                const __m512d half = _mm512_set1_pd(0.5);
                for (int j = 0; j < 3; ++j) {  // G g
                    t[0][j] = w[0][j];
                    t[1][j] = _mm512_mul_pd(half, _mm512_add_pd(_mm512_add_pd(w[0][j], w[1][j]), w[2][j]));
                    t[2][j] = _mm512_mul_pd(half, _mm512_add_pd(_mm512_sub_pd(w[0][j], w[1][j]), w[2][j]));
                    t[3][j] = w[2][j];
                }
                for (int i = 0; i < 4; ++i) {  // (G g) G^T
                    const __m512d u[4] = {
                        t[i][0], _mm512_mul_pd(half, _mm512_add_pd(_mm512_add_pd(t[i][0], t[i][1]), t[i][2])),
                        _mm512_mul_pd(half, _mm512_add_pd(_mm512_sub_pd(t[i][0], t[i][1]), t[i][2])), t[i][2]};
                    for (int j = 0; j < 4; ++j)
                        _mm_storeu_si128((__m128i *)(U + ((ob * 16 + i * 4 + j) * pairs + p) * 64 + f0),
                                         bf16_rne8(_mm512_cvtpd_ps(u[j])));
                }
            }
        }
    });
    return 0;
}

}  // extern "C"
