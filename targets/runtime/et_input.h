/* Input checks: a sample with NaN/Inf or a value outside [lo, hi] is rejected before it can
 * reach the model (a broken sensor must not be learned from). */
#ifndef ET_INPUT_H
#define ET_INPUT_H

#include "et_types.h"

/* ET_OK when every x[i] is finite and lo <= x[i] <= hi; ET_E_INPUT otherwise, with the index of
 * the first bad value in *first_bad (may be NULL). */
et_status et_input_check(const float *x, uint32_t n, float lo, float hi, uint32_t *first_bad);

#endif /* ET_INPUT_H */
