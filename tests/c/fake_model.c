#include "fake_model.h"

#include <math.h>
#include <string.h>

static float fm_frozen[FM_TAPS][FM_IN];
static float fm_w[FM_CLASSES][FM_TAPS];
static float fm_b[FM_CLASSES];
static float fm_vw[FM_CLASSES][FM_TAPS];
static float fm_vb[FM_CLASSES];
static float fm_mean[FM_TAPS];
static float fm_taps[FM_TAPS];
static float fm_logits[FM_CLASSES];
static float fm_target[FM_CLASSES];
static float fm_lr;

static const et_state_buf fm_state[5] = {{fm_w, sizeof fm_w, ET_STATE_PARAM},
                                         {fm_b, sizeof fm_b, ET_STATE_PARAM},
                                         {fm_vw, sizeof fm_vw, ET_STATE_OPTIM},
                                         {fm_vb, sizeof fm_vb, ET_STATE_OPTIM},
                                         {fm_mean, sizeof fm_mean, ET_STATE_STAT}};

static uint32_t fm_next(uint32_t *s) {
  *s = *s * 1664525u + 1013904223u;
  return *s;
}

/* uniform in [-0.5, 0.5), exactly representable (24 bits) so every libc gets the same value */
static float fm_uniform(uint32_t *s) { return (float)(fm_next(s) >> 8) / 16777216.0f - 0.5f; }

static et_status fm_frozen_forward(void *ctx, const float *in, float *taps) {
  int j, i;
  (void)ctx;
  for (j = 0; j < FM_TAPS; ++j) {
    float acc = 0.0f;
    for (i = 0; i < FM_IN; ++i) acc += fm_frozen[j][i] * in[i];
    taps[j] = acc > 0.0f ? acc : 0.0f;
  }
  return ET_OK;
}

/* logits of the aligned taps; fills z, log-probabilities and probabilities */
static void fm_head(const et_step_args *a, float *z, float *logp, float *p, float *logits) {
  int j, k;
  float mx, sum = 0.0f, lse;
  for (j = 0; j < FM_TAPS; ++j) {
    float mean = (1.0f - a->momentum) * fm_mean[j] + a->momentum * a->taps[j];
    if (!a->labelled) fm_mean[j] = mean;
    z[j] = a->taps[j] - mean;
  }
  for (k = 0; k < FM_CLASSES; ++k) {
    float acc = fm_b[k];
    for (j = 0; j < FM_TAPS; ++j) acc += fm_w[k][j] * z[j];
    logits[k] = acc;
  }
  mx = logits[0];
  for (k = 1; k < FM_CLASSES; ++k) mx = logits[k] > mx ? logits[k] : mx;
  for (k = 0; k < FM_CLASSES; ++k) sum += expf(logits[k] - mx);
  lse = mx + logf(sum);
  for (k = 0; k < FM_CLASSES; ++k) {
    logp[k] = logits[k] - lse;
    p[k] = expf(logp[k]);
  }
}

static float fm_loss_and_grad(const et_step_args *a, const float *logp, const float *p, float *g, uint32_t *exit) {
  int k;
  float h = 0.0f, ce = 0.0f, pmax = 0.0f;
  for (k = 0; k < FM_CLASSES; ++k) {
    h -= p[k] * logp[k];
    ce -= a->target[k] * logp[k];
    pmax = p[k] > pmax ? p[k] : pmax;
  }
  for (k = 0; k < FM_CLASSES; ++k) g[k] = a->labelled ? p[k] - a->target[k] : -p[k] * (logp[k] + h);
  *exit = pmax > 0.95f; /* stands in for a confident shallow exit */
  return a->labelled ? ce : h;
}

static et_status fm_infer(void *ctx, const et_step_args *a, float *logits, et_step_info *info) {
  float z[FM_TAPS], logp[FM_CLASSES], p[FM_CLASSES], g[FM_CLASSES];
  (void)ctx;
  fm_head(a, z, logp, p, logits);
  info->loss = fm_loss_and_grad(a, logp, p, g, &info->early_exit);
  return ET_OK;
}

static et_status fm_train_step(void *ctx, const et_step_args *a, float *logits, et_step_info *info) {
  float z[FM_TAPS], logp[FM_CLASSES], p[FM_CLASSES], g[FM_CLASSES];
  int j, k;
  (void)ctx;
  fm_head(a, z, logp, p, logits);
  info->loss = fm_loss_and_grad(a, logp, p, g, &info->early_exit);
  for (k = 0; k < FM_CLASSES; ++k) {
    for (j = 0; j < FM_TAPS; ++j) {
      fm_vw[k][j] = 0.9f * fm_vw[k][j] + g[k] * z[j];
      fm_w[k][j] -= fm_lr * fm_vw[k][j];
    }
    fm_vb[k] = 0.9f * fm_vb[k] + g[k];
    fm_b[k] -= fm_lr * fm_vb[k];
  }
  return ET_OK;
}

static const et_model fm_model = {FM_IN, FM_CLASSES, -4.0f, 4.0f, fm_taps, fm_logits, fm_target, fm_state, 5u,
                                  0xFA4E0001u, NULL, fm_frozen_forward, fm_infer, fm_train_step};

et_status fake_model_init(uint32_t seed, float lr) {
  uint32_t s = seed;
  int j, i;
  for (j = 0; j < FM_TAPS; ++j)
    for (i = 0; i < FM_IN; ++i) fm_frozen[j][i] = fm_uniform(&s);
  for (j = 0; j < FM_CLASSES; ++j)
    for (i = 0; i < FM_TAPS; ++i) fm_w[j][i] = fm_uniform(&s);
  memset(fm_b, 0, sizeof fm_b);
  memset(fm_vw, 0, sizeof fm_vw);
  memset(fm_vb, 0, sizeof fm_vb);
  memset(fm_mean, 0, sizeof fm_mean);
  fm_lr = lr;
  return ET_OK;
}

et_status fake_model_get(const et_model **out) {
  if (out == NULL) return ET_E_ARG;
  *out = &fm_model;
  return ET_OK;
}

et_status fake_model_sample(uint32_t stream, uint32_t index, float *x) {
  uint32_t s = index * 2654435761u + stream;
  uint32_t cls = stream == 1u ? 2u : index % FM_CLASSES;
  int i;
  if (x == NULL || stream > 1u) return ET_E_ARG;
  for (i = 0; i < FM_IN; ++i) x[i] = ((uint32_t)i % FM_CLASSES == cls ? 1.0f : 0.0f) + 0.5f * fm_uniform(&s);
  if (stream == 0u && index % 37u == 36u) {
    const uint32_t kind = (index / 37u) % 3u;
    x[index % FM_IN] = kind == 0u ? NAN : (kind == 1u ? INFINITY : 5.0f);
  }
  return ET_OK;
}
