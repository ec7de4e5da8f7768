/* maskparam's active-tap convolution kernel for x86-64 CPUs with AVX-512, float32.
 *
 * Built at first use by maskparam/_tap_kernel.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes; without a C compiler or AVX-512, maskparam runs the same layers box by box.
 *
 * A stride-1 convolution with T active taps, in the layout torch gives by default
 * (channels-first, contiguous), over "planes": x is (N, C, D, P) with P = H * W, y is
 * (N, O, Do, P) with the same H and W. Tap t reads the input plane taps[3t] away, at the
 * position (taps[3t+1], taps[3t+2]) away in (H, W); a read outside the input is zero. So
 *
 *     y[n, o, q, (h, w)] = bias[o] + sum_{c, t} w[t, c, o] * x[n, c, q + dq_t, (h + dh_t, w + dw_t)]
 *
 * Every plane is flat and contiguous, so a tap is a constant offset into it: 16 output
 * positions are one vector, and lanes whose source falls outside the plane (across a row
 * end, or past the top or bottom) are masked off as the vector loads. A 2-D conv has D = 1,
 * a 1-D conv also H = 1. The input gradient is the same sum with the taps negated and the
 * weight transposed; tap_weight_grad gives the weight (and bias) gradient.
 */
#ifndef __AVX512F__
#error "maskparam's tap kernel needs AVX-512 (compile with -march=native on such a CPU)"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NV 3 /* vectors of 16 positions per output tile */
#define OB 8 /* output channels per tile: NV * OB = 24 accumulators */

static __mmask16 range_mask(int64_t start, int64_t lo, int64_t hi) {
    /* lanes i with lo <= start + i < hi */
    int64_t a = lo - start, b = hi - start;
    if (a < 0) a = 0;
    if (b > 16) b = 16;
    if (b <= a) return 0;
    return (__mmask16)((((uint32_t)1 << b) - 1) & ~(((uint32_t)1 << a) - 1));
}

/* masks[t * nvec + v]: the lanes of vector v (positions 16v ...) whose tap-t source lies in
 * the plane; masks[T * nvec + v]: the lanes inside the plane at all. */
static __mmask16* plane_masks(int64_t H, int64_t W, int64_t T, const int64_t* taps, int64_t nvec) {
    int64_t P = H * W;
    __mmask16* masks = (__mmask16*)malloc(sizeof(__mmask16) * (T + 1) * nvec);
    if (!masks) return NULL;
    for (int64_t t = 0; t < T; t++)
        for (int64_t v = 0; v < nvec; v++) {
            __mmask16 m = 0;
            for (int i = 0; i < 16; i++) {
                int64_t p = v * 16 + i;
                if (p >= P) break;
                int64_t h = p / W + taps[3 * t + 1], w = p % W + taps[3 * t + 2];
                if (h >= 0 && h < H && w >= 0 && w < W) m |= (__mmask16)(1u << i);
            }
            masks[t * nvec + v] = m;
        }
    for (int64_t v = 0; v < nvec; v++) masks[T * nvec + v] = range_mask(v * 16, 0, P);
    return masks;
}

/* y = conv(x): wp is (T, C, Opad) and bias (Opad) or NULL, Opad = O rounded up to OB with
 * zeros. Returns 0, or -1 if out of memory (y untouched then). */
