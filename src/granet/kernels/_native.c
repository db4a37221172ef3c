/* granet's native selection kernels (see granet/kernels/native.py for what each one replaces).

   Built once, when the package is built (setup.py: the extension module granet.kernels._native_kernels),
   and loaded by granet/kernels/native.py with ctypes; no compiler ever runs at import or run time. The
   kernels use no Python API: the module stub at the end exists only so that setuptools builds,
   names and installs the shared library like any extension module.

   Portable C99 (GCC, Clang, MSVC). Code generation is portable too: the build uses no -march flag.
   On x86 with GCC or Clang every kernel is compiled four times, for the baseline instruction set,
   AVX2, AVX-512 (F/BW/VL/DQ: x86-64-v4) and AVX-512 with VBMI (Ice Lake, Zen 4 and later), with
   function target attributes, and granet_kernels_use picks the widest one the CPU runs when the
   library is loaded. That keeps the speed -march=native gave when these kernels were compiled at
   run time: the band pass is about 1.6x faster with AVX-512 than with SSE2 alone, and VBMI's byte
   permutes take another 2-8% off it.
   No kernel does floating-point arithmetic beyond |x|, comparisons and x * 1.0 / x * 0.0 (built
   with -ffp-contract=off all the same), so every variant returns the same bits (tested). */
#ifndef GRANET_NO_PYTHON  /* defined to compile the kernels alone (tests of the byte-order paths) */
#include <Python.h>       /* first, as Python's headers require */
#endif
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 256

/* Lets native.py tell a library built from another version of this file (a stale in-place build
   of an editable install) from the right one: setup.py passes the first 60 bits of its SHA-256. */
#ifndef GRANET_SOURCE_HASH
#define GRANET_SOURCE_HASH 0
#endif

typedef char granet_float_is_ieee_single[(sizeof(float) == 4 && sizeof(uint32_t) == 4) ? 1 : -1];

#if defined(_WIN32)
#define GRANET_EXPORT __declspec(dllexport)
#elif defined(__GNUC__)
#define GRANET_EXPORT __attribute__((visibility("default")))
#else
#define GRANET_EXPORT
#endif

/* The kernels are inlined into each instruction-set variant, so that each is compiled for it. */
#if defined(_MSC_VER) && !defined(__clang__)
#define GRANET_INLINE static __forceinline
#elif defined(__GNUC__)
#define GRANET_INLINE static inline __attribute__((always_inline))
#else
#define GRANET_INLINE static inline
#endif

/* Byte order, for the 8-flags-at-a-time scan in emit: 1 little-endian (the first byte in memory
   is the lowest of a word), 2 big-endian, 0 unknown (one byte at a time: slower, any order).
   -DGRANET_BYTE_ORDER=N overrides the detection; the self-test catches a wrong one. */
#ifndef GRANET_BYTE_ORDER
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define GRANET_BYTE_ORDER 1
#elif defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define GRANET_BYTE_ORDER 2
#elif defined(_WIN32)  /* every Windows target is little-endian */
#define GRANET_BYTE_ORDER 1
#else
#define GRANET_BYTE_ORDER 0
#endif
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

/* Index of the lowest set bit of a nonzero word. */
GRANET_INLINE int trailing_zeros(uint64_t word) {
#if defined(_MSC_VER) && !defined(__clang__)
    unsigned long i;
#if defined(_M_X64) || defined(_M_ARM64)
    _BitScanForward64(&i, word);
    return (int)i;
#else
    if ((uint32_t)word) { _BitScanForward(&i, (uint32_t)word); return (int)i; }
    _BitScanForward(&i, (uint32_t)(word >> 32));
    return 32 + (int)i;
#endif
#else
    return __builtin_ctzll(word);
#endif
}

/* Append position base+i and value x[i] for every byte flags[i] == 1 (bytes are 0 or 1), in
   ascending order; entries beyond cap are counted but not written. */
