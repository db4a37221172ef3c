/* granet's condensed fan-in kernels: y = x W^T for a weight whose rows all hold k active weights
   (see granet/deploy/condensed.py, which loads this library with ctypes and holds the same
   computation in torch operations for builds without it).

   Built once, when the package is built (setup.py: the extension module
   granet.deploy._condensed_kernels); no compiler runs at import or run time. The kernels use no
   Python API: the module stub at the end exists only so that setuptools builds, names and installs
   the shared library like any extension module.

   Layout ("blocked"): the output rows in blocks of 16, block b holding for each j < k the j-th
   active weight of its 16 rows side by side: values[(b * k + j) * 16 + r] and index[same] (the
   input it reads; uint16 or int32) for row 16 b + r. Rows past the layer's last (the padding of the
   last block) hold value 0 at index 0. One vector of 16 lanes is then 16 rows at the same j: the
   one-row product is one gather of x per 16 weights, and rows never need a horizontal sum.

   What every kernel computes, for each output row o and input row b (k the fan-in):

       acc = 0.0f;  for (j = 0; j < k; j++) { p = value[o][j] * x[b][index[o][j]]; acc = acc + p; }
       y[b][o] = bias ? acc + bias[o] : acc;

   a product rounded to float, then a sum in the order of j: every kernel, instruction set and
   batch size gives the same bits, and condensed.py's torch operations do the same additions. The
   build uses -ffp-contract=off and every product is its own statement, so no compiler fuses the
   two roundings into one FMA; condensed.py checks the bits against the torch operations when it
   loads the library and refuses a library that differs.

   Two kernels: "gather" (x row-major, batch rows in the inner loop: for one or a few rows) and
   "broadcast" (x transposed, in x batch: each weight scales a row of x^T, for larger batches).
   On x86 with GCC or Clang both are compiled for the baseline instruction set (plain C), AVX2 and
   AVX-512 (F), and granet_condensed_use picks the widest one the CPU runs. */
#ifndef GRANET_NO_PYTHON /* defined to compile the kernels alone */
#include <Python.h>      /* first, as Python's headers require */
#endif
#include <stdint.h>
#include <string.h>

#ifndef GRANET_SOURCE_HASH
#define GRANET_SOURCE_HASH 0
#endif

#if defined(_WIN32)
#define GRANET_EXPORT __declspec(dllexport)
#elif defined(__GNUC__)
#define GRANET_EXPORT __attribute__((visibility("default")))
#else
#define GRANET_EXPORT
#endif

#define LANES 16 /* rows per block */

typedef void (*gather_fn)(const float*, const void*, const float*, int64_t, const float*, float*, int64_t, int64_t,
                          int64_t, int64_t, int64_t);
typedef void (*broadcast_fn)(const float*, const void*, const float*, const float*, float*, int64_t, int64_t,
                             int64_t, int64_t, int64_t);

/* ------------------------------------------------------------------------------------ portable */

/* The rows of block blk that exist (the last block may be partly padding). */
static int64_t live_rows(int64_t blk, int64_t out) {
    int64_t left = out - blk * LANES;
    return left < LANES ? left : LANES;
}

/* Rows o0 .. o0 + min(4, rows) - 1 of a broadcast kernel's 4 x stride results (tmp, row-major)
   into columns c .. c + width - 1 of y (batch x out), plus bias where given. */
static void store_rows(float* y, const float* tmp, int64_t stride, int64_t out, int64_t o0, int64_t rows, int64_t c,
                       int64_t width, const float* bias) {
    for (int64_t r = 0; r < 4 && r < rows; ++r) {
        float add = bias ? bias[o0 + r] : 0.0f;
        for (int64_t l = 0; l < width; ++l) {
            float value = tmp[r * stride + l];
            y[(c + l) * out + o0 + r] = bias ? value + add : value;
        }
    }
}

