/* The per-sample driver: input check -> frozen forward -> method step -> prediction -> collapse
 * guard, with counters, optional phase timing and A/B persistence of the adapted state.
 *
 *   static et_runtime rt;  static uint32_t work[...];     (no malloc anywhere)
 *   et_runtime_init(&rt, &model, &cfg, work, sizeof work);
 *   et_runtime_boot(&rt, &ckpt, &seq);                     (ET_E_NO_CHECKPOINT on first boot,
 *                                                           ET_E_BAD_STATE: no usable slot)
 *   for each sample: et_runtime_step(&rt, x, &result);     (ET_E_INPUT: rejected and counted)
 *   when result.snapshot (the guard found the stream healthy), or every N samples for methods
 *   without a train_step (no guard): et_runtime_save(&rt, &ckpt, &seq);
 */
#ifndef ET_RUNTIME_H
#define ET_RUNTIME_H

#include "et_ckpt.h"
#include "et_guard.h"
#include "et_model.h"
#include "et_replay.h"
#include "et_schedule.h"

typedef struct et_runtime_config {
  et_momentum_schedule momentum; /* {0, 0, 0} for methods without running statistics */
  et_guard_config guard;
  uint32_t adapt;     /* 0: source behaviour (momentum 0, no train_step) */
  uint32_t use_guard; /* 1: collapse guard on (only acts when the model has a train_step) */
  /* optional tick source for per-phase timing (e.g. SysTick); NULL: results carry 0 ticks */
  et_status (*clock)(void *clock_ctx, uint64_t *ticks);
  void *clock_ctx;
} et_runtime_config;

typedef struct et_counters {
  uint32_t samples;     /* calls of et_runtime_step and et_runtime_feedback */
  uint32_t rejected;    /* samples refused by the input check */
  uint32_t updates;     /* train_step calls */
  uint32_t restores;    /* collapse-guard restores */
  uint32_t snapshots;   /* collapse-guard snapshots */
  uint32_t early_exits; /* predictions made by a shallow exit */
  uint32_t labelled;    /* supervised feedback steps */
  uint32_t saves;       /* successful checkpoint saves */
} et_counters;

typedef struct et_step_result {
  int32_t prediction; /* argmax of the logits (first on ties); -1 when rejected */
  float loss;
  float momentum;
  uint32_t updated;    /* train_step ran */
  uint32_t early_exit;
  uint32_t restored;   /* the guard restored the last good weights after this sample */
  uint32_t snapshot;   /* the guard found the stream healthy and took a snapshot: a good time to save */
  uint32_t ticks_frozen; /* clock ticks in frozen_forward / infer or train_step / argmax + guard (0: no clock) */
  uint32_t ticks_method;
  uint32_t ticks_guard;
} et_step_result;

/* Persisted with the model's state so a reboot resumes the schedule, the guard and the counters. */
typedef struct et_runtime_meta {
  uint32_t step; /* accepted unsupervised samples: index of the momentum schedule */
  uint32_t guard_seen;
  et_counters counters;
} et_runtime_meta;

typedef struct et_runtime {
  const et_model *model;
  et_runtime_config cfg;
  et_guard guard;
  et_runtime_meta meta;
  et_state_buf own[2]; /* meta + guard histogram: persisted ahead of the model's buffers */
  uint8_t *snapshot;   /* last good copy of the ET_STATE_PARAM buffers */
  uint32_t snapshot_bytes;
  uint32_t layout_id;  /* model layout + runtime layout: a checkpoint of anything else is not loaded */
  uint32_t guard_active;
  uint32_t floor_from; /* the schedule is at its floor from this step on (pow() is skipped there) */
  float floor_value;
  et_status (*restore)(void); /* et_runtime_set_restore: the guard's restore of a statistics-only model */
  et_learner learner; /* et_runtime_set_learner: replay buffer and lr warm-up of supervised steps */
  uint32_t learning;  /* 1: `learner` is set (its buffer is not persisted: a reboot starts it empty) */
} et_runtime;

