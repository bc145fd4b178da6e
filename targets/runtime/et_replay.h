/* Learning more from each revealed label, on the device: a replay buffer and a learning-rate warm-up.
 *
 * Replay (experience replay of stored features, as in on-device continual learning, e.g. Pellegrini et al.
 * 2020, "Latent replay"): the last N labelled samples' taps -- int8, one float scale per tap -- and labels.
 * After the step on a revealed label, S more supervised steps run on samples drawn from the buffer by
 * xorshift32 (Marsaglia 2003), oldest-first index = draw % count; then the new sample joins the buffer
 * (evicting the oldest). The stream stays single-pass: only samples already scored are replayed.
 *
 * Warm-up (Goyal et al. 2017): during the first W labels every supervised step is scaled by
 * w = min(1, labels / W) by blending the weights, p = p_before + w * (p_after - p_before), which is the
 * optimizer's update at lr * w for SGD (with or without momentum) and Adam alike.
 *
 * The Python reference (edgetune.methods.base.Method) implements the same steps, draws and rounding, so
 * a stream gives the same updates in torch and here. */
#ifndef ET_REPLAY_H
#define ET_REPLAY_H

#include "et_types.h"

typedef struct et_learner_config {
  uint32_t replay;         /* N: labelled samples kept (0: no replay) */
  uint32_t replay_steps;   /* S: replayed steps per revealed label */
  uint32_t warmup;         /* W: labels over which the step ramps up linearly (0: none) */
  uint32_t seed;           /* xorshift32 seed (0 stands for 0x9E3779B9) */
  const uint32_t *tap_off; /* first float of each tap in the model's taps buffer (taps may be padded) */
  const uint32_t *tap_len; /* floats of each tap, in calling order */
  uint32_t tap_count;
} et_learner_config;

/* One stored sample: a scale per tap, the label, the int8 taps (padded to 4 bytes). */
#define ET_REPLAY_SLOT_BYTES(tap_floats, tap_count) \
  (4u * (uint32_t)(tap_count) + 4u + (((uint32_t)(tap_floats) + 3u) & ~3u))
/* The learner's workspace: N + 1 slots (one stages the revealed sample while older ones are replayed) and,
 * with a warm-up, a copy of the weights before each step. */
#define ET_LEARNER_WORK_BYTES(replay, tap_floats, tap_count, warmup, param_bytes)                             \
  (((replay) ? ((uint32_t)(replay) + 1u) * ET_REPLAY_SLOT_BYTES(tap_floats, tap_count) : 0u) + \
   ((warmup) ? (((uint32_t)(param_bytes) + 3u) & ~3u) : 0u))

typedef struct et_learner {
  et_learner_config cfg;
  uint8_t *slots;      /* (N + 1) slots, a ring */
  float *before;       /* the weights before a warm-up step */
  uint32_t slot_bytes;
  uint32_t tap_floats;
  uint32_t head;       /* the staging slot */
  uint32_t count;      /* stored samples (<= N) */
  uint32_t rng;        /* xorshift32 state */
  uint32_t labels;     /* revealed labels so far (the warm-up's clock) */
} et_learner;

/* Carves `work` (4-byte aligned, ET_LEARNER_WORK_BYTES long for the taps' total floats and a model with
 * `param_bytes` of weights) and starts with an empty buffer. ET_E_ARG: cfg NULL, misaligned work, replay
 * without taps or steps, or a tap of 0 floats; ET_E_CAPACITY: work too small. */
et_status et_learner_init(et_learner *l, const et_learner_config *cfg, void *work, uint32_t work_bytes,
                          uint32_t param_bytes);
/* The next xorshift32 value of *state (never 0 from a non-zero state). */
uint32_t et_xorshift32(uint32_t *state);
/* Quantises the taps buffer into the staging slot with `label` (not yet drawable). */
void et_replay_stage(et_learner *l, const float *taps, uint32_t label);
/* Draws a stored sample: its taps dequantised into `taps`, its label into *label. Needs count > 0. */
void et_replay_draw(et_learner *l, float *taps, uint32_t *label);
/* The staged sample joins the buffer (the oldest leaves when it is full). */
void et_replay_commit(et_learner *l);

#endif /* ET_REPLAY_H */
