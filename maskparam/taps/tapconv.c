/* maskparam's active-tap convolution kernel, float32, written once with GCC/Clang vector
 * extensions and compiled once per instruction set: x86-64 AVX-512 (16 lanes), x86-64
 * AVX2 with FMA (8 lanes), ARM64 NEON (4 lanes). Only the few primitives in "the
 * instruction set" below (masked loads and stores, tile sizes) differ between them.
 *
 * Built at first use by maskparam/taps/build.py (cc -O3 -fopenmp and the flags of one
 * instruction set) and called through ctypes by maskparam/taps/kernel.py; without a C
 * compiler or a supported CPU, maskparam runs the same layers box by box. tests/c/ builds it
 * standalone.
 *
 * Layout. A stride-1 convolution with T active taps, in the layout torch gives by default
 * (channels-first, contiguous), over "planes": x is (N, C, D, P) with P = H * W, y is
 * (N, O, Do, P) with the same H and W, and the weight is torch's, (O, C, kernel) flattened.
 * Tap t, at place k_t = index[t] of the kernel, reads the input plane taps[3t] away, at the
 * position (taps[3t+1], taps[3t+2]) away in (H, W); a read outside the input is zero. So
 *
 *     y[n, o, q, (h, w)] = bias[o] + sum_{c, t} w[o, c, k_t] * x[n, c, q + dq_t, (h + dh_t, w + dw_t)]
 *
 * Every plane is flat and contiguous, so a tap is a constant offset into it: LANES output
 * positions are one vector, and lanes whose source falls outside the plane (across a row
 * end, or past the top or bottom) are masked off as the vector loads; a vector whose lanes
 * all read inside the plane loads plainly. A 2-D conv has D = 1, a 1-D conv also H = 1.
 * The input gradient is the same sum with the taps negated and the weight transposed.
 * Channels-last input (tap_call's layout 1) runs the variant in tapconv_cl.c, included below.
 * tap_forward packs the weight it reads, and tap_weight_grad unpacks the sums it makes, into
 * torch's layout, so that Python passes tensors as they are.
 *
 * Loop order. tap_forward: in parallel over (n, q, tile of NV * LANES positions); then the
 * (tap, input channel) pairs whose tap lands inside the depth, in chunks of at most KC pairs
 * to copy; then blocks of OB output channels; then the pairs, each NV vector loads of x and
 * OB broadcasts of w into NV * OB accumulators that stay in registers. With several blocks
 * and at least PACK_MIN output channels, the first block also stores each pair's NV vectors
 * (lanes outside the plane zeroed) to a per-thread buffer that the other blocks read from
 * L1: the channel planes of x lie a multiple of 4 KB apart, so read in place they share L1
 * sets and evict each other. With fewer output channels the copy costs more than it saves,
 * and each block reads x in place; with two blocks, so do the pairs whose vectors lie whole
 * and aligned in x. On AVX-512, a large output is written with streaming stores, which
 * bypass the caches.
 * tap_weight_grad, two variants (tap_weight_grad_variant says which runs):
 * "channels" (O a multiple of LANES, at least 2 * LANES, or LANES with C >= 16) puts output
 * channels in the lanes and goes in parallel over (n, q), then rectangles of a plane (whose g
 * it transposes to position-major, LANES x LANES at a time, while it fetches the next
 * rectangle's into L2), then taps, then blocks of SB input channels, then positions;
 * "positions" puts positions in the lanes and goes in parallel over (n, q), then blocks of
 * WO output channels, then blocks of WK (channel, tap) pairs, then vectors of positions. Both
 * keep per-thread partial sums (tap_weight_grad_scratch bytes per thread) that add up at the
 * end.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* -- the instruction set ---------------------------------------------------------------- */

#if defined(__AVX512F__)
#include <immintrin.h>
#define TAP_ISA "avx512"
#define LANES 16
#define NV 3        /* forward: vectors of positions per tile */
#define OB 8        /* forward: output channels per tile; NV * OB = 24 of 32 registers */
#define WO 8        /* weight gradient, positions: output channels per tile */
#define WK 3        /* weight gradient, positions: (channel, tap) pairs; WO * WK = 24 */
#define OV_MAX 4    /* weight gradient, channels: vectors of output channels per block */
#define WG_UNROLL 4 /* weight gradient, channels: positions per step of its inner loop */
typedef __mmask16 lanes_t;
static inline lanes_t lanes_from_bits(uint32_t bits) { return (lanes_t)bits; }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TAP_ISA "avx2"
#define LANES 8
#define NV 3 /* NV * OB = 12 accumulators, NV + 1 more of 16 registers */
#define OB 4
#define WO 4
#define WK 2
#define OV_MAX 2
#define WG_UNROLL 1 /* 16 registers: none left for more positions in flight */
typedef __m256i lanes_t;
static inline lanes_t lanes_from_bits(uint32_t bits) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), bit), bit);
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define TAP_ISA "neon"
#define LANES 4
#define NV 3 /* 32 registers, as for AVX-512 */
#define OB 8
#define WO 8
#define WK 3
#define OV_MAX 4
#define WG_UNROLL 1 /* one position a step, the plain loop */
typedef uint32_t lanes_t;
static inline lanes_t lanes_from_bits(uint32_t bits) { return bits; }
#else
#error "maskparam's tap kernel needs AVX-512, AVX2 with FMA, or ARM64 NEON"
#endif

#define PRAGMA(x) _Pragma(#x)
#define UNROLL(n) PRAGMA(GCC unroll n)

#define FULL_BITS ((uint32_t)((1ull << LANES) - 1))
#define LINE 16 /* floats in a cache line of 64 bytes */
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));

/* Every lane s. As s - 0, which is s for every s, so the compiler drops the subtraction and
 * broadcasts; s + 0 is not (-0.0 + 0.0 = +0.0), and the add would stay in the innermost
 * loops. */
static inline vf splat(float s) { return s - (vf){0}; }

