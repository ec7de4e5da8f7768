/* A standalone test of maskparam's tap kernel against a naive convolution, for any
 * instruction set the kernel builds for: run natively, or for ARM64 under qemu-aarch64
 * (tests/c/run_neon.sh). Exits 0 if every case matches, 1 otherwise; prints each case. */
#include "../../maskparam/taps/tapconv.c"

#include <math.h>
#include <stdio.h>

static uint64_t rng = 88172645463325252ull;

static double uniform(void) { /* xorshift64, in [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}

/* Where output position (q, p) of a plane reads tap t of g's taps: the input plane's offset
 * (sq * H * W + row * W + column) within a channel, or -1 where the tap reads padding. */
static int64_t source(const tap_call* g, int64_t q, int64_t p, int64_t t) {
    int64_t sq = q + g->taps[3 * t], sh = p / g->W + g->taps[3 * t + 1];
    int64_t sw = p % g->W + g->taps[3 * t + 2];
    if (sq < 0 || sq >= g->D || sh < 0 || sh >= g->H || sw < 0 || sw >= g->W) return -1;
    return (sq * g->H + sh) * g->W + sw;
}

/* y[n, o, q, p] = bias[o] + sum_{c, t} w[t, c, o] x[n, c, source(q, p, t)] */
static void naive_forward(const tap_call* g, const float* x, const float* w, const float* b,
                          double* y) {
    int64_t P = g->H * g->W;
    for (int64_t n = 0; n < g->N; n++)
        for (int64_t o = 0; o < g->O; o++)
            for (int64_t q = 0; q < g->Do; q++)
                for (int64_t p = 0; p < P; p++) {
                    double s = b ? b[o] : 0.0;
                    for (int64_t t = 0; t < g->T; t++) {
                        int64_t at = source(g, q, p, t);
                        if (at < 0) continue;
                        for (int64_t c = 0; c < g->C; c++)
                            s += (double)w[(t * g->C + c) * g->O + o] *
                                 x[(n * g->C + c) * g->D * P + at];
                    }
                    y[((n * g->O + o) * g->Do + q) * P + p] = s;
                }
}

static int close_enough(const char* what, const float* got, const double* want, int64_t count,
                        double scale) {
    double worst = 0.0;
    for (int64_t i = 0; i < count; i++) {
        double err = fabs(got[i] - want[i]) / (1e-3 * scale + fabs(want[i]));
        if (isnan(err) || err > worst) worst = err; /* a NaN stays: it fails the case */
    }
    if (!(worst <= 1e-4)) printf("  %s: worst relative error %.3g\n", what, worst);
    return worst <= 1e-4;
}

/* The input gradient of sum(y * gy): gx[n, c, source(q, p, t)] += w[t, c, o] gy[n, o, q, p] */
static void naive_input_grad(const tap_call* g, const float* gy, const float* w, double* gx) {
    int64_t P = g->H * g->W;
    for (int64_t i = 0; i < g->N * g->C * g->D * P; i++) gx[i] = 0.0;
    for (int64_t n = 0; n < g->N; n++)
        for (int64_t o = 0; o < g->O; o++)
            for (int64_t q = 0; q < g->Do; q++)
                for (int64_t p = 0; p < P; p++)
                    for (int64_t t = 0; t < g->T; t++) {
                        int64_t at = source(g, q, p, t);
                        if (at < 0) continue;
                        for (int64_t c = 0; c < g->C; c++)
                            gx[(n * g->C + c) * g->D * P + at] +=
                                (double)w[(t * g->C + c) * g->O + o] *
                                gy[((n * g->O + o) * g->Do + q) * P + p];
                    }
}

/* a (N, C, S) to (N, S, C), or back with back set: channels-first to channels-last */
static float* relayout(const float* a, int64_t N, int64_t C, int64_t S, int back) {
    float* b = malloc(sizeof(float) * N * C * S);
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                int64_t first = (n * C + c) * S + s, last = (n * S + s) * C + c;
                if (back) b[first] = a[last];
                else b[last] = a[first];
            }
    return b;
}

/* The channels-last kernel on the case's x and gy (made channels-last here), with tuning
 * (tile, chunk, stream), against the same naive sums. */
