// What latentforge's AVX-512 kernels share: 2^x on 16 floats (attention's softmax, GEGLU's erf, SiLU), bf16
// loads, tail masks; and (parallel.h) the threads that run a kernel's tasks.
// x is clamped to [-127, 127]; 2^f on the fraction f in [0, 1) is a degree-4 polynomial (least squares on
// Chebyshev nodes, relative error 2.7e-6, far below bf16's 3.9e-3), and VSCALEFPS multiplies by 2^n.
#pragma once
#include <immintrin.h>

#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

// 2^x for x in [-127, 127]: 2^f on the fraction f in [0, 1) by the polynomial with coefficients c (highest
// degree first, Horner), times 2^n by VSCALEFPS
template <int N>
inline __m512 lf_exp2_in_range(__m512 x, const float (&c)[N]) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

constexpr float LF_EXP2_DEGREE4[] = {1.3520603e-2f, 5.2037429e-2f, 2.4142750e-1f, 6.9300663e-1f, 1.0000025f};

inline __m512 lf_exp2(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    return lf_exp2_in_range(x, LF_EXP2_DEGREE4);
}

// 16 bf16 values (masked) widened to fp32
inline __m512 lf_load_bf16(const uint16_t *p, __mmask16 m) {
    __m256i raw = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// the mask of the first min(n, 16) lanes
inline __mmask16 lf_tail(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
