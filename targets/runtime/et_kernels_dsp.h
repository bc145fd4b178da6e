/* int8 micro-kernels for Cortex-M cores with the DSP extension (Cortex-M4, M7, M33): dual 16-bit
 * multiply-accumulates (SMLAD) on sign-extended byte pairs (SXTB16, ACLE intrinsics); and for cores with
 * Helium (MVE, Cortex-M55, M85): 16-lane int8 dot products (VMLADAVA, arm_mve.h). The compiler picks the
 * path (__ARM_FEATURE_MVE, then __ARM_FEATURE_DSP, else plain C); every path gives the same bytes. Included by the generated
 * kernels (et_kernels.c) after their prologue, which defines et_nearbyintf; the compiler pass that
 * calls them is compilers/dsp_kernels.py. et_kernels_dsp.c exports them for kernels compiled by
 * TVM's LLVM backend (Linux targets). Without __ARM_FEATURE_DSP the same loops run in plain C,
 * so a host build of the same source gives the same bytes.
 *
 * Bit-exact with onnxruntime's QLinearConv (and with the TVM kernel they replace): exact int32
 * accumulation, then float32 requantisation in TVM's order: (float)(acc + bias) * scale, clamped to
 * [-128 - zy, 127 - zy], rounded half to even, plus zy. */
#ifndef ET_KERNELS_DSP_H
#define ET_KERNELS_DSP_H

#include <stdint.h>
#include <string.h>

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#define ET_DSP 1
#endif
#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#include <arm_mve.h>
#define ET_MVE 1
#endif

/* TVM's epilogue: clamp to the zero-point-shifted int8 range, round half to even, add the zero point */
static inline int8_t et_requant_f32(int32_t acc, float scale, int32_t zy) {
  const float hi = (float)(127 - zy), lo = (float)(-128 - zy);
  float v = (float)acc * scale;
  v = v < hi ? v : hi;
  v = v > lo ? v : lo;
  return (int8_t)(et_nearbyintf(v) + (float)zy);
}

#if ET_DSP && defined(__ARM_FP)
/* The same value in 6 instructions instead of ~25: VCVTR rounds to an int32 in the FPSCR's mode (round
 * half to even, the reset default the firmware keeps) and saturates; the zero point is added
 * saturating and the result saturated to int8. Clamping to integer bounds commutes with rounding, so
 * sat8(rne(v) + zy) = rne(clamp(v, -128 - zy, 127 - zy)) + zy for every float32 v. */
static inline int8_t et_requant_dsp(int32_t acc, float scale, int32_t zy) {
  float v = (float)acc * scale, r;
  int32_t q, s;
  __asm__("vcvtr.s32.f32 %0, %1" : "=t"(r) : "t"(v));
  memcpy(&q, &r, 4);
  /* QADD, SSAT: arm_acle.h's __ssat macro is not -Wconversion clean */
  __asm__("qadd %0, %1, %2\n\tssat %0, #8, %0" : "=&r"(s) : "r"(q), "r"(zy));
  return (int8_t)s;
}
#define ET_REQUANT et_requant_dsp
#else
#define ET_REQUANT et_requant_f32
#endif

static inline int32_t et_load32(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, 4); /* one LDR: the core allows unaligned word loads */
  return v;
}

/* Largest input channel count of et_dsp_pointwise_s8: its 4-pixel slice of the input lives on the stack. */
#define ET_DSP_MAX_CIN 256

#if ET_DSP
/* SXTB16 of the word rotated by 8 (bytes 1 and 3): one instruction; GCC 12 does not fold the rotate */
static inline int32_t et_sxtb16_odd(int32_t v) {
  int32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
  return r;
}
#endif

/* The accumulation of one 2-channel x 4-pixel tile, shared by et_dsp_rows4 and et_dsp_rows4_moments: the
 * 4 pixel rows of xt (K bytes each) times the weight rows wa, wb, into the caller's accumulators a0..a3 (wa)
 * and b0..b3 (wb). A macro, not a function, so both kernels compile to exactly what they did when each had its
 * own copy (GCC keeps the 8 accumulators in registers; a helper taking them by address would not be
 * guaranteed to). SIMD part: per 4 of K the weights extended once (SXTB16) for 4 pixels, 16 SMLAD. */