static inline vf loadu(const float* p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storeu(float* p, vf v) { memcpy(p, &v, sizeof v); }

/* The lanes of m from p, zero elsewhere; lanes off are never read (they may lie outside
 * the tensor). */
static inline vf load_lanes(lanes_t m, const float* p) {
#if LANES == 16
    return (vf)_mm512_maskz_loadu_ps(m, p);
#elif defined(__AVX2__)
    return (vf)_mm256_maskload_ps(p, m);
#else
    if (m == FULL_BITS) return loadu(p);
    vf v = {0};
    for (int i = 0; i < LANES; i++)
        if (m >> i & 1) v[i] = p[i];
    return v;
#endif
}

static inline void store_lanes(lanes_t m, float* p, vf v) {
#if LANES == 16
    _mm512_mask_storeu_ps(p, m, (__m512)v);
#elif defined(__AVX2__)
    _mm256_maskstore_ps(p, m, (__m256)v);
#else
    for (int i = 0; i < LANES; i++)
        if (m >> i & 1) p[i] = v[i];
#endif
}

/* v to p, a whole cache line, around the caches: a store that does not first read the line
 * from memory. stream_fence orders such stores before those that follow (the end of a call).
 * Only AVX-512 streams (STREAMS): an AVX2 vector is half a line, and the forward's tiles of
 * three vectors end mid-line, so a line's halves would be written apart, which defeats the
 * streaming store. ARM64 has no such store in GCC's vector extensions. */
#if LANES == 16
#define STREAMS 1
static inline void stream_store(float* p, vf v) { _mm512_stream_ps(p, (__m512)v); }
static inline void stream_fence(void) { _mm_sfence(); }
#else
#define STREAMS 0
static inline void stream_store(float* p, vf v) { storeu(p, v); }
static inline void stream_fence(void) {}
#endif

/* Lanes interleaved: (a0, b0, a1, b1, ...) from the lower halves of a and b, or the upper. */
#if LANES == 16
#define LO_LANES 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define HI_LANES 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#elif LANES == 8
#define LO_LANES 0, 8, 1, 9, 2, 10, 3, 11
#define HI_LANES 4, 12, 5, 13, 6, 14, 7, 15
#else
#define LO_LANES 0, 4, 1, 5
#define HI_LANES 2, 6, 3, 7
#endif
#if defined(__clang__)
#define SHUFFLE(a, b, LIST) __builtin_shufflevector(a, b, LIST)
#else
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
#define SHUFFLE(a, b, LIST) __builtin_shuffle(a, b, (vi){LIST})
#endif

/* r as a LANES x LANES matrix, transposed in place: log2(LANES) perfect shuffles of its
 * rows (row i with row i + LANES / 2), each moving one bit of a lane's index from the
 * column to the row. */
static inline void transpose(vf r[LANES]) {
    for (int round = 1; round < LANES; round *= 2) {
        vf t[LANES];
        for (int i = 0; i < LANES / 2; i++) {
            t[2 * i] = SHUFFLE(r[i], r[i + LANES / 2], LO_LANES);
            t[2 * i + 1] = SHUFFLE(r[i], r[i + LANES / 2], HI_LANES);
        }
        for (int i = 0; i < LANES; i++) r[i] = t[i];
    }
}

/* aligned_alloc wants a size that is a multiple of the alignment. */
static void* alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

static inline float lane_sum(vf v) {
    float s = 0.f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* -- what Python must know ---------------------------------------------------------------- */

/* One call: its sizes (see the layout above), its taps and its threads. */
typedef struct {
    int64_t N, C, D, H, W, O, Do, T;
    const int64_t* taps; /* (T, 3): plane, row, column offsets */
    int64_t nthreads;
    const int64_t* index; /* (T): each tap's place in the flattened kernel of the weight */
    int64_t kernel;       /* the flattened kernel's size */
    int64_t input_grad;   /* tap_forward: 1 for the input gradient, see there */
    int64_t layout;       /* 0: channels-first, as above; 1: channels-last (tapconv_cl.c) */
    /* Tuning, 0 for the defaults (see tapconv_cl.c): -1 never streams stores; the most
       vectors of output channels per channels-last forward tile; the floats per rectangle
       of the channels-last weight gradient. */
    int64_t stream, tile, chunk;
} tap_call;

#ifndef TAP_BUILD_KEY
#define TAP_BUILD_KEY 0 /* set by the builder to a hash of this source and its flags */
#endif

uint64_t tap_build_key(void) { return (uint64_t)TAP_BUILD_KEY; }
const char* tap_isa(void) { return TAP_ISA; }
int64_t tap_lanes(void) { return LANES; }
/* The forward reads its weight in blocks of this many output channels (see tap_forward). */
int64_t tap_out_block(void) { return OB; }
int64_t tap_forward_tile(void) { return NV * LANES; }

enum { WG_POSITIONS = 0, WG_CHANNELS = 1 };

/* Channels in the lanes when they fill whole vectors, at least two, or one with 16 input
 * channels or more: then each position's products stay in registers. With fewer input
 * channels, the blocks of SB input channels would be mostly padding, unused channels whose
 * work is thrown away, so the lanes hold positions instead. */
int tap_weight_grad_variant(int64_t C, int64_t O, int64_t T) {
    (void)T;
    return O % LANES == 0 && (O >= 2 * LANES || (O == LANES && C >= 16)) ? WG_CHANNELS
                                                                          : WG_POSITIONS;
}

#define SB_MAX 12 /* the most input channels in one block of the channels variant */

/* The bytes of partial sums the weight gradient keeps per thread. */
int64_t tap_weight_grad_scratch(int64_t C, int64_t O, int64_t T) {
    if (tap_weight_grad_variant(C, O, T) == WG_CHANNELS)
        return (int64_t)sizeof(float) * ((C + SB_MAX) * T * O + O);
    int64_t Opad = (O + WO - 1) / WO * WO;
    return (int64_t)sizeof(float) * LANES * (C * T + 2) * Opad;
}

/* -- lane masks ---------------------------------------------------------------------------- */

static uint32_t range_bits(int64_t start, int64_t lo, int64_t hi) {
    /* lanes i with lo <= start + i < hi */
    int64_t a = lo - start, b = hi - start;
    if (a < 0) a = 0;
    if (b > LANES) b = LANES;
    if (b <= a) return 0;
    return (uint32_t)(((1ull << b) - 1) & ~((1ull << a) - 1));
}

/* Lane masks of the vectors of a plane: entry t * nvec + v holds the lanes of vector v
 * (positions LANES * v ...) whose tap-t source lies in the plane; entry T * nvec + v the
 * lanes inside the plane at all. bits holds the same as bit masks. */
typedef struct {
    lanes_t* lanes;
    uint32_t* bits;
} plane_masks;

static int plane_masks_make(plane_masks* m, int64_t H, int64_t W, int64_t T,
                            const int64_t* taps, int64_t nvec) {
    int64_t P = H * W;
    m->lanes = (lanes_t*)alloc64(sizeof(lanes_t) * (T + 1) * nvec);
    m->bits = (uint32_t*)malloc(sizeof(uint32_t) * (T + 1) * nvec);
    if (!m->lanes || !m->bits) return -1;
    for (int64_t t = 0; t < T; t++)
        for (int64_t v = 0; v < nvec; v++) {
            uint32_t b = 0;
            for (int i = 0; i < LANES; i++) {
                int64_t p = v * LANES + i;
                if (p >= P) break;
                int64_t h = p / W + taps[3 * t + 1], w = p % W + taps[3 * t + 2];
                if (h >= 0 && h < H && w >= 0 && w < W) b |= 1u << i;
            }
            m->bits[t * nvec + v] = b;
        }
    for (int64_t v = 0; v < nvec; v++) m->bits[T * nvec + v] = range_bits(v * LANES, 0, P);
    for (int64_t i = 0; i < (T + 1) * nvec; i++) m->lanes[i] = lanes_from_bits(m->bits[i]);
    return 0;
}

static void plane_masks_free(plane_masks* m) {
    free(m->lanes);
    free(m->bits);
}

/* -- forward (and input gradient) ----------------------------------------------------------- */

/* The blocks of one tile of output positions: acc[o][v] holds output channel o0 + o at the
 * positions p0 + LANES * v ... of output plane q of sample n. */
typedef struct {
    int64_t n, q, p0, tile;
} fwd_tile;

/* acc[o][v] += wt[o] * xv[v] for the OB output channels and the first nv vectors (a
 * constant where it is inlined). */
static inline __attribute__((always_inline)) void fwd_fma(vf acc[OB][NV], const vf xv[NV],
                                                          const float* wt, const int nv) {
#pragma GCC unroll 16
    for (int o = 0; o < OB; o++) {
        vf wv = splat(wt[o]);
#pragma GCC unroll 8
        for (int v = 0; v < nv; v++) acc[o][v] += wv * xv[v];
    }
}

/* Whether the NV vectors whose lane bits start at bits all have every lane on. */
static inline int all_on(const uint32_t* bits) {
    int full = 1;
    for (int v = 0; v < NV; v++) full &= bits[v] == FULL_BITS;
    return full;
}

/* acc += the products of one tap over C input channels, read from x in place, cstride apart,
 * the lanes of mk only; full: every lane reads inside the plane. Unless dst is NULL, also
 * stores each channel's NV vectors there, one channel after another. */
static inline __attribute__((always_inline)) void fwd_tap(vf acc[OB][NV], const float* src,
                                                          const float* wt, int64_t C,
                                                          int64_t cstride, const lanes_t* mk,
                                                          int full, float* dst) {
    lanes_t mv[NV];
    for (int v = 0; v < NV; v++) mv[v] = mk[v];
    for (int64_t c = 0; c < C; c++, src += cstride, wt += OB) {
        vf xv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++)
            xv[v] = full ? loadu(src + LANES * v) : load_lanes(mv[v], src + LANES * v);
        if (dst) {
            for (int v = 0; v < NV; v++) *(vf*)(dst + LANES * v) = xv[v];
            dst += NV * LANES;
        }
        fwd_fma(acc, xv, wt, NV);
    }
}

/* A run of (tap, input channel) pairs: n channels of one tap. Its OB weights of a block of
 * output channels start at w plus the block's offset and step OB from channel to channel; its
 * NV vectors of positions lie in x, step floats from channel to channel, the lanes of mask
 * only (all of them if full). Where buf is not NULL, the first block stores each pair's
 * vectors there as it reads them, one pair after another, and the blocks after it read them
 * there; otherwise every block reads x in place. */
typedef struct {
    const float* w;
    const float* x;
    int64_t step, n;
    const lanes_t* mask;
    int full;
    float* buf;
} fwd_run;

/* acc += the products of the pairs of runs for the block whose weights are woff floats on, the
 * vectors read where the first block left them (see fwd_run). Only the first nv vectors (a
 * constant where it is inlined): the last tile of a plane may have fewer. */
static inline __attribute__((always_inline)) void fwd_pairs_nv(vf acc[OB][NV],
                                                               const fwd_run* run,
                                                               int64_t runs, int64_t woff,
                                                               const int nv) {
    /* The sums in a local array, which no float pointer may alias: so they stay in
       registers even where fwd_pairs is not inlined. Summed through acc itself, they would
       go to memory and back at every step (twice the time). */
    vf a[OB][NV];
    memcpy(a, acc, sizeof a);
    for (int64_t r = 0; r < runs; r++) {
        const float* wt = run[r].w + woff;
        const float* xs = run[r].buf ? run[r].buf : run[r].x;
        const int64_t step = run[r].buf ? NV * LANES : run[r].step;
        for (int64_t j = 0; j < run[r].n; j++, xs += step, wt += OB) {
            vf xv[NV];
#pragma GCC unroll 8
            for (int v = 0; v < nv; v++) xv[v] = loadu(xs + LANES * v);
            fwd_fma(a, xv, wt, nv);
        }
    }
    memcpy(acc, a, sizeof a);
}

static void fwd_pairs(vf acc[OB][NV], const fwd_run* run, int64_t runs, int64_t woff, int nv) {
#if NV == 3
    if (nv == 1) return fwd_pairs_nv(acc, run, runs, woff, 1);
    if (nv == 2) return fwd_pairs_nv(acc, run, runs, woff, 2);
#endif
    (void)nv;
    fwd_pairs_nv(acc, run, runs, woff, NV);
}

/* The first block's acc += the products of the pairs of runs: it reads x (NV vectors, masked:
 * lanes outside the plane are zero) and stores what it read to the buffer of each run that
 * has one. The copy is made in the same pass as the products, so that its loads, from L2,
 * overlap them (a separate copying pass would wait on those loads). */
static void fwd_pairs_first(vf acc[OB][NV], const fwd_run* run, int64_t runs) {
    vf a[OB][NV]; /* in registers, as in fwd_pairs_nv */
    memcpy(a, acc, sizeof a);
    for (const fwd_run* r = run; r < run + runs; r++) {
        if (r->full)
            fwd_tap(a, r->x, r->w, r->n, r->step, r->mask, 1, r->buf);
        else
            fwd_tap(a, r->x, r->w, r->n, r->step, r->mask, 0, r->buf);
    }
    memcpy(acc, a, sizeof a);
}

/* Fetch into L2 the lines of NV vectors ahead floats on from src, in n channels cstride apart
 * (a line more, as they may start mid-line). A prefetch never faults, even past the end of
 * x. */
static inline void prefetch_run(const float* src, int64_t cstride, int64_t n, int64_t ahead) {
    for (int64_t c = 0; c < n; c++, src += cstride)
        for (int i = 0; i <= NV * LANES; i += LINE) __builtin_prefetch(src + ahead + i, 0, 2);
}

static inline void fwd_start(vf acc[OB][NV], const float* bias) {
    for (int o = 0; o < OB; o++) {
        vf b = splat(bias ? bias[o] : 0.f);
        for (int v = 0; v < NV; v++) acc[o][v] = b;
    }
}

/* The tile's outputs into y, output channels o0 ... below O, lanes inside the plane; with
 * stream, every whole vector around the caches (see fwd_packed). */
static inline void fwd_store(vf acc[OB][NV], float* y, int64_t O, int64_t Do, int64_t P,
                             fwd_tile at, int64_t o0, const lanes_t* inside,
                             const uint32_t* inside_bits, int stream) {
    for (int o = 0; o < OB && o0 + o < O; o++) {
        float* yo = y + ((at.n * O + o0 + o) * Do + at.q) * P + at.p0;
        for (int v = 0; v < NV; v++) {
            if (inside_bits[at.tile * NV + v] == FULL_BITS && stream)
                stream_store(yo + LANES * v, acc[o][v]);
            else if (inside_bits[at.tile * NV + v] == FULL_BITS)
                storeu(yo + LANES * v, acc[o][v]);
            else
                store_lanes(inside[at.tile * NV + v], yo + LANES * v, acc[o][v]);
        }
    }
}

#ifndef KC /* a test builds with a small one, to cross chunk boundaries often */
#define KC 128 /* pairs (tap, input channel) packed at a time: KC * NV * LANES floats */
#endif
#define PACK_MIN 16 /* the fewest output channels (rounded up to OB) that pack */
#define STREAM_MIN (1 << 20) /* bytes of output per thread from which stores stream */

/* y = conv(x) for tap_forward: wp is (T, Opad / OB, C, OB) and bias (Opad) or NULL, Opad = O
 * rounded up to OB with zeros. Returns 0, or -1 if out of memory (y untouched then). */
static int fwd_packed(const tap_call* g, const float* x, const float* wp, const float* bias,
                      float* y) {
    const int64_t N = g->N, C = g->C, D = g->D, H = g->H, W = g->W, O = g->O, Do = g->Do;
    const int64_t T = g->T, *taps = g->taps;
    int64_t P = H * W, nvec = (P + LANES - 1) / LANES, tiles = (nvec + NV - 1) / NV;
    const int64_t Opad = (O + OB - 1) / OB * OB, nob = Opad / OB;
    /* Where the blocks of output channels make PACK_MIN uses of each vector of x or more,
       the first copies the vectors they share into a buffer (see above); fewer, and the copy
       costs more than it saves: they read x in place. */
    const int packed = nob > 1 && Opad >= PACK_MIN, in_place = nob <= 2 && (D * P) % LANES == 0;
    /* An output of STREAM_MIN per thread or more does not stay in the caches for whatever
       reads it next, so on AVX-512 its whole vectors go around them (where they are aligned:
       y aligned and P a multiple of LANES), and each line is no longer read from memory
       first. */
    const double out_bytes = (double)sizeof(float) * N * O * Do * P;
    const int stream = STREAMS && g->stream >= 0 &&
                       out_bytes >= (double)STREAM_MIN * g->nthreads &&
                       P % LANES == 0 && ((uintptr_t)y & (sizeof(vf) - 1)) == 0;
    const int64_t mstride = tiles * NV;
    plane_masks masks;
    if (plane_masks_make(&masks, H, W, T, taps, mstride)) {
        plane_masks_free(&masks);
        return -1;
    }
    const lanes_t* inside = masks.lanes + T * mstride;
    const uint32_t* inside_bits = masks.bits + T * mstride;
    int failed = 0;
#pragma omp parallel num_threads((int)g->nthreads)
    {
        int64_t* toff = (int64_t*)malloc(sizeof(int64_t) * (T + 1));
        int64_t* tidx = (int64_t*)malloc(sizeof(int64_t) * (T + 1));
        float* buf = packed ? (float*)alloc64(sizeof(float) * KC * NV * LANES) : NULL;
        float* part = packed ? (float*)alloc64(sizeof(float) * Opad * NV * LANES) : NULL;
        /* the runs of one chunk: at most KC */
        fwd_run* run = (fwd_run*)malloc(sizeof(fwd_run) * KC);
        if (!toff || !tidx || !run ||
            (packed && (!buf || !part))) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t job = 0; job < N * Do * tiles; job++) {
                fwd_tile at = {job / (Do * tiles), (job / tiles) % Do, 0, job % tiles};
                at.p0 = at.tile * LANES * NV;
                int64_t nt = 0;
                for (int64_t t = 0; t < T; t++) {
                    int64_t sq = at.q + taps[3 * t];
                    if (sq < 0 || sq >= D) continue; /* the whole plane is padding */
                    toff[nt] = sq * P + taps[3 * t + 1] * W + taps[3 * t + 2];
                    tidx[nt++] = t;
                }
                const float* xn = x + at.n * C * D * P + at.p0;
                if (!packed) {
                    for (int64_t ob = 0; ob < nob; ob++) {
                        vf acc[OB][NV];
                        fwd_start(acc, bias ? bias + ob * OB : NULL);
                        for (int64_t k = 0; k < nt; k++) {
                            int64_t m = tidx[k] * mstride + at.tile * NV;
                            const float* wt = wp + (tidx[k] * nob + ob) * C * OB;
                            if (all_on(masks.bits + m))
                                fwd_tap(acc, xn + toff[k], wt, C, D * P, masks.lanes + m, 1, NULL);
                            else
                                fwd_tap(acc, xn + toff[k], wt, C, D * P, masks.lanes + m, 0, NULL);
                        }
                        fwd_store(acc, y, O, Do, P, at, ob * OB, inside, inside_bits, stream);
                    }
                    continue;
                }
                int64_t npairs = nt * C;
                /* The tap that reads furthest on in x reads, at the next tile (the next
                   job, usually), lines that no tile has read yet: of the plane after this
                   one, for a 3-D cross. Fetched a tile ahead, they arrive in time. The other
                   taps' lines are in cache already. */
                int64_t lead = 0;
                for (int64_t k = 1; k < nt; k++)
                    if (toff[k] > toff[lead]) lead = k;
                /* the vectors of the tile that hold positions of the plane */
                int nv = nvec - at.tile * NV < NV ? (int)(nvec - at.tile * NV) : NV;
                /* Chunks of pairs, tap-major, as runs of channels of one tap: at most KC
                   pairs to pack (lanes outside the plane zero) and KC runs per chunk. Pairs
                   read in place do not count, so a tile takes as few chunks as it can:
                   each chunk stores and reloads the partial sums of every block. */
                int64_t j = 0;
                for (int first = 1;; first = 0) {
                    int64_t runs = 0, copied = 0;
                    while (j < npairs && runs < KC && copied < KC) {
                        int64_t k = j / C, c0 = j % C, c1 = C;
                        const float* src = xn + c0 * D * P + toff[k];
                        int64_t m = tidx[k] * mstride + at.tile * NV;
                        fwd_run* r = run + runs++;
                        r->x = src, r->step = D * P, r->mask = masks.lanes + m;
                        r->full = all_on(masks.bits + m), r->buf = NULL;
                        /* With two blocks of output channels, a run whose vectors lie whole
                           and aligned in x is read in place, the second time from L2: one
                           reread costs less than the copy. With more blocks, rereading each
                           vector that many times from L2 costs more than the copy saves.
                           (AVX2 packs no two blocks: 2 * OB is below PACK_MIN.) */
                        int in_x = r->full && in_place && ((uintptr_t)src & (sizeof(vf) - 1)) == 0;
                        if (!in_x) {
                            if (c1 - c0 > KC - copied) c1 = c0 + (KC - copied);
                            r->buf = buf + copied * NV * LANES;
                            copied += c1 - c0;
                        }
                        if (k == lead) prefetch_run(src, D * P, c1 - c0, NV * LANES);
                        r->w = wp + (tidx[k] * nob * C + c0) * OB;
                        r->n = c1 - c0;
                        j += c1 - c0;
                    }
                    int last = j >= npairs;
                    for (int64_t o0 = 0; o0 < Opad; o0 += OB) {
                        vf acc[OB][NV];
                        float* pp = part + o0 * NV * LANES;
                        if (first)
                            fwd_start(acc, bias ? bias + o0 : NULL);
                        else
                            for (int o = 0; o < OB; o++)
                                for (int v = 0; v < NV; v++)
                                    acc[o][v] = *(const vf*)(pp + (o * NV + v) * LANES);
                        if (o0 == 0)
                            fwd_pairs_first(acc, run, runs);
                        else
                            fwd_pairs(acc, run, runs, o0 * C, nv);
                        if (last)
                            fwd_store(acc, y, O, Do, P, at, o0, inside, inside_bits, stream);
                        else
                            for (int o = 0; o < OB; o++)
                                for (int v = 0; v < NV; v++)
                                    *(vf*)(pp + (o * NV + v) * LANES) = acc[o][v];
                    }
                    if (last) break;
                }
            }
            if (stream) stream_fence();
        }
        free(toff);
        free(tidx);
        free(buf);
        free(part);
        free(run);
    }
    plane_masks_free(&masks);
    return failed ? -1 : 0;
}

