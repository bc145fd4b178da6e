/* The app's model port around fake_model.c (16 inputs, 4 classes, SGD head, running mean): what
 * tests/test_simulate.py and benchmarks/faults.py build edgetune-run with. */
#include "et_app.h"
#include "fake_model.h"
static float input[FM_IN];
static uint32_t work[64];
static et_status reset(void) { return fake_model_init(3u, 0.02f); }
static et_app_port port = {"fake on fake", 0, {0.1, 0.94, 0.005}, ET_GUARD_DEFAULTS, 1u, input, work, sizeof work,
                           reset};
et_status et_app_port_get(const et_app_port **out) {
  if (port.model == 0 && fake_model_get(&port.model) != ET_OK) return ET_E_MODEL;
  *out = &port;
  return ET_OK;
}
