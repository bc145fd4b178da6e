/* Sizes of the runtime's structs, for foreign-function bindings (Python ctypes, JNI, ...) that
 * allocate them or mirror their layout and want to check it. */
#ifndef ET_ABI_H
#define ET_ABI_H

#include "et_types.h"

typedef enum et_abi_struct {
  ET_ABI_STATE_BUF = 0,
  ET_ABI_STATE_LIST = 1,
  ET_ABI_IO = 2,
  ET_ABI_IO_MEM = 3,
  ET_ABI_IO_STDIO = 4,
  ET_ABI_IO_POSIX = 5,
  ET_ABI_CKPT = 6,
  ET_ABI_GUARD_CONFIG = 7,
  ET_ABI_GUARD = 8,
  ET_ABI_MOMENTUM_SCHEDULE = 9,
  ET_ABI_MODEL = 10,
  ET_ABI_STEP_ARGS = 11,
  ET_ABI_STEP_INFO = 12,
  ET_ABI_RUNTIME_CONFIG = 13,
  ET_ABI_COUNTERS = 14,
  ET_ABI_STEP_RESULT = 15,
  ET_ABI_RUNTIME = 16,
  ET_ABI_COUNT = 17
} et_abi_struct;

/* *bytes = sizeof the struct `which` names; ET_E_ARG for an unknown one. */
et_status et_abi_size(uint32_t which, uint32_t *bytes);

#endif /* ET_ABI_H */
