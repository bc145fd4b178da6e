/* int8 micro-kernels for the host (x86-64): convolutions as integer matrix products with AVX-512 VNNI
 * (VPDPBUSD: 64 unsigned x signed byte products summed into 16 int32 lanes per instruction), and the
 * residual add with vector fused multiply-adds. The compiler picks the path from its feature macros
 * (__AVX512F__, __AVX512BW__, __AVX512VL__, __AVX512VNNI__: -march=native on a CPU that has them), else
 * plain C; both give the same bytes (tests/test_host_kernels.py builds both). The compiler pass that
 * calls them is compilers/host_kernels.py; et_kernels_x86.c exports them for the kernels object that
 * TVM's LLVM backend emits (the host library).
 *
 * Bit-exact with onnxruntime's QLinearConv / QLinearAdd (and with the TVM kernels they replace): exact
 * int32 accumulation (wrapping, as int32 arithmetic in TVM does), then float32 requantisation in TVM's
 * order: (float)(acc + bias) * scale, clamped to [-128 - zy, 127 - zy], rounded half to even, plus zy.
 *
 * VPDPBUSD multiplies unsigned by signed bytes, so activations enter as x + 128 (x ^ 0x80, an unsigned
 * byte) and the weights as they are: sum((x + 128) * w) = sum(x * w) + 128 * sum(w). The bias the
 * kernels receive already holds - 128 * sum(w) of its output channel (compilers/host_kernels.py folds it
 * in offline, with the weights repacked in the order the inner loop reads), so no correction runs per
 * call. The plain C path computes the same sum of (x + 128) * w. */
#ifndef ET_KERNELS_X86_H
#define ET_KERNELS_X86_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef ET_X86_API
#define ET_X86_API static inline
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define ET_X86_VNNI 1
#endif

/* Largest packed input (bytes, on the stack) of one convolution: 256 KB, well inside a thread's default
 * stack (8 MB with glibc). compilers/host_kernels.py routes nothing larger. */
#define ET_X86_MAX_PACKED (1 << 18)

/* TVM's epilogue, one value */
static inline int8_t et_x86_requant(int32_t acc, float scale, int32_t zy) {
  const float hi = (float)(127 - zy), lo = (float)(-128 - zy);
  float v = (float)acc * scale;
  v = v < hi ? v : hi;
  v = v > lo ? v : lo;
  return (int8_t)(nearbyintf(v) + (float)zy);
}

static inline uint8_t et_x86_u8(int8_t v) { return (uint8_t)((uint8_t)v ^ 0x80u); }

/* Where weight k of output channel o lies in the blocked layout the tiles read (K weights per channel, K % 4
 * == 0): output channels in blocks of 16, then 8, then 4, then 1 (the tile sequence of et_x86_gemm16), each
 * block [K / 4][channels][4] at offset o0 * K (compilers/host_kernels.py packs the same way offline). */
static inline int32_t et_x86_widx(int32_t o, int32_t k, int32_t K, int32_t cout) {
  int32_t start = 0, size = 1;
  for (int32_t s = 16; s >= 4; s /= 2) {
    const int32_t end = start + (cout - start) / s * s;
    if (o < end) {
      size = s;
      start += (o - start) / s * s;
      return start * K + (k / 4) * 4 * size + (o - start) * 4 + k % 4;
    }
    start = end;
  }
  return o * K + k;
}

/* 4 channel rows of n bytes -> n pixels of 4 bytes (x + 128): the layout one VPDPBUSD lane reads */
static inline void et_x86_interleave4(const int8_t *r0, const int8_t *r1, const int8_t *r2, const int8_t *r3,
                                      uint8_t *d, int32_t n) {
  int32_t i = 0;
#if ET_X86_VNNI
  const __m128i flip = _mm_set1_epi8((char)0x80);
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r0 + i)), flip);
    const __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r1 + i)), flip);
    const __m128i c = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r2 + i)), flip);
    const __m128i e = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(r3 + i)), flip);
    const __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
    const __m128i ce0 = _mm_unpacklo_epi8(c, e), ce1 = _mm_unpackhi_epi8(c, e);
    _mm_storeu_si128((__m128i *)(d + 4 * i), _mm_unpacklo_epi16(ab0, ce0));
    _mm_storeu_si128((__m128i *)(d + 4 * i + 16), _mm_unpackhi_epi16(ab0, ce0));
    _mm_storeu_si128((__m128i *)(d + 4 * i + 32), _mm_unpacklo_epi16(ab1, ce1));
    _mm_storeu_si128((__m128i *)(d + 4 * i + 48), _mm_unpackhi_epi16(ab1, ce1));
  }