/* The weight as tap_forward reads it, (T, Opad / OB, C, OB), Opad = O rounded up to OB with
 * zeros: w[o, c, index[t]] from w (O, C, kernel), or w[c, o, index[t]] from w (C, O, kernel)
 * for the input gradient. NULL if out of memory. */
static float* pack_weight(const tap_call* g, const float* w) {
    const int64_t C = g->C, O = g->O, T = g->T, kernel = g->kernel;
    const int64_t Opad = (O + OB - 1) / OB * OB, nob = Opad / OB;
    float* wp = (float*)alloc64(sizeof(float) * T * Opad * C);
    if (!wp) return NULL;
    for (int64_t t = 0; t < T; t++)
        for (int64_t ob = 0; ob < nob; ob++)
            for (int64_t c = 0; c < C; c++)
                for (int64_t j = 0; j < OB; j++) {
                    int64_t o = ob * OB + j;
                    int64_t at = g->input_grad ? (c * O + o) * kernel : (o * C + c) * kernel;
                    wp[((t * nob + ob) * C + c) * OB + j] = o < O ? w[at + g->index[t]] : 0.f;
                }
    return wp;
}

#include "tapconv_cl.c"

/* y[n, o, q, p] = bias[o] + sum_{c, t} w[o, c, index[t]] * x[n, c, q + dq_t, p + off_t]: the
 * conv with weight w (O, C, kernel), contiguous, and bias (O) or NULL. With input_grad, the
 * input gradient of the conv whose weight w is (C, O, kernel): x is the output gradient, y
 * the input gradient, y[n, o, q, p] = sum_{c, t} w[c, o, index[t]] * x[n, c, q - dq_t,
 * p - off_t] (the taps negated; bias NULL). The weight, a few KB, is packed here rather than
 * by torch operations in Python, whose fixed cost per call would weigh on small inputs.
 * Returns 0, or -1 if out of memory (y untouched then). */
