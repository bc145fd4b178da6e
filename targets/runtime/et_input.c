#include "et_input.h"

#include <math.h>

et_status et_input_check(const float *x, uint32_t n, float lo, float hi, uint32_t *first_bad) {
  uint32_t i;
  if (x == NULL || n == 0 || !(lo <= hi)) return ET_E_ARG;
  for (i = 0; i < n; ++i) {
    const float v = x[i];
    /* isfinite first: with an infinite bound, the range test alone would let +-Inf through */
    if (!isfinite(v) || !(v >= lo && v <= hi)) {
      if (first_bad != NULL) *first_bad = i;
      return ET_E_INPUT;
    }
  }
  return ET_OK;
}
