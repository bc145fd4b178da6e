/* Test firmware for the Cortex-M QEMU machines: the C runtime + tests/c/fake_model.c + board
 * support. The semihosting command line (QEMU -append) picks what to do:
 *   calib N                      : N iterations of a 2-instruction loop, timed with SysTick
 *   run STREAM N SEED LR_E4      : N samples through et_runtime_step; predictions, counters, state
 *   persist FILE START N [CUT]   : boot from FILE, run samples START..START+N-1, save; with CUT the
 *                                  save stops after CUT bytes, prints CUT and spins until killed */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgetune_runtime.h"
#include "et_board.h"
#include "fake_model.h"

#define MAX_SAMPLES 1000u
#define PARAM_BYTES ((FM_CLASSES * FM_TAPS + FM_CLASSES) * 4u)

static et_runtime rt;
static uint32_t work[ET_RUNTIME_WORK_BYTES(FM_CLASSES, PARAM_BYTES) / 4u];
static int8_t predictions[MAX_SAMPLES];
static uint8_t flags[MAX_SAMPLES];

static void spin(uint32_t n) { __asm volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(n)::"cc"); }

static int fail(const char *what, et_status st) {
  printf("FAIL %s status %d\n", what, (int)st);
  return 1;
}

static et_status start(uint32_t seed, float lr, int with_clock) {
  const et_model *model;
  et_runtime_config cfg;
  uint32_t need;
  et_status st = fake_model_init(seed, lr);
  if (st == ET_OK) st = fake_model_get(&model);
  if (st == ET_OK) st = et_runtime_work_bytes(model, &need);
  if (st == ET_OK && need > sizeof work) st = ET_E_CAPACITY;
  if (st != ET_OK) return st;
  memset(&cfg, 0, sizeof cfg);
  cfg.momentum.start = 0.1;
  cfg.momentum.decay = 0.94;
  cfg.momentum.floor = 0.005;
  cfg.guard.rate = 0.02;
  cfg.guard.max_share = 0.8;
  cfg.guard.every = 50u;
  cfg.guard.warmup = 100u;
  cfg.adapt = 1u;
  cfg.use_guard = 1u;
  cfg.clock = with_clock ? et_board_ticks : NULL;
  return et_runtime_init(&rt, model, &cfg, work, (uint32_t)sizeof work);
}

static void print_state(void) {
  const et_model *model;
  uint32_t i, j;
  if (fake_model_get(&model) != ET_OK) return;
  printf("STATE");
  for (i = 0; i < model->state_count; ++i) {
    const uint32_t *w = (const uint32_t *)model->state[i].data;
    for (j = 0; j < model->state[i].bytes / 4u; ++j) printf(" %08lx", (unsigned long)w[j]);
  }
  printf("\n");
}

static void print_counters(void) {
  et_counters c;
  if (et_runtime_counters(&rt, &c) != ET_OK) return;
  printf("COUNTERS %lu %lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)c.samples, (unsigned long)c.rejected,
         (unsigned long)c.updates, (unsigned long)c.restores, (unsigned long)c.snapshots,
         (unsigned long)c.early_exits, (unsigned long)c.labelled, (unsigned long)c.saves);
}

/* CRC-32 over the model's state and the runtime's counters: what a reboot must get back. */
static uint32_t digest(void) {
  const et_model *model;
  et_counters c;
  uint32_t crc = 0, i;
  if (fake_model_get(&model) != ET_OK || et_runtime_counters(&rt, &c) != ET_OK) return 0;
  for (i = 0; i < model->state_count; ++i) et_crc32_update(&crc, model->state[i].data, model->state[i].bytes);
  et_crc32_update(&crc, &c, sizeof c);
  return crc;
}

static int cmd_calib(uint32_t n) {
  uint64_t t0, t1;
  et_board_clock_start();
  et_board_ticks(NULL, &t0);
  spin(n);
  et_board_ticks(NULL, &t1);
  printf("CALIB %lu %lu\n", (unsigned long)n, (unsigned long)(t1 - t0));
  return 0;
}

static int cmd_run(uint32_t stream, uint32_t n, uint32_t seed, uint32_t lr_e4) {
  float x[FM_IN];
  uint64_t frozen = 0, method = 0, guard = 0, total = 0, t0, t1;
  uint32_t i, used, size, accepted = 0;
  et_status st;
  if (n > MAX_SAMPLES) return fail("too many samples", ET_E_ARG);
  et_board_clock_start();
  if ((st = start(seed, (float)lr_e4 * 1e-4f, 1)) != ET_OK) return fail("init", st);
  for (i = 0; i < n; ++i) {
    et_step_result r;
    if ((st = fake_model_sample(stream, i, x)) != ET_OK) return fail("sample", st);
    et_board_ticks(NULL, &t0);
    st = et_runtime_step(&rt, x, &r);
    et_board_ticks(NULL, &t1);
    if (st != ET_OK && st != ET_E_INPUT) return fail("step", st);
    predictions[i] = (int8_t)r.prediction;
    flags[i] = (uint8_t)(r.updated | (r.restored << 1) | (r.snapshot << 2) | (r.early_exit << 3));
    if (st == ET_OK) {
      accepted += 1u;
      total += t1 - t0;
      frozen += r.ticks_frozen;
      method += r.ticks_method;
      guard += r.ticks_guard;
    }
  }
  /* measured before any printf so the mark is the runtime's + the model's, not newlib's */
  et_board_stack_used(&used);
  et_board_stack_size(&size);
  for (i = 0; i < n; ++i) printf("S %lu %d %u\n", (unsigned long)i, (int)predictions[i], (unsigned)flags[i]);
  printf("TICKS %lu %lu %lu %lu %lu\n", (unsigned long)accepted, (unsigned long)total, (unsigned long)frozen,
         (unsigned long)method, (unsigned long)guard);
  printf("STACK %lu %lu\n", (unsigned long)used, (unsigned long)size);
  print_counters();
  print_state();
  return 0;
}