#if ET_DSP
#define ET_TILE_2X4_SIMD(xt, K, wa, wb)                                   \
  for (; c + 4 <= K; c += 4) {                                            \
    int32_t k = et_load32(wa + c);                                        \
    const int32_t ae = __sxtb16(k), ao = et_sxtb16_odd(k);                \
    k = et_load32(wb + c);                                                \
    const int32_t be = __sxtb16(k), bo = et_sxtb16_odd(k);                \
    int32_t u = et_load32(xt + c), e = __sxtb16(u), d = et_sxtb16_odd(u); \
    a0 = __smlad(d, ao, __smlad(e, ae, a0));                              \
    b0 = __smlad(d, bo, __smlad(e, be, b0));                              \
    u = et_load32(xt + K + c), e = __sxtb16(u), d = et_sxtb16_odd(u);     \
    a1 = __smlad(d, ao, __smlad(e, ae, a1));                              \
    b1 = __smlad(d, bo, __smlad(e, be, b1));                              \
    u = et_load32(xt + 2 * K + c), e = __sxtb16(u), d = et_sxtb16_odd(u); \
    a2 = __smlad(d, ao, __smlad(e, ae, a2));                              \
    b2 = __smlad(d, bo, __smlad(e, be, b2));                              \
    u = et_load32(xt + 3 * K + c), e = __sxtb16(u), d = et_sxtb16_odd(u); \
    a3 = __smlad(d, ao, __smlad(e, ae, a3));                              \
    b3 = __smlad(d, bo, __smlad(e, be, b3));                              \
  }
#else
#define ET_TILE_2X4_SIMD(xt, K, wa, wb)
#endif
#define ET_TILE_2X4(xt, K, wa, wb)                                                                            \
  do {                                                                                                        \
    int32_t c = 0;                                                                                            \
    ET_TILE_2X4_SIMD(xt, K, wa, wb)                                                                           \
    for (; c < K; ++c) {                                                                                      \
      a0 += xt[c] * wa[c], a1 += xt[K + c] * wa[c], a2 += xt[2 * K + c] * wa[c], a3 += xt[3 * K + c] * wa[c]; \
      b0 += xt[c] * wb[c], b1 += xt[K + c] * wb[c], b2 += xt[2 * K + c] * wb[c], b3 += xt[3 * K + c] * wb[c]; \
    }                                                                                                         \
  } while (0)

/* The tile loop of the DSP (and plain C) kernels: for every output channel pair (cout even), the 4 pixel
 * rows of xt (K bytes each) times the weight rows w[o], w[o + 1] plus the bias, requantised to
 * y[o * hw .. + 3]: tiles of 2 channels x 4 pixels, per 4 of K 6 word loads, 12 SXTB16 and 16 SMLAD
 * (the 2 x 2 tile it replaced extended each weight word twice: 1.86 -> 1.74 per MAC on mcunet-s's
 * pointwise convs, once the caller's constant K lets GCC keep the 8 accumulators in registers). */
static inline void et_dsp_rows4(const int8_t *xt, int32_t K, const int8_t *w, const int32_t *bias, const float *scale,
                                int8_t *y, int32_t hw, int32_t cout, int32_t zy) {
  for (int32_t o = 0; o < cout; o += 2) {
    const int8_t *wa = w + o * K, *wb = wa + K;
    int8_t *ya = y + o * hw;
    const int32_t ba = bias[o], bb = bias[o + 1];
    int32_t a0 = ba, a1 = ba, a2 = ba, a3 = ba, b0 = bb, b1 = bb, b2 = bb, b3 = bb;
    ET_TILE_2X4(xt, K, wa, wb);
    const float sa = scale[o], sb = scale[o + 1];
    ya[0] = ET_REQUANT(a0, sa, zy), ya[1] = ET_REQUANT(a1, sa, zy);
    ya[2] = ET_REQUANT(a2, sa, zy), ya[3] = ET_REQUANT(a3, sa, zy);
    ya[hw] = ET_REQUANT(b0, sb, zy), ya[hw + 1] = ET_REQUANT(b1, sb, zy);
    ya[hw + 2] = ET_REQUANT(b2, sb, zy), ya[hw + 3] = ET_REQUANT(b3, sb, zy);
  }
}

#if ET_MVE
/* Helium (MVE) kernels. Requantisation of 4 accumulators (acc + bias, one output channel, 4 pixels) in
 * one vector: the float product rounded half to even by VCVTN (saturating, as VCVTR), the zero point
 * added saturating and the result clamped to int8: the value et_requant_dsp and et_requant_f32 give
 * for each lane (same float32 multiply; a product below 2^-126, flushed or not, rounds to 0). */
static inline void et_mve_requant4(int32x4_t acc, float scale, int32_t zy, int8_t *y) {
  int32x4_t q = vcvtnq_s32_f32(vmulq_n_f32(vcvtq_f32_s32(acc), scale));
  q = vqaddq_n_s32(q, zy);
  q = vmaxq_s32(vminq_s32(q, vdupq_n_s32(127)), vdupq_n_s32(-128));
  vstrbq_s32(y, q); /* the low byte of each lane: 4 consecutive outputs */
}

/* {a, b, c, d} in two VMOVs (two general registers to two lanes each) */
static inline int32x4_t et_mve_lanes(int32_t a, int32_t b, int32_t c, int32_t d) {
  int32x4_t v = vdupq_n_s32(0);
  __asm__("vmov %q0[2], %q0[0], %1, %3\n\tvmov %q0[3], %q0[1], %2, %4" : "+w"(v) : "r"(a), "r"(b), "r"(c), "r"(d));
  return v;
}