static int channels_last_case(const tap_call* g0, const tap_call* gi0, const float* x,
                              const float* gy, const float* w, const float* b,
                              const double* want, const double* want_gx, const double* want_gw,
                              const double* want_gb, int64_t tile, int64_t chunk, int64_t stream,
                              double scale_y, double scale_gx, double scale_w) {
    const int64_t N = g0->N, C = g0->C, D = g0->D, O = g0->O, P = g0->H * g0->W;
    const int64_t KN = g0->kernel;
    tap_call g = *g0, gi = *gi0;
    g.layout = gi.layout = 1;
    g.tile = gi.tile = tile, g.chunk = gi.chunk = chunk, g.stream = gi.stream = stream;
    float* xc = relayout(x, N, C, D * P, 0);
    float* gyc = relayout(gy, N, O, D * P, 0);
    float* yc = alloc64(sizeof(float) * N * O * D * P);
    float* gxc = malloc(sizeof(float) * N * C * D * P);
    float* gw = malloc(sizeof(float) * O * C * KN);
    float* gb = malloc(sizeof(float) * O);
    int ok = tap_forward(&g, xc, w, b, yc) == 0 && tap_forward(&gi, gyc, w, NULL, gxc) == 0 &&
             tap_weight_grad(&g, xc, gyc, gw, gb) == 0;
    float* y = relayout(yc, N, O, D * P, 1);
    float* gx = relayout(gxc, N, C, D * P, 1);
    ok = ok && close_enough("channels-last forward", y, want, N * O * D * P, scale_y);
    ok = ok && close_enough("channels-last input gradient", gx, want_gx, N * C * D * P, scale_gx);
    ok = ok && close_enough("channels-last weight gradient", gw, want_gw, O * C * KN, scale_w);
    ok = ok && close_enough("channels-last bias gradient", gb, want_gb, O, scale_w);
    free(xc), free(gyc), free(yc), free(gxc), free(gw), free(gb), free(y), free(gx);
    return ok;
}

/* One case: the forward, the input gradient, and the weight and bias gradients, against the
 * naive sums in double. The weight is torch's (O, C, kernel), the taps at places 2T - 1,
 * 2T - 3, ..., 1 of a kernel of 2T + 1: the other places hold NaN, which no result may read,
 * and the weight gradient must set to zero. The forward's output starts y_shift floats past
 * a 64-byte boundary. */
static int one_case_at(int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int64_t O,
                       int64_t T, int64_t reach, int64_t y_shift) {
    int64_t taps[3 * 64], index[64], KN = 2 * T + 1;
    if (T > 64) return 0;
    for (int64_t t = 0; t < T; t++) {
        index[t] = 2 * (T - t) - 1;
        for (int a = 0; a < 3; a++)
            taps[3 * t + a] = (a == 0 && D == 1) ? 0 : (int64_t)((uniform() + 1.0) * (reach + 0.5)) - reach;
    }
    tap_call g = {N, C, D, H, W, O, D, T, taps, 2, index, KN, 0, 0, 0, 0, 0};
    /* the input gradient: */
    tap_call gi = {N, O, D, H, W, C, D, T, taps, 2, index, KN, 1, 0, 0, 0, 0};
    int64_t P = H * W;
    float* x = malloc(sizeof(float) * N * C * D * P);
    float* w = malloc(sizeof(float) * O * C * KN);
    float* wo = malloc(sizeof(float) * T * C * O);
    float* b = malloc(sizeof(float) * O);
    float* y_alloc = alloc64(sizeof(float) * (N * O * D * P + y_shift));
    float* y = y_alloc + y_shift;
    float* gx = malloc(sizeof(float) * N * C * D * P);
    float* gw = malloc(sizeof(float) * O * C * KN);
    float* gb = malloc(sizeof(float) * O);
    float* gb_alone = malloc(sizeof(float) * O);
    double* want = malloc(sizeof(double) * N * O * D * P);
    double* want_gx = malloc(sizeof(double) * N * C * D * P);
    double* want_gw = calloc(O * C * KN, sizeof(double));
    double* want_gb = calloc(O, sizeof(double));
    for (int64_t i = 0; i < N * C * D * P; i++) x[i] = (float)uniform();
    for (int64_t i = 0; i < O * C * KN; i++) w[i] = gw[i] = NAN;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t o = 0; o < O; o++)
                wo[(t * C + c) * O + o] = w[(o * C + c) * KN + index[t]] = (float)uniform();
    for (int64_t o = 0; o < O; o++) b[o] = (float)uniform();
    int ok = tap_forward(&g, x, w, b, y) == 0;
    naive_forward(&g, x, wo, b, want);
    ok = ok && close_enough("forward", y, want, N * O * D * P, (double)C * T);
    /* the gradients of sum(y * gy) with gy = want as a float: use y itself */
    ok = ok && tap_forward(&gi, y, w, NULL, gx) == 0;
    naive_input_grad(&g, y, wo, want_gx);
    /* |gy| = |y| <= C * T, so each input gradient is at most O * T * C * T */
    ok = ok && close_enough("input gradient", gx, want_gx, N * C * D * P, (double)O * T * C * T);
    ok = ok && tap_weight_grad(&g, x, y, gw, gb) == 0;
    ok = ok && tap_weight_grad(&g, x, y, NULL, gb_alone) == 0; /* the bias gradient alone */
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < O; o++)
            for (int64_t q = 0; q < D; q++)
                for (int64_t p = 0; p < P; p++) {
                    double gy = y[((n * O + o) * D + q) * P + p];
                    want_gb[o] += gy;
                    for (int64_t t = 0; t < T; t++) {
                        int64_t at = source(&g, q, p, t);
                        if (at < 0) continue;
                        for (int64_t c = 0; c < C; c++)
                            want_gw[(o * C + c) * KN + index[t]] += gy * x[(n * C + c) * D * P + at];
                    }
                }
    double scale = (double)N * D * P * C * T;
    ok = ok && close_enough("weight gradient", gw, want_gw, O * C * KN, scale);
    ok = ok && close_enough("bias gradient", gb, want_gb, O, scale);
    ok = ok && close_enough("bias gradient alone", gb_alone, want_gb, O, scale);
    /* channels-last, with every tile width, rectangles of a row and of the default size, and
       stores streamed where they may be and never */
    for (int64_t tile = 1; tile <= CL_OV_MAX; tile++)
        ok = ok && channels_last_case(&g, &gi, x, y, w, b, want, want_gx, want_gw, want_gb, tile,
                                      tile % 2 ? 1 : 0, tile == 2 ? -1 : 0, (double)C * T,
                                      (double)O * T * C * T, scale);
    printf("%s %s N=%lld C=%lld D=%lld H=%lld W=%lld O=%lld T=%lld weight gradient by %s%s\n",
           ok ? "ok  " : "FAIL", TAP_ISA, (long long)N, (long long)C, (long long)D, (long long)H,
           (long long)W, (long long)O, (long long)T,
           tap_weight_grad_variant(C, O, T) == WG_CHANNELS ? "channels" : "positions",
           y_shift ? ", output a float off alignment" : "");
    free(x), free(w), free(wo), free(b), free(y_alloc), free(gx), free(gw), free(gb);
    free(gb_alone);
    free(want), free(want_gx), free(want_gw), free(want_gb);
    return ok;
}