#endif
  for (; i < n; ++i) {
    d[4 * i] = et_x86_u8(r0[i]), d[4 * i + 1] = et_x86_u8(r1[i]);
    d[4 * i + 2] = et_x86_u8(r2[i]), d[4 * i + 3] = et_x86_u8(r3[i]);
  }
}

#if ET_X86_VNNI
/* 16 accumulators (one output channel, 16 pixels) -> int8 under mask m: the epilogue lane by lane
 * (VCVTPS2DQ with round-to-nearest-even, as nearbyintf in the default rounding mode) */
static inline void et_x86_requant16(__m512i acc, float scale, int32_t zy, int8_t *y, __mmask16 m) {
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(scale));
  v = _mm512_min_ps(v, _mm512_set1_ps((float)(127 - zy))); /* (v < hi) ? v : hi, as the C epilogue */
  v = _mm512_max_ps(v, _mm512_set1_ps((float)(-128 - zy)));
  const __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                     _mm512_set1_epi32(zy));
  _mm_mask_storeu_epi8(y, m, _mm512_cvtepi32_epi8(q));
}

/* The register tiles: OT output channels x 16 pixels (OT = 16, 8, 4, 1), accumulators as named variables
 * (GCC 12 keeps an array of them in memory). B holds k4 groups of 16 pixels x 4 bytes, groups bstride bytes
 * apart; w is the tile's weight block [k4][OT][4] (group g's 4 weights of each of its channels, contiguous),
 * each broadcast to every lane from memory (embedded broadcast: no extra instruction, one base register).
 * Per group: 1 load, OT VPDPBUSD (inline asm: around the intrinsic GCC 12 copies every accumulator). */
#define ET_X86_DECL(t) __m512i a##t = _mm512_set1_epi32(bias[t]);
#define ET_X86_MAC(t) __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a##t) : "v"(b), "m"(*(const int32_t *)(const void *)(w + 4 * (t))));
#define ET_X86_STORE(t) et_x86_requant16(a##t, scale[t], zy, y + (t) * hw, m);
#define ET_X86_EACH1(X) X(0)
#define ET_X86_EACH4(X) X(0) X(1) X(2) X(3)
#define ET_X86_EACH8(X) ET_X86_EACH4(X) X(4) X(5) X(6) X(7)
#define ET_X86_EACH16(X) ET_X86_EACH8(X) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define ET_X86_TILE(OT)                                                                                           \
  static inline void et_x86_tile##OT(const uint8_t *B, int64_t bstride, int32_t k4, const int8_t *w,              \
                                     const int32_t *bias, const float *scale, int8_t *y, int32_t hw, int32_t zy, \
                                     __mmask16 m) {                                                               \
    ET_X86_EACH##OT(ET_X86_DECL)                                                                                  \
    for (int32_t g = 0; g < k4; ++g, B += bstride, w += 4 * (OT)) {                                               \
      const __m512i b = _mm512_loadu_si512((const void *)B);                                                      \
      ET_X86_EACH##OT(ET_X86_MAC)                                                                                 \
    }                                                                                                             \
    ET_X86_EACH##OT(ET_X86_STORE)                                                                                 \
  }
ET_X86_TILE(16)
ET_X86_TILE(8)
ET_X86_TILE(4)
ET_X86_TILE(1)

/* 16 pixels (masked to m) of every output channel: tiles of 16, 8, 4 and 1 channels (the weights are
 * blocked in that sequence, et_x86_block_weights) */
static inline void et_x86_gemm16(const uint8_t *B, int64_t bstride, int32_t k4, const int8_t *w,
                                 const int32_t *bias, const float *scale, int8_t *y, int32_t hw, int32_t cout,
                                 int32_t zy, __mmask16 m) {
  const int32_t K = 4 * k4;
  int32_t o = 0;
  for (; o + 16 <= cout; o += 16) et_x86_tile16(B, bstride, k4, w + o * K, bias + o, scale + o, y + o * hw, hw, zy, m);
  for (; o + 8 <= cout; o += 8) et_x86_tile8(B, bstride, k4, w + o * K, bias + o, scale + o, y + o * hw, hw, zy, m);
  for (; o + 4 <= cout; o += 4) et_x86_tile4(B, bstride, k4, w + o * K, bias + o, scale + o, y + o * hw, hw, zy, m);
  for (; o < cout; ++o) et_x86_tile1(B, bstride, k4, w + o * K, bias + o, scale + o, y + o * hw, hw, zy, m);
}

