/* edgetune C runtime: status codes and the description of a state buffer.
 * C99, no malloc; every runtime function returns an et_status. */
#ifndef ET_TYPES_H
#define ET_TYPES_H

#include <stddef.h>
#include <stdint.h>

typedef enum et_status {
  ET_OK = 0,
  ET_E_ARG = 1,           /* NULL pointer, zero/misaligned size, invalid setting: a programming error */
  ET_E_INPUT = 2,         /* sample holds NaN/Inf or a value out of range: rejected, not learned from */
  ET_E_MODEL = 3,         /* a callback of the generated model code failed */
  ET_E_IO = 4,            /* the storage behind et_io failed (read, write, sync, open) */
  ET_E_NO_CHECKPOINT = 5, /* neither slot holds a valid checkpoint of this state layout */
  ET_E_CORRUPT = 6,       /* a slot changed between its check and its load: buffers are undefined */
  ET_E_CAPACITY = 7,      /* the state does not fit the slot or the workspace */
  ET_E_BAD_STATE = 8      /* every CRC-valid slot holds non-finite state or out-of-range metadata */
} et_status;

/* What a registered buffer holds decides what the collapse guard does with it. */
typedef enum et_state_kind {
  ET_STATE_PARAM = 0, /* trainable weights: snapshotted while healthy, restored on collapse */
  ET_STATE_OPTIM = 1, /* optimizer state (SGD momentum): zeroed on collapse (= torch clearing it) */
  ET_STATE_STAT = 2   /* running statistics and runtime bookkeeping: kept on collapse */
} et_state_kind;

/* A registered buffer holds float32 values (the boot check reads them as such). */
typedef struct et_state_buf {
  void *data;
  uint32_t bytes;
  uint32_t kind; /* et_state_kind */
} et_state_buf;

/* Several buffer lists persisted as one payload, in order (the runtime's own + the model's). */
typedef struct et_state_list {
  const et_state_buf *bufs;
  uint32_t count;
} et_state_list;

#endif /* ET_TYPES_H */