/* Bytes of workspace (4-byte aligned) et_runtime_init needs: the guard histogram and the snapshot. */
#define ET_RUNTIME_WORK_BYTES(classes, param_bytes) (4u * (uint32_t)(classes) + (((uint32_t)(param_bytes) + 3u) & ~3u))
et_status et_runtime_work_bytes(const et_model *model, uint32_t *bytes);

/* Checks the model and config, carves the workspace, snapshots the initial weights. */
et_status et_runtime_init(et_runtime *rt, const et_model *model, const et_runtime_config *cfg, void *work,
                          uint32_t work_bytes);
/* For a model whose adapted state is its statistics, not weights (norm-align: running statistics and the
 * requantisation folded from them), a collapse sends the whole state back to the bundle's values: on a trip
 * the guard calls `restore` (the generated edgetune_model_reset) instead of restoring the weights' snapshot,
 * and it runs without a train_step too (cfg.use_guard and cfg.adapt still decide). Call after
 * et_runtime_init; NULL goes back to the weights' restore. ET_E_ARG: rt NULL or not initialised. */
et_status et_runtime_set_restore(et_runtime *rt, et_status (*restore)(void));
/* Defined by the generated model code only when the bundle's guard declares that a trip restores the source
 * state (manifest runtime.guard.restore "source": a statistics-only model): et_runtime_init then uses it as
 * the restore above, so every app gets it without app code. Weak: any other model leaves it NULL (the weights'
 * snapshot restore). */
et_status edgetune_model_restore_source(void) __attribute__((weak));
/* One unsupervised sample: predict, then adapt. ET_E_INPUT when the sample was rejected. */
et_status et_runtime_step(et_runtime *rt, const float *input, et_step_result *result);
/* Supervised feedback on a sample whose prediction was already scored: one update towards
 * `label`; statistics, schedule and guard are left alone. */
et_status et_runtime_feedback(et_runtime *rt, const float *input, uint32_t label, et_step_result *result);
et_status et_runtime_counters(const et_runtime *rt, et_counters *out);
/* Persists runtime meta + guard histogram + the model's state buffers (older slot). */
et_status et_runtime_save(et_runtime *rt, et_ckpt *ck, uint32_t *seq);
/* Loads the newest valid checkpoint whose state is finite and whose metadata is consistent,
 * falling back to the other valid slot. ET_E_NO_CHECKPOINT (no valid slot) leaves everything as
 * initialised; after ET_E_BAD_STATE (every valid slot failed those checks) or ET_E_CORRUPT the
 * buffers are undefined: initialise the model and runtime again before stepping. */
et_status et_runtime_boot(et_runtime *rt, et_ckpt *ck, uint32_t *seq);
/* The payload length of this runtime's checkpoints (size the slots with ET_CKPT_SLOT_BYTES). */
et_status et_runtime_payload_bytes(const et_runtime *rt, uint32_t *bytes);

/* Learn from labels with a replay buffer and / or an lr warm-up (et_replay.h) in `work` (4-byte aligned,
 * et_learner_work_bytes long; its taps must describe the model's taps buffer). A supervised feedback then
 * runs its own step, S replayed steps on stored samples and stores its sample; during the warm-up each of
 * these steps is scaled. Only where the model has a train_step and cfg.adapt is on. Call after
 * et_runtime_init (which calls it itself with edgetune_model_learner's answer when the model defines it).
 * ET_E_ARG: rt not initialised or cfg invalid; ET_E_CAPACITY: work too small. */
et_status et_runtime_set_learner(et_runtime *rt, const et_learner_config *cfg, void *work, uint32_t work_bytes);
/* Defined by the generated model code only when the bundle declares a learner (manifest runtime.learner):
 * its settings and a static workspace for it. Weak: other models learn one step per label. */
et_status edgetune_model_learner(et_learner_config *cfg, void **work, uint32_t *work_bytes) __attribute__((weak));

#endif /* ET_RUNTIME_H */