int tap_forward(const tap_call* g, const float* x, const float* w, const float* bias,
                float* y) {
    if (g->layout) return cl_tap_forward(g, x, w, bias, y);
    const int64_t T = g->T, O = g->O, Opad = (O + OB - 1) / OB * OB;
    tap_call h = *g;
    int64_t* taps = (int64_t*)malloc(sizeof(int64_t) * 3 * (T + 1));
    float* wp = pack_weight(g, w);
    float* b = bias ? (float*)calloc(Opad, sizeof(float)) : NULL;
    int status = -1;
    if (taps && wp && (b || !bias)) {
        for (int64_t i = 0; i < 3 * T; i++) taps[i] = g->input_grad ? -g->taps[i] : g->taps[i];
        if (b) memcpy(b, bias, sizeof(float) * O);
        h.taps = taps;
        status = fwd_packed(&h, x, wp, b, y);
    }
    free(taps);
    free(wp);
    free(b);
    return status;
}

/* -- weight gradient, positions in the lanes ------------------------------------------------ */

/* For any O: each thread sums vectors of LANES partial sums per (slot, o) over the planes it
 * takes, and the threads' sums add up at the end. */
static int wg_positions(const tap_call* g, const float* x, const float* gy, float* gwp,
                        float* gb) {
    const int64_t N = g->N, C = g->C, D = g->D, H = g->H, W = g->W, O = g->O, Do = g->Do;
    const int64_t T = g->T, *taps = g->taps;
    const int nthreads = (int)g->nthreads;
    int64_t P = H * W, nvec = (P + LANES - 1) / LANES;
    int64_t K = C * T + 1; /* slots: each (c, t), then the bias; then one that takes padding */
    int64_t Opad = (O + WO - 1) / WO * WO;
    int64_t slots = (K + 1) * Opad * LANES;
    plane_masks masks;
    int failed = plane_masks_make(&masks, H, W, T, taps, nvec);
    float* zeros = (float*)alloc64(sizeof(float) * LANES * nvec);
    float* ones = (float*)alloc64(sizeof(float) * LANES * nvec);
    float* acc_all = (float*)alloc64(sizeof(float) * slots * nthreads);
    failed = failed || !zeros || !ones || !acc_all;
    if (!failed) {
        for (int64_t i = 0; i < LANES * nvec; i++) zeros[i] = 0.f, ones[i] = 1.f;
        for (int64_t i = 0; i < slots * nthreads; i++) acc_all[i] = 0.f;
    }
    const lanes_t* inside = failed ? NULL : masks.lanes + T * nvec;
#pragma omp parallel num_threads(nthreads) if (!failed)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        int64_t cap = K + WK;
        const float** src = (const float**)malloc(sizeof(float*) * cap);
        const lanes_t** msk = (const lanes_t**)malloc(sizeof(lanes_t*) * cap);
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
                        msk[nk] = masks.lanes + t * nvec;
                        slot[nk++] = c * T + t;
                    }
                if (gb) src[nk] = ones, msk[nk] = inside, slot[nk++] = C * T;
                while (nk % WK) src[nk] = zeros, msk[nk] = inside, slot[nk++] = K;
                for (int64_t o0 = 0; o0 < Opad; o0 += WO) {
                    const float* gp[WO];
                    for (int j = 0; j < WO; j++)
                        gp[j] = o0 + j < O ? gy + ((n * O + o0 + j) * Do + q) * P : zeros;
                    for (int64_t k0 = 0; k0 < nk; k0 += WK) {
                        vf acc[WK][WO];
                        for (int k = 0; k < WK; k++)
                            for (int j = 0; j < WO; j++)
                                acc[k][j] = *(vf*)(accb + (slot[k0 + k] * Opad + o0 + j) * LANES);
                        for (int64_t v = 0; v < nvec; v++) {
                            vf gv[WO];
                            for (int j = 0; j < WO; j++) gv[j] = load_lanes(inside[v], gp[j] + v * LANES);
#pragma GCC unroll 8
                            for (int k = 0; k < WK; k++) {
                                vf xv = load_lanes(msk[k0 + k][v], src[k0 + k] + v * LANES);
                                for (int j = 0; j < WO; j++) acc[k][j] += gv[j] * xv;
                            }
                        }
                        for (int k = 0; k < WK; k++)
                            for (int j = 0; j < WO; j++)
                                *(vf*)(accb + (slot[k0 + k] * Opad + o0 + j) * LANES) = acc[k][j];
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
                vf sum = {0};
                for (int th = 0; th < nthreads; th++)
                    sum += *(const vf*)(acc_all + th * slots + (s * Opad + o) * LANES);
                float v = lane_sum(sum);
                if (s < C * T) gwp[s * O + o] = v;
                else if (gb) gb[o] = v;
            }
    free(acc_all);
    free(zeros);
    free(ones);
    plane_masks_free(&masks);
    return failed ? -1 : 0;
}

