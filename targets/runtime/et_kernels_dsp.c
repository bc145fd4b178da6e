/* The DSP micro-kernels (et_kernels_dsp.h) as external functions, for kernels that TVM's LLVM backend
 * compiled into an object (Linux targets): the C kernels (et_kernels.c) inline the header instead. */
#include <math.h>
#include <stdint.h>

#define et_nearbyintf nearbyintf /* what the C kernels' prologue uses off Cortex-M: round half to even */
#define et_dsp_pointwise_s8 et_dsp_pointwise_s8_inline
#define et_dsp_pointwise_moments_s8 et_dsp_pointwise_moments_s8_inline
#define et_dsp_depthwise3x3_s8 et_dsp_depthwise3x3_s8_inline
#define et_dsp_depthwise3x3_moments_s8 et_dsp_depthwise3x3_moments_s8_inline
#define et_dsp_conv3x3_s8 et_dsp_conv3x3_s8_inline
#define et_dsp_conv3x3_ihwo_s8 et_dsp_conv3x3_ihwo_s8_inline
#include "et_kernels_dsp.h"
#undef et_dsp_pointwise_s8
#undef et_dsp_pointwise_moments_s8
#undef et_dsp_depthwise3x3_s8
#undef et_dsp_depthwise3x3_moments_s8
#undef et_dsp_conv3x3_s8
#undef et_dsp_conv3x3_ihwo_s8

int32_t et_dsp_pointwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                            int32_t cin, int32_t hw, int32_t cout, int32_t zy);
int32_t et_dsp_pointwise_moments_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                    const float *offset, int8_t *y, int64_t *sum, int64_t *sumsq, int32_t cin,
                                    int32_t hw, int32_t cout, int32_t zy);
int32_t et_dsp_depthwise3x3_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                               int32_t ch, int32_t h, int32_t wd, int32_t oh, int32_t ow, int32_t stride, int32_t zx,
                               int32_t zy);
int32_t et_dsp_depthwise3x3_moments_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                       const float *offset, int8_t *y, int64_t *sum, int64_t *sumsq, int32_t ch,
                                       int32_t h, int32_t wd, int32_t oh, int32_t ow, int32_t stride, int32_t zx,
                                       int32_t zy);
int32_t et_dsp_conv3x3_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                          int32_t cin, int32_t h, int32_t wd, int32_t cout, int32_t oh, int32_t ow, int32_t stride,
                          int32_t zx, int32_t zy);
int32_t et_dsp_conv3x3_ihwo_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                               int32_t cin, int32_t h, int32_t wd, int32_t cout, int32_t oh, int32_t ow,
                               int32_t stride, int32_t zx, int32_t zy);

int32_t et_dsp_pointwise_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                            int32_t cin, int32_t hw, int32_t cout, int32_t zy) {
  return et_dsp_pointwise_s8_inline(x, w, bias, scale, y, cin, hw, cout, zy);
}

int32_t et_dsp_pointwise_moments_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                    const float *offset, int8_t *y, int64_t *sum, int64_t *sumsq, int32_t cin,
                                    int32_t hw, int32_t cout, int32_t zy) {
  return et_dsp_pointwise_moments_s8_inline(x, w, bias, scale, offset, y, sum, sumsq, cin, hw, cout, zy);
}

int32_t et_dsp_depthwise3x3_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                               int32_t ch, int32_t h, int32_t wd, int32_t oh, int32_t ow, int32_t stride, int32_t zx,
                               int32_t zy) {
  return et_dsp_depthwise3x3_s8_inline(x, w, bias, scale, y, ch, h, wd, oh, ow, stride, zx, zy);
}

int32_t et_dsp_depthwise3x3_moments_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale,
                                       const float *offset, int8_t *y, int64_t *sum, int64_t *sumsq, int32_t ch,
                                       int32_t h, int32_t wd, int32_t oh, int32_t ow, int32_t stride, int32_t zx,
                                       int32_t zy) {
  return et_dsp_depthwise3x3_moments_s8_inline(x, w, bias, scale, offset, y, sum, sumsq, ch, h, wd, oh, ow, stride,
                                               zx, zy);
}

int32_t et_dsp_conv3x3_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                          int32_t cin, int32_t h, int32_t wd, int32_t cout, int32_t oh, int32_t ow, int32_t stride,
                          int32_t zx, int32_t zy) {
  return et_dsp_conv3x3_s8_inline(x, w, bias, scale, y, cin, h, wd, cout, oh, ow, stride, zx, zy);
}

int32_t et_dsp_conv3x3_ihwo_s8(const int8_t *x, const int8_t *w, const int32_t *bias, const float *scale, int8_t *y,
                               int32_t cin, int32_t h, int32_t wd, int32_t cout, int32_t oh, int32_t ow,
                               int32_t stride, int32_t zx, int32_t zy) {
  return et_dsp_conv3x3_ihwo_s8_inline(x, w, bias, scale, y, cin, h, wd, cout, oh, ow, stride, zx, zy);
}
