/* The tap kernel for channels-last input: included by tapconv.c, after its primitives.
 *
 * Layout. x is (N, D, H, W, C) and y (N, Do, H, W, O): torch's channels_last (2-D, D = 1)
 * and channels_last_3d. The taps and the weight are as in tapconv.c. A position's channels
 * are contiguous, so the conv is, per tap, a small matrix product: the positions of a row
 * times the tap's (C, O) slice of the weight. The lanes hold output channels (as oneDNN's
 * NDHWC convolutions do), and each product broadcasts one input value to a vector of them:
 *
 *     y[n, q, h, w, o:o+LANES] += x[n, q + dq, h + dh, w + dw, c] * wp[t, c, o:o+LANES]
 *
 * Forward (and input gradient, the taps negated and the weight transposed, as in tapconv.c):
 * in parallel over output rows (n, q, h); then blocks of OV vectors of output channels; then
 * tiles of PB positions of the row, PB * OV sums in registers; then the taps that read inside
 * the depth and height; then the input channels. A tap that reads along the row (a column
 * offset) reads a per-thread copy of its source row instead, padded with zeros at both
 * ends, so that no tile checks bounds. The weight is packed (T, C, Opad), Opad = O rounded up
 * to LANES with zeros, so the last vector of output channels needs no mask but at its store.
 * With few output channels (at most a vector's worth), a lane holds one output channel and
 * one of four input channels instead (cl_forward_kp, "few output channels" below).
 *
 * Weight gradient: in parallel over rectangles of rows of an output plane; then the taps;
 * then blocks of SB input channels and OV vectors of output channels, SB * OV sums in
 * registers; then the positions of the rectangle where the tap reads inside the plane, each
 * one load of g's channels (contiguous: no transposition) and SB broadcasts of x's. Each
 * thread keeps (T, C, Opad) partial sums that add up at the end.
 *
 * Tuning (tap_call's stream, tile and chunk, 0 for the defaults; maskparam/taps/tune.py
 * picks them per CPU by timing): whether large outputs are stored around the caches, the
 * most vectors of output channels per forward tile (wide, few positions; or narrow, many),
 * and the floats of x and g per rectangle of the weight gradient.
 */

/* Tiles: positions per forward tile (PB), input channels per weight-gradient block (SB),
 * per count OV of output-channel vectors. PB * OV + OV + 1 (or SB * OV + OV + 1) registers:
 * 32 on AVX-512 and NEON, 16 on AVX2. */
#if LANES == 8
#define CL_OV_MAX 2
#define CL_OV_DEFAULT 2
#else
#define CL_OV_MAX 4
#define CL_OV_DEFAULT 3
#endif
#define CL_CHUNK_DEFAULT (1 << 13) /* floats of x and g per weight-gradient rectangle */

/* The grid of (OV, size) that every family of tiles below is built for: CL_GRID(M) defines
 * M's function for each, CL_TABLE(f) lists f's functions by [OV][rank], and cl_size gives
 * each rank's size (PB or SB). Per OV, the largest size first: a row of positions, or the
 * input channels, split into the largest that fit what is left, so nothing past the end is
 * computed. */
#define CL_SIZES 5
#if CL_OV_MAX == 4
#define CL_GRID(M)                                                                              \
    M(1, 16) M(1, 8) M(1, 4) M(1, 2) M(1, 1) M(2, 12) M(2, 8) M(2, 4) M(2, 2) M(2, 1)          \
    M(3, 8) M(3, 4) M(3, 2) M(3, 1) M(4, 6) M(4, 4) M(4, 2) M(4, 1)
