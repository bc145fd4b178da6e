/* Collapse guard: the same algorithm as edgetune.methods.base.CollapseGuard.
 *
 * An exponential histogram of predicted classes (window ~1/rate samples). After `warmup`
 * samples, one class taking more than `max_share` of it means the stream drove the adapted
 * weights into collapse: restore the last good weights and start over. While healthy, a
 * snapshot of the weights is due every `every` samples. Arithmetic is float32 like the
 * torch reference (hist *= 1 - rate; hist[p] += rate), so both give identical verdicts. */
#ifndef ET_GUARD_H
#define ET_GUARD_H

#include "et_types.h"

typedef struct et_guard_config {
  double rate;      /* 0 < rate < 1 */
  double max_share; /* collapse threshold on the largest class share */
  uint32_t every;   /* snapshot period in samples (>= 1) */
  uint32_t warmup;  /* samples before collapse can be declared */
} et_guard_config;

#define ET_GUARD_DEFAULTS {0.02, 0.8, 50u, 100u}

typedef enum et_guard_verdict {
  ET_GUARD_OK = 0,
  ET_GUARD_SNAPSHOT = 1, /* healthy and a snapshot is due */
  ET_GUARD_RESTORE = 2   /* collapsed: restore the last good weights (the histogram was reset) */
} et_guard_verdict;

typedef struct et_guard {
  float *hist; /* caller's storage, `classes` floats */
  uint32_t classes;
  uint32_t seen; /* samples since the last reset */
  float keep;    /* (float)(1 - rate) */
  float add;     /* (float)rate */
  float above;   /* largest float <= max_share: top > above <=> (double)top > max_share, no soft double */
  uint32_t every;
  uint32_t warmup;
} et_guard;

et_status et_guard_init(et_guard *g, const et_guard_config *cfg, float *hist, uint32_t classes);
/* Back to a uniform histogram and seen = 0. */
et_status et_guard_reset(et_guard *g);
/* Record one prediction (0 <= prediction < classes). */
et_status et_guard_observe(et_guard *g, uint32_t prediction, et_guard_verdict *verdict);

#endif /* ET_GUARD_H */