/* The tile loop of the Helium kernels: for every output channel o (cout even), the 4 pixel rows of
 * xt (K bytes each, xt[4K..4K+15] readable) times the weight row w[o] (K bytes) plus bias[o],
 * requantised to y[o * hw .. + 3]: per 16 of K, 6 loads and 8 VMLADAVA (4 pixels x 2 channels), the
 * last K % 16 tail-predicated (zeroed weight lanes). */
static inline void et_mve_rows4(const int8_t *xt, int32_t K, const int8_t *w, const int32_t *bias, const float *scale,
                                int8_t *y, int32_t hw, int32_t cout, int32_t zy) {
  for (int32_t o = 0; o < cout; o += 2) {
    const int8_t *wa = w + o * K, *wb = wa + K;
    int32_t a0 = bias[o], a1 = a0, a2 = a0, a3 = a0, b0 = bias[o + 1], b1 = b0, b2 = b0, b3 = b0;
    int32_t c = 0;
    for (; c + 16 <= K; c += 16) {
      const int8x16_t x0 = vld1q_s8(xt + c), x1 = vld1q_s8(xt + K + c), x2 = vld1q_s8(xt + 2 * K + c),
                      x3 = vld1q_s8(xt + 3 * K + c), ka = vld1q_s8(wa + c), kb = vld1q_s8(wb + c);
      a0 = vmladavaq_s8(a0, x0, ka);
      a1 = vmladavaq_s8(a1, x1, ka);
      a2 = vmladavaq_s8(a2, x2, ka);
      a3 = vmladavaq_s8(a3, x3, ka);
      b0 = vmladavaq_s8(b0, x0, kb);
      b1 = vmladavaq_s8(b1, x1, kb);
      b2 = vmladavaq_s8(b2, x2, kb);
      b3 = vmladavaq_s8(b3, x3, kb);
    }
    if (c < K) { /* the last K % 16: zeroed weight lanes */
      const mve_pred16_t m = vctp8q((uint32_t)(K - c));
      const int8x16_t x0 = vld1q_s8(xt + c), x1 = vld1q_s8(xt + K + c), x2 = vld1q_s8(xt + 2 * K + c),
                      x3 = vld1q_s8(xt + 3 * K + c), ka = vldrbq_z_s8(wa + c, m), kb = vldrbq_z_s8(wb + c, m);
      a0 = vmladavaq_s8(a0, x0, ka);
      a1 = vmladavaq_s8(a1, x1, ka);
      a2 = vmladavaq_s8(a2, x2, ka);
      a3 = vmladavaq_s8(a3, x3, ka);
      b0 = vmladavaq_s8(b0, x0, kb);
      b1 = vmladavaq_s8(b1, x1, kb);
      b2 = vmladavaq_s8(b2, x2, kb);
      b3 = vmladavaq_s8(b3, x3, kb);
    }
    et_mve_requant4(et_mve_lanes(a0, a1, a2, a3), scale[o], zy, y + o * hw);
    et_mve_requant4(et_mve_lanes(b0, b1, b2, b3), scale[o + 1], zy, y + (o + 1) * hw);
  }
}

/* Largest pixel count of et_mve_pointwise_s8: its transposing gathers take 16-bit offsets (7 * hw). */
#define ET_MVE_MAX_HW 9362

/* et_dsp_pointwise_s8 with Helium: per 4 pixels the input slice is gathered channels-last onto the stack
 * (8 channels of one pixel per gather, VLDRB.S16 with offsets c * hw, then a narrowing store); per output
 * channel 4 pixels accumulate 16 channels per VMLADAVA (one instruction for 16 MACs), the last group of
 * a channel count that is not a multiple of 16 tail-predicated (zeroed weight lanes). Same contract as
 * et_dsp_pointwise_s8. */
static inline int32_t et_mve_pointwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                          int8_t *y, int32_t cin, int32_t hw, int32_t cout, int32_t zy) {
  /* + 16: the last pixel's final 16-byte load may read past cin (those lanes meet zeroed weights) */
  int8_t xt[4 * ET_DSP_MAX_CIN + 16] __attribute__((aligned(16)));
  const uint16x8_t off = vmulq_n_u16(vidupq_n_u16(0, 1), (uint16_t)hw);
  vst1q_s8(xt + 4 * cin, vdupq_n_s8(0));
  for (int32_t p = 0; p < hw; p += 4) {
    for (int32_t k = 0; k < 4; ++k) {
      for (int32_t c = 0; c < cin; c += 8) {
        const mve_pred16_t m = vctp16q((uint32_t)(cin - c));
        vstrbq_p_s16(xt + k * cin + c, vldrbq_gather_offset_z_s16(x + c * hw + p + k, off, m), m);
      }
    }
    et_mve_rows4(xt, cin, w, bias, scale, y + p, hw, cout, zy);
  }
  return 0;
}
#endif