int tap_forward(const float* x, const float* wp, const float* bias, float* y, int64_t N,
                int64_t C, int64_t D, int64_t H, int64_t W, int64_t O, int64_t Do, int64_t T,
                const int64_t* taps, int nthreads) {
    int64_t P = H * W, nvec = (P + 15) / 16, tiles = (nvec + NV - 1) / NV;
    int64_t Opad = (O + OB - 1) / OB * OB;
    __mmask16* masks = plane_masks(H, W, T, taps, tiles * NV);
    if (!masks) return -1;
    const int64_t mstride = tiles * NV;
    const __mmask16* inside = masks + T * mstride;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t* toff = (int64_t*)malloc(sizeof(int64_t) * (T + 1));
        int64_t* tidx = (int64_t*)malloc(sizeof(int64_t) * (T + 1));
        if (!toff || !tidx) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t job = 0; job < N * Do * tiles; job++) {
                int64_t n = job / (Do * tiles), q = (job / tiles) % Do, tile = job % tiles;
                int64_t nt = 0;
                for (int64_t t = 0; t < T; t++) {
                    int64_t sq = q + taps[3 * t];
                    if (sq < 0 || sq >= D) continue; /* the whole plane is padding */
                    toff[nt] = sq * P + taps[3 * t + 1] * W + taps[3 * t + 2];
                    tidx[nt++] = t;
                }
                int64_t p0 = tile * 16 * NV;
                for (int64_t o0 = 0; o0 < Opad; o0 += OB) {
                    __m512 acc[OB][NV];
                    for (int o = 0; o < OB; o++) {
                        __m512 b = _mm512_set1_ps(bias ? bias[o0 + o] : 0.f);
                        for (int v = 0; v < NV; v++) acc[o][v] = b;
                    }
                    for (int64_t k = 0; k < nt; k++) {
                        const __mmask16* mk = masks + tidx[k] * mstride + tile * NV;
                        __mmask16 mv[NV];
                        for (int v = 0; v < NV; v++) mv[v] = mk[v];
                        const float* src = x + n * C * D * P + p0 + toff[k];
                        const float* wt = wp + tidx[k] * C * Opad + o0;
                        for (int64_t c = 0; c < C; c++, src += D * P, wt += Opad) {
                            __m512 xv[NV];
#pragma GCC unroll 8
                            for (int v = 0; v < NV; v++) xv[v] = _mm512_maskz_loadu_ps(mv[v], src + 16 * v);
#pragma GCC unroll 16
                            for (int o = 0; o < OB; o++) {
                                __m512 wv = _mm512_set1_ps(wt[o]);
#pragma GCC unroll 8
                                for (int v = 0; v < NV; v++) acc[o][v] = _mm512_fmadd_ps(wv, xv[v], acc[o][v]);
                            }
                        }
                    }
                    for (int o = 0; o < OB && o0 + o < O; o++) {
                        float* yo = y + ((n * O + o0 + o) * Do + q) * P + p0;
                        for (int v = 0; v < NV; v++)
                            _mm512_mask_storeu_ps(yo + 16 * v, inside[tile * NV + v], acc[o][v]);
                    }
                }
            }
        }
        free(toff);
        free(tidx);
    }
    free(masks);
    return failed ? -1 : 0;
}

#define WO 8 /* output channels per weight-gradient tile */
#define WK 3 /* (input channel, tap) pairs per tile: WO * WK = 24 accumulators */

/* The weight gradient with positions in the vector lanes, for any O: each thread sums
 * vectors of 16 partial sums per (slot, o) over the planes it takes, and the threads' sums
 * add up at the end. */