/* et_io that loses power after `budget` bytes: the cut write lands partially, is flushed, and the
 * CPU spins so the host can kill QEMU in the middle of the checkpoint write. */
typedef struct cut_io {
  et_io inner;
  uint32_t budget;
  uint32_t written;
} cut_io;

static et_status cut_read(void *ctx, uint32_t off, void *dst, uint32_t len) {
  cut_io *c = (cut_io *)ctx;
  return c->inner.read(c->inner.ctx, off, dst, len);
}

static et_status cut_write(void *ctx, uint32_t off, const void *src, uint32_t len) {
  cut_io *c = (cut_io *)ctx;
  if (len > c->budget - c->written) {
    const uint32_t k = c->budget - c->written;
    if (k > 0) c->inner.write(c->inner.ctx, off, src, k);
    c->inner.sync(c->inner.ctx);
    printf("CUT %lu\n", (unsigned long)c->budget);
    fflush(stdout);
    for (;;) {
    }
  }
  c->written += len;
  return c->inner.write(c->inner.ctx, off, src, len);
}

static et_status cut_sync(void *ctx) {
  cut_io *c = (cut_io *)ctx;
  return c->inner.sync(c->inner.ctx);
}

static int cmd_persist(const char *path, uint32_t first, uint32_t n, int cut, uint32_t budget) {
  static et_io_stdio file;
  et_io io;
  cut_io cio;
  et_ckpt ck;
  float x[FM_IN];
  uint32_t i, payload, seq = 0;
  et_status st;
  if ((st = start(3u, 0.005f, 0)) != ET_OK) return fail("init", st);
  if ((st = et_io_stdio_open(&io, &file, path)) != ET_OK) return fail("open", st);
  if ((st = et_runtime_payload_bytes(&rt, &payload)) != ET_OK) return fail("payload", st);
  if (cut) {
    cio.inner = io;
    cio.budget = budget;
    cio.written = 0;
    io.read = cut_read;
    io.write = cut_write;
    io.sync = cut_sync;
    io.ctx = &cio;
  }
  if ((st = et_ckpt_open(&ck, &io, 0, ET_CKPT_SLOT_BYTES(payload))) != ET_OK) return fail("ckpt", st);
  st = et_runtime_boot(&rt, &ck, &seq);
  if (st == ET_E_NO_CHECKPOINT)
    printf("BOOT none\n");
  else if (st == ET_OK)
    printf("BOOT %lu %08lx\n", (unsigned long)seq, (unsigned long)digest());
  else
    return fail("boot", st);
  for (i = first; i < first + n; ++i) {
    et_step_result r;
    if ((st = fake_model_sample(0, i, x)) != ET_OK) return fail("sample", st);
    st = et_runtime_step(&rt, x, &r);
    if (st != ET_OK && st != ET_E_INPUT) return fail("step", st);
  }
  if (n > 0) {
    printf("SAVING %lu\n", (unsigned long)payload);
    if ((st = et_runtime_save(&rt, &ck, &seq)) != ET_OK) return fail("save", st);
    printf("SAVED %lu %08lx\n", (unsigned long)seq, (unsigned long)digest());
  }
  return et_io_stdio_close(&file) == ET_OK ? 0 : fail("close", ET_E_IO);
}

int main(void) {
  static char line[256];
  char *argv[8];
  int argc = 0;
  char *tok;
  if (et_board_cmdline(line, sizeof line) != ET_OK) return fail("cmdline", ET_E_IO);
  for (tok = strtok(line, " "); tok != NULL && argc < 8; tok = strtok(NULL, " ")) argv[argc++] = tok;
  /* argv[0] is the program name QEMU puts first */
  if (argc == 3 && strcmp(argv[1], "calib") == 0) return cmd_calib((uint32_t)strtoul(argv[2], NULL, 10));
  if (argc == 6 && strcmp(argv[1], "run") == 0)
    return cmd_run((uint32_t)strtoul(argv[2], NULL, 10), (uint32_t)strtoul(argv[3], NULL, 10),
                   (uint32_t)strtoul(argv[4], NULL, 10), (uint32_t)strtoul(argv[5], NULL, 10));
  if ((argc == 5 || argc == 6) && strcmp(argv[1], "persist") == 0)
    return cmd_persist(argv[2], (uint32_t)strtoul(argv[3], NULL, 10), (uint32_t)strtoul(argv[4], NULL, 10),
                       argc == 6, argc == 6 ? (uint32_t)strtoul(argv[5], NULL, 10) : 0u);
  printf("usage: calib N | run STREAM N SEED LR_E4 | persist FILE START N [CUT]\n");
  return 2;
}