GRANET_INLINE int64_t emit(const uint8_t* flags, int64_t m, int64_t base, const float* x, int absolute,
                           int64_t k, int64_t* idx, float* vals, int64_t cap) {
    int64_t w = 0;
    for (; w + 8 <= m; w += 8) {
        uint64_t word;
        memcpy(&word, flags + w, 8);
#if GRANET_BYTE_ORDER == 1 || GRANET_BYTE_ORDER == 2
        while (word) {
            /* flags[w + b] is the b-th lowest byte of word (little-endian) or the b-th highest. */
#if GRANET_BYTE_ORDER == 1
            int64_t i = w + (trailing_zeros(word) >> 3);
            word &= word - 1;
#else  /* big-endian: GCC or Clang (every MSVC target is little-endian) */
            int shift = __builtin_clzll(word);
            int64_t i = w + (shift >> 3);
            word &= ~((uint64_t)1 << (63 - shift));
#endif
            if (k < cap) { idx[k] = base + i; if (vals) vals[k] = absolute ? fabsf(x[i]) : x[i]; }
            k++;
        }
#else
        if (word) {
            for (int64_t i = w; i < w + 8; i++) {
                if (flags[i]) {
                    if (k < cap) { idx[k] = base + i; if (vals) vals[k] = absolute ? fabsf(x[i]) : x[i]; }
                    k++;
                }
            }
        }
#endif
    }
    for (; w < m; w++) {
        if (flags[w]) {
            if (k < cap) { idx[k] = base + w; if (vals) vals[k] = absolute ? fabsf(x[w]) : x[w]; }
            k++;
        }
    }
    return k;
}

/* One block of the band pass; absolute and has_valid are constants at each call site, so the
   compiler emits a vectorised loop for each combination. */
GRANET_INLINE int64_t band_block(const float* x, const uint8_t* ok, uint8_t inv, int64_t m,
                                 float hi, float lo, uint8_t no_lo, uint8_t* up, uint8_t* in,
                                 const int absolute, const int has_valid) {
    int64_t count = 0;
    for (int64_t i = 0; i < m; i++) {
        float v = absolute ? fabsf(x[i]) : x[i];
        uint8_t o = has_valid ? (uint8_t)(ok[i] ^ inv) : 1;
        uint8_t above_hi = v > hi;
        uint8_t u = above_hi & o;
        up[i] = u;
        count += u;
        in[i] = o & (uint8_t)!above_hi & ((uint8_t)(v > lo) | no_lo);
    }
    return count;
}

/* above = (v > hi) & valid (where above is not NULL), n_above its count; the band
   valid & !(v > hi) & (v > lo) as positions and values; v is |x| with absolute, valid is
   !valid with invert; no hi: hi = +inf; no lo: has_lo = 0. Returns the band's size. */
GRANET_INLINE int64_t band(const float* x, int64_t n, int absolute, const uint8_t* valid, int invert,
                           float hi, int has_lo, float lo, uint8_t* above, int64_t* n_above,
                           int64_t* idx, float* vals, int64_t cap) {
    uint8_t up[BLOCK], in[BLOCK];
    uint8_t inv = (uint8_t)(invert & 1), no_lo = (uint8_t)!has_lo;
    int64_t k = 0, a = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        uint8_t* u = above ? above + s : up;
        const uint8_t* ok = valid ? valid + s : 0;
        if (absolute) {
            a += valid ? band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 1, 1)
                       : band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 1, 0);
        } else {
            a += valid ? band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 0, 1)
                       : band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 0, 0);
        }
        k = emit(in, m, s, x + s, absolute, k, idx, vals, cap);
    }
    *n_above = a;
    return k;
}