static int one_case(int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int64_t O, int64_t T,
                    int64_t reach) {
    return one_case_at(N, C, D, H, W, O, T, reach, 0);
}

int main(void) {
    int ok = 1;
    /* planes that fill no vector, some, and many; both weight-gradient variants; 1-, 2-, 3-D */
    ok &= one_case(2, 3, 1, 1, 37, 5, 3, 4);
    ok &= one_case(1, 4, 1, 7, 9, 8, 5, 2);
    ok &= one_case(2, 5, 1, 13, 17, 2 * LANES, 7, 3);
    ok &= one_case(1, 13, 4, 5, 6, 3 * LANES, 7, 1);
    ok &= one_case(2, 3, 5, 6, 7, 5 * LANES, 9, 2);
    ok &= one_case(1, 16, 3, 9, 10, 12, 7, 1);
    ok &= one_case(1, 2, 3, 3, 3, 7, 11, 3);
    /* more (tap, channel) pairs than the forward packs at once, with several blocks of output
       channels; one block (read in place); taps that all miss some planes; wide rows that
       the weight gradient transposes a vector at a time, with a tail */
    ok &= one_case(1, 37, 2, 6, 11, 2 * OB + 3, 9, 2);
    ok &= one_case(2, 37, 2, 6, 11, 3, 9, 2);
    ok &= one_case(1, 5, 2, 5, 9, 2 * OB < PACK_MIN ? 2 * OB : OB + 1, 4, 1);
    ok &= one_case(1, 3, 2, 4, 5, 2 * OB, 3, 4);
    ok &= one_case(1, 6, 1, 3, 2 * LANES + 5, 3 * LANES, 5, 2);
    /* two blocks of output channels over planes a whole number of vectors long: the runs
       whose vectors lie whole and aligned in x are read in place, the others packed */
    ok &= one_case(2, 6, 3, 4, 2 * LANES, 2 * OB, 9, 1);
    /* the same with more pairs to pack than a chunk takes, and taps that all read in place
       (every chunk's runs in place: as many runs as taps) */
    ok &= one_case(1, KC / 2 + 5, 3, 4, 2 * LANES, 2 * OB, 9, 1);
    ok &= one_case(1, 2, 3, 4, 2 * LANES, 2 * OB, 40, 0);
    /* planes the weight gradient takes a rectangle at a time: several rows each, the last
       with fewer; rows longer than a rectangle, in pieces with a shorter last piece */
    ok &= one_case(1, 4, 2, WG_CHUNK / (32 * 2 * LANES) + 3, 32, 2 * LANES, 5, 2);
    ok &= one_case(1, 3, 1, 3, WG_CHUNK / (2 * LANES) + 7, 2 * LANES, 5, 2);
    /* one vector of output channels, by channels: input channels that fill blocks of 8, and
       that leave the last block part-empty */
    ok &= one_case(1, 16, 2, 5, 9, LANES, 5, 2);
    ok &= one_case(2, 17, 1, 6, 7, LANES, 7, 2);
    /* so many output channels that the rectangles take WG_CHUNK_MAX values */
    {
        int64_t many = (WG_CHUNK / WG_MIN_POS / LANES + 1) * LANES;
        ok &= one_case(1, 3, 1, WG_CHUNK_MAX / (many * 32) + 2, 32, many, 5, 2);
    }
    /* outputs of STREAM_MIN per thread (the cases run two threads), packed and not: aligned,
       their whole vectors stream (on AVX-512); a float off, none can */
    for (int64_t shift = 0; shift < 2; shift++) {
        ok &= one_case_at(1, 3, 4, 64, 64, 32, 3, 1, shift);
        ok &= one_case_at(2, 3, 8, 64, 64, 8, 3, 1, shift);
    }
    printf(ok ? "all cases match\n" : "some cases do not match\n");
    return ok ? 0 : 1;
}