static inline __mmask16 et_x86_mask(int32_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}
#endif

/* 1x1 convolution, stride 1, no padding: x [cin][hw] (NCHW, one image), w [cout][cin] blocked
 * (et_x86_widx), bias (with
 * - 128 * sum(w) folded in), scale [cout], y [cout][hw]. The input is repacked once into groups of 4
 * channels per pixel (x + 128); then per 16 pixels every output channel tile reads it. Needs cin % 4 == 0
 * (compilers/host_kernels.py checks); returns -1 otherwise. */
ET_X86_API int32_t et_x86_pointwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                       int8_t *y, int32_t cin, int32_t hw, int32_t cout, int32_t zy) {
  if (cin % 4 || (int64_t)cin * hw > ET_X86_MAX_PACKED) return -1;
#if ET_X86_VNNI
  uint8_t packed[cin * hw + 64] __attribute__((aligned(64))); /* + 64: the last block's full-width loads */
  for (int32_t c = 0; c < cin; c += 4) {
    const int8_t *r = x + c * hw;
    et_x86_interleave4(r, r + hw, r + 2 * hw, r + 3 * hw, packed + c * hw, hw);
  }
  for (int32_t p = 0; p < hw; p += 16)
    et_x86_gemm16(packed + 4 * p, 4 * (int64_t)hw, cin / 4, w, bias, scale, y + p, hw, cout, zy, et_x86_mask(hw - p));
#else
  int8_t rows[cout * cin]; /* the weights unblocked once: [cout][cin] */
  for (int32_t o = 0; o < cout; ++o)
    for (int32_t c = 0; c < cin; ++c) rows[o * cin + c] = w[et_x86_widx(o, c, cin, cout)];
  for (int32_t o = 0; o < cout; ++o) {
    for (int32_t p = 0; p < hw; ++p) {
      int32_t acc = bias[o];
      for (int32_t c = 0; c < cin; ++c) acc += (int32_t)et_x86_u8(x[c * hw + p]) * rows[o * cin + c];
      y[o * hw + p] = et_x86_requant(acc, scale[o], zy);
    }
  }
#endif
  return 0;
}

/* Convolution (one group, no dilation), one image: x [cin][h][wd] (NCHW), w [cout][kh][kw][cin] (OHWI: a
 * weight row is K = kh * kw * cin bytes in (ry, rx, c) order; blocked as et_x86_widx when cin % 4 == 0),
 * bias (with - 128 * sum(w) folded in), scale [cout], y [cout][oh][ow]; stride sh x sw; pt rows and pl
 * columns of padding at the top and left filled with the input zero point zx (the bias carries its
 * correction, as in the TVM kernel this replaces), as much at the bottom and right as the output size
 * reads. The padded input is repacked once into groups of 4 channels per pixel (x + 128; a channel count
 * that is not a multiple of 4 padded with channels whose weights are zero), then per 16 output pixels
 * their windows are gathered into K / 4 groups (im2col in the VPDPBUSD layout: plain loads when the 16
 * pixels lie in one row at stride 1, two loads and a permute at stride 2, a gather otherwise) and every
 * output channel tile reads them. Returns -1 for a packed input above ET_X86_MAX_PACKED. */
