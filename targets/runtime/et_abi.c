#include "et_abi.h"

#include "et_io_posix.h"
#include "et_io_stdio.h"
#include "et_runtime.h"

et_status et_abi_size(uint32_t which, uint32_t *bytes) {
  static const uint32_t sizes[ET_ABI_COUNT] = {
      (uint32_t)sizeof(et_state_buf),      (uint32_t)sizeof(et_state_list),    (uint32_t)sizeof(et_io),
      (uint32_t)sizeof(et_io_mem),         (uint32_t)sizeof(et_io_stdio),      (uint32_t)sizeof(et_io_posix),
      (uint32_t)sizeof(et_ckpt),           (uint32_t)sizeof(et_guard_config),  (uint32_t)sizeof(et_guard),
      (uint32_t)sizeof(et_momentum_schedule), (uint32_t)sizeof(et_model),      (uint32_t)sizeof(et_step_args),
      (uint32_t)sizeof(et_step_info),      (uint32_t)sizeof(et_runtime_config), (uint32_t)sizeof(et_counters),
      (uint32_t)sizeof(et_step_result),    (uint32_t)sizeof(et_runtime)};
  if (bytes == NULL || which >= ET_ABI_COUNT) return ET_E_ARG;
  *bytes = sizes[which];
  return ET_OK;
}