#define PORTABLE_KERNELS(SUF, IDX)                                                                       \
    static void gather_portable_##SUF(const float* v, const void* ixv, const float* x, int64_t in,       \
                                      const float* bias, float* y, int64_t out, int64_t k,               \
                                      int64_t batch, int64_t first, int64_t last) {                      \
        const IDX* ix = (const IDX*)ixv;                                                                 \
        for (int64_t blk = first; blk < last; ++blk) {                                                   \
            const float* vb = v + blk * k * LANES;                                                       \
            const IDX* ib = ix + blk * k * LANES;                                                        \
            int64_t live = live_rows(blk, out);                                                          \
            for (int64_t b = 0; b < batch; ++b) {                                                        \
                const float* xb = x + b * in;                                                            \
                float acc[LANES] = {0};                                                                  \
                for (int64_t j = 0; j < k; ++j) {                                                        \
                    for (int r = 0; r < LANES; ++r) {                                                    \
                        float p = vb[j * LANES + r] * xb[ib[j * LANES + r]];                             \
                        acc[r] = acc[r] + p;                                                             \
                    }                                                                                    \
                }                                                                                        \
                for (int64_t r = 0; r < live; ++r)                                                       \
                    y[b * out + blk * LANES + r] = bias ? acc[r] + bias[blk * LANES + r] : acc[r];       \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    static void broadcast_portable_##SUF(const float* v, const void* ixv, const float* xt, const float* bias, \
                                         float* y, int64_t out, int64_t k, int64_t batch,                \
                                         int64_t first, int64_t last) {                                  \
        const IDX* ix = (const IDX*)ixv;                                                                 \
        for (int64_t blk = first; blk < last; ++blk) {                                                   \
            const float* vb = v + blk * k * LANES;                                                       \
            const IDX* ib = ix + blk * k * LANES;                                                        \
            int64_t live = live_rows(blk, out);                                                          \
            for (int64_t r = 0; r < live; ++r) {                                                         \
                for (int64_t c = 0; c < batch; c += LANES) {                                             \
                    int64_t width = batch - c < LANES ? batch - c : LANES;                               \
                    float acc[LANES] = {0};                                                              \
                    for (int64_t j = 0; j < k; ++j) {                                                    \
                        float w = vb[j * LANES + r];                                                     \
                        const float* xr = xt + (int64_t)ib[j * LANES + r] * batch + c;                   \
                        for (int64_t l = 0; l < width; ++l) {                                            \
                            float p = w * xr[l];                                                         \
                            acc[l] = acc[l] + p;                                                         \
                        }                                                                                \
                    }                                                                                    \
                    float add = bias ? bias[blk * LANES + r] : 0.0f;                                     \
                    for (int64_t l = 0; l < width; ++l)                                                  \
                        y[(c + l) * out + blk * LANES + r] = bias ? acc[l] + add : acc[l];               \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

PORTABLE_KERNELS(u16, uint16_t)
PORTABLE_KERNELS(i32, int32_t)

/* ------------------------------------------------------------------------------- x86 variants */

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(_MSC_VER)                \
    && !defined(GRANET_NO_DISPATCH)
#define GRANET_X86_DISPATCH 1
#include <immintrin.h>

#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx2")))

/* ---- AVX2: a block is two vectors of 8 rows. */

#define IDX256_u16(p) _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p)))
#define IDX256_i32(p) _mm256_loadu_si256((const __m256i*)(p))
#define GB2 4 /* batch rows per pass of the AVX2 gather kernel: 8 accumulators */

/* Store the live rows of a 16-row result (two vectors) at dst, plus bias (when not NULL). */
TARGET_AVX2 static inline void store16_avx2(float* dst, __m256 lo, __m256 hi, const float* bias, int64_t live) {
    if (bias && live == LANES) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
    } else if (bias) {
        float b[LANES] = {0};
        memcpy(b, bias, (size_t)live * sizeof(float));
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(b));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(b + 8));
    }
    if (live == LANES) {
        _mm256_storeu_ps(dst, lo);
        _mm256_storeu_ps(dst + 8, hi);
    } else {
        float tmp[LANES];
        _mm256_storeu_ps(tmp, lo);
        _mm256_storeu_ps(tmp + 8, hi);
        memcpy(dst, tmp, (size_t)live * sizeof(float));
    }
}

/* Lanes [0, width) of a 8-lane maskload (width <= 8; AVX2 maskload never touches masked lanes). */
TARGET_AVX2 static inline __m256i lanes_avx2(int64_t width) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)width), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#define AVX2_KERNELS(SUF, IDX)                                                                           \
    TARGET_AVX2 static void gather_avx2_##SUF(const float* v, const void* ixv, const float* x, int64_t in, \
                                              const float* bias, float* y, int64_t out,                  \
                                              int64_t k, int64_t batch, int64_t first, int64_t last) {   \
        const IDX* ix = (const IDX*)ixv;                                                                 \
        for (int64_t blk = first; blk < last; ++blk) {                                                   \
            const float* vb = v + blk * k * LANES;                                                       \
            const IDX* ib = ix + blk * k * LANES;                                                        \
            int64_t live = live_rows(blk, out);                                                          \
            for (int64_t b0 = 0; b0 < batch; b0 += GB2) {                                                \
                int n = batch - b0 < GB2 ? (int)(batch - b0) : GB2;                                      \
                __m256 lo[GB2], hi[GB2];                                                                 \
                for (int t = 0; t < GB2; ++t) lo[t] = hi[t] = _mm256_setzero_ps();                       \
                for (int64_t j = 0; j < k; ++j) {                                                        \
                    __m256i i0 = IDX256_##SUF(ib + j * LANES), i1 = IDX256_##SUF(ib + j * LANES + 8);    \
                    __m256 w0 = _mm256_loadu_ps(vb + j * LANES), w1 = _mm256_loadu_ps(vb + j * LANES + 8); \
                    for (int t = 0; t < GB2; ++t) {                                                      \
                        if (t < n) {                                                                     \
                            const float* xb = x + (b0 + t) * in;                                         \
                            __m256 p0 = _mm256_mul_ps(w0, _mm256_i32gather_ps(xb, i0, 4));               \
                            __m256 p1 = _mm256_mul_ps(w1, _mm256_i32gather_ps(xb, i1, 4));               \
                            lo[t] = _mm256_add_ps(lo[t], p0);                                            \
                            hi[t] = _mm256_add_ps(hi[t], p1);                                            \
                        }                                                                                \
                    }                                                                                    \
                }                                                                                        \
                for (int t = 0; t < n; ++t)                                                              \
                    store16_avx2(y + (b0 + t) * out + blk * LANES, lo[t], hi[t], bias ? bias + blk * LANES : 0, live); \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    TARGET_AVX2 static void broadcast_avx2_##SUF(const float* v, const void* ixv, const float* xt,       \
                                                 const float* bias, float* y, int64_t out,               \
                                                 int64_t k, int64_t batch, int64_t first, int64_t last) { \
        const IDX* ix = (const IDX*)ixv;                                                                 \
        float tmp[4][LANES];                                                                             \
        for (int64_t blk = first; blk < last; ++blk) {                                                   \
            const float* vb = v + blk * k * LANES;                                                       \
            const IDX* ib = ix + blk * k * LANES;                                                        \
            int64_t live = live_rows(blk, out);                                                          \
            for (int g = 0; g < live; g += 4) { /* 4 rows at a time: 8 independent sums */               \
                for (int64_t c = 0; c < batch; c += LANES) {                                             \
                    int64_t width = batch - c < LANES ? batch - c : LANES;                               \
                    __m256i m0 = lanes_avx2(width < 8 ? width : 8), m1 = lanes_avx2(width > 8 ? width - 8 : 0); \
                    __m256 a[4][2];                                                                      \
                    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();                 \
                    for (int64_t j = 0; j < k; ++j) {                                                    \
                        for (int r = 0; r < 4; ++r) {                                                    \
                            const float* xr = xt + (int64_t)ib[j * LANES + g + r] * batch + c;           \
                            __m256 w = _mm256_set1_ps(vb[j * LANES + g + r]);                            \
                            __m256 p0 = _mm256_mul_ps(w, _mm256_maskload_ps(xr, m0));                    \
                            __m256 p1 = _mm256_mul_ps(w, _mm256_maskload_ps(xr + 8, m1));                \
                            a[r][0] = _mm256_add_ps(a[r][0], p0);                                        \
                            a[r][1] = _mm256_add_ps(a[r][1], p1);                                        \
                        }                                                                                \
                    }                                                                                    \
                    for (int r = 0; r < 4; ++r) {                                                        \
                        _mm256_storeu_ps(tmp[r], a[r][0]);                                               \
                        _mm256_storeu_ps(tmp[r] + 8, a[r][1]);                                           \
                    }                                                                                    \
                    store_rows(y, tmp[0], LANES, out, blk * LANES + g, live - g, c, width, bias);        \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

AVX2_KERNELS(u16, uint16_t)
AVX2_KERNELS(i32, int32_t)

/* ---- AVX-512: a block is one vector. */

#define IDX512_u16(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p)))
#define IDX512_i32(p) _mm512_loadu_si512((const void*)(p))
#define GB512 8 /* batch rows per pass of the AVX-512 gather kernel */

TARGET_AVX512 static inline __mmask16 lanes_avx512(int64_t width) {
    return (__mmask16)(width >= LANES ? 0xFFFFu : ((1u << width) - 1u));
}

/* One input row, two blocks at a time (two independent sums and gathers in flight) with the weights
   prefetched 1 KiB ahead: 15-25% faster than one block at a time when the weights come from L3
   (measured). Returns the first block it left (an odd one at the end). */
#define AVX512_PAIRS(SUF, IDX)                                                                           \
    TARGET_AVX512 static int64_t gather_pairs_avx512_##SUF(const float* v, const IDX* ix, const float* x, \
                                                           const float* bias, float* y, int64_t out,      \
                                                           int64_t k, int64_t first, int64_t last) {     \
        int64_t blk = first;                                                                             \
        for (; blk + 2 <= last; blk += 2) {                                                              \
            const float* v0 = v + blk * k * LANES;                                                       \
            const IDX* i0 = ix + blk * k * LANES;                                                        \
            const float* v1 = v0 + k * LANES;                                                            \
            const IDX* i1 = i0 + k * LANES;                                                              \
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                                   \
            for (int64_t j = 0; j < k; ++j) {                                                            \
                _mm_prefetch((const char*)(v0 + j * LANES) + 1024, _MM_HINT_T0);                         \
                _mm_prefetch((const char*)(v1 + j * LANES) + 1024, _MM_HINT_T0);                         \
                _mm_prefetch((const char*)(i0 + j * LANES) + 1024, _MM_HINT_T0);                         \
                _mm_prefetch((const char*)(i1 + j * LANES) + 1024, _MM_HINT_T0);                         \
                __m512 p0 = _mm512_mul_ps(_mm512_loadu_ps(v0 + j * LANES),                               \
                                          _mm512_i32gather_ps(IDX512_##SUF(i0 + j * LANES), x, 4));      \
                __m512 p1 = _mm512_mul_ps(_mm512_loadu_ps(v1 + j * LANES),                               \
                                          _mm512_i32gather_ps(IDX512_##SUF(i1 + j * LANES), x, 4));      \
                a0 = _mm512_add_ps(a0, p0);                                                              \
                a1 = _mm512_add_ps(a1, p1);                                                              \
            }                                                                                            \
            __mmask16 m0 = lanes_avx512(live_rows(blk, out)), m1 = lanes_avx512(live_rows(blk + 1, out)); \
            if (bias) {                                                                                  \
                a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, bias + blk * LANES));                   \
                a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, bias + blk * LANES + LANES));           \
            }                                                                                            \
            _mm512_mask_storeu_ps(y + blk * LANES, m0, a0);                                              \
            _mm512_mask_storeu_ps(y + blk * LANES + LANES, m1, a1);                                      \
        }                                                                                                \
        return blk;                                                                                      \
    }

AVX512_PAIRS(u16, uint16_t)
AVX512_PAIRS(i32, int32_t)

#define AVX512_KERNELS(SUF, IDX)                                                                         \
    TARGET_AVX512 static void gather_avx512_##SUF(const float* v, const void* ixv, const float* x, int64_t in, \
                                                  const float* bias, float* y, int64_t out,              \
                                                  int64_t k, int64_t batch, int64_t first, int64_t last) { \
        const IDX* ix = (const IDX*)ixv;                                                                 \
        if (batch == 1) first = gather_pairs_avx512_##SUF(v, ix, x, bias, y, out, k, first, last);       \
        for (int64_t blk = first; blk < last; ++blk) {                                                   \
            const float* vb = v + blk * k * LANES;                                                       \
            const IDX* ib = ix + blk * k * LANES;                                                        \
            __mmask16 live = lanes_avx512(live_rows(blk, out));                                          \
            __m512 add = bias ? _mm512_maskz_loadu_ps(live, bias + blk * LANES) : _mm512_setzero_ps();   \
            for (int64_t b0 = 0; b0 < batch; b0 += GB512) {                                              \
                int n = batch - b0 < GB512 ? (int)(batch - b0) : GB512;                                  \
                __m512 acc[GB512];                                                                       \
                for (int t = 0; t < GB512; ++t) acc[t] = _mm512_setzero_ps();                            \
                for (int64_t j = 0; j < k; ++j) {                                                        \
                    __m512i i = IDX512_##SUF(ib + j * LANES);                                            \
                    __m512 w = _mm512_loadu_ps(vb + j * LANES);                                          \
                    for (int t = 0; t < GB512; ++t) {                                                    \
                        if (t < n) {                                                                     \
                            __m512 p = _mm512_mul_ps(w, _mm512_i32gather_ps(i, x + (b0 + t) * in, 4));   \
                            acc[t] = _mm512_add_ps(acc[t], p);                                           \
                        }                                                                                \
                    }                                                                                    \
                }                                                                                        \
                for (int t = 0; t < n; ++t)                                                              \
                    _mm512_mask_storeu_ps(y + (b0 + t) * out + blk * LANES, live,                        \
                                          bias ? _mm512_add_ps(acc[t], add) : acc[t]);                   \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    TARGET_AVX512 static void broadcast_avx512_##SUF(const float* v, const void* ixv, const float* xt,   \
                                                     const float* bias, float* y, int64_t out,           \
                                                     int64_t k, int64_t batch, int64_t first, int64_t last) { \
        const IDX* ix = (const IDX*)ixv;                                                                 \
        float tmp[4][2 * LANES];                                                                         \
        for (int64_t blk = first; blk < last; ++blk) {                                                   \
            const float* vb = v + blk * k * LANES;                                                       \
            const IDX* ib = ix + blk * k * LANES;                                                        \
            int64_t live = live_rows(blk, out);                                                          \
            for (int g = 0; g < live; g += 4) { /* 4 rows x 32 batch lanes: 8 independent sums */        \
                for (int64_t c = 0; c < batch; c += 2 * LANES) {                                         \
                    int64_t width = batch - c < 2 * LANES ? batch - c : 2 * LANES;                       \
                    __mmask16 m0 = lanes_avx512(width), m1 = lanes_avx512(width > LANES ? width - LANES : 0); \
                    __m512 a[4][2];                                                                      \
                    for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();                 \
                    for (int64_t j = 0; j < k; ++j) {                                                    \
                        for (int r = 0; r < 4; ++r) {                                                    \
                            const float* xr = xt + (int64_t)ib[j * LANES + g + r] * batch + c;           \
                            __m512 w = _mm512_set1_ps(vb[j * LANES + g + r]);                            \
                            __m512 p0 = _mm512_mul_ps(w, _mm512_maskz_loadu_ps(m0, xr));                 \
                            __m512 p1 = _mm512_mul_ps(w, _mm512_maskz_loadu_ps(m1, xr + LANES));         \
                            a[r][0] = _mm512_add_ps(a[r][0], p0);                                        \
                            a[r][1] = _mm512_add_ps(a[r][1], p1);                                        \
                        }                                                                                \
                    }                                                                                    \
                    for (int r = 0; r < 4; ++r) {                                                        \
                        _mm512_storeu_ps(tmp[r], a[r][0]);                                               \
                        _mm512_storeu_ps(tmp[r] + LANES, a[r][1]);                                       \
                    }                                                                                    \
                    store_rows(y, tmp[0], 2 * LANES, out, blk * LANES + g, live - g, c, width, bias);    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

AVX512_KERNELS(u16, uint16_t)
AVX512_KERNELS(i32, int32_t)

#define GRANET_LEVELS 3
#else
#define GRANET_LEVELS 1
#endif

/* ------------------------------------------------------------------------------------ dispatch */

typedef struct {
    gather_fn gather[2];       /* [0] uint16 indices, [1] int32 */
    broadcast_fn broadcast[2];
} kernel_set;

static const kernel_set levels[GRANET_LEVELS] = {
    {{gather_portable_u16, gather_portable_i32}, {broadcast_portable_u16, broadcast_portable_i32}},
#ifdef GRANET_X86_DISPATCH
    {{gather_avx2_u16, gather_avx2_i32}, {broadcast_avx2_u16, broadcast_avx2_i32}},
    {{gather_avx512_u16, gather_avx512_i32}, {broadcast_avx512_u16, broadcast_avx512_i32}},
#endif
};

/* The set in use: written only by granet_condensed_use, which condensed.py calls under its lock
   before any kernel runs (and tests call between runs). */
static kernel_set active = {{gather_portable_u16, gather_portable_i32},
                            {broadcast_portable_u16, broadcast_portable_i32}};

GRANET_EXPORT uint64_t granet_condensed_source_hash(void) { return GRANET_SOURCE_HASH; }

/* Bit i set: level i runs on this CPU (0 portable, 1 AVX2, 2 AVX-512 F). */
GRANET_EXPORT int granet_condensed_levels(void) {
    int bits = 1;
#ifdef GRANET_X86_DISPATCH
    /* __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        bits |= 2;
        if (__builtin_cpu_supports("avx512f")) bits |= 4;
    }
#endif
    return bits;
}

/* Use the kernels of level (-1: the highest this CPU runs); returns the level now in use, or -1
   (and nothing changes) when this CPU or this build does not have it. */
GRANET_EXPORT int granet_condensed_use(int level) {
    int bits = granet_condensed_levels();
    if (level < 0) {
        for (level = GRANET_LEVELS - 1; !(bits >> level & 1); level--) {
        }
    }
    if (level >= GRANET_LEVELS || !(bits >> level & 1)) return -1;
    active = levels[level];
    return level;
}

/* y (batch x out, row-major) = x (batch x in, row-major) W^T (+ bias, when not NULL); index_bytes 2
   (uint16) or 4 (int32). Only the rows of blocks [first, last) are computed and written, so that
   threads can share a product. Returns 0, -1 for another index width or -2 for a range outside
   [0, blocks) (nothing written). */
GRANET_EXPORT int granet_condensed_gather_f32(const float* values, const void* index, int index_bytes,
                                              const float* x, int64_t in, const float* bias, float* y, int64_t out,
                                              int64_t blocks, int64_t k, int64_t batch, int64_t first, int64_t last) {
    if (index_bytes != 2 && index_bytes != 4) return -1;
    if (first < 0 || last > blocks || first > last) return -2;
    active.gather[index_bytes == 4](values, index, x, in, bias, y, out, k, batch, first, last);
    return 0;
}

/* The same product from xt = x^T (in x batch, row-major). */
GRANET_EXPORT int granet_condensed_broadcast_f32(const float* values, const void* index, int index_bytes,
                                                 const float* xt, const float* bias, float* y, int64_t out,
                                                 int64_t blocks, int64_t k, int64_t batch, int64_t first,
                                                 int64_t last) {
    if (index_bytes != 2 && index_bytes != 4) return -1;
    if (first < 0 || last > blocks || first > last) return -2;
    active.broadcast[index_bytes == 4](values, index, xt, bias, y, out, k, batch, first, last);
    return 0;
}

#ifndef GRANET_NO_PYTHON
static struct PyModuleDef granet_condensed_module = {
    PyModuleDef_HEAD_INIT, "_condensed_kernels",
    "granet's condensed fan-in kernels, loaded by granet.deploy.condensed with ctypes (no Python functions).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__condensed_kernels(void) { return PyModule_Create(&granet_condensed_module); }
#endif