/* -- weight gradient, output channels in the lanes ------------------------------------------ */

/* For O a multiple of LANES (see tap_weight_grad_variant). Each thread copies a rectangle of
 * a plane of g to position-major order, then for each tap and block of SB input channels sums
 * x (broadcast) times a row of that copy over the positions where the tap reads inside the
 * plane, OV * SB vectors in registers. The SB rows of x are offsets from the first, so the
 * loop over positions steps one pointer, not SB of them. It takes WG_UNROLL positions a
 * step where the registers hold that many loads in flight (32 registers: AVX-512). */
#define WG_KERNEL(OV, SB)                                                                      \
    static void wg_block_##OV##_##SB(const float* const* xs, const float* gT, int64_t O,        \
                                     int64_t W, int64_t h0, int64_t h1, int64_t w0,             \
                                     int64_t w1, int64_t ha, int64_t wa, int64_t cw,            \
                                     float* out, int64_t out_stride) {                          \
        vf acc[SB][OV];                                                                         \
        int64_t off[SB];                                                                        \
        for (int i = 0; i < SB; i++) off[i] = xs[i] - xs[0];                                    \
        for (int i = 0; i < SB; i++)                                                            \
            for (int v = 0; v < OV; v++) acc[i][v] = (vf){0};                                   \
        for (int64_t h = h0; h < h1; h++) {                                                     \
            const float* gp = gT + ((h - ha) * cw + (w0 - wa)) * O;                             \
            UNROLL(WG_UNROLL)                                                                   \
            for (int64_t w = w0; w < w1; w++, gp += O) {                                        \
                const float* xp = xs[0] + h * W + w;                                            \
                vf gv[OV];                                                                      \
                for (int v = 0; v < OV; v++) gv[v] = loadu(gp + LANES * v);                     \
                for (int i = 0; i < SB; i++) {                                                  \
                    vf xb = splat(xp[off[i]]);                                                  \
                    for (int v = 0; v < OV; v++) acc[i][v] += xb * gv[v];                       \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < SB; i++)                                                            \
            for (int v = 0; v < OV; v++) {                                                      \
                float* dst = out + i * out_stride + LANES * v;                                  \
                storeu(dst, loadu(dst) + acc[i][v]);                                            \
            }                                                                                   \
    }

typedef void (*wg_block_fn)(const float* const*, const float*, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                            int64_t);

/* Per count of output-channel vectors OV, two block heights SB: the larger, unless the
 * smaller divides C and the larger not. OV * SB + OV + 1 vectors fit in the registers. */
#if OV_MAX == 4
WG_KERNEL(4, 6)
WG_KERNEL(4, 4)
WG_KERNEL(3, 8)
WG_KERNEL(2, 12)
WG_KERNEL(2, 8)
WG_KERNEL(1, 12)
WG_KERNEL(1, 8)
static const int sb_big[OV_MAX + 1] = {0, 12, 12, 8, 6}, sb_small[OV_MAX + 1] = {0, 8, 8, 8, 4};
static const wg_block_fn wg_big[OV_MAX + 1] = {0, wg_block_1_12, wg_block_2_12, wg_block_3_8,
                                               wg_block_4_6};
static const wg_block_fn wg_small[OV_MAX + 1] = {0, wg_block_1_8, wg_block_2_8, wg_block_3_8,
                                                 wg_block_4_4};
#elif OV_MAX == 2
WG_KERNEL(2, 6)
WG_KERNEL(2, 4)
WG_KERNEL(1, 12)
WG_KERNEL(1, 8)
static const int sb_big[OV_MAX + 1] = {0, 12, 6}, sb_small[OV_MAX + 1] = {0, 8, 4};
static const wg_block_fn wg_big[OV_MAX + 1] = {0, wg_block_1_12, wg_block_2_6};
static const wg_block_fn wg_small[OV_MAX + 1] = {0, wg_block_1_8, wg_block_2_4};
#endif

/* Floats of g, position-major, per thread: 32 KB, which stay in L1 (with the rows of x they
 * meet) while every tap and block of channels reads them, as long as that makes WG_MIN_POS
 * positions or more; a larger piece, a whole plane say, would come from L2 on each pass.
 * With more output channels, so few positions would leave the fixed cost of each block's
 * sums (loaded, stored) to too little work: those take WG_CHUNK_MAX floats, from L2. */
#define WG_CHUNK (1 << 13)
#define WG_CHUNK_MAX (1 << 16)
#define WG_MIN_POS 256

/* The g of the rectangle a thread takes next, to fetch into L2 while it works on this one:
 * in each of channels output channels, len floats from at, then at + stride, ... (a
 * rectangle is whole rows, or one row's piece: contiguous). i: where wg_fetch goes on. */
typedef struct {
    const float* at;
    int64_t len, stride, channels, i;
} wg_next;

/* Fetch up to count more lines of next into L2: each channel's, and one more line, as they
 * may start mid-line. */
static inline void wg_fetch(wg_next* next, int64_t count) {
    for (; count > 0 && next->channels > 0; count--) {
        __builtin_prefetch(next->at + (next->i < next->len ? next->i : next->len - 1), 0, 2);
        next->i += LINE;
        if (next->i >= next->len + LINE) next->i = 0, next->at += next->stride, next->channels--;
    }
}

/* One rectangle [ha, hb) x [wa, wb) of output plane q of sample n: its g, position-major,
 * into gT (row stride cw positions), then every tap's sums over the part of the rectangle
 * where that tap reads inside the plane; meanwhile, the next rectangle's g into L2. */
static void wg_rect(const tap_call* g, const float* x, const float* gq, float* gT,
                    float* accw, float* accb, int64_t n, int64_t q,
                    int64_t ha, int64_t hb, int64_t wa, int64_t wb, int64_t cw, wg_next next) {
    const int64_t C = g->C, D = g->D, H = g->H, W = g->W, O = g->O, Do = g->Do, T = g->T;
    const int64_t* taps = g->taps;
    int64_t P = H * W;
    /* The next rectangle's g, fetched into L2 a share before each tap, so that the
       transposition below finds it there. g's channels lie a plane or more apart: too many
       streams for the hardware to fetch ahead by itself. */
    int64_t share = (next.channels * (next.len / LINE + 2) + T - 1) / T;
    for (int64_t h = ha; h < hb; h++)
        for (int64_t o0 = 0; o0 < O; o0 += LANES) {
            const float* row = gq + o0 * Do * P + h * W;
            float* dst = gT + (h - ha) * cw * O + o0;
            int64_t w = wa;
            for (; w + LANES <= wb; w += LANES) {
                vf r[LANES];
                for (int i = 0; i < LANES; i++) r[i] = loadu(row + i * Do * P + w);
                transpose(r);
                for (int j = 0; j < LANES; j++) storeu(dst + (w + j - wa) * O, r[j]);
            }
            for (; w < wb; w++)
                for (int i = 0; i < LANES; i++) dst[(w - wa) * O + i] = row[i * Do * P + w];
        }
    if (accb) /* four sums, so that the adds need not wait for each other */
        for (int64_t o0 = 0; o0 < O; o0 += LANES) {
            vf s[4] = {{0}, {0}, {0}, {0}};
            for (int64_t h = ha; h < hb; h++) {
                const float* row = gT + (h - ha) * cw * O + o0;
                int64_t w = 0, width = wb - wa;
                for (; w + 4 <= width; w += 4)
                    for (int i = 0; i < 4; i++) s[i] += loadu(row + (w + i) * O);
                for (; w < width; w++) s[0] += loadu(row + w * O);
            }
            storeu(accb + o0, loadu(accb + o0) + ((s[0] + s[1]) + (s[2] + s[3])));
        }
    for (int64_t t = 0; t < T; t++) {
        wg_fetch(&next, share);
        int64_t sq = q + taps[3 * t], dh = taps[3 * t + 1], dw = taps[3 * t + 2];
        if (sq < 0 || sq >= D) continue;
        int64_t h0 = dh < 0 ? -dh : 0, h1 = dh > 0 ? H - dh : H;
        int64_t w0 = dw < 0 ? -dw : 0, w1 = dw > 0 ? W - dw : W;
        if (h0 < ha) h0 = ha;
        if (h1 > hb) h1 = hb;
        if (w0 < wa) w0 = wa;
        if (w1 > wb) w1 = wb;
        if (h1 <= h0 || w1 <= w0) continue;
        for (int64_t o0 = 0; o0 < O; o0 += OV_MAX * LANES) {
            int ov = (O - o0) / LANES < OV_MAX ? (int)((O - o0) / LANES) : OV_MAX;
            int big = sb_big[ov], small = sb_small[ov];
            int use_small = (C % big && !(C % small)) || C <= small;
            int sb = use_small ? small : big;
            wg_block_fn block = use_small ? wg_small[ov] : wg_big[ov];
            for (int64_t c0 = 0; c0 < C; c0 += sb) {
                /* channels past C, which pad the last block, read channel c0 again: their
                   sums go to rows past C, which are dropped */
                const float* xs[SB_MAX];
                for (int i = 0; i < sb; i++)
                    xs[i] = x + ((n * C + (c0 + i < C ? c0 + i : c0)) * D + sq) * P + dh * W + dw;
                block(xs, gT + o0, O, W, h0, h1, w0, w1, ha, wa, cw, accw + (c0 * T + t) * O + o0,
                      T * O);
            }
        }
    }
}

/* The rectangle after the one of rows [ha, hb) ending at column wb, in rectangles of ch rows
 * and cw columns, of job's plane of g: the row's next piece, the next rows, or the first of
 * the next job's plane (this thread's next, but at the end of its share of jobs). */
static wg_next wg_after(const tap_call* g, const float* gy, int64_t job, int64_t ha,
                        int64_t hb, int64_t wb, int64_t ch, int64_t cw) {
    const int64_t H = g->H, W = g->W, Do = g->Do;
    int64_t nh = ha, nw = wb;
    if (wb >= W) nh = hb, nw = 0;
    if (nh >= H) nh = 0, job++;
    wg_next next = {gy, 1, 0, 0, 0};
    if (job >= g->N * Do) return next;
    int64_t nh1 = nh + ch < H ? nh + ch : H, nw1 = nw + cw < W ? nw + cw : W;
    next.at += ((job / Do * g->O * Do) + job % Do) * H * W + nh * W + nw;
    next.len = (nh1 - nh - 1) * W + nw1 - nw; /* whole rows, or one row's piece */
    next.stride = Do * H * W, next.channels = g->O;
    return next;
}

static int wg_channels(const tap_call* g, const float* x, const float* gy, float* gw,
                       float* gb) {
    const int64_t N = g->N, C = g->C, H = g->H, W = g->W, O = g->O, Do = g->Do, T = g->T;
    const int nthreads = (int)g->nthreads;
    /* per thread: (C + SB_MAX, T, O) weight sums (rows past C take the sums of the channels
       that pad the last block, which are dropped), then O bias sums */
    int64_t P = H * W, G = (C + SB_MAX) * T * O;
    /* g goes position-major a rectangle of rect positions at a time (WG_CHUNK values, or
       WG_CHUNK_MAX for many channels, see there; 16 positions at least): whole rows while
       they fit, else pieces of one row */
    int64_t rect = WG_CHUNK / O >= WG_MIN_POS ? WG_CHUNK / O : WG_CHUNK_MAX / O;
    if (rect < 16) rect = 16;
    int64_t ch = 1, cw = W;
    if (W <= rect) ch = rect / W;
    else cw = rect;
    float* acc_all = (float*)calloc((G + O) * nthreads, sizeof(float));
    int failed = !acc_all;
#pragma omp parallel num_threads(nthreads) if (!failed)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float* gT = (float*)alloc64(sizeof(float) * ch * cw * O);
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
                const float* gq = gy + (n * O * Do + q) * P;
                for (int64_t ha = 0; ha < H; ha += ch)
                    for (int64_t wa = 0; wa < W; wa += cw) {
                        int64_t hb = ha + ch < H ? ha + ch : H, wb = wa + cw < W ? wa + cw : W;
                        wg_next next = wg_after(g, gy, job, ha, hb, wb, ch, cw);
                        wg_rect(g, x, gq, gT, accw, accb, n, q, ha, hb, wa, wb, cw, next);
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
    free(acc_all);
    return failed ? -1 : 0;
}

/* gw[o, c, index[t]] = sum_{n, q, p} g[n, o, q, p] * x[n, c, q + dq_t, p + off_t], gw (O, C,
 * kernel) zero elsewhere, unless gw is NULL; gb[o] = sum g[n, o, q, p] unless gb is NULL.
 * Returns 0, or -1 if out of memory (gw and gb untouched then). */
int tap_weight_grad(const tap_call* g, const float* x, const float* gy, float* gw,
                    float* gb) {
    const int64_t C = g->C, O = g->O, T = g->T, kernel = g->kernel;
    float* gwp = (float*)malloc(sizeof(float) * C * T * O); /* (C, T, O): by tap */
    int status = -1; /* the variants write gb only once they have all their sums */
    if (gwp && g->layout)
        status = cl_weight_grad(g, x, gy, gwp, gb);
    else if (gwp && tap_weight_grad_variant(C, O, T) == WG_CHANNELS)
        status = wg_channels(g, x, gy, gwp, gb);
    else if (gwp)
        status = wg_positions(g, x, gy, gwp, gb);
    if (status == 0 && gw) {
        memset(gw, 0, sizeof(float) * O * C * kernel);
        for (int64_t c = 0; c < C; c++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t o = 0; o < O; o++)
                    gw[(o * C + c) * kernel + g->index[t]] += gwp[(c * T + t) * O + o];
    }
    free(gwp);
    return status;
}
