#include "et_replay.h"

#include <math.h>
#include <string.h>

#define ET_XORSHIFT_DEFAULT 0x9E3779B9u

static et_status et_tap_floats(const et_learner_config *cfg, uint32_t *floats) {
  uint32_t i, total = 0;
  if (cfg->replay == 0u) {
    *floats = 0u;
    return ET_OK;
  }
  if (cfg->replay_steps == 0u || cfg->tap_len == NULL || cfg->tap_off == NULL || cfg->tap_count == 0u) return ET_E_ARG;
  for (i = 0; i < cfg->tap_count; ++i) {
    if (cfg->tap_len[i] == 0u || cfg->tap_len[i] > 0x3FFFFFFFu - total) return ET_E_ARG;
    total += cfg->tap_len[i];
  }
  *floats = total;
  return ET_OK;
}

et_status et_learner_init(et_learner *l, const et_learner_config *cfg, void *work, uint32_t work_bytes,
                          uint32_t param_bytes) {
  uint32_t floats;
  et_status st;
  if (l == NULL || cfg == NULL || ((uintptr_t)work & 3u) != 0u) return ET_E_ARG;
  if ((st = et_tap_floats(cfg, &floats)) != ET_OK) return st;
  if (work_bytes < ET_LEARNER_WORK_BYTES(cfg->replay, floats, cfg->tap_count, cfg->warmup, param_bytes) ||
      (work == NULL && work_bytes != 0u))
    return ET_E_CAPACITY;
  memset(l, 0, sizeof *l);
  l->cfg = *cfg;
  l->tap_floats = floats;
  l->slot_bytes = cfg->replay ? ET_REPLAY_SLOT_BYTES(floats, cfg->tap_count) : 0u;
  l->slots = (uint8_t *)work;
  l->before = (float *)((uint8_t *)work + (cfg->replay ? cfg->replay + 1u : 0u) * l->slot_bytes);
  l->rng = cfg->seed ? cfg->seed : ET_XORSHIFT_DEFAULT;
  return ET_OK;
}

uint32_t et_xorshift32(uint32_t *state) {
  uint32_t x = *state;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  *state = x;
  return x;
}

/* Slot layout: float scale[tap_count], uint32 label, int8 q[tap_floats]. */
static uint8_t *et_slot(const et_learner *l, uint32_t index) { return l->slots + index * l->slot_bytes; }

/* Symmetric int8 with one scale per tap: scale = max|x| / 127, q = round-half-even(x / scale), the same
 * float32 operations as the reference's torch.round. */
void et_replay_stage(et_learner *l, const float *taps, uint32_t label) {
  uint8_t *slot = et_slot(l, l->head);
  int8_t *q = (int8_t *)(slot + 4u * l->cfg.tap_count + 4u);
  uint32_t t, i, off = 0;
  for (t = 0; t < l->cfg.tap_count; ++t) {
    const uint32_t n = l->cfg.tap_len[t];
    const float *x = taps + l->cfg.tap_off[t];
    float amax = 0.0f, scale;
    for (i = 0; i < n; ++i) {
      const float a = fabsf(x[i]);
      if (a > amax) amax = a;
    }
    scale = amax / 127.0f;
    for (i = 0; i < n; ++i) {
      float v = scale > 0.0f ? nearbyintf(x[i] / scale) : 0.0f;
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      q[off + i] = (int8_t)v;
    }
    memcpy(slot + 4u * t, &scale, 4);
    off += n;
  }
  memcpy(slot + 4u * l->cfg.tap_count, &label, 4);
}

void et_replay_draw(et_learner *l, float *taps, uint32_t *label) {
  const uint32_t ring = l->cfg.replay + 1u;
  const uint32_t k = et_xorshift32(&l->rng) % l->count; /* 0: the oldest stored sample */
  const uint8_t *slot = et_slot(l, (l->head + ring - l->count + k) % ring);
  const int8_t *q = (const int8_t *)(slot + 4u * l->cfg.tap_count + 4u);
  uint32_t t, i, off = 0;
  for (t = 0; t < l->cfg.tap_count; ++t) {
    float scale;
    memcpy(&scale, slot + 4u * t, 4);
    for (i = 0; i < l->cfg.tap_len[t]; ++i) taps[l->cfg.tap_off[t] + i] = (float)q[off + i] * scale;
    off += l->cfg.tap_len[t];
  }
  memcpy(label, slot + 4u * l->cfg.tap_count, 4);
}

void et_replay_commit(et_learner *l) {
  l->head = (l->head + 1u) % (l->cfg.replay + 1u);
  if (l->count < l->cfg.replay) l->count += 1u;
}