/* 1x1 convolution, stride 1, no padding: x [cin][hw] (NCHW, one image), w [cout][cin] (OIHW), bias,
 * scale [cout], y [cout][hw]. Per 4 pixels the input slice is copied channels-last onto the stack
 * (so a word load holds 4 channels of one pixel, the layout SMLAD pairs need), then every output
 * channel pair reads it: tiles of 2 channels x 2 pixels. Needs cout % 2 == 0, hw % 4 == 0,
 * cin % 4 == 0 and cin <= ET_DSP_MAX_CIN (compilers/dsp_kernels.py checks). */
static inline int32_t et_dsp_pointwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                          int8_t *y, int32_t cin, int32_t hw, int32_t cout, int32_t zy) {
  int8_t xt[4 * ET_DSP_MAX_CIN] __attribute__((aligned(4)));
  if (cin > ET_DSP_MAX_CIN || cin % 4 || hw % 4 || cout % 2) return -1;
#if ET_MVE
  if (hw <= ET_MVE_MAX_HW) return et_mve_pointwise_s8(x, w, bias, scale, y, cin, hw, cout, zy);
#endif
  for (int32_t p = 0; p < hw; p += 4) {
    for (int32_t c = 0; c < cin; ++c) {
      const int8_t *v = x + c * hw + p;
      xt[c] = v[0];
      xt[cin + c] = v[1];
      xt[2 * cin + c] = v[2];
      xt[3 * cin + c] = v[3];
    }
    et_dsp_rows4(xt, cin, w, bias, scale, y + p, hw, cout, zy);
  }
  return 0;
}

/* The tile loop of et_dsp_pointwise_moments_s8 (norm-align's aligned 1x1 convs): et_dsp_rows4's 2 channels
 * x 4 pixels, then per channel the accumulator tile (acc + bias, the unaligned pre-activation) enters the
 * int64 sum and sum of squares (SMLAL), and the tile is requantised with the accumulator offset added
 * (acc + bias + offset: the fold of the state's affine; offset holds integers in float32). */
static inline void et_dsp_rows4_moments(const int8_t *xt, int32_t K, const int8_t *w, const int32_t *bias,
                                        const float *scale, const float *offset, int8_t *y, int64_t *sum,
                                        int64_t *sumsq, int32_t hw, int32_t cout, int32_t zy) {
  for (int32_t o = 0; o < cout; o += 2) {
    const int8_t *wa = w + o * K, *wb = wa + K;
    int8_t *ya = y + o * hw;
    const int32_t ba = bias[o], bb = bias[o + 1];
    int32_t a0 = ba, a1 = ba, a2 = ba, a3 = ba, b0 = bb, b1 = bb, b2 = bb, b3 = bb;
    ET_TILE_2X4(xt, K, wa, wb);
    sum[o] += (int64_t)a0 + a1 + a2 + a3;
    sum[o + 1] += (int64_t)b0 + b1 + b2 + b3;
    sumsq[o] += (int64_t)a0 * a0 + (int64_t)a1 * a1 + (int64_t)a2 * a2 + (int64_t)a3 * a3;
    sumsq[o + 1] += (int64_t)b0 * b0 + (int64_t)b1 * b1 + (int64_t)b2 * b2 + (int64_t)b3 * b3;
    const float sa = scale[o], sb = scale[o + 1];
    const int32_t oa = (int32_t)offset[o], ob = (int32_t)offset[o + 1];
    ya[0] = ET_REQUANT(a0 + oa, sa, zy), ya[1] = ET_REQUANT(a1 + oa, sa, zy);
    ya[2] = ET_REQUANT(a2 + oa, sa, zy), ya[3] = ET_REQUANT(a3 + oa, sa, zy);
    ya[hw] = ET_REQUANT(b0 + ob, sb, zy), ya[hw + 1] = ET_REQUANT(b1 + ob, sb, zy);
    ya[hw + 2] = ET_REQUANT(b2 + ob, sb, zy), ya[hw + 3] = ET_REQUANT(b3 + ob, sb, zy);
  }
}

/* norm-align's aligned 1x1 convolution: et_dsp_pointwise_s8 whose requantisation adds the accumulator
 * offset (offset [cout], float32 holding integers) and which also returns the per-channel sum and sum of
 * squares of the unaligned accumulator acc + bias over the hw pixels (sum, sumsq [cout] int64: the
 * statistics norm-align's step reads; no second pass). Same constraints as et_dsp_pointwise_s8 (the DSP
 * path on Helium cores too). The kernel TVM generates for it (compilers/int8_kernels.py, moments=True)
 * gives the same bytes. */
