#include "et_schedule.h"

#include <math.h>

static int et_unit(double v) { return v >= 0.0 && v <= 1.0; }

et_status et_momentum_at(const et_momentum_schedule *s, uint32_t step, float *out) {
  double m;
  if (s == NULL || out == NULL) return ET_E_ARG;
  if (!et_unit(s->start) || !et_unit(s->decay) || !et_unit(s->floor)) return ET_E_ARG;
  /* pow, not repeated multiplication: Python's float ** int is C pow(), so both agree bit for bit */
  m = s->start * pow(s->decay, (double)step);
  *out = (float)(m > s->floor ? m : s->floor);
  return ET_OK;
}

et_status et_warmup_at(uint32_t warmup, uint32_t labels, float *out) {
  if (out == NULL) return ET_E_ARG;
  *out = (warmup == 0u || labels >= warmup) ? 1.0f : (float)labels / (float)warmup;
  return ET_OK;
}