/* Order-preserving map of a float to an unsigned key (negative floats reversed). */
GRANET_INLINE uint32_t float_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The j-th smallest (1-based, 1 <= j <= n) of x[0..n), as torch.kthvalue, by a radix select on
   the keys: three counting passes of 11, 11 and 10 bits, each over the entries that share the
   bits found so far (no data-dependent swaps, ties cost nothing; n < 2^32). NaN when x holds a NaN (the
   caller then leaves it to torch, which orders NaN last). -0.0 and 0.0 compare equal everywhere
   the result is used, so either may be returned for a tie between them. */
GRANET_INLINE float kth(const float* x, int64_t n, int64_t j) {
    static const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    uint32_t hist[2048];
    uint32_t prefix = 0, fixed = 0;
    int64_t rank = j - 1;
    for (int pass = 0; pass < 3; pass++) {
        int shift = shifts[pass];
        uint32_t bins = 1u << widths[pass], low = bins - 1;
        memset(hist, 0, sizeof(uint32_t) * bins);
        if (pass == 0) {
            int nan = 0;
            for (int64_t i = 0; i < n; i++) {
                nan |= x[i] != x[i];
                hist[float_key(x[i]) >> shift]++;
            }
            if (nan) return NAN;
        } else {
            for (int64_t i = 0; i < n; i++) {
                uint32_t key = float_key(x[i]);
                if ((key & fixed) == prefix) hist[(key >> shift) & low]++;
            }
        }
        uint32_t b = 0;
        while (rank >= (int64_t)hist[b]) rank -= hist[b++];
        prefix |= b << shift;
        fixed |= low << shift;
    }
    uint32_t u = (prefix & 0x80000000u) ? (prefix & 0x7FFFFFFFu) : ~prefix;
    float out;
    memcpy(&out, &u, 4);
    return out;
}

/* x *= (float)mask for each of the count tensors (one read of the mask per block, shared by all
   of them), then x *= 0.0f at the n_also flat positions also (-n <= p < n, a negative one counted
   from the end, as torch indexes): the same bits as multiplying by the mask converted to 1.0 / 0.0
   with those positions cleared. The positions are checked first: with one out of range nothing is
   written and its index in also is returned (torch raises before writing too); else -1. */
GRANET_INLINE int64_t zero_outside(const uint8_t* mask, int64_t n, float* const* tensors, int count,
                                   const int64_t* also, int64_t n_also) {
    float keep[BLOCK];
    for (int64_t j = 0; j < n_also; j++) {
        if (also[j] < -n || also[j] >= n) return j;
    }
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        for (int64_t i = 0; i < m; i++) keep[i] = (float)mask[s + i];
        for (int c = 0; c < count; c++) {
            float* x = tensors[c] + s;
            for (int64_t i = 0; i < m; i++) x[i] *= keep[i];
        }
    }
    for (int64_t j = 0; j < n_also; j++) {
        int64_t p = also[j] < 0 ? also[j] + n : also[j];
        for (int c = 0; c < count; c++) tensors[c][p] *= 0.0f;
    }
    return -1;
}

/* Positions of the set entries of a bool mask (of the clear ones with invert) and, where x is
   not NULL, x (|x| with absolute) there. Returns their number. */
GRANET_INLINE int64_t compact(const uint8_t* mask, int64_t n, int invert, const float* x, int absolute,
                              int64_t* idx, float* vals, int64_t cap) {
    uint8_t flags[BLOCK];
    int64_t k = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const uint8_t* f = mask + s;
        if (invert) {
            for (int64_t i = 0; i < m; i++) flags[i] = f[i] ^ 1;
            f = flags;
        }
        k = emit(f, m, s, x ? x + s : 0, absolute, k, idx, x ? vals : 0, cap);
    }
    return k;
}

/* One set of the four kernels compiled for one instruction set (ATTR: its target attribute). */
typedef int64_t (*band_fn)(const float*, int64_t, int, const uint8_t*, int, float, int, float, uint8_t*,
                           int64_t*, int64_t*, float*, int64_t);