static int wg_lanes(const float* x, const float* g, float* gwp, float* gb, int64_t N, int64_t C,
                    int64_t D, int64_t H, int64_t W, int64_t O, int64_t Do, int64_t T,
                    const int64_t* taps, int nthreads) {
    int64_t P = H * W, nvec = (P + 15) / 16;
    int64_t K = C * T + 1; /* slots: each (c, t), then the bias; then one that takes padding */
    int64_t Opad = (O + WO - 1) / WO * WO;
    int64_t slots = (K + 1) * Opad * 16;
    __mmask16* masks = plane_masks(H, W, T, taps, nvec);
    float* zeros = (float*)aligned_alloc(64, sizeof(float) * 16 * nvec);
    float* ones = (float*)aligned_alloc(64, sizeof(float) * 16 * nvec);
    float* acc_all = (float*)aligned_alloc(64, sizeof(float) * slots * nthreads);
    int failed = !masks || !zeros || !ones || !acc_all;
    if (!failed) {
        for (int64_t i = 0; i < 16 * nvec; i++) zeros[i] = 0.f, ones[i] = 1.f;
        for (int64_t i = 0; i < slots * nthreads; i++) acc_all[i] = 0.f;
    }
    const __mmask16* inside = failed ? NULL : masks + T * nvec;
#pragma omp parallel num_threads(nthreads) if (!failed)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        int64_t cap = K + WK;
        const float** src = (const float**)malloc(sizeof(float*) * cap);
        const __mmask16** msk = (const __mmask16**)malloc(sizeof(__mmask16*) * cap);
        int64_t* slot = (int64_t*)malloc(sizeof(int64_t) * cap);
        if (!failed && (!src || !msk || !slot)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float* accb = acc_all + (int64_t)tid * slots;
#pragma omp for schedule(static)
            for (int64_t job = 0; job < N * Do; job++) {
                int64_t n = job / Do, q = job % Do, nk = 0;
                for (int64_t c = 0; c < C; c++)
                    for (int64_t t = 0; t < T; t++) {
                        int64_t sq = q + taps[3 * t];
                        if (sq < 0 || sq >= D) continue;
                        src[nk] = x + ((n * C + c) * D + sq) * P + taps[3 * t + 1] * W + taps[3 * t + 2];
                        msk[nk] = masks + t * nvec;
                        slot[nk++] = c * T + t;
                    }
                if (gb) src[nk] = ones, msk[nk] = inside, slot[nk++] = C * T;
                while (nk % WK) src[nk] = zeros, msk[nk] = inside, slot[nk++] = K;
                for (int64_t o0 = 0; o0 < Opad; o0 += WO) {
                    const float* gp[WO];
                    for (int j = 0; j < WO; j++)
                        gp[j] = o0 + j < O ? g + ((n * O + o0 + j) * Do + q) * P : zeros;
                    for (int64_t k0 = 0; k0 < nk; k0 += WK) {
                        __m512 acc[WK][WO];
                        for (int k = 0; k < WK; k++)
                            for (int j = 0; j < WO; j++)
                                acc[k][j] = _mm512_load_ps(accb + (slot[k0 + k] * Opad + o0 + j) * 16);
                        for (int64_t v = 0; v < nvec; v++) {
                            __m512 gv[WO];
                            for (int j = 0; j < WO; j++)
                                gv[j] = _mm512_maskz_loadu_ps(inside[v], gp[j] + v * 16);
#pragma GCC unroll 8
                            for (int k = 0; k < WK; k++) {
                                __m512 xv = _mm512_maskz_loadu_ps(msk[k0 + k][v], src[k0 + k] + v * 16);
                                for (int j = 0; j < WO; j++) acc[k][j] = _mm512_fmadd_ps(gv[j], xv, acc[k][j]);
                            }
                        }
                        for (int k = 0; k < WK; k++)
                            for (int j = 0; j < WO; j++)
                                _mm512_store_ps(accb + (slot[k0 + k] * Opad + o0 + j) * 16, acc[k][j]);
                    }
                }
            }
        }
        free(src);
        free(msk);
        free(slot);
    }
    if (!failed)
        for (int64_t s = 0; s < K; s++)
            for (int64_t o = 0; o < O; o++) {
                __m512 sum = _mm512_setzero_ps();
                for (int th = 0; th < nthreads; th++)
                    sum = _mm512_add_ps(sum, _mm512_load_ps(acc_all + th * slots + (s * Opad + o) * 16));
                float v = _mm512_reduce_add_ps(sum);
                if (s < C * T) gwp[s * O + o] = v;
                else if (gb) gb[o] = v;
            }
    free(acc_all);
    free(zeros);
    free(ones);
    free(masks);
    return failed ? -1 : 0;
}

/* Weight gradient with the output channels in the vector lanes: for O a multiple of 16.
 * Each thread copies a plane of g to position-major order (P, O), then for each tap and
 * block of input channels sums x (broadcast) times a row of that copy over the positions
 * where the tap reads inside the plane, in registers. */
