/* edgetune C runtime: include this one header. */
#ifndef EDGETUNE_RUNTIME_H
#define EDGETUNE_RUNTIME_H

#include "et_abi.h"
#include "et_ckpt.h"
#include "et_crc32.h"
#include "et_guard.h"
#include "et_input.h"
#include "et_io.h"
#include "et_io_posix.h"
#include "et_io_stdio.h"
#include "et_model.h"
#include "et_runtime.h"
#include "et_schedule.h"
#include "et_types.h"

#endif /* EDGETUNE_RUNTIME_H */
