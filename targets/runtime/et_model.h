/* What the generated model code hands the runtime: its buffers and three entry points.
 * The runtime holds no model code; a bundle's generated C fills one et_model (statically). */
#ifndef ET_MODEL_H
#define ET_MODEL_H

#include "et_types.h"

typedef struct et_step_args {
  const float *taps;   /* the frozen forward's outputs (the model's own buffer) */
  float momentum;      /* EMA momentum of running statistics for this sample */
  const float *target; /* [classes]: zeros, or a one-hot label in supervised feedback */
  uint32_t labelled;   /* 1: supervised feedback; the model must leave ET_STATE_STAT buffers unchanged */
} et_step_args;

typedef struct et_step_info {
  float loss;
  uint32_t early_exit; /* set by methods with exits when a shallow exit made the prediction */
} et_step_info;

typedef struct et_model {
  uint32_t input_len;  /* floats per sample */
  uint32_t classes;
  float input_min;     /* valid input range (inclusive); use +-FLT_MAX for "any finite value" */
  float input_max;
  float *taps;         /* written by frozen_forward */
  float *logits;       /* [classes], written by infer / train_step */
  float *target;       /* [classes], filled by the runtime */
  const et_state_buf *state; /* what persists: weights, optimizer state, statistics */
  uint32_t state_count;
  uint32_t layout_id;  /* changes whenever the meaning of the state changes (e.g. a manifest hash) */
  void *ctx;
  /* input (input_len floats) -> taps */
  et_status (*frozen_forward)(void *ctx, const float *input, float *taps);
  /* taps -> logits, updating running statistics in place (momentum 0 leaves them unchanged) */
  et_status (*infer)(void *ctx, const et_step_args *args, float *logits, et_step_info *info);
  /* infer + one optimizer step on the loss; NULL when the method trains nothing */
  et_status (*train_step)(void *ctx, const et_step_args *args, float *logits, et_step_info *info);
} et_model;

#endif /* ET_MODEL_H */
