/* edgetune-run: the per-sample streaming program, one source for Cortex-M firmware and Linux.
 *
 * It reads a stream of samples, runs each through et_runtime (predict, then adapt), and writes
 * one result record per sample, the final adapted state and a one-line JSON summary; it boots
 * from and saves to an A/B checkpoint when given one. The model code (generated per bundle, see
 * compilers/emit_model.py) provides the port below; the two mains (et_app_mcu.c: semihosting
 * command line + SysTick; et_app_linux.c: argv + CLOCK_MONOTONIC + POSIX files) provide the
 * clock, the checkpoint storage and the stack probe.
 *
 * Stream file (little-endian): a 32-byte header
 *   {"ETSM", version 1, count, input_len (floats per sample), classes (0: unknown), record bytes,
 *    shape0, shape1}
 * where words 6-7 give one sample's shape: shape0 = rank | C << 8 with rank 2 (C x T) or 3
 * (C x H x W), shape1 = T (rank 2) or H | W << 16 (rank 3); 0, 0: not recorded. When both the
 * stream and the model (et_app_input_shape) declare a shape they must be equal, else the stream
 * is refused naming both shapes; the float count is always checked.
 * then `count` records {int32 feedback label (-1: none), uint32 flags (bit 0: reset the model
 * before this sample), float32 x[input_len]}. A feedback label is revealed only after the
 * sample's prediction was scored (the supervised mode); the default protocol has none.
 *
 * Results file: a 16-byte header {"ETRS", version 1, count, record bytes 28} then per sample
 * {int32 prediction (-1: rejected), uint32 flags (ET_APP_F_*), uint32 ticks of the whole step,
 * uint32 ticks frozen forward, uint32 ticks method (infer or train_step), uint32 ticks guard,
 * float32 loss}. Ticks are the main's clock (SysTick on Cortex-M, nanoseconds on Linux).
 *
 * State file: the model's registered state buffers, concatenated in registration order. */
#ifndef ET_APP_H
#define ET_APP_H

#include "edgetune_runtime.h"

#define ET_APP_STREAM_MAGIC 0x4D535445u  /* "ETSM" */
#define ET_APP_RESULTS_MAGIC 0x53525445u /* "ETRS" */
#define ET_APP_VERSION 1u
#define ET_APP_STREAM_HEADER_BYTES 32u
#define ET_APP_RESULT_BYTES 28u

/* flags of a result record */
#define ET_APP_F_REJECTED 1u
#define ET_APP_F_UPDATED 2u
#define ET_APP_F_EARLY_EXIT 4u
#define ET_APP_F_RESTORED 8u
#define ET_APP_F_SNAPSHOT 16u
#define ET_APP_F_FEEDBACK 32u
#define ET_APP_F_RESET 64u
#define ET_APP_F_SAVED 128u
#define ET_APP_F_BAD_LABEL 256u /* the feedback label was out of range: ignored and counted */

/* Exit codes of et_app_run (2 is a bad command line, printed by the mains). */
#define ET_APP_EXIT_OK 0
#define ET_APP_EXIT_FAILED 1
#define ET_APP_EXIT_CHECKPOINT_UNUSABLE 3 /* --resume found a checkpoint it cannot use, and no --fresh-ok */

/* What the model code gives the app (generated from the bundle's manifest). */
typedef struct et_app_port {
  const char *name;              /* "<method> on <model>" */
  const et_model *model;
  et_momentum_schedule momentum; /* {0, 0, 0}: no running statistics */
  et_guard_config guard;
  uint32_t use_guard;            /* the method's config asks for the collapse guard */
  float *input;                  /* room for one sample (model->input_len floats) */
  void *work;                    /* runtime workspace (guard histogram + weight snapshot), 4-byte aligned */
  uint32_t work_bytes;
  /* Weights, optimizer state and statistics back to the bundle's values (boot, episodic reset). */
  et_status (*reset)(void);
} et_app_port;

/* Implemented by the model code. */
et_status et_app_port_get(const et_app_port **out);
/* The sample shape input_len flattens: returns the rank, 2 (dims C, T) or 3 (C, H, W), compared
 * with a stream's header words 6-7. The generated model code defines it; et_app.c's weak default
 * (for hand-written ports) returns 0: not declared, only the float count is checked. */
uint32_t et_app_input_shape(uint32_t dims[3]);

/* What differs between the mains. */
typedef struct et_app_hooks {
  et_status (*clock)(void *ctx, uint64_t *ticks); /* NULL: no timing (ticks 0) */
  void *clock_ctx;
  uint64_t clock_hz;             /* ticks per second, reported in the summary (0: unknown) */
  void (*stack_reset)(void);     /* NULL where the stack cannot be painted */
  uint32_t (*stack_used)(void);  /* deepest stack use since stack_reset, bytes */
  uint32_t stack_bytes;          /* size of the stack region (0: unknown) */
  void (*power_cut)(void);       /* called when the write budget of --cut-after-bytes runs out; never returns */
} et_app_hooks;

typedef struct et_app_options {
  const char *stream;     /* file of samples; "-": standard input (hosted builds) */
  const char *results;    /* NULL: no per-sample records */
  const char *state;      /* NULL: final state not written */
  const char *summary;    /* NULL: summary on standard output only */
  const char *checkpoint; /* NULL: no persistence */
  uint32_t adapt;         /* 0: the source behaviour (no statistics update, no train_step) */
  uint32_t resume;        /* boot from the checkpoint's newest usable slot */
  uint32_t fresh_ok;      /* with resume: an unusable checkpoint starts from the bundle's state instead of failing */
  uint32_t checkpoint_found; /* set by the main: the checkpoint file existed before it was opened */
  uint32_t save_every;    /* also save every N accepted samples (0: at guard snapshots and at the end) */
  uint32_t max_samples;   /* 0: the whole stream */
  uint32_t cut_after;     /* > 0: simulate a power cut once this many checkpoint bytes were written */
} et_app_options;

/* Parses "--key=value" / "--flag" arguments (and one positional stream path). Keys: stream,
 * results, state, summary, checkpoint, adapt (0/1), no-adapt, resume, fresh-ok, save-every, max,
 * cut-after-bytes. ET_E_ARG with a message in `err` (len bytes) on an unknown or bad argument. */
et_status et_app_parse(int argc, char **argv, et_app_options *opt, char *err, uint32_t len);

/* Runs the stream; returns the process exit code (ET_APP_EXIT_*; a message is printed on failure).
 * With --resume, a missing checkpoint file is a first boot; an existing one without a usable slot
 * (empty, truncated, damaged, non-finite state) stops the run before anything is written, unless
 * --fresh-ok. The summary says whether the state was resumed and why not.
 * `checkpoint_io` is the storage behind opt->checkpoint (opened by the main), NULL for none. */
int et_app_run(const et_app_options *opt, const et_app_hooks *hooks, const et_io *checkpoint_io);

#endif /* ET_APP_H */
