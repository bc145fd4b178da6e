#include "et_runtime.h"

#include <math.h>
#include <string.h>

#include "et_crc32.h"
#include "et_input.h"

#define ET_RUNTIME_LAYOUT_VERSION 1u

static et_status et_model_valid(const et_model *m) {
  uint32_t i;
  if (m->input_len == 0 || m->classes == 0 || !(m->input_min <= m->input_max)) return ET_E_ARG;
  if (m->taps == NULL || m->logits == NULL || m->target == NULL) return ET_E_ARG;
  if (m->frozen_forward == NULL || m->infer == NULL) return ET_E_ARG;
  if (m->state == NULL && m->state_count != 0) return ET_E_ARG;
  for (i = 0; i < m->state_count; ++i) {
    const et_state_buf *b = &m->state[i];
    if ((b->data == NULL && b->bytes != 0) || b->kind > ET_STATE_STAT) return ET_E_ARG;
  }
  return ET_OK;
}

static uint32_t et_param_bytes(const et_model *m) {
  uint32_t i, total = 0;
  for (i = 0; i < m->state_count; ++i)
    if (m->state[i].kind == ET_STATE_PARAM) total += m->state[i].bytes;
  return total;
}

et_status et_runtime_work_bytes(const et_model *model, uint32_t *bytes) {
  et_status st;
  if (model == NULL || bytes == NULL) return ET_E_ARG;
  st = et_model_valid(model);
  if (st != ET_OK) return st;
  *bytes = ET_RUNTIME_WORK_BYTES(model->classes, et_param_bytes(model));
  return ET_OK;
}

static et_status et_crc_u32(uint32_t *crc, uint32_t v) {
  uint8_t b[4];
  b[0] = (uint8_t)v;
  b[1] = (uint8_t)(v >> 8);
  b[2] = (uint8_t)(v >> 16);
  b[3] = (uint8_t)(v >> 24);
  return et_crc32_update(crc, b, 4);
}

/* Identifies what a checkpoint payload means: a slot written for another model or another
 * runtime layout is never loaded into these buffers. */
static et_status et_layout_id(const et_model *m, uint32_t *out) {
  uint32_t crc = 0, i;
  et_status st = et_crc_u32(&crc, ET_RUNTIME_LAYOUT_VERSION);
  if (st == ET_OK) st = et_crc_u32(&crc, (uint32_t)sizeof(et_runtime_meta));
  if (st == ET_OK) st = et_crc_u32(&crc, m->layout_id);
  if (st == ET_OK) st = et_crc_u32(&crc, m->classes);
  if (st == ET_OK) st = et_crc_u32(&crc, m->state_count);
  for (i = 0; st == ET_OK && i < m->state_count; ++i) {
    st = et_crc_u32(&crc, m->state[i].bytes);
    if (st == ET_OK) st = et_crc_u32(&crc, m->state[i].kind);
  }
  *out = crc;
  return st;
}

static void et_snapshot_take(et_runtime *rt) {
  const et_model *m = rt->model;
  uint32_t i, off = 0;
  for (i = 0; i < m->state_count; ++i) {
    if (m->state[i].kind != ET_STATE_PARAM || m->state[i].bytes == 0) continue;
    memcpy(rt->snapshot + off, m->state[i].data, m->state[i].bytes);
    off += m->state[i].bytes;
  }
}

/* Like the torch reference: weights back to the last good copy, optimizer state cleared
 * (zero SGD momentum == a fresh torch SGD buffer), running statistics kept. */
static void et_snapshot_restore(et_runtime *rt) {
  const et_model *m = rt->model;
  uint32_t i, off = 0;
  for (i = 0; i < m->state_count; ++i) {
    const et_state_buf *b = &m->state[i];
    if (b->bytes == 0) continue;
    if (b->kind == ET_STATE_PARAM) {
      memcpy(b->data, rt->snapshot + off, b->bytes);
      off += b->bytes;
    } else if (b->kind == ET_STATE_OPTIM) {
      memset(b->data, 0, b->bytes);
    }
  }
}