typedef float (*kth_fn)(const float*, int64_t, int64_t);
typedef int64_t (*zero_outside_fn)(const uint8_t*, int64_t, float* const*, int, const int64_t*, int64_t);
typedef int64_t (*compact_fn)(const uint8_t*, int64_t, int, const float*, int, int64_t*, float*, int64_t);
typedef struct { band_fn band; kth_fn kth; zero_outside_fn zero_outside; compact_fn compact; } kernel_set;

#define GRANET_VARIANT(NAME, ATTR)                                                                      \
    ATTR static int64_t band_##NAME(const float* x, int64_t n, int absolute, const uint8_t* valid,    \
                                    int invert, float hi, int has_lo, float lo, uint8_t* above,        \
                                    int64_t* n_above, int64_t* idx, float* vals, int64_t cap) {        \
        return band(x, n, absolute, valid, invert, hi, has_lo, lo, above, n_above, idx, vals, cap);    \
    }                                                                                                   \
    ATTR static float kth_##NAME(const float* x, int64_t n, int64_t j) { return kth(x, n, j); }        \
    ATTR static int64_t zero_outside_##NAME(const uint8_t* mask, int64_t n, float* const* tensors,     \
                                            int count, const int64_t* also, int64_t n_also) {          \
        return zero_outside(mask, n, tensors, count, also, n_also);                                    \
    }                                                                                                   \
    ATTR static int64_t compact_##NAME(const uint8_t* mask, int64_t n, int invert, const float* x,     \
                                       int absolute, int64_t* idx, float* vals, int64_t cap) {         \
        return compact(mask, n, invert, x, absolute, idx, vals, cap);                                  \
    }

GRANET_VARIANT(portable, )

/* x86 variants where the compiler has target attributes and __builtin_cpu_supports (MSVC builds
   the portable set only: SSE2 on x64). The feature lists are what the code generated at each
   level uses; the CPU check below tests each of them. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(_MSC_VER) \
    && !defined(GRANET_NO_DISPATCH)
#define GRANET_X86_DISPATCH 1
GRANET_VARIANT(avx2, __attribute__((target("avx2,bmi,bmi2"))))
GRANET_VARIANT(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2"))))
GRANET_VARIANT(avx512vbmi, __attribute__((target("avx512vbmi,avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2"))))
#define GRANET_LEVELS 4
static const kernel_set levels[GRANET_LEVELS] = {
    {band_portable, kth_portable, zero_outside_portable, compact_portable},
    {band_avx2, kth_avx2, zero_outside_avx2, compact_avx2},
    {band_avx512, kth_avx512, zero_outside_avx512, compact_avx512},
    {band_avx512vbmi, kth_avx512vbmi, zero_outside_avx512vbmi, compact_avx512vbmi},
};
#else
#define GRANET_LEVELS 1
static const kernel_set levels[GRANET_LEVELS] = {
    {band_portable, kth_portable, zero_outside_portable, compact_portable},
};
#endif

/* The set in use: written only by granet_kernels_use, which native.py calls under its lock
   before any kernel runs (and tests call between runs). */
static kernel_set active = {band_portable, kth_portable, zero_outside_portable, compact_portable};