static inline int32_t et_dsp_pointwise_moments_s8(const int8_t *x, const int8_t *w, const int32_t *bias,
                                                  const float *scale, const float *offset, int8_t *y, int64_t *sum,
                                                  int64_t *sumsq, int32_t cin, int32_t hw, int32_t cout, int32_t zy) {
  int8_t xt[4 * ET_DSP_MAX_CIN] __attribute__((aligned(4)));
  if (cin > ET_DSP_MAX_CIN || cin % 4 || hw % 4 || cout % 2) return -1;
  for (int32_t o = 0; o < cout; ++o) sum[o] = 0, sumsq[o] = 0;
  for (int32_t p = 0; p < hw; p += 4) {
    for (int32_t c = 0; c < cin; ++c) {
      const int8_t *v = x + c * hw + p;
      xt[c] = v[0];
      xt[cin + c] = v[1];
      xt[2 * cin + c] = v[2];
      xt[3 * cin + c] = v[3];
    }
    et_dsp_rows4_moments(xt, cin, w, bias, scale, offset, y + p, sum, sumsq, hw, cout, zy);
  }
  return 0;
}

/* Largest padded input plane (one channel) of et_dsp_depthwise3x3_s8: it lives on the stack. */
#define ET_DSP_MAX_PLANE 4096

/* The padded plane's row length for ow outputs at stride s: the 3 taps of the last output, plus the
 * over-read of a 4-lane group past it (at most 3 strides), rounded to words. */
static inline int32_t et_dw_row(int32_t ow, int32_t stride) {
  return (((ow + 3) / 4 * 4 - 1) * stride + 3 + 3) & ~3;
}

#if ET_MVE
/* One output row of one channel, 4 outputs per vector: 9 widening loads (gathers at stride 2) and 9
 * VMLA by the scalar taps, the accumulators never leave the vector; tail lanes predicated off. */
static inline void et_mve_dw_row(const int8_t *r0, int32_t pw, const int8_t *k, int32_t bias, float scale,
                                 int32_t zy, int8_t *y, int32_t ow, int32_t stride) {
  const uint32x4_t off = vmulq_n_u32(vidupq_n_u32(0, 1), (uint32_t)stride);
  const int32_t k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6], k7 = k[7], k8 = k[8];
  for (int32_t j = 0; j < ow; j += 4) {
    const int8_t *p = r0 + j * stride;
    int32x4_t acc = vdupq_n_s32(bias);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p, off), k0);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p + 1, off), k1);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p + 2, off), k2);
    p += pw;
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p, off), k3);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p + 1, off), k4);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p + 2, off), k5);
    p += pw;
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p, off), k6);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p + 1, off), k7);
    acc = vmlaq_n_s32(acc, vldrbq_gather_offset_s32(p + 2, off), k8);
    int32x4_t q = vcvtnq_s32_f32(vmulq_n_f32(vcvtq_f32_s32(acc), scale));
    q = vqaddq_n_s32(q, zy);
    q = vmaxq_s32(vminq_s32(q, vdupq_n_s32(127)), vdupq_n_s32(-128));
    vstrbq_p_s32(y + j, q, vctp32q((uint32_t)(ow - j)));
  }
}
#endif

/* One output row of one channel, scalar (SMLAD pairs on DSP cores): out[j] = bias + the 3x3 window at
 * (row 0, column j * stride) of the padded plane times the taps k, requantised. */
static inline void et_dsp_dw_row(const int8_t *r0, int32_t pw, const int8_t *k, const int32_t *kp, int32_t bias,
                                 float scale, int32_t zy, int8_t *y, int32_t ow, int32_t stride) {
  int32_t j = 0;
  (void)kp;
#if ET_DSP
  /* per tap row: the outer taps as one halfword pair (k0, k2), the middle one alone (packed once per
   * channel by the caller, kp[0..2] and kp[3..5]); a word of 4 inputs (x0..x3) splits into (x0, x2)
   * and (x1, x3) */
  const int32_t k02[3] = {kp[0], kp[1], kp[2]}, k1[3] = {kp[3], kp[4], kp[5]};
  if (stride == 1) {
    for (; j + 2 <= ow; j += 2) { /* outputs j, j + 1: x0 k0 + x1 k1 + x2 k2 and x1 k0 + x2 k1 + x3 k2 */
      int32_t a = bias, b = bias;
      const int8_t *p = r0 + j;
      for (int32_t ry = 0; ry < 3; ++ry, p += pw) {
        const int32_t u = et_load32(p), e = __sxtb16(u), o = et_sxtb16_odd(u);
        a = __smlabb(o, k1[ry], __smlad(e, k02[ry], a));
        b = __smlatb(e, k1[ry], __smlad(o, k02[ry], b));
      }
      y[j] = ET_REQUANT(a, scale, zy);
      y[j + 1] = ET_REQUANT(b, scale, zy);
    }
  } else {
    for (; j < ow; ++j) { /* x0 k0 + x1 k1 + x2 k2 from the word at column 2j */
      int32_t a = bias;
      const int8_t *p = r0 + 2 * j;
      for (int32_t ry = 0; ry < 3; ++ry, p += pw) {
        const int32_t u = et_load32(p);
        a = __smlabb(et_sxtb16_odd(u), k1[ry], __smlad(__sxtb16(u), k02[ry], a));
      }
      y[j] = ET_REQUANT(a, scale, zy);
    }
  }
#endif
  for (; j < ow; ++j) {
    const int8_t *p = r0 + j * stride;
    int32_t acc = bias;
    for (int32_t ry = 0; ry < 3; ++ry, p += pw) acc += p[0] * k[3 * ry] + p[1] * k[3 * ry + 1] + p[2] * k[3 * ry + 2];
    y[j] = ET_REQUANT(acc, scale, zy);
  }
}