et_status et_runtime_init(et_runtime *rt, const et_model *model, const et_runtime_config *cfg, void *work,
                          uint32_t work_bytes) {
  uint32_t need;
  float probe;
  et_status st;
  if (rt == NULL || model == NULL || cfg == NULL || work == NULL) return ET_E_ARG;
  if (((uintptr_t)work & 3u) != 0) return ET_E_ARG;
  st = et_runtime_work_bytes(model, &need);
  if (st != ET_OK) return st;
  if (work_bytes < need) return ET_E_CAPACITY;
  st = et_momentum_at(&cfg->momentum, 0, &probe);
  if (st != ET_OK) return st;

  memset(rt, 0, sizeof *rt);
  rt->model = model;
  rt->cfg = *cfg;
  st = et_guard_init(&rt->guard, &cfg->guard, (float *)work, model->classes);
  if (st != ET_OK) return st;
  rt->snapshot = (uint8_t *)work + 4u * model->classes;
  rt->snapshot_bytes = et_param_bytes(model);
  rt->restore = edgetune_model_restore_source; /* weak: NULL unless the model declares a source restore */
  rt->guard_active = (cfg->use_guard && cfg->adapt && (model->train_step != NULL || rt->restore != NULL)) ? 1u : 0u;
  rt->own[0].data = &rt->meta;
  rt->own[0].bytes = (uint32_t)sizeof rt->meta;
  rt->own[0].kind = ET_STATE_STAT;
  rt->own[1].data = rt->guard.hist;
  rt->own[1].bytes = 4u * model->classes;
  rt->own[1].kind = ET_STATE_STAT;
  rt->floor_from = 0xFFFFFFFFu;
  st = et_layout_id(model, &rt->layout_id);
  if (st != ET_OK) return st;
  et_snapshot_take(rt); /* like the reference's reset(): the weights after fit are the first good ones */
  if (edgetune_model_learner != NULL) { /* weak: only bundles that declare a learner define it */
    et_learner_config lc;
    void *lw = NULL;
    uint32_t lb = 0;
    if ((st = edgetune_model_learner(&lc, &lw, &lb)) != ET_OK) return st;
    if ((st = et_runtime_set_learner(rt, &lc, lw, lb)) != ET_OK) return st;
  }
  return ET_OK;
}

et_status et_runtime_set_learner(et_runtime *rt, const et_learner_config *cfg, void *work, uint32_t work_bytes) {
  et_status st;
  if (rt == NULL || rt->model == NULL || cfg == NULL) return ET_E_ARG;
  rt->learning = 0u;
  if ((st = et_learner_init(&rt->learner, cfg, work, work_bytes, rt->snapshot_bytes)) != ET_OK) return st;
  rt->learning = 1u;
  return ET_OK;
}

/* One train_step; during the warm-up a supervised step's update is scaled by w, as a blend of the weights
 * (p = before + w * (after - before), the reference's float32 operations). */
static et_status et_train(et_runtime *rt, const et_step_args *args, et_step_info *info) {
  const et_model *m = rt->model;
  float w = 1.0f;
  uint32_t i, j, off = 0;
  et_status st;
  if (args->labelled && rt->learning && (st = et_warmup_at(rt->learner.cfg.warmup, rt->learner.labels, &w)) != ET_OK)
    return st;
  for (i = 0; w < 1.0f && i < m->state_count; ++i) {
    if (m->state[i].kind != ET_STATE_PARAM) continue;
    memcpy((uint8_t *)rt->learner.before + off, m->state[i].data, m->state[i].bytes);
    off += m->state[i].bytes;
  }
  if (m->train_step(m->ctx, args, m->logits, info) != ET_OK) return ET_E_MODEL;
  for (i = 0, off = 0; w < 1.0f && i < m->state_count; ++i) {
    float *p = (float *)m->state[i].data;
    const float *old = rt->learner.before + off / 4u;
    if (m->state[i].kind != ET_STATE_PARAM) continue;
    for (j = 0; j < m->state[i].bytes / 4u; ++j) p[j] = old[j] + w * (p[j] - old[j]);
    off += m->state[i].bytes;
  }
  return ET_OK;
}

/* After a label's own step: S steps on samples drawn from the buffer, then the label's sample joins it. */
static et_status et_replay_after(et_runtime *rt, uint32_t label) {
  const et_model *m = rt->model;
  et_learner *l = &rt->learner;
  et_step_args args;
  et_step_info info;
  uint32_t s, i, drawn;
  et_status st;
  if (!rt->learning || l->cfg.replay == 0u || !rt->cfg.adapt || m->train_step == NULL) return ET_OK;
  et_replay_stage(l, m->taps, label);
  args.taps = m->taps;
  args.target = m->target;
  args.labelled = 1u;
  args.momentum = 0.0f;
  for (s = 0; l->count > 0u && s < l->cfg.replay_steps; ++s) {
    et_replay_draw(l, m->taps, &drawn); /* a stored label was checked when it was revealed */
    for (i = 0; i < m->classes; ++i) m->target[i] = 0.0f;
    m->target[drawn] = 1.0f;
    info.loss = 0.0f;
    info.early_exit = 0;
    if ((st = et_train(rt, &args, &info)) != ET_OK) return st;
  }
  et_replay_commit(l);
  return ET_OK;
}

