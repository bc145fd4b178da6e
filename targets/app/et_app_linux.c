/* edgetune-run on Linux / Android (and the host): arguments from argv, the stream from a file or
 * standard input, checkpoints through POSIX files (fsync is the durability barrier), ticks in
 * nanoseconds of CLOCK_MONOTONIC. Under an emulator those nanoseconds are emulated time, never
 * device speed. --cut-after-bytes=N kills the process (SIGKILL) in the middle of a checkpoint
 * write, for the persistence tests. */
#define _POSIX_C_SOURCE 200809L

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "et_app.h"

static et_status et_linux_clock(void *ctx, uint64_t *ticks) {
  struct timespec ts;
  (void)ctx;
  if (ticks == NULL || clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return ET_E_IO;
  *ticks = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
  return ET_OK;
}

static void et_linux_power_cut(void) {
  raise(SIGKILL);
  for (;;) {
  }
}

int main(int argc, char **argv) {
  static et_io_posix file;
  char err[96];
  et_app_options opt;
  et_app_hooks hooks;
  et_io io;
  int rc;
  if (et_app_parse(argc, argv, &opt, err, sizeof err) != ET_OK) {
    fprintf(stderr, "edgetune-run: error: %s\nusage: %s STREAM|- [--results=FILE] [--state=FILE] [--summary=FILE] "
                    "[--checkpoint=FILE [--resume [--fresh-ok]] [--save-every=N]] [--no-adapt] [--max=N]\n", err, argv[0]);
    return 2;
  }
  memset(&hooks, 0, sizeof hooks);
  hooks.clock = et_linux_clock;
  hooks.clock_hz = 1000000000u;
  hooks.power_cut = et_linux_power_cut;
  if (opt.checkpoint != NULL) opt.checkpoint_found = access(opt.checkpoint, F_OK) == 0 ? 1u : 0u;
  if (opt.checkpoint != NULL && et_io_posix_open(&io, &file, opt.checkpoint) != ET_OK) {
    fprintf(stderr, "edgetune-run: error: cannot open checkpoint %s\n", opt.checkpoint);
    return 1;
  }
  rc = et_app_run(&opt, &hooks, opt.checkpoint != NULL ? &io : NULL);
  if (opt.checkpoint != NULL && et_io_posix_close(&file) != ET_OK && rc == 0) rc = 1;
  return rc;
}