/* n bytes from src to dst (a row of the padded plane): vectors or words, no library call per row */
static inline void et_copy_row(int8_t *dst, const int8_t *src, int32_t n) {
  int32_t i = 0;
#if ET_MVE
  for (; i < n; i += 16) {
    const mve_pred16_t m = vctp8q((uint32_t)(n - i));
    vstrbq_p_s8(dst + i, vldrbq_z_s8(src + i, m), m);
  }
#elif ET_DSP
  for (; i + 4 <= n; i += 4) {
    int32_t v = et_load32(src + i);
    __asm__("" : "+r"(v)); /* GCC would make the loop a memmove call: ~30 instructions for a short row */
    memcpy(dst + i, &v, 4);
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

/* 3x3 depthwise convolution, one image: x [ch][h][wd] (NCHW), w [ch][1][3][3], bias, scale [ch],
 * y [ch][oh][ow]; one row and one column of padding at the top and left whose value is the input zero
 * point zx (the bias carries the zero point's correction, as in the TVM kernel this replaces), and as
 * much at the bottom and right as the output size reads; stride 1 or 2. Per channel the padded plane is
 * built on the stack, then each output row is computed by the core's row kernel. Returns -1 when the
 * plane does not fit ET_DSP_MAX_PLANE (compilers/dsp_kernels.py checks). */
static inline int32_t et_dsp_depthwise3x3_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                             int8_t *y, int32_t ch, int32_t h, int32_t wd, int32_t oh, int32_t ow,
                                             int32_t stride, int32_t zx, int32_t zy) {
  const int32_t pw = et_dw_row(ow, stride), ph = (oh - 1) * stride + 3;
  const int32_t rows = ph - 1 < h ? ph - 1 : h, cols = pw - 1 < wd ? pw - 1 : wd;
  if (ph * pw > ET_DSP_MAX_PLANE || (stride != 1 && stride != 2)) return -1;
  int8_t plane[ph * pw] __attribute__((aligned(4))); /* the layer's own size: stack use is what it needs */
  memset(plane, zx, (size_t)(ph * pw));
  for (int32_t c = 0; c < ch; ++c) {
    const int8_t *xc = x + c * h * wd;
    const int8_t *k = w + 9 * c;
    int32_t kp[6]; /* et_dsp_dw_row's taps: (k0, k2) halfword pairs, then k1, per tap row */
    for (int32_t ry = 0; ry < 3; ++ry) {
      kp[ry] = (int32_t)(((uint32_t)(uint16_t)k[3 * ry]) | ((uint32_t)(uint16_t)k[3 * ry + 2] << 16));
      kp[3 + ry] = k[3 * ry + 1];
    }
    (void)kp;
    for (int32_t r = 0; r < rows; ++r) et_copy_row(plane + (r + 1) * pw + 1, xc + r * wd, cols);
    for (int32_t i = 0; i < oh; ++i) {
#if ET_MVE
      et_mve_dw_row(plane + i * stride * pw, pw, k, bias[c], scale[c], zy, y + (c * oh + i) * ow, ow, stride);
#else
      et_dsp_dw_row(plane + i * stride * pw, pw, k, kp, bias[c], scale[c], zy, y + (c * oh + i) * ow, ow, stride);
#endif
    }
  }
  return 0;
}

/* One output row of one channel of norm-align's aligned depthwise conv: et_dsp_dw_row's accumulators (its SMLAD
 * paths on DSP cores, plain C elsewhere; Helium cores take the DSP path), requantised with the accumulator
 * offset added (acc + bias + off), and the row's sum and sum of squares of acc + bias added to *sum, *sumsq. */
static inline void et_dsp_dw_row_moments(const int8_t *r0, int32_t pw, const int8_t *k, const int32_t *kp,
                                         int32_t bias, float scale, int32_t off, int32_t zy, int8_t *y, int32_t ow,
                                         int32_t stride, int64_t *sum, int64_t *sumsq) {
  int32_t j = 0;
  int64_t total = 0, squares = 0;
  (void)kp;
#if ET_DSP
  const int32_t k02[3] = {kp[0], kp[1], kp[2]}, k1[3] = {kp[3], kp[4], kp[5]};
  if (stride == 1) {
    for (; j + 2 <= ow; j += 2) {
      int32_t a = bias, b = bias;
      const int8_t *p = r0 + j;
      for (int32_t ry = 0; ry < 3; ++ry, p += pw) {
        const int32_t u = et_load32(p), e = __sxtb16(u), o = et_sxtb16_odd(u);
        a = __smlabb(o, k1[ry], __smlad(e, k02[ry], a));
        b = __smlatb(e, k1[ry], __smlad(o, k02[ry], b));
      }
      total += (int64_t)a + b;
      squares += (int64_t)a * a + (int64_t)b * b;
      y[j] = ET_REQUANT(a + off, scale, zy);
      y[j + 1] = ET_REQUANT(b + off, scale, zy);
    }
  } else {
    for (; j < ow; ++j) {
      int32_t a = bias;
      const int8_t *p = r0 + 2 * j;
      for (int32_t ry = 0; ry < 3; ++ry, p += pw) {
        const int32_t u = et_load32(p);
        a = __smlabb(et_sxtb16_odd(u), k1[ry], __smlad(__sxtb16(u), k02[ry], a));
      }
      total += a;
      squares += (int64_t)a * a;
      y[j] = ET_REQUANT(a + off, scale, zy);
    }
  }
#endif
  for (; j < ow; ++j) {
    const int8_t *p = r0 + j * stride;
    int32_t acc = bias;
    for (int32_t ry = 0; ry < 3; ++ry, p += pw) acc += p[0] * k[3 * ry] + p[1] * k[3 * ry + 1] + p[2] * k[3 * ry + 2];
    total += acc;
    squares += (int64_t)acc * acc;
    y[j] = ET_REQUANT(acc + off, scale, zy);
  }
  *sum += total;
  *sumsq += squares;
}

/* norm-align's aligned 3x3 depthwise convolution: et_dsp_depthwise3x3_s8 whose requantisation adds the
 * accumulator offset (offset [ch], float32 holding integers) and which also returns the per-channel int64 sum
 * and sum of squares of the unaligned accumulator acc + bias over the oh x ow outputs. Same constraints. */
static inline int32_t et_dsp_depthwise3x3_moments_s8(const int8_t *x, const int8_t *w, const int32_t *bias,
                                                     const float *scale, const float *offset, int8_t *y,
                                                     int64_t *sum, int64_t *sumsq, int32_t ch, int32_t h, int32_t wd,
                                                     int32_t oh, int32_t ow, int32_t stride, int32_t zx, int32_t zy) {
  const int32_t pw = et_dw_row(ow, stride), ph = (oh - 1) * stride + 3;
  const int32_t rows = ph - 1 < h ? ph - 1 : h, cols = pw - 1 < wd ? pw - 1 : wd;
  if (ph * pw > ET_DSP_MAX_PLANE || (stride != 1 && stride != 2)) return -1;
  int8_t plane[ph * pw] __attribute__((aligned(4)));
  memset(plane, zx, (size_t)(ph * pw));
  for (int32_t c = 0; c < ch; ++c) {
    const int8_t *xc = x + c * h * wd;
    const int8_t *k = w + 9 * c;
    int32_t kp[6];
    for (int32_t ry = 0; ry < 3; ++ry) {
      kp[ry] = (int32_t)(((uint32_t)(uint16_t)k[3 * ry]) | ((uint32_t)(uint16_t)k[3 * ry + 2] << 16));
      kp[3 + ry] = k[3 * ry + 1];
    }
    for (int32_t r = 0; r < rows; ++r) et_copy_row(plane + (r + 1) * pw + 1, xc + r * wd, cols);
    sum[c] = 0, sumsq[c] = 0;
    for (int32_t i = 0; i < oh; ++i)
      et_dsp_dw_row_moments(plane + i * stride * pw, pw, k, kp, bias[c], scale[c], (int32_t)offset[c], zy,
                            y + (c * oh + i) * ow, ow, stride, sum + c, sumsq + c);
  }
  return 0;
}

/* Largest K = 9 * cin of et_dsp_conv3x3_s8: its 4 pixel rows live on the stack. */
#define ET_DSP_MAX_K 1152

/* The input windows of output pixels p .. p + 3 (3x3, padding 1 at the top and left filled with zx) as 4
 * rows of K = 9 * cin bytes in (c, ry, rx) order: the im2col rows of et_dsp_conv3x3_s8. */
static inline void et_im2col4(const int8_t *x, int8_t *xt, int32_t p, int32_t cin, int32_t h, int32_t wd,
                              int32_t ow, int32_t stride, int32_t zx) {
  const int32_t K = 9 * cin;
  for (int32_t k = 0; k < 4; ++k) {
    const int32_t i = (p + k) / ow, j = (p + k) % ow, r0 = i * stride - 1, c0 = j * stride - 1;
    int8_t *d = xt + k * K;
    if (r0 >= 0 && r0 + 3 <= h && c0 >= 0 && c0 + 3 <= wd) { /* inside: 3 rows of 3 bytes per channel */
      const int8_t *s = x + r0 * wd + c0;
      for (int32_t c = 0; c < cin; ++c, s += h * wd, d += 9) {
        d[0] = s[0], d[1] = s[1], d[2] = s[2];
        d[3] = s[wd], d[4] = s[wd + 1], d[5] = s[wd + 2];
        d[6] = s[2 * wd], d[7] = s[2 * wd + 1], d[8] = s[2 * wd + 2];
      }
    } else {
      for (int32_t c = 0; c < cin; ++c)
        for (int32_t t = 0; t < 9; ++t, ++d) {
          const int32_t r = r0 + t / 3, q = c0 + t % 3;
          *d = (r >= 0 && r < h && q >= 0 && q < wd) ? x[(c * h + r) * wd + q] : (int8_t)zx;
        }
    }
  }
}

/* 3x3 convolution (one group), one image: x [cin][h][wd] (NCHW), w [cout][cin][3][3] (OIHW: a weight row
 * is K = 9 * cin bytes in (c, ry, rx) order), bias, scale [cout], y [cout][oh][ow]; padding 1 at the top
 * and left with the input zero point zx (as et_dsp_depthwise3x3_s8), stride 1 or 2. As CMSIS-NN does:
 * per 4 output pixels their input windows are copied into 4 rows of K bytes on the stack (im2col), then
 * the pointwise kernels' tile loop (SMLAD pairs, or VMLADAVA under Helium) runs with K for cin. Needs
 * cout % 2 == 0, oh * ow % 4 == 0, K <= ET_DSP_MAX_K (compilers/dsp_kernels.py checks). */
static inline int32_t et_dsp_conv3x3_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                        int8_t *y, int32_t cin, int32_t h, int32_t wd, int32_t cout, int32_t oh,
                                        int32_t ow, int32_t stride, int32_t zx, int32_t zy) {
  const int32_t K = 9 * cin, hw = oh * ow;
  if (K > ET_DSP_MAX_K || hw % 4 || cout % 2 || (stride != 1 && stride != 2)) return -1;
  int8_t xt[4 * K + 16] __attribute__((aligned(16))); /* + 16: the Helium loop's last over-read */
  memset(xt + 4 * K, 0, 16);
  for (int32_t p = 0; p < hw; p += 4) {
    et_im2col4(x, xt, p, cin, h, wd, ow, stride, zx);
#if ET_MVE
    et_mve_rows4(xt, K, w, bias, scale, y + p, hw, cout, zy);
#else
    et_dsp_rows4(xt, K, w, bias, scale, y + p, hw, cout, zy);
#endif
  }
  return 0;
}