et_status et_runtime_set_restore(et_runtime *rt, et_status (*restore)(void)) {
  const et_runtime_config *c;
  if (rt == NULL || rt->model == NULL) return ET_E_ARG;
  c = &rt->cfg;
  rt->restore = restore;
  rt->guard_active = (c->use_guard && c->adapt && (rt->model->train_step != NULL || restore != NULL)) ? 1u : 0u;
  return ET_OK;
}

static et_status et_now(const et_runtime *rt, uint64_t *t) {
  if (rt->cfg.clock == NULL) {
    *t = 0;
    return ET_OK;
  }
  return rt->cfg.clock(rt->cfg.clock_ctx, t);
}

/* The schedule in double (pow) costs thousands of soft-float instructions per sample on a
 * Cortex-M4, so it is only evaluated until it reaches its floor: decay <= 1 makes it
 * non-increasing, and once the float32 value equals (float)floor it stays there. */
static et_status et_momentum_now(et_runtime *rt, float *m) {
  et_status st;
  if (rt->meta.step >= rt->floor_from) {
    *m = rt->floor_value;
    return ET_OK;
  }
  st = et_momentum_at(&rt->cfg.momentum, rt->meta.step, m);
  if (st == ET_OK && *m <= (float)rt->cfg.momentum.floor) {
    rt->floor_from = rt->meta.step;
    rt->floor_value = *m;
  }
  return st;
}