/* Bit i set: level i runs on this CPU (0 portable, 1 AVX2, 2 AVX-512 F/BW/VL/DQ, 3 and VBMI). */
GRANET_EXPORT int granet_kernels_levels(void) {
    int bits = 1;
#ifdef GRANET_X86_DISPATCH
    /* __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")) {
        bits |= 2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
            bits |= 4;
            if (__builtin_cpu_supports("avx512vbmi")) bits |= 8;
        }
    }
#endif
    return bits;
}

/* Use the kernels of level (-1: the highest this CPU runs); returns the level now in use, or -1
   (and nothing changes) when this CPU or this build does not have it. */
GRANET_EXPORT int granet_kernels_use(int level) {
    int bits = granet_kernels_levels();
    if (level < 0) {
        for (level = GRANET_LEVELS - 1; !(bits >> level & 1); level--) {}
    }
    if (level >= GRANET_LEVELS || !(bits >> level & 1)) return -1;
    active = levels[level];
    return level;
}

GRANET_EXPORT uint64_t granet_kernels_source_hash(void) { return (uint64_t)(GRANET_SOURCE_HASH); }

/* Run at load by native.py before the kernels are used: 0 when the kernels in use give known
   results on a small case (positions across 8-byte words, as a wrong byte order would misplace
   them; the band, the k-th value and the masked multiply), else a bit per failed part. */
GRANET_EXPORT int granet_kernels_self_test(void) {
    enum { N = 45 };
    float x[N], vals[N], w[N];
    uint8_t mask[N];
    int64_t idx[N], n_above = -1, want = 0;
    float* tensors[1] = {w};
    int failed = 0;
    for (int i = 0; i < N; i++) {
        x[i] = (float)(i % 9) - 4.0f;  /* -4 .. 4 */
        w[i] = 1.0f;
        mask[i] = (uint8_t)((i * 7) % 5 == 1);
    }
    int64_t k = active.compact(mask, N, 0, x, 1, idx, vals, N);
    for (int i = 0; i < N; i++) {
        if (!mask[i]) continue;
        if (want >= k || idx[want] != i || vals[want] != fabsf(x[i])) failed |= 1;
        want++;
    }
    if (k != want) failed |= 1;
    /* |x| in (2, 3]: the entries with x = -3 or 3; |x| > 3 above. */
    k = active.band(x, N, 1, 0, 0, 3.0f, 1, 2.0f, 0, &n_above, idx, vals, N);
    want = 0;
    for (int i = 0; i < N; i++) {
        if (fabsf(x[i]) != 3.0f) continue;
        if (want >= k || idx[want] != i || vals[want] != 3.0f) failed |= 2;
        want++;
    }
    if (k != want || n_above != 10) failed |= 2;  /* |x| = 4 at 5 per 9 of 45, both signs: 10 */
    if (active.kth(x, N, 5) != -4.0f || active.kth(x, N, 6) != -3.0f) failed |= 4;  /* five -4s first */
    if (active.zero_outside(mask, N, tensors, 1, 0, 0) != -1) failed |= 8;
    for (int i = 0; i < N; i++) {
        if (w[i] != (float)mask[i]) failed |= 8;
    }
    return failed;
}

/* The kernels as native.py declares them (restypes and argtypes): calls through the set in use. */
GRANET_EXPORT int64_t granet_band_f32(const float* x, int64_t n, int absolute, const uint8_t* valid, int invert,
                                      float hi, int has_lo, float lo, uint8_t* above, int64_t* n_above,
                                      int64_t* idx, float* vals, int64_t cap) {
    return active.band(x, n, absolute, valid, invert, hi, has_lo, lo, above, n_above, idx, vals, cap);
}

GRANET_EXPORT float granet_kth_f32(const float* x, int64_t n, int64_t j) { return active.kth(x, n, j); }

GRANET_EXPORT int64_t granet_zero_outside_f32(const uint8_t* mask, int64_t n, float* const* tensors, int count,
                                              const int64_t* also, int64_t n_also) {
    return active.zero_outside(mask, n, tensors, count, also, n_also);
}

GRANET_EXPORT int64_t granet_compact_f32(const uint8_t* mask, int64_t n, int invert, const float* x, int absolute,
                                         int64_t* idx, float* vals, int64_t cap) {
    return active.compact(mask, n, invert, x, absolute, idx, vals, cap);
}

#ifndef GRANET_NO_PYTHON
/* An empty module, so that `import granet.kernels._native_kernels` works; native.py never imports it. */
static struct PyModuleDef granet_native_module = {
    PyModuleDef_HEAD_INIT, "_native_kernels",
    "granet's native selection kernels, loaded by granet.kernels.native with ctypes (no Python functions).", -1, NULL,
};

PyMODINIT_FUNC PyInit__native_kernels(void) { return PyModule_Create(&granet_native_module); }
#endif