#define WG_KERNEL(OV, SB)                                                                      \
    static void wg_block_##OV##_##SB(const float* const* xs, const float* gT, int64_t O,        \
                                     int64_t W, int64_t h0, int64_t h1, int64_t w0,             \
                                     int64_t w1, int64_t ha, int64_t wa, int64_t cw,            \
                                     float* out, int64_t out_stride) {                          \
        __m512 acc[SB][OV];                                                                     \
        for (int i = 0; i < SB; i++)                                                            \
            for (int v = 0; v < OV; v++) acc[i][v] = _mm512_setzero_ps();                       \
        for (int64_t h = h0; h < h1; h++) {                                                     \
            const float* gp = gT + ((h - ha) * cw + (w0 - wa)) * O;                             \
            for (int64_t w = w0; w < w1; w++, gp += O) {                                        \
                int64_t p = h * W + w;                                                          \
                __m512 gv[OV];                                                                  \
                for (int v = 0; v < OV; v++) gv[v] = _mm512_loadu_ps(gp + 16 * v);              \
                for (int i = 0; i < SB; i++) {                                                  \
                    __m512 xb = _mm512_set1_ps(xs[i][p]);                                       \
                    for (int v = 0; v < OV; v++)                                                \
                        acc[i][v] = _mm512_fmadd_ps(xb, gv[v], acc[i][v]);                      \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < SB; i++)                                                            \
            for (int v = 0; v < OV; v++) {                                                      \
                float* dst = out + i * out_stride + 16 * v;                                     \
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[i][v]));          \
            }                                                                                   \
    }
#define WG_CHUNK (1 << 16)
WG_KERNEL(4, 6)
WG_KERNEL(3, 8)
WG_KERNEL(2, 12)
WG_KERNEL(1, 12)
WG_KERNEL(4, 4)
WG_KERNEL(2, 8)
WG_KERNEL(1, 8)

/* One rectangle [ha, hb) x [wa, wb) of output plane q of sample n: its g, position-major,
 * into gT (row stride cw positions), then every tap's sums over the part of the rectangle
 * where that tap reads inside the plane. */