static et_status et_argmax(const float *v, uint32_t n, int32_t *out) {
  uint32_t i, best = 0;
  for (i = 0; i < n; ++i)
    if (isnan(v[i])) return ET_E_MODEL; /* a diverged model: never report a made-up class */
  for (i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  *out = (int32_t)best;
  return ET_OK;
}

/* label < 0: unsupervised step; otherwise supervised feedback towards `label`. */
static et_status et_run(et_runtime *rt, const float *input, int32_t label, et_step_result *r) {
  const et_model *m;
  et_step_args args;
  et_step_info info;
  uint64_t t0, t1, t2, t3;
  uint32_t i;
  et_status st;
  if (rt == NULL || rt->model == NULL || input == NULL || r == NULL) return ET_E_ARG;
  m = rt->model;
  memset(r, 0, sizeof *r);
  r->prediction = -1;
  rt->meta.counters.samples += 1u;
  st = et_input_check(input, m->input_len, m->input_min, m->input_max, NULL);
  if (st != ET_OK) {
    if (st == ET_E_INPUT) rt->meta.counters.rejected += 1u;
    return st;
  }

  args.taps = m->taps;
  args.target = m->target;
  args.labelled = label >= 0 ? 1u : 0u;
  args.momentum = 0.0f; /* adapt off, or feedback: statistics stay as they are */
  if (label < 0 && rt->cfg.adapt && (st = et_momentum_now(rt, &args.momentum)) != ET_OK) return st;
  for (i = 0; i < m->classes; ++i) m->target[i] = 0.0f;
  if (label >= 0) m->target[label] = 1.0f;
  info.loss = 0.0f;
  info.early_exit = 0;

  /* the timed windows hold only the model's code (frozen, method) and the guard */
  if ((st = et_now(rt, &t0)) != ET_OK) return st;
  if (m->frozen_forward(m->ctx, input, m->taps) != ET_OK) return ET_E_MODEL;
  if ((st = et_now(rt, &t1)) != ET_OK) return st;
  if (rt->cfg.adapt && m->train_step != NULL) {
    if (label >= 0 && rt->learning) rt->learner.labels += 1u; /* the warm-up counts this label */
    if ((st = et_train(rt, &args, &info)) != ET_OK) return st;
    r->updated = 1u;
    rt->meta.counters.updates += 1u;
  } else if (m->infer(m->ctx, &args, m->logits, &info) != ET_OK) {
    return ET_E_MODEL;
  }
  if ((st = et_now(rt, &t2)) != ET_OK) return st;
  if ((st = et_argmax(m->logits, m->classes, &r->prediction)) != ET_OK) return st;
  r->loss = info.loss;
  r->momentum = args.momentum;
  r->early_exit = info.early_exit ? 1u : 0u;
  rt->meta.counters.early_exits += r->early_exit;

  if (label >= 0) {
    rt->meta.counters.labelled += 1u;
    if ((st = et_replay_after(rt, (uint32_t)label)) != ET_OK) return st; /* after the prediction was taken */
  } else {
    rt->meta.step += 1u;
    if (rt->guard_active) {
      et_guard_verdict verdict;
      if ((st = et_guard_observe(&rt->guard, (uint32_t)r->prediction, &verdict)) != ET_OK) return st;
      if (verdict == ET_GUARD_RESTORE) {
        if (rt->restore == NULL)
          et_snapshot_restore(rt);
        else if (rt->restore() != ET_OK)
          return ET_E_MODEL;
        r->restored = 1u;
        rt->meta.counters.restores += 1u;
      } else if (verdict == ET_GUARD_SNAPSHOT) {
        et_snapshot_take(rt);
        r->snapshot = 1u;
        rt->meta.counters.snapshots += 1u;
      }
    }
  }
  if ((st = et_now(rt, &t3)) != ET_OK) return st;
  r->ticks_frozen = (uint32_t)(t1 - t0);
  r->ticks_method = (uint32_t)(t2 - t1);
  r->ticks_guard = (uint32_t)(t3 - t2);
  return ET_OK;
}

et_status et_runtime_step(et_runtime *rt, const float *input, et_step_result *result) {
  return et_run(rt, input, -1, result);
}

et_status et_runtime_feedback(et_runtime *rt, const float *input, uint32_t label, et_step_result *result) {
  if (rt == NULL || rt->model == NULL || label >= rt->model->classes || label > 0x7FFFFFFFu) return ET_E_ARG;
  return et_run(rt, input, (int32_t)label, result);
}

et_status et_runtime_counters(const et_runtime *rt, et_counters *out) {
  if (rt == NULL || out == NULL) return ET_E_ARG;
  *out = rt->meta.counters;
  return ET_OK;
}

static void et_lists(const et_runtime *rt, et_state_list lists[2]) {
  lists[0].bufs = rt->own;
  lists[0].count = 2;
  lists[1].bufs = rt->model->state;
  lists[1].count = rt->model->state_count;
}

et_status et_runtime_payload_bytes(const et_runtime *rt, uint32_t *bytes) {
  et_state_list lists[2];
  if (rt == NULL || rt->model == NULL) return ET_E_ARG;
  et_lists(rt, lists);
  return et_ckpt_payload_bytes(lists, 2, bytes);
}

et_status et_runtime_save(et_runtime *rt, et_ckpt *ck, uint32_t *seq) {
  et_state_list lists[2];
  et_status st;
  if (rt == NULL || rt->model == NULL || ck == NULL) return ET_E_ARG;
  rt->meta.guard_seen = rt->guard.seen;
  rt->meta.counters.saves += 1u; /* counted in the payload itself, so a reboot sees this save */
  et_lists(rt, lists);
  st = et_ckpt_save(ck, lists, 2, rt->layout_id, seq);
  if (st != ET_OK) rt->meta.counters.saves -= 1u;
  return st;
}

/* A CRC-valid slot can still hold state no healthy run produces (written by a diverged model,
 * or by a bug elsewhere): every float must be finite and the bookkeeping consistent. */
static int et_floats_finite(const void *data, uint32_t bytes) {
  const uint8_t *p = (const uint8_t *)data;
  uint32_t i;
  float f;
  for (i = 0; i + 4u <= bytes; i += 4u) {
    memcpy(&f, p + i, 4);
    if (!isfinite(f)) return 0;
  }
  return 1;
}

static int et_state_sane(const et_runtime *rt) {
  const et_counters *c = &rt->meta.counters;
  const et_model *m = rt->model;
  uint32_t i;
  if (rt->meta.guard_seen > 0x7FFFFFFFu || rt->meta.step > c->samples) return 0;
  if (c->rejected > c->samples || c->updates > c->samples || c->restores > c->samples ||
      c->snapshots > c->samples || c->early_exits > c->samples || c->labelled > c->samples)
    return 0;
  for (i = 0; i < m->classes; ++i)
    if (!isfinite(rt->guard.hist[i]) || rt->guard.hist[i] < 0.0f || rt->guard.hist[i] > 1.0001f) return 0;
  for (i = 0; i < m->state_count; ++i)
    if (!et_floats_finite(m->state[i].data, m->state[i].bytes)) return 0;
  return 1;
}

et_status et_runtime_boot(et_runtime *rt, et_ckpt *ck, uint32_t *seq) {
  et_state_list lists[2];
  et_status st = ET_E_NO_CHECKPOINT;
  uint32_t rank, insane = 0;
  if (rt == NULL || rt->model == NULL || ck == NULL) return ET_E_ARG;
  et_lists(rt, lists);
  for (rank = 0; rank < 2u; ++rank) {
    st = et_ckpt_load_rank(ck, lists, 2, rt->layout_id, rank, seq);
    if (st == ET_E_NO_CHECKPOINT) break;
    if (st != ET_OK) return st;
    if (et_state_sane(rt)) {
      if (rank == 1u && (st = et_ckpt_drop_newest(ck)) != ET_OK) return st;
      rt->guard.seen = rt->meta.guard_seen;
      et_snapshot_take(rt); /* the loaded weights were saved while healthy: they are the good ones now */
      return ET_OK;
    }
    insane += 1u; /* fall back to the other valid slot */
  }
  return insane > 0u ? ET_E_BAD_STATE : st;
}
