/* A hand-written stand-in for generated model code, only to exercise the runtime's driver:
 * frozen part = fixed linear map + ReLU (16 inputs -> 8 taps), method = running-mean alignment
 * of the taps (ET_STATE_STAT) + a linear head (ET_STATE_PARAM) trained by SGD with momentum
 * (ET_STATE_OPTIM) on the softmax entropy, or cross-entropy for labelled feedback. */
#ifndef FAKE_MODEL_H
#define FAKE_MODEL_H

#include "edgetune_runtime.h"

#define FM_IN 16
#define FM_TAPS 8
#define FM_CLASSES 4

/* Deterministic weights from `seed`; zero bias, optimizer state and statistics. */
et_status fake_model_init(uint32_t seed, float lr);
et_status fake_model_get(const et_model **out);
/* Sample `index` of stream `stream` into x[FM_IN]: 0 = four classes in turn, every 37th sample
 * corrupted (NaN, +Inf, or out of range); 1 = one class only (drives predictions into collapse). */
et_status fake_model_sample(uint32_t stream, uint32_t index, float *x);

#endif /* FAKE_MODEL_H */