static void wg_rect(const float* x, const float* gq, float* gT, float* accw, float* accb,
                    int64_t n, int64_t q, int64_t C, int64_t D, int64_t H, int64_t W, int64_t O,
                    int64_t Do, int64_t T, const int64_t* taps, const float* zeros, int64_t ha,
                    int64_t hb, int64_t wa, int64_t wb, int64_t cw) {
    int64_t P = H * W;
    for (int64_t h = ha; h < hb; h++)
        for (int64_t o0 = 0; o0 < O; o0 += 16)
            for (int64_t w0 = wa; w0 < wb; w0 += 16) {
                int64_t we = w0 + 16 < wb ? w0 + 16 : wb;
                for (int64_t o = o0; o < o0 + 16; o++) {
                    const float* row = gq + o * Do * P + h * W;
                    float* dst = gT + (h - ha) * cw * O + o;
                    for (int64_t w = w0; w < we; w++) dst[(w - wa) * O] = row[w];
                }
            }
    if (accb)
        for (int64_t o0 = 0; o0 < O; o0 += 16) {
            __m512 s = _mm512_setzero_ps();
            for (int64_t h = ha; h < hb; h++)
                for (int64_t w = wa; w < wb; w++)
                    s = _mm512_add_ps(s, _mm512_loadu_ps(gT + ((h - ha) * cw + (w - wa)) * O + o0));
            _mm512_storeu_ps(accb + o0, _mm512_add_ps(_mm512_loadu_ps(accb + o0), s));
        }
    for (int64_t t = 0; t < T; t++) {
        int64_t sq = q + taps[3 * t], dh = taps[3 * t + 1], dw = taps[3 * t + 2];
        if (sq < 0 || sq >= D) continue;
        int64_t h0 = dh < 0 ? -dh : 0, h1 = dh > 0 ? H - dh : H;
        int64_t w0 = dw < 0 ? -dw : 0, w1 = dw > 0 ? W - dw : W;
        if (h0 < ha) h0 = ha;
        if (h1 > hb) h1 = hb;
        if (w0 < wa) w0 = wa;
        if (w1 > wb) w1 = wb;
        if (h1 <= h0 || w1 <= w0) continue;
        for (int64_t o0 = 0; o0 < O; o0 += 64) {
            int ov = (O - o0) / 16 < 4 ? (int)((O - o0) / 16) : 4;
            /* the larger block, unless the smaller divides C and the larger not */
            int big = ov == 4 ? 6 : ov == 3 ? 8 : 12, small = ov == 4 ? 4 : 8;
            int sb = ov == 3 || (C % big && !(C % small)) || C <= small ? small : big;
            for (int64_t c0 = 0; c0 < C; c0 += sb) {
                const float* xs[12];
                for (int i = 0; i < sb; i++)
                    xs[i] = c0 + i < C ? x + ((n * C + c0 + i) * D + sq) * P + dh * W + dw : zeros;
                float* out = accw + (c0 * T + t) * O + o0;
                const float* gt = gT + o0;
                int64_t os = T * O;
                switch (ov * 100 + sb) {
                    case 406: wg_block_4_6(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                    case 404: wg_block_4_4(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                    case 308: wg_block_3_8(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                    case 212: wg_block_2_12(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                    case 208: wg_block_2_8(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                    case 112: wg_block_1_12(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                    default: wg_block_1_8(xs, gt, O, W, h0, h1, w0, w1, ha, wa, cw, out, os); break;
                }
            }
        }
    }
}

static int wg_channels(const float* x, const float* g, float* gw, float* gb, int64_t N, int64_t C,
                      int64_t D, int64_t H, int64_t W, int64_t O, int64_t Do, int64_t T,
                      const int64_t* taps, int nthreads) {
    /* per thread: (C + 12, T, O) weight sums (rows past C take the zero channels that pad
       the last block), then O bias sums */
    int64_t P = H * W, G = (C + 12) * T * O;
    /* g goes position-major a rectangle at a time, at most WG_CHUNK values: whole rows
       while they fit, else pieces of one row */
    int64_t ch = 1, cw = W;
    if (W * O <= WG_CHUNK) ch = WG_CHUNK / (W * O);
    else cw = WG_CHUNK / O > 16 ? WG_CHUNK / O : 16;
    float* zeros = (float*)calloc(P, sizeof(float));
    float* acc_all = (float*)calloc((G + O) * nthreads, sizeof(float));
    int failed = !zeros || !acc_all;
#pragma omp parallel num_threads(nthreads) if (!failed)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float* gT = (float*)aligned_alloc(64, sizeof(float) * ch * cw * O);
        if (!failed && !gT) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float* accw = acc_all + (int64_t)tid * (G + O);
            float* accb = gb ? accw + G : NULL; /* no bias sums unless asked for */
#pragma omp for schedule(static)
            for (int64_t job = 0; job < N * Do; job++) {
                int64_t n = job / Do, q = job % Do;
                const float* gq = g + (n * O * Do + q) * P;
                for (int64_t ha = 0; ha < H; ha += ch)
                    for (int64_t wa = 0; wa < W; wa += cw) {
                        int64_t hb = ha + ch < H ? ha + ch : H, wb = wa + cw < W ? wa + cw : W;
                        wg_rect(x, gq, gT, accw, accb, n, q, C, D, H, W, O, Do, T, taps, zeros,
                                ha, hb, wa, wb, cw);
                    }
            }
        }
        free(gT);
    }
    if (!failed) {
        for (int64_t i = 0; i < C * T * O; i++) {
            float s = 0.f;
            for (int th = 0; th < nthreads; th++) s += acc_all[th * (G + O) + i];
            gw[i] = s;
        }
        if (gb)
            for (int64_t o = 0; o < O; o++) {
                float s = 0.f;
                for (int th = 0; th < nthreads; th++) s += acc_all[th * (G + O) + G + o];
                gb[o] = s;
            }
    }
    free(zeros);
    free(acc_all);
    return failed ? -1 : 0;
}

/* gwp[c, t, o] = sum_{n, q, p} g[n, o, q, p] * x[n, c, q + dq_t, p + off_t], and
 * gb[o] = sum g[n, o, q, p] unless gb is NULL. Returns 0, or -1 if out of memory. */
int tap_weight_grad(const float* x, const float* g, float* gwp, float* gb, int64_t N, int64_t C,
                    int64_t D, int64_t H, int64_t W, int64_t O, int64_t Do, int64_t T,
                    const int64_t* taps, int nthreads) {
    /* Channels in the lanes when they fill at least two vectors: then each position's
       products stay in registers. Fewer, and the lanes hold positions. */
    if (O % 16 == 0 && O >= 32)
        return wg_channels(x, g, gwp, gb, N, C, D, H, W, O, Do, T, taps, nthreads);
    return wg_lanes(x, g, gwp, gb, N, C, D, H, W, O, Do, T, taps, nthreads);
}
