#include "et_guard.h"

#include <math.h>

et_status et_guard_init(et_guard *g, const et_guard_config *cfg, float *hist, uint32_t classes) {
  if (g == NULL || cfg == NULL || hist == NULL || classes == 0) return ET_E_ARG;
  if (!(cfg->rate > 0.0 && cfg->rate < 1.0) || !(cfg->max_share > 0.0 && cfg->max_share <= 1.0) ||
      cfg->every == 0)
    return ET_E_ARG;
  g->hist = hist;
  g->classes = classes;
  g->keep = (float)(1.0 - cfg->rate);
  g->add = (float)cfg->rate;
  /* The reference compares float32 shares with a double threshold; Cortex-M4 has no double FPU. */
  g->above = (float)cfg->max_share;
  if ((double)g->above > cfg->max_share) g->above = nextafterf(g->above, 0.0f);
  g->every = cfg->every;
  g->warmup = cfg->warmup;
  return et_guard_reset(g);
}

et_status et_guard_reset(et_guard *g) {
  uint32_t i;
  float uniform;
  if (g == NULL || g->hist == NULL || g->classes == 0) return ET_E_ARG;
  uniform = (float)(1.0 / (double)g->classes); /* torch.full(..., 1.0 / classes) rounds the double */
  for (i = 0; i < g->classes; ++i) g->hist[i] = uniform;
  g->seen = 0;
  return ET_OK;
}

et_status et_guard_observe(et_guard *g, uint32_t prediction, et_guard_verdict *verdict) {
  uint32_t i;
  float top;
  if (g == NULL || verdict == NULL || g->hist == NULL || prediction >= g->classes) return ET_E_ARG;
  for (i = 0; i < g->classes; ++i) g->hist[i] = g->hist[i] * g->keep;
  g->hist[prediction] = g->hist[prediction] + g->add;
  g->seen += 1u;
  top = g->hist[0];
  for (i = 1; i < g->classes; ++i)
    if (g->hist[i] > top) top = g->hist[i];
  if (g->seen >= g->warmup && top > g->above) {
    *verdict = ET_GUARD_RESTORE;
    return et_guard_reset(g);
  }
  *verdict = (g->seen % g->every == 0u) ? ET_GUARD_SNAPSHOT : ET_GUARD_OK;
  return ET_OK;
}
