/* The EMA momentum schedule of running feature statistics (DUA): max(floor, start * decay^step).
 * The compiled trainable graph takes the momentum as an input; the runtime computes it. */
#ifndef ET_SCHEDULE_H
#define ET_SCHEDULE_H

#include "et_types.h"

/* Doubles, like the Python reference (edgetune.methods.base.ema_momentum), so the float32
 * momentum handed to the graph is the same value torch.tensor([...]) makes of it. */
typedef struct et_momentum_schedule {
  double start;
  double decay;
  double floor;
} et_momentum_schedule;

/* *out = (float)max(floor, start * decay^step). ET_E_ARG unless start, decay, floor lie in [0, 1]. */
et_status et_momentum_at(const et_momentum_schedule *s, uint32_t step, float *out);

/* The linear lr warm-up of supervised steps (et_replay.h): *out = min(1, labels / warmup) in float32, the
 * reference's torch.tensor(labels) / torch.tensor(warmup); 1 when warmup is 0. ET_E_ARG: out NULL. */
et_status et_warmup_at(uint32_t warmup, uint32_t labels, float *out);

#endif /* ET_SCHEDULE_H */