ET_X86_API int32_t et_x86_conv_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                  int8_t *y, int32_t cin, int32_t h, int32_t wd, int32_t cout, int32_t oh,
                                  int32_t ow, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pt, int32_t pl,
                                  int32_t zx, int32_t zy) {
  const int32_t ph = (oh - 1) * sh + kh, pw = (ow - 1) * sw + kw;
  const int32_t c4 = (cin + 3) / 4, taps = kh * kw;
  if (sh < 1 || sw < 1 || pt < 0 || pl < 0 || (int64_t)c4 * 4 * ph * pw > ET_X86_MAX_PACKED) return -1;
#if ET_X86_VNNI
  const int32_t hw = oh * ow, k4 = taps * c4, K = 4 * k4;
  const int32_t rows = ph - pt < h ? ph - pt : h, cols = pw - pl < wd ? pw - pl : wd;
  uint8_t packed[c4 * 4 * ph * pw + 128] __attribute__((aligned(64))); /* + 128: stride-2 pairs of loads */
  memset(packed, (int)et_x86_u8((int8_t)zx), sizeof(packed));
  int8_t zero[wd];
  memset(zero, 0, sizeof(zero));
  for (int32_t g = 0; g < c4 && cols > 0; ++g) {
    const int8_t *r[4];
    for (int32_t k = 0; k < 4; ++k) r[k] = 4 * g + k < cin ? x + (4 * g + k) * h * wd : zero;
    for (int32_t i = 0; i < rows; ++i)
      et_x86_interleave4(r[0] + i * wd, r[1] + i * wd, r[2] + i * wd, r[3] + i * wd,
                         packed + 4 * ((g * ph + i + pt) * pw + pl), cols);
  }
  /* blocked weights: as they come when cin % 4 == 0, else OHWI, zero-padded per tap and blocked here */
  const int8_t *wk = w;
  int8_t padded_w[cin % 4 ? cout * K : 1];
  if (cin % 4) {
    memset(padded_w, 0, sizeof(padded_w));
    for (int32_t o = 0; o < cout; ++o)
      for (int32_t t = 0; t < taps; ++t)
        for (int32_t c = 0; c < cin; ++c)
          padded_w[et_x86_widx(o, 4 * c4 * t + c, K, cout)] = w[(o * taps + t) * cin + c];
    wk = padded_w;
  }
  const int32_t *p32 = (const int32_t *)(const void *)packed;
  uint8_t B[k4 * 64] __attribute__((aligned(64)));
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int32_t p = 0; p < hw; p += 16) {
    const __mmask16 m = et_x86_mask(hw - p);
    /* each lane's window origin (dword index into the packed plane); lanes past hw repeat pixel p */
    const int32_t i0 = p / ow, j0 = p % ow, in_row = j0 + 16 <= ow && sw <= 2;
    int32_t origin[16] __attribute__((aligned(64)));
    origin[0] = i0 * sh * pw + j0 * sw;
    if (!in_row) {
      for (int32_t l = 1, i = i0, j = j0; l < 16; ++l) {
        if (++j == ow) j = 0, ++i;
        origin[l] = p + l < hw ? i * sh * pw + j * sw : origin[0];
      }
    }
    for (int32_t ry = 0; ry < kh; ++ry) {
      for (int32_t rx = 0; rx < kw; ++rx) {
        for (int32_t g = 0; g < c4; ++g) {
          const int32_t off = (g * ph + ry) * pw + rx;
          __m512i v;
          if (in_row && sw == 1) {
            v = _mm512_loadu_si512((const void *)(p32 + origin[0] + off));
          } else if (in_row) {
            v = _mm512_permutex2var_epi32(_mm512_loadu_si512((const void *)(p32 + origin[0] + off)), even,
                                          _mm512_loadu_si512((const void *)(p32 + origin[0] + off + 16)));
          } else {
            v = _mm512_i32gather_epi32(_mm512_add_epi32(_mm512_load_si512((const void *)origin), _mm512_set1_epi32(off)),
                                       (const void *)p32, 4);
          }
          _mm512_store_si512((void *)(B + 64 * ((ry * kw + rx) * c4 + g)), v);
        }
      }
    }
    et_x86_gemm16(B, 64, k4, wk, bias, scale, y + p, hw, cout, zy, m);
  }
#else
  const int32_t K = taps * cin;
  int8_t rows[cout * K]; /* the weights unblocked once: [cout][kh][kw][cin] */
  for (int32_t o = 0; o < cout; ++o)
    for (int32_t k = 0; k < K; ++k) rows[o * K + k] = w[cin % 4 ? o * K + k : et_x86_widx(o, k, K, cout)];
  for (int32_t o = 0; o < cout; ++o) {
    for (int32_t i = 0; i < oh; ++i) {
      for (int32_t j = 0; j < ow; ++j) {
        int32_t acc = bias[o];
        for (int32_t ry = 0; ry < kh; ++ry) {
          for (int32_t rx = 0; rx < kw; ++rx) {
            const int32_t r = i * sh + ry - pt, q = j * sw + rx - pl;
            const int inside = r >= 0 && r < h && q >= 0 && q < wd;
            const int8_t *wk = rows + o * K + (ry * kw + rx) * cin;
            for (int32_t c = 0; c < cin; ++c)
              acc += (int32_t)et_x86_u8(inside ? x[(c * h + r) * wd + q] : (int8_t)zx) * wk[c];
          }
        }
        y[(o * oh + i) * ow + j] = et_x86_requant(acc, scale[o], zy);
      }
    }
  }