#define CL_TABLE(f)                                                                             \
    {{0},                                                                                       \
     {f##_1_16, f##_1_8, f##_1_4, f##_1_2, f##_1_1},                                            \
     {f##_2_12, f##_2_8, f##_2_4, f##_2_2, f##_2_1},                                            \
     {f##_3_8, f##_3_4, f##_3_2, f##_3_1, 0},                                                   \
     {f##_4_6, f##_4_4, f##_4_2, f##_4_1, 0}}
static const int cl_size[CL_OV_MAX + 1][CL_SIZES] = {
    {0}, {16, 8, 4, 2, 1}, {12, 8, 4, 2, 1}, {8, 4, 2, 1, 0}, {6, 4, 2, 1, 0}};
#else
#define CL_GRID(M) M(1, 12) M(1, 8) M(1, 4) M(1, 2) M(1, 1) M(2, 6) M(2, 4) M(2, 2) M(2, 1)
#define CL_TABLE(f)                                                                             \
    {{0},                                                                                       \
     {f##_1_12, f##_1_8, f##_1_4, f##_1_2, f##_1_1},                                            \
     {f##_2_6, f##_2_4, f##_2_2, f##_2_1, 0}}
static const int cl_size[CL_OV_MAX + 1][CL_SIZES] = {{0}, {12, 8, 4, 2, 1}, {6, 4, 2, 1, 0}};
#endif

/* What maskparam/taps/tune.py may choose from, and the choices it replaces. */
int64_t tap_tile_max(void) { return CL_OV_MAX; }
int64_t tap_tile_default(void) { return CL_OV_DEFAULT; }
int64_t tap_chunk_default(void) { return CL_CHUNK_DEFAULT; }
int64_t tap_streams(void) { return STREAMS; } /* whether stream matters: 0, none streams */

/* -- forward tiles ------------------------------------------------------------------------ */

/* acc[PB][OV] += the products of nt taps over C channels: tap k reads the positions of
 * src[k], C floats apart, and the weights of wt[k], Opad floats apart from channel to
 * channel; then y's first np positions (O floats apart) get acc, the last vector's lanes
 * of tail only. */
#define CL_FWD(OV, PB)                                                                          \
    static void cl_fwd_##OV##_##PB(const float* const* src, const float* const* wt, int64_t nt, \
                                   int64_t C, int64_t Opad, const float* bias, float* y,         \
                                   int64_t O, int np, lanes_t tail, int stream) {                \
        vf acc[PB][OV];                                                                         \
        for (int v = 0; v < OV; v++) {                                                          \
            vf b = bias ? loadu(bias + LANES * v) : (vf){0};                                     \
            for (int i = 0; i < PB; i++) acc[i][v] = b;                                         \
        }                                                                                       \
        for (int64_t k = 0; k < nt; k++) {                                                      \
            const float* s = src[k];                                                            \
            const float* w = wt[k];                                                             \
            for (int64_t c = 0; c < C; c++, s++, w += Opad) {                                   \
                vf wv[OV];                                                                      \
                for (int v = 0; v < OV; v++) wv[v] = loadu(w + LANES * v);                      \
                UNROLL(16)                                                                      \
                for (int i = 0; i < PB; i++) {                                                  \
                    vf xb = splat(s[i * C]);                                                    \
                    for (int v = 0; v < OV; v++) acc[i][v] += xb * wv[v];                       \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < np; i++) {                                                          \
            float* yi = y + i * O;                                                              \
            for (int v = 0; v < OV - 1; v++)                                                    \
                if (stream) stream_store(yi + LANES * v, acc[i][v]);                            \
                else storeu(yi + LANES * v, acc[i][v]);                                         \
            if (stream) stream_store(yi + LANES * (OV - 1), acc[i][OV - 1]);                    \
            else store_lanes(tail, yi + LANES * (OV - 1), acc[i][OV - 1]);                      \
        }                                                                                       \
    }

typedef void (*cl_fwd_fn)(const float* const*, const float* const*, int64_t, int64_t, int64_t,
                          const float*, float*, int64_t, int, lanes_t, int);

CL_GRID(CL_FWD)
static const cl_fwd_fn cl_fwd[CL_OV_MAX + 1][CL_SIZES] = CL_TABLE(cl_fwd);

/* The lanes of the last vector of a block of output channels that hold channels below O. */
static lanes_t cl_tail(int64_t O, int64_t o_end) {
    return lanes_from_bits(range_bits(o_end - LANES, 0, O));
}

/* The weight as cl_forward reads it: (T, C, Opad), Opad = O rounded up to LANES with
 * zeros; w[o, c, index[t]] from w (O, C, kernel), or w[c, o, index[t]] for the input
 * gradient (see pack_weight). NULL if out of memory. */
static float* cl_pack_weight(const tap_call* g, const float* w, int64_t Opad) {
    const int64_t C = g->C, O = g->O, T = g->T, kernel = g->kernel;
    float* wp = (float*)alloc64(sizeof(float) * T * C * Opad);
    if (!wp) return NULL;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t o = 0; o < Opad; o++) {
                int64_t at = g->input_grad ? (c * O + o) * kernel : (o * C + c) * kernel;
                wp[(t * C + c) * Opad + o] = o < O ? w[at + g->index[t]] : 0.f;
            }
    return wp;
}

/* -- zero-padded copies of source rows ---------------------------------------------------- */

/* The source rows a forward reads from per-thread copies rather than from x: per copy, one
 * source row (dq, dh) of the taps, padded with reach zero positions at both ends (so that no
 * tile checks bounds) and with its positions cp >= C floats apart (zero channels past C).
 * A row gets a copy where a tap reads along it (dw != 0), or, with every, for every tap; the
 * other taps read x in place. Each output row fills the copies of its source rows once. */
typedef struct {
    int64_t* slot; /* per tap: its copy, or -1 (in place) */
    int64_t* pair; /* per copy: its rows' dq, dh */
    int64_t n, reach, len, cp; /* copies, zero positions at each end, floats per copy, stride */
} row_copies;

static void row_copies_free(row_copies* r) {
    free(r->slot);
    free(r->pair);
}

/* Returns 0, or -1 if out of memory (r freed then). */
static int row_copies_make(row_copies* r, const int64_t* taps, int64_t T, int64_t W, int64_t cp,
                           int every) {
    r->slot = (int64_t*)malloc(sizeof(int64_t) * (T + 1));
    r->pair = (int64_t*)malloc(sizeof(int64_t) * 2 * (T + 1));
    r->n = r->reach = 0, r->cp = cp;
    if (!r->slot || !r->pair) {
        row_copies_free(r);
        return -1;
    }
    for (int64_t t = 0; t < T; t++) {
        int64_t dw = taps[3 * t + 2] < 0 ? -taps[3 * t + 2] : taps[3 * t + 2];
        if (dw > r->reach) r->reach = dw;
        r->slot[t] = -1;
        if (dw == 0 && !every) continue;
        for (int64_t k = 0; k < r->n && r->slot[t] < 0; k++)
            if (r->pair[2 * k] == taps[3 * t] && r->pair[2 * k + 1] == taps[3 * t + 1])
                r->slot[t] = k;
        if (r->slot[t] < 0) {
            r->pair[2 * r->n] = taps[3 * t], r->pair[2 * r->n + 1] = taps[3 * t + 1];
            r->slot[t] = r->n++;
        }
    }
    r->len = (W + 2 * r->reach) * cp;
    return 0;
}

/* A thread's buffer of copies, its padding zero (fill writes only the rows); NULL if out of
 * memory. */
static float* row_copies_buffer(const row_copies* r) {
    float* rows = (float*)alloc64(sizeof(float) * (r->n * r->len + 1));
    if (rows) memset(rows, 0, sizeof(float) * r->n * r->len);
    return rows;
}

/* The copies of output row (q, h) of sample xn, x's (D, H, W, C): each copy's source row
 * that lies inside the input. */
static void row_copies_fill(const row_copies* r, float* rows, const float* xn, int64_t q,
                            int64_t h, int64_t D, int64_t H, int64_t W, int64_t C) {
    for (int64_t k = 0; k < r->n; k++) {
        int64_t sq = q + r->pair[2 * k], sh = h + r->pair[2 * k + 1];
        if (sq < 0 || sq >= D || sh < 0 || sh >= H) continue;
        const float* from = xn + (sq * H + sh) * W * C;
        float* to = rows + k * r->len + r->reach * r->cp;
        if (r->cp == C)
            memcpy(to, from, sizeof(float) * W * C);
        else
            for (int64_t p = 0; p < W; p++) memcpy(to + p * r->cp, from + p * C, sizeof(float) * C);
    }
}

/* Where tap t (its offsets tap) reads for output position w0 of row (q, h): in its copy, or
 * in x (sample xn) where it has none. */
static inline const float* row_copies_src(const row_copies* r, const float* rows,
                                          const float* xn, int64_t t, const int64_t* tap,
                                          int64_t q, int64_t h, int64_t H, int64_t W, int64_t C,
                                          int64_t w0) {
    if (r->slot[t] < 0) return xn + (((q + tap[0]) * H + h + tap[1]) * W + w0 + tap[2]) * C;
    return rows + r->slot[t] * r->len + (r->reach + w0 + tap[2]) * r->cp;
}

/* y = conv(x), channels-last: wp from cl_pack_weight, bias (Opad) or NULL, taps as given
 * (negated already for the input gradient). Returns 0, or -1 if out of memory. */
static int cl_forward(const tap_call* g, const float* x, const float* wp, const float* bias,
                      float* y) {
    const int64_t N = g->N, C = g->C, D = g->D, H = g->H, W = g->W, O = g->O, Do = g->Do;
    const int64_t T = g->T, *taps = g->taps;
    const int64_t Opad = (O + LANES - 1) / LANES * LANES, nvec = Opad / LANES;
    int ov_max = g->tile > 0 && g->tile <= CL_OV_MAX ? (int)g->tile : CL_OV_DEFAULT;
    const double out_bytes = (double)sizeof(float) * N * Do * H * W * O;
    const int stream = STREAMS && g->stream >= 0 && O % LANES == 0 &&
                       out_bytes >= (double)STREAM_MIN * g->nthreads &&
                       ((uintptr_t)y & (sizeof(vf) - 1)) == 0;
    row_copies copies;
    if (row_copies_make(&copies, taps, T, W, C, 0)) return -1;
    int failed = 0;
#pragma omp parallel num_threads((int)g->nthreads)
    {
        const float** src = (const float**)malloc(sizeof(float*) * (T + 1));
        const float** wt = (const float**)malloc(sizeof(float*) * (T + 1));
        int64_t* tk = (int64_t*)malloc(sizeof(int64_t) * (T + 1));
        float* rows = row_copies_buffer(&copies);
        if (!src || !wt || !tk || !rows) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * Do * H; row++) {
                int64_t n = row / (Do * H), q = row / H % Do, h = row % H, nt = 0;
                const float* xn = x + n * D * H * W * C;
                row_copies_fill(&copies, rows, xn, q, h, D, H, W, C);
                for (int64_t t = 0; t < T; t++) {
                    int64_t sq = q + taps[3 * t], sh = h + taps[3 * t + 1];
                    if (sq < 0 || sq >= D || sh < 0 || sh >= H) continue;
                    tk[nt++] = t;
                }
                float* yrow = y + row * W * O;
                for (int64_t v0 = 0; v0 < nvec; v0 += ov_max) {
                    int ov = nvec - v0 < ov_max ? (int)(nvec - v0) : ov_max;
                    int64_t o0 = v0 * LANES;
                    lanes_t tail = cl_tail(O, o0 + ov * LANES);
                    for (int64_t k = 0; k < nt; k++) wt[k] = wp + tk[k] * C * Opad + o0;
                    for (int64_t w0 = 0; w0 < W;) {
                        int s = 0;
                        while (cl_size[ov][s] > W - w0) s++;
                        for (int64_t k = 0; k < nt; k++)
                            src[k] = row_copies_src(&copies, rows, xn, tk[k], taps + 3 * tk[k],
                                                    q, h, H, W, C, w0);
                        cl_fwd[ov][s](src, wt, nt, C, Opad, bias ? bias + o0 : NULL,
                                      yrow + w0 * O + o0, O, cl_size[ov][s], tail, stream);
                        w0 += cl_size[ov][s];
                    }
                }
            }
            if (stream) stream_fence();
        }
        free(src);
        free(wt);
        free(tk);
        free(rows);
    }
    row_copies_free(&copies);
    return failed ? -1 : 0;
}

/* -- few output channels: four input channels per product ---------------------------------- */

/* With at most a vector of output channels, the lanes of cl_forward would idle, or each
 * broadcast would feed a single product. Instead each lane holds one output channel and one
 * of four input channels: lane 4j + k of vector v sums output OPV * v + j over input
 * channels k, k + 4, ... (OPV = LANES / 4 outputs per vector, V <= KP_V_MAX vectors, so O <=
 * 16 on AVX-512, 4 on AVX2 and NEON). One load broadcasts four input channels of a position
 * to every group of four lanes, and feeds V products. The store adds each group's four lanes
 * (cl_kp_reduce). With C a multiple of 4, x is read as cl_forward reads it; else every tap
 * reads a zero-padded copy of its source row whose positions lie CP = C rounded up to 4
 * floats apart, so that the padding channels are zero, not the next position's values (an
 * inf there, times a zero weight, would be NaN). The weight is packed (T, CP / 4, V, LANES),
 * zero where no channel is. */
#define OPV (LANES / 4)

/* Four floats from p in every group of four lanes. */
static inline vf bcast4(const float* p) {
#if LANES == 16
    return (vf)_mm512_broadcast_f32x4(_mm_loadu_ps(p));
#elif LANES == 8
    return (vf)_mm256_broadcast_ps((const __m128*)p);
#else
    return loadu(p);
#endif
}

/* Per group of four lanes of a (one vector of output channels each), the group's sum, in
 * output order: out[OPV * v + j] = the sum of lanes 4j ... 4j + 3 of a[v]. As SSE's horizontal
 * adds of four vectors, group by group, then one permutation from (j, v) to output order. */
#if LANES == 16
#define KP_LO 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29
#define KP_HI 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31
#define KP_LH 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define KP_HL 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define KP_OUT 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15
#elif LANES == 8
#define KP_LO 0, 8, 1, 9, 4, 12, 5, 13
#define KP_HI 2, 10, 3, 11, 6, 14, 7, 15
#define KP_LH 0, 1, 8, 9, 4, 5, 12, 13
#define KP_HL 2, 3, 10, 11, 6, 7, 14, 15
#define KP_OUT 0, 4, 1, 5, 2, 6, 3, 7
#else
#define KP_LO 0, 4, 1, 5
#define KP_HI 2, 6, 3, 7
#define KP_LH 0, 1, 4, 5
#define KP_HL 2, 3, 6, 7
#define KP_OUT 0, 1, 2, 3
#endif
static inline vf cl_kp_reduce(vf a0, vf a1, vf a2, vf a3) {
    vf s01 = SHUFFLE(a0, a1, KP_LO) + SHUFFLE(a0, a1, KP_HI);
    vf s23 = SHUFFLE(a2, a3, KP_LO) + SHUFFLE(a2, a3, KP_HI);
    vf r = SHUFFLE(s01, s23, KP_LH) + SHUFFLE(s01, s23, KP_HL);
    return SHUFFLE(r, r, KP_OUT);
}

/* As CL_FWD, for V vectors of packed output channels: src[k]'s positions CP floats apart,
 * wt[k] the tap's packed weight; y's first np positions get the sums plus bias (LANES
 * floats, zero past O), their first O lanes only (lanes of o). */
#define CL_KP(V, PB)                                                                            \
    static void cl_kp_##V##_##PB(const float* const* src, const float* const* wt, int64_t nt,  \
                                 int64_t CP, const float* bias, float* y, int64_t O, int np,    \
                                 lanes_t o) {                                                   \
        vf acc[PB][V];                                                                          \
        for (int v = 0; v < V; v++)                                                             \
            for (int i = 0; i < PB; i++) acc[i][v] = (vf){0};                                   \
        for (int64_t k = 0; k < nt; k++) {                                                      \
            const float* s = src[k];                                                            \
            const float* w = wt[k];                                                             \
            for (int64_t c = 0; c < CP; c += 4, s += 4, w += V * LANES) {                       \
                vf wv[V];                                                                       \
                for (int v = 0; v < V; v++) wv[v] = loadu(w + LANES * v);                       \
                for (int i = 0; i < PB; i++) {                                                  \
                    vf xb = bcast4(s + i * CP);                                                 \
                    for (int v = 0; v < V; v++) acc[i][v] += xb * wv[v];                        \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        vf b = loadu(bias);                                                                     \
        for (int i = 0; i < np; i++) {                                                          \
            vf a[4] = {{0}, {0}, {0}, {0}};                                                     \
            for (int v = 0; v < V; v++) a[v] = acc[i][v];                                       \
            store_lanes(o, y + i * O, cl_kp_reduce(a[0], a[1], a[2], a[3]) + b);                \
        }                                                                                       \
    }

typedef void (*cl_kp_fn)(const float* const*, const float* const*, int64_t, int64_t,
                         const float*, float*, int64_t, int, lanes_t);

CL_GRID(CL_KP)
static const cl_kp_fn cl_kp[CL_OV_MAX + 1][CL_SIZES] = CL_TABLE(cl_kp);
#define KP_V_MAX CL_OV_MAX /* the vectors of the widest packed tile */

/* Whether cl_forward packs input channels for O output channels: O fits the vectors it has. */
static int cl_packs_channels(int64_t O) { return O <= KP_V_MAX * OPV; }

/* The weight as the packed products read it: (T, CP / 4, V, LANES), lane 4j + k of vector v
 * holding w[o = OPV * v + j, c = 4 * c4 + k] (transposed for the input gradient, as
 * cl_pack_weight), zero past C or O. NULL if out of memory. */
static float* cl_kp_pack_weight(const tap_call* g, const float* w, int64_t V, int64_t CP) {
    const int64_t C = g->C, O = g->O, T = g->T, kernel = g->kernel;
    float* wk = (float*)alloc64(sizeof(float) * T * CP * V * OPV);
    if (!wk) return NULL;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c4 = 0; c4 < CP / 4; c4++)
            for (int64_t v = 0; v < V; v++)
                for (int l = 0; l < LANES; l++) {
                    int64_t o = OPV * v + l / 4, c = 4 * c4 + l % 4;
                    int64_t at = g->input_grad ? (c * O + o) * kernel : (o * C + c) * kernel;
                    float value = o < O && c < C ? w[at + g->index[t]] : 0.f;
                    wk[((t * (CP / 4) + c4) * V + v) * LANES + l] = value;
                }
    return wk;
}

/* cl_forward for O <= KP_V_MAX * OPV, with wk from cl_kp_pack_weight and bias (LANES floats,
 * zero past O). */
static int cl_forward_kp(const tap_call* g, const float* x, const float* wk, const float* bias,
                         float* y) {
    const int64_t N = g->N, C = g->C, D = g->D, H = g->H, W = g->W, O = g->O, Do = g->Do;
    const int64_t T = g->T, *taps = g->taps;
    const int64_t CP = (C + 3) / 4 * 4, V = (O + OPV - 1) / OPV;
    const lanes_t o_lanes = lanes_from_bits(range_bits(0, 0, O));
    /* With C a multiple of 4, the copies cl_forward makes; else every source row's, whose
       channels need padding too. */
    row_copies copies;
    if (row_copies_make(&copies, taps, T, W, CP, CP != C)) return -1;
    int failed = 0;
#pragma omp parallel num_threads((int)g->nthreads)
    {
        const float** src = (const float**)malloc(sizeof(float*) * (T + 1));
        const float** wt = (const float**)malloc(sizeof(float*) * (T + 1));
        float* rows = row_copies_buffer(&copies);
        if (!src || !wt || !rows) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < N * Do * H; row++) {
                int64_t n = row / (Do * H), q = row / H % Do, h = row % H, nt = 0;
                const float* xn = x + n * D * H * W * C;
                row_copies_fill(&copies, rows, xn, q, h, D, H, W, C);
                for (int64_t t = 0; t < T; t++) {
                    int64_t sq = q + taps[3 * t], sh = h + taps[3 * t + 1];
                    if (sq < 0 || sq >= D || sh < 0 || sh >= H) continue;
                    wt[nt] = wk + t * CP * V * OPV;
                    src[nt++] =
                        row_copies_src(&copies, rows, xn, t, taps + 3 * t, q, h, H, W, C, 0);
                }
                float* yrow = y + row * W * O;
                for (int64_t w0 = 0; w0 < W;) {
                    int s = 0;
                    while (cl_size[V][s] > W - w0) s++;
                    cl_kp[V][s](src, wt, nt, CP, bias, yrow + w0 * O, O, cl_size[V][s], o_lanes);
                    for (int64_t k = 0; k < nt; k++) src[k] += cl_size[V][s] * CP;
                    w0 += cl_size[V][s];
                }
            }
        }
        free(src);
        free(wt);
        free(rows);
    }
    row_copies_free(&copies);
    return failed ? -1 : 0;
}

/* tap_forward for channels-last input (see there). */
static int cl_tap_forward(const tap_call* g, const float* x, const float* w, const float* bias,
                          float* y) {
    const int64_t T = g->T, O = g->O, Opad = (O + LANES - 1) / LANES * LANES;
    const int packs = cl_packs_channels(O);
    const int64_t CP = (g->C + 3) / 4 * 4, V = (O + OPV - 1) / OPV;
    tap_call h = *g;
    int64_t* taps = (int64_t*)malloc(sizeof(int64_t) * 3 * (T + 1));
    float* wp = packs ? cl_kp_pack_weight(g, w, V, CP) : cl_pack_weight(g, w, Opad);
    /* the bias, zero past O: the packed products add a whole vector of it */
    float* b = bias || packs ? (float*)calloc(Opad, sizeof(float)) : NULL;
    int status = -1;
    if (taps && wp && (b || !(bias || packs))) {
        for (int64_t i = 0; i < 3 * T; i++) taps[i] = g->input_grad ? -g->taps[i] : g->taps[i];
        if (bias) memcpy(b, bias, sizeof(float) * O);
        h.taps = taps;
        status = packs ? cl_forward_kp(&h, x, wp, b, y) : cl_forward(&h, x, wp, b, y);
    }
    free(taps);
    free(wp);
    free(b);
    return status;
}

/* -- weight gradient ---------------------------------------------------------------------- */

/* out[i * Opad + LANES * v] += sum over rows r < rows and positions j < cols of
 * x0[r * xrow + j * C + i] * g0[r * grow + j * O + LANES * v], for the SB input channels i
 * and OV vectors v of output channels. Where O is not a multiple of LANES, the last vector
 * reads past a position's channels, into the next position's: those lanes' sums (past O)
 * are dropped, and the caller keeps the last position of g out (see cl_wg_last). Loads
 * masked instead would keep GCC from holding acc in registers: it stores the whole array at
 * every step. */
#define CL_WG(OV, SB)                                                                           \
    static void cl_wg_##OV##_##SB(const float* x0, const float* g0, int64_t rows, int64_t cols, \
                                  int64_t xrow, int64_t grow, int64_t C, int64_t O,             \
                                  float* out, int64_t Opad) {                     \
        vf acc[SB][OV];                                                                         \
        for (int v = 0; v < OV; v++)                                                            \
            for (int i = 0; i < SB; i++) acc[i][v] = (vf){0};                                   \
        for (int64_t r = 0; r < rows; r++) {                                                    \
            const float* xp = x0 + r * xrow;                                                    \
            const float* gp = g0 + r * grow;                                                    \
            for (int64_t j = 0; j < cols; j++, xp += C, gp += O) {                              \
                vf gv[OV];                                                                      \
                for (int v = 0; v < OV; v++) gv[v] = loadu(gp + LANES * v);                     \
                for (int i = 0; i < SB; i++) {                                                  \
                    vf xb = splat(xp[i]);                                                       \
                    for (int v = 0; v < OV; v++) acc[i][v] += xb * gv[v];                       \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < SB; i++)                                                            \
            for (int v = 0; v < OV; v++) {                                                      \
                float* dst = out + i * Opad + LANES * v;                                        \
                storeu(dst, loadu(dst) + acc[i][v]);                                            \
            }                                                                                   \
    }

typedef void (*cl_wg_fn)(const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, float*, int64_t);

/* The sums of cl_wg for one position, n channels, one at a time: where the vectors of g would
 * read past its end. */
static void cl_wg_last(const float* x, const float* g, int64_t n, int64_t O, float* out,
                       int64_t Opad) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t o = 0; o < O; o++) out[i * Opad + o] += x[i] * g[o];
}

CL_GRID(CL_WG)
static const cl_wg_fn cl_wg[CL_OV_MAX + 1][CL_SIZES] = CL_TABLE(cl_wg);

/* gw and gb as tap_weight_grad (see there), x and g channels-last; gwp (T, C, O) gets the
 * weight sums by tap. Returns 0, or -1 if out of memory. */
static int cl_weight_grad(const tap_call* g, const float* x, const float* gy, float* gwp,
                          float* gb) {
    const int64_t N = g->N, C = g->C, D = g->D, H = g->H, W = g->W, O = g->O, Do = g->Do;
    const int64_t T = g->T, *taps = g->taps;
    const int nthreads = (int)g->nthreads;
    const int64_t Opad = (O + LANES - 1) / LANES * LANES, nvec = Opad / LANES;
    const int64_t G = T * C * Opad + Opad; /* per thread: the weight sums, then the bias's */
    int64_t chunk = g->chunk > 0 ? g->chunk : CL_CHUNK_DEFAULT;
    int64_t rh = chunk / (W * (C + O)); /* rows per rectangle */
    if (rh < 1) rh = 1;
    if (rh > H) rh = H;
    const int64_t nrect = (H + rh - 1) / rh;
    float* acc_all = (float*)alloc64(sizeof(float) * G * nthreads);
    if (!acc_all) return -1;
    memset(acc_all, 0, sizeof(float) * G * nthreads);
#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float* accw = acc_all + (int64_t)tid * G;
#pragma omp for schedule(static)
        for (int64_t job = 0; job < N * Do * nrect; job++) {
            int64_t n = job / (Do * nrect), q = job / nrect % Do, ha = job % nrect * rh;
            int64_t hb = ha + rh < H ? ha + rh : H;
            const float* gq = gy + (n * Do + q) * H * W * O;
            if (gb)
                for (int64_t v = 0; v < nvec; v++) {
                    lanes_t tail = cl_tail(O, (v + 1) * LANES);
                    vf s[4] = {{0}, {0}, {0}, {0}};
                    int64_t p = ha * W, end = hb * W;
                    for (; p + 4 <= end; p += 4)
                        for (int i = 0; i < 4; i++)
                            s[i] += load_lanes(tail, gq + (p + i) * O + LANES * v);
                    for (; p < end; p++) s[0] += load_lanes(tail, gq + p * O + LANES * v);
                    float* dst = accw + T * C * Opad + LANES * v;
                    *(vf*)dst += (s[0] + s[1]) + (s[2] + s[3]);
                }
            for (int64_t t = 0; t < T; t++) {
                int64_t sq = q + taps[3 * t], dh = taps[3 * t + 1], dw = taps[3 * t + 2];
                if (sq < 0 || sq >= D) continue;
                int64_t h0 = dh < 0 ? -dh : 0, h1 = dh > 0 ? H - dh : H;
                int64_t w0 = dw < 0 ? -dw : 0, w1 = dw > 0 ? W - dw : W;
                if (h0 < ha) h0 = ha;
                if (h1 > hb) h1 = hb;
                if (h1 <= h0 || w1 <= w0) continue;
                const float* xs = x + (((n * D + sq) * H + h0 + dh) * W + w0 + dw) * C;
                const float* gs = gq + (h0 * W + w0) * O;
                /* With O not a multiple of LANES, the last vector of a position reads up to
                   Opad - O floats on (see CL_WG): positions whose reads would pass g's end
                   are summed one channel at a time instead. */
                int64_t rows = h1 - h0, cols = w1 - w0;
                const float* end = gy + N * Do * H * W * O;
                int near_end = gs + ((rows - 1) * W + cols - 1) * O + Opad > end;
                for (int64_t r = near_end ? 0 : rows - 1; r < rows; r++) {
                    /* rows r on (all, unless near the end: then one at a time), safe columns */
                    const float* gr = gs + r * W * O;
                    int64_t safe = cols;
                    if (near_end) {
                        safe = gr + Opad > end ? 0 : (int64_t)((end - Opad - gr) / O) + 1;
                        if (safe > cols) safe = cols;
                    }
                    int64_t r0 = near_end ? r : 0, nr = near_end ? 1 : rows;
                    for (int64_t v0 = 0; v0 < nvec; v0 += CL_OV_MAX) {
                        int ov = nvec - v0 < CL_OV_MAX ? (int)(nvec - v0) : CL_OV_MAX;
                        for (int64_t c0 = 0; c0 < C;) {
                            int s = 0;
                            while (cl_size[ov][s] > C - c0) s++;
                            if (safe > 0)
                                cl_wg[ov][s](xs + r0 * W * C + c0, gs + r0 * W * O + v0 * LANES,
                                             nr, safe, W * C, W * O, C, O,
                                             accw + (t * C + c0) * Opad + v0 * LANES, Opad);
                            c0 += cl_size[ov][s];
                        }
                    }
                    for (int64_t j = safe; j < cols; j++)
                        cl_wg_last(xs + (r0 * W + j) * C, gr + j * O, C, O, accw + t * C * Opad,
                                   Opad);
                }
            }
        }
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t o = 0; o < O; o++) {
                float s = 0.f;
                for (int th = 0; th < nthreads; th++) s += acc_all[th * G + (t * C + c) * Opad + o];
                gwp[(c * T + t) * O + o] = s;
            }
    if (gb)
        for (int64_t o = 0; o < O; o++) {
            float s = 0.f;
            for (int th = 0; th < nthreads; th++) s += acc_all[th * G + T * C * Opad + o];
            gb[o] = s;
        }
    free(acc_all);
    return 0;
}