/* et_dsp_conv3x3_s8 for weights laid out w [cin][3][3][cout] (IHWO: output channels innermost, TVM's
 * channel-vector conv). Helium only: per 4 pixels and output channel pair, the two weight rows are
 * gathered (VLDRB.S16 with offsets k * cout) into K-byte rows on the stack, then the same tile loop
 * runs. Elsewhere it returns -1 at once and the caller runs TVM's own kernel (compilers/dsp_kernels.py
 * keeps it behind the call): a scalar gather would cost the DSP loop a third more. */
static inline int32_t et_dsp_conv3x3_ihwo_s8(const int8_t *x, const int8_t *w, const int32_t *bias,
                                             const float *scale, int8_t *y, int32_t cin, int32_t h, int32_t wd,
                                             int32_t cout, int32_t oh, int32_t ow, int32_t stride, int32_t zx,
                                             int32_t zy) {
#if ET_MVE
  const int32_t K = 9 * cin, hw = oh * ow;
  if (K > ET_DSP_MAX_K || hw % 4 || cout % 2 || (stride != 1 && stride != 2) || 7 * cout > 65535) return -1;
  int8_t xt[4 * K + 16] __attribute__((aligned(16)));
  int8_t wr[2 * K + 16] __attribute__((aligned(16)));
  const uint16x8_t off = vmulq_n_u16(vidupq_n_u16(0, 1), (uint16_t)cout);
  memset(xt + 4 * K, 0, 16);
  for (int32_t p = 0; p < hw; p += 4) {
    et_im2col4(x, xt, p, cin, h, wd, ow, stride, zx);
    for (int32_t o = 0; o < cout; o += 2) {
      for (int32_t r = 0; r < 2; ++r) {
        for (int32_t k = 0; k < K; k += 8) {
          const mve_pred16_t m = vctp16q((uint32_t)(K - k));
          vstrbq_p_s16(wr + r * K + k, vldrbq_gather_offset_z_s16(w + k * cout + o + r, off, m), m);
        }
      }
      et_mve_rows4(xt, K, wr, bias + o, scale + o, y + o * hw + p, hw, 2, zy);
    }
  }
  return 0;
#else
  (void)x, (void)w, (void)bias, (void)scale, (void)y, (void)cin, (void)h, (void)wd, (void)cout, (void)oh, (void)ow;
  (void)stride, (void)zx, (void)zy;
  return -1;
#endif
}

#endif /* ET_KERNELS_DSP_H */