#endif
  return 0;
}

/* One output pixel (i, j) of a depthwise channel from its phase-split padded plane; off[t]: tap t's offset */
static inline int8_t et_x86_dw_pixel(const int8_t *plane, int32_t pitch, const int32_t *off, const int8_t *k,
                                     int32_t taps, int32_t sh, int32_t i, int32_t j, int32_t bias, float scale,
                                     int32_t zy) {
  const int8_t *s0 = plane + i * sh * pitch + j;
  int32_t a = bias;
  for (int32_t t = 0; t < taps; ++t) a += s0[off[t]] * k[t];
  return et_x86_requant(a, scale, zy);
}

#if ET_X86_VNNI
/* 16 outputs of a depthwise channel: row i0 from column j0 (span 16), or 16 / span whole rows of span outputs */
static inline void et_x86_dw_block(const int8_t *plane, int32_t pitch, const int32_t *off, const int8_t *k,
                                   int32_t taps, int32_t sh, int32_t i0, int32_t j0, int32_t span, int32_t bias,
                                   float scale, int32_t zy, int8_t *y) {
  const int8_t *base = plane + i0 * sh * pitch + j0;
  __m512i acc = _mm512_set1_epi32(bias);
  for (int32_t t = 0; t < taps; ++t) {
    const int8_t *s0 = base + off[t];
    __m128i v;
    const int32_t step = sh * pitch; /* one output row down */
    if (span == 16) {
      v = _mm_loadu_si128((const __m128i *)(const void *)s0);
    } else if (span == 8) {
      v = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(const void *)s0),
                             _mm_loadl_epi64((const __m128i *)(const void *)(s0 + step)));
    } else if (span == 4) {
      int32_t q[4];
      for (int32_t r = 0; r < 4; ++r) memcpy(q + r, s0 + r * step, 4); /* fixed size: one load each */
      v = _mm_setr_epi32(q[0], q[1], q[2], q[3]);
    } else {
      int8_t seg[16] __attribute__((aligned(16)));
      for (int32_t r = 0; r < 16; ++r) seg[r] = s0[(r / span) * step + r % span];
      v = _mm_load_si128((const __m128i *)(const void *)seg);
    }
    acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(_mm512_cvtepi8_epi32(v), _mm512_set1_epi32(k[t])));
  }
  et_x86_requant16(acc, scale, zy, y, (__mmask16)0xFFFF);
}
#endif

/* Depthwise convolution (one input channel per output channel, no dilation), one image: x [ch][h][wd]
 * (NCHW), w [ch][kh][kw], bias, scale [ch], y [ch][oh][ow]; stride sh x sw, pt / pl rows / columns of
 * padding at the top / left filled with the input zero point zx (the bias carries its correction, as in
 * the TVM kernel this replaces; no + 128 here: the products are formed in int32). Per channel the padded
 * plane is built on the stack with its columns split by phase (column c at (c % sw) * pq + c / sw), so
 * every tap reads the inputs of consecutive outputs contiguously; then 16 outputs at a time (one row
 * segment, or 16 / ow whole rows of a narrow plane) accumulate a widening load times the tap per tap.
 * Pixels no such vector covers are computed one by one. Returns -1 for a plane above ET_X86_MAX_PACKED. */
ET_X86_API int32_t et_x86_depthwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                       int8_t *y, int32_t ch, int32_t h, int32_t wd, int32_t oh, int32_t ow,
                                       int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pt, int32_t pl,
                                       int32_t zx, int32_t zy) {
  const int32_t ph = (oh - 1) * sh + kh, pq = ((ow - 1) * sw + kw + sw - 1) / sw, pitch = sw * pq;
  const int32_t rows = ph - pt < h ? ph - pt : h, cols = pitch - pl < wd ? pitch - pl : wd, hw = oh * ow;
  const int32_t taps = kh * kw;
  if (sh < 1 || sw < 1 || pt < 0 || pl < 0 || (int64_t)ph * pitch > ET_X86_MAX_PACKED) return -1;
  int8_t plane[ph * pitch + 16] __attribute__((aligned(64))); /* + 16: a row segment's full-width load */
  int32_t off[taps];
  for (int32_t t = 0; t < taps; ++t) off[t] = (t / kw) * pitch + (t % kw) % sw * pq + (t % kw) / sw;
  for (int32_t c = 0; c < ch; ++c) {
    const int8_t *xc = x + c * h * wd, *k = w + c * taps;
    int8_t *yc = y + c * hw;
    memset(plane, zx, sizeof(plane));
    for (int32_t r = 0; r < rows; ++r) {
      int8_t *d = plane + (r + pt) * pitch;
      const int8_t *src = xc + r * wd;
      int32_t q = 0;
      if (sw == 1) {
        memcpy(d + pl, src, (size_t)(cols > 0 ? cols : 0));
        continue;
      }
#if ET_X86_VNNI
      if (sw == 2) { /* 16 inputs -> 8 of each column phase */
        int8_t *even = d + (pl & 1) * pq, *odd = d + ((pl + 1) & 1) * pq;
        for (; q + 16 <= cols; q += 16) {
          const __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(src + q));
          _mm_storel_epi64((__m128i *)(void *)(even + ((q + pl) >> 1)), _mm_cvtepi16_epi8(v));
          _mm_storel_epi64((__m128i *)(void *)(odd + ((q + pl + 1) >> 1)), _mm_cvtepi16_epi8(_mm_srai_epi16(v, 8)));
        }
      }
#endif
      for (int32_t phase = (q + pl) % sw, at = (q + pl) / sw; q < cols; ++q) {
        d[phase * pq + at] = src[q];
        if (++phase == sw) phase = 0, ++at;
      }
    }
    int32_t p = 0;
#if ET_X86_VNNI
    if (ow >= 16) { /* row segments of 16, the rest of each row one by one */
      for (int32_t i = 0; i < oh; ++i) {
        int32_t j = 0;
        for (; j + 16 <= ow; j += 16)
          et_x86_dw_block(plane, pitch, off, k, taps, sh, i, j, 16, bias[c], scale[c], zy, yc + i * ow + j);
        for (; j < ow; ++j) yc[i * ow + j] = et_x86_dw_pixel(plane, pitch, off, k, taps, sh, i, j, bias[c], scale[c], zy);
      }
      p = hw;
    } else if (16 % ow == 0) { /* 16 / ow whole rows per vector */
      for (; p + 16 <= hw; p += 16)
        et_x86_dw_block(plane, pitch, off, k, taps, sh, p / ow, 0, ow, bias[c], scale[c], zy, yc + p);
    }
#endif
    for (int32_t i = p / ow, j = p % ow; p < hw; ++p) {
      yc[p] = et_x86_dw_pixel(plane, pitch, off, k, taps, sh, i, j, bias[c], scale[c], zy);
      if (++j == ow) j = 0, ++i;
    }
  }
  return 0;
}

/* QLinearAdd (onnxruntime's AVX2 kernel, int8_math.add): y = sat8(rne(fma(a, p[0], fma(b, p[1], p[2])))) for
 * n elements. TVM's LLVM backend emits its fmaf as two library calls per element; here they are vector
 * FMAs (one rounding each, the same values). */
ET_X86_API int32_t et_x86_add_s8(const float *params, const int8_t *a, const int8_t *b, int8_t *y, int32_t n) {
  int32_t i = 0;
#if ET_X86_VNNI
  const __m512 ra = _mm512_set1_ps(params[0]), rb = _mm512_set1_ps(params[1]), f = _mm512_set1_ps(params[2]);
  const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-128.0f);
  for (; i < n; i += 16) {
    const __mmask16 m = et_x86_mask(n - i);
    const __m512 va = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, a + i)));
    const __m512 vb = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, b + i)));
    __m512 v = _mm512_fmadd_ps(va, ra, _mm512_fmadd_ps(vb, rb, f));
    v = _mm512_max_ps(_mm512_min_ps(v, hi), lo);
    const __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_mask_storeu_epi8(y + i, m, _mm512_cvtepi32_epi8(q));
  }
#endif
  for (; i < n; ++i) {
    float v = fmaf((float)a[i], params[0], fmaf((float)b[i], params[1], params[2]));
    v = v < 127.0f ? v : 127.0f;
    v = v > -128.0f ? v : -128.0f;
    y[i] = (int8_t)nearbyintf(v);
  }
  return 0;
}

#endif /* ET_KERNELS_X86_H */
