#include "et_app.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* --- little-endian packing (the stream and results files are byte formats, not structs) ------- */
static uint32_t et_le32(const uint8_t *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void et_put32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}

static uint32_t et_float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

/* newlib's printf may lack %llu: 64-bit counters are formatted here */
static const char *et_u64(uint64_t v, char buf[24]) {
  char *p = buf + 23;
  *p = '\0';
  do {
    *--p = (char)('0' + (int)(v % 10u));
    v /= 10u;
  } while (v != 0u);
  return p;
}

/* --- arguments -------------------------------------------------------------------------------- */
static int et_parse_u32(const char *s, uint32_t *out) {
  char *end;
  unsigned long v;
  if (s == NULL || *s == '\0') return 0;
  v = strtoul(s, &end, 10);
  if (*end != '\0' || v > 0xFFFFFFFFul) return 0;
  *out = (uint32_t)v;
  return 1;
}

et_status et_app_parse(int argc, char **argv, et_app_options *opt, char *err, uint32_t len) {
  int i;
  if (opt == NULL || err == NULL || len == 0) return ET_E_ARG;
  memset(opt, 0, sizeof *opt);
  opt->adapt = 1u;
  err[0] = '\0';
  for (i = 1; i < argc; ++i) {
    const char *a = argv[i];
    const char *eq = strchr(a, '=');
    const char *value = eq != NULL ? eq + 1 : NULL;
    size_t klen = eq != NULL ? (size_t)(eq - a) : strlen(a);
    int ok = 1;
#define ET_KEY(k) (klen == sizeof(k) - 1u && strncmp(a, k, klen) == 0)
    if (strncmp(a, "--", 2) != 0) {
      if (opt->stream != NULL) ok = 0;
      opt->stream = a;
    } else if (ET_KEY("--stream") && value != NULL) {
      opt->stream = value;
    } else if (ET_KEY("--results") && value != NULL) {
      opt->results = value;
    } else if (ET_KEY("--state") && value != NULL) {
      opt->state = value;
    } else if (ET_KEY("--summary") && value != NULL) {
      opt->summary = value;
    } else if (ET_KEY("--checkpoint") && value != NULL) {
      opt->checkpoint = value;
    } else if (ET_KEY("--adapt")) {
      ok = value == NULL || et_parse_u32(value, &opt->adapt);
      if (value == NULL) opt->adapt = 1u;
    } else if (ET_KEY("--no-adapt") && value == NULL) {
      opt->adapt = 0u;
    } else if (ET_KEY("--resume") && value == NULL) {
      opt->resume = 1u;
    } else if (ET_KEY("--fresh-ok") && value == NULL) {
      opt->fresh_ok = 1u;
    } else if (ET_KEY("--save-every")) {
      ok = et_parse_u32(value, &opt->save_every);
    } else if (ET_KEY("--max")) {
      ok = et_parse_u32(value, &opt->max_samples);
    } else if (ET_KEY("--cut-after-bytes")) {
      ok = et_parse_u32(value, &opt->cut_after) && opt->cut_after > 0u;
    } else {
      ok = 0;
    }
#undef ET_KEY
    if (!ok) {
      snprintf(err, len, "bad argument '%s'", a);
      return ET_E_ARG;
    }
  }
  if (opt->stream == NULL) {
    snprintf(err, len, "no stream given");
    return ET_E_ARG;
  }
  if (opt->adapt > 1u) opt->adapt = 1u;
  if (opt->resume && opt->checkpoint == NULL) {
    snprintf(err, len, "--resume needs --checkpoint=FILE");
    return ET_E_ARG;
  }
  return ET_OK;
}

/* --- a checkpoint storage that loses power after a byte budget (persistence tests) ------------- */
typedef struct et_cut_io {
  et_io inner;
  uint32_t budget;
  uint32_t written;
  void (*power_cut)(void);
} et_cut_io;

static et_status et_cut_read(void *ctx, uint32_t off, void *dst, uint32_t n) {
  et_cut_io *c = (et_cut_io *)ctx;
  return c->inner.read(c->inner.ctx, off, dst, n);
}

static et_status et_cut_write(void *ctx, uint32_t off, const void *src, uint32_t n) {
  et_cut_io *c = (et_cut_io *)ctx;
  if (n > c->budget - c->written) {
    const uint32_t k = c->budget - c->written;
    if (k > 0u) (void)c->inner.write(c->inner.ctx, off, src, k); /* the torn part lands */
    (void)c->inner.sync(c->inner.ctx);
    printf("CUT %lu\n", (unsigned long)c->budget);
    fflush(stdout);
    c->power_cut();
    return ET_E_IO; /* not reached */
  }
  c->written += n;
  return c->inner.write(c->inner.ctx, off, src, n);
}

static et_status et_cut_sync(void *ctx) {
  et_cut_io *c = (et_cut_io *)ctx;
  return c->inner.sync(c->inner.ctx);
}

/* --- the run ---------------------------------------------------------------------------------- */
typedef struct et_run_totals {
  uint64_t step, frozen, method, guard;
  uint32_t accepted, stack_used, boot_seq, save_seq, payload, resets, bad_labels, resumed;
  const char *resume_reason; /* why the state was not resumed ("" when it was, or not asked) */
  et_counters counters; /* of runtime instances already finished (episodic resets) */
} et_run_totals;

static int et_fail(const char *what, int st) {
  printf("edgetune-run: error: %s (status %d)\n", what, st);
  fflush(stdout);
  return 1;
}

static void et_add_counters(et_counters *acc, const et_counters *c) {
  acc->samples += c->samples;
  acc->rejected += c->rejected;
  acc->updates += c->updates;
  acc->restores += c->restores;
  acc->snapshots += c->snapshots;
  acc->early_exits += c->early_exits;
  acc->labelled += c->labelled;
  acc->saves += c->saves;
}

static et_status et_start(et_runtime *rt, const et_app_port *port, const et_app_options *opt,
                          const et_app_hooks *hooks) {
  et_runtime_config cfg;
  et_status st = port->reset();
  if (st != ET_OK) return st;
  memset(&cfg, 0, sizeof cfg);
  cfg.momentum = port->momentum;
  cfg.guard = port->guard;
  cfg.adapt = opt->adapt;
  cfg.use_guard = port->use_guard;
  cfg.clock = hooks->clock;
  cfg.clock_ctx = hooks->clock_ctx;
  return et_runtime_init(rt, port->model, &cfg, port->work, port->work_bytes);
}

/* "CxHxW" / "CxT" of a rank and dims (the stream header's shape words use the same two ranks) */
static void et_shape_text(char *buf, size_t n, uint32_t rank, const uint32_t *d) {
  if (rank == 3u)
    snprintf(buf, n, "%lux%lux%lu", (unsigned long)d[0], (unsigned long)d[1], (unsigned long)d[2]);
  else
    snprintf(buf, n, "%lux%lu", (unsigned long)d[0], (unsigned long)d[1]);
}

__attribute__((weak)) uint32_t et_app_input_shape(uint32_t dims[3]) {
  dims[0] = dims[1] = dims[2] = 0u;
  return 0u;
}

/* words 6-7 of the header -> rank and dims; 0 when the stream does not record its shape */
static uint32_t et_stream_shape(const uint8_t *h, uint32_t *d) {
  uint32_t w0 = et_le32(h + 24), w1 = et_le32(h + 28), rank = w0 & 0xFFu;
  d[0] = w0 >> 8;
  if (rank == 3u) {
    d[1] = w1 & 0xFFFFu;
    d[2] = w1 >> 16;
  } else if (rank == 2u) {
    d[1] = w1;
    d[2] = 0u;
  } else {
    rank = 0u;
  }
  return rank;
}

static int et_read_header(FILE *in, const et_model *m, uint32_t *count) {
  char msg[200]; /* on the stack: the check costs no static RAM */
  char got[40], want[40];
  uint8_t h[ET_APP_STREAM_HEADER_BYTES];
  uint32_t dims[3], rank, want_dims[3], want_rank = et_app_input_shape(want_dims);
  if (fread(h, 1, sizeof h, in) != sizeof h) return et_fail("stream: cannot read the 32-byte header", ET_E_IO);
  if (et_le32(h) != ET_APP_STREAM_MAGIC || et_le32(h + 4) != ET_APP_VERSION)
    return et_fail("stream: not an edgetune stream (magic/version)", ET_E_ARG);
  rank = et_stream_shape(h, dims);
  /* a shape recorded on both sides is compared first: the same float count can hide a transposed
   * or re-sized sample (e.g. 3x32x32 written as 32x32x3) */
  if (rank != 0u && want_rank != 0u &&
      (rank != want_rank || dims[0] != want_dims[0] || dims[1] != want_dims[1] ||
       (rank == 3u && dims[2] != want_dims[2]))) {
    et_shape_text(got, sizeof got, rank, dims);
    et_shape_text(want, sizeof want, want_rank, want_dims);
    snprintf(msg, sizeof msg, "stream: sample shape %s differs from the model's input %s; write the stream with "
             "samples shaped like the model's input", got, want);
    return et_fail(msg, ET_E_ARG);
  }
  if (et_le32(h + 12) != m->input_len) {
    snprintf(msg, sizeof msg, "stream: floats per sample differ (%lu in the stream, %lu in the model's input); write "
             "the stream with samples shaped like the model's input", (unsigned long)et_le32(h + 12),
             (unsigned long)m->input_len);
    return et_fail(msg, ET_E_ARG);
  }
  if (et_le32(h + 16) != 0u && et_le32(h + 16) != m->classes)
    return et_fail("stream: class count differs from the model's", ET_E_ARG);
  if (et_le32(h + 20) != 8u + 4u * m->input_len) return et_fail("stream: record size mismatch", ET_E_ARG);
  *count = et_le32(h + 8);
  return 0;
}

static int et_read_sample(FILE *in, float *x, uint32_t n, int32_t *label, uint32_t *flags) {
  uint8_t h[8];
  if (fread(h, 1, 8, in) != 8 || fread(x, 4, n, in) != n) return 0;
  *label = (int32_t)et_le32(h);
  *flags = et_le32(h + 4);
  return 1;
}

static int et_write_state(const char *path, const et_model *m) {
  FILE *f = fopen(path, "wb");
  uint32_t i;
  int ok = f != NULL;
  for (i = 0; ok && i < m->state_count; ++i)
    ok = m->state[i].bytes == 0u || fwrite(m->state[i].data, 1, m->state[i].bytes, f) == m->state[i].bytes;
  if (f != NULL && fclose(f) != 0) ok = 0;
  return ok ? 0 : et_fail("cannot write the state file", ET_E_IO);
}

static void et_summary(FILE *out, const et_app_port *port, const et_app_options *opt, const et_app_hooks *hooks,
                       const et_run_totals *t, const et_counters *c) {
  char b[4][24];
  fprintf(out, "{\"format\": \"edgetune-run/1\", \"model\": \"%s\", \"adapt\": %u, \"samples\": %lu, "
               "\"accepted\": %lu, \"rejected\": %lu, \"updates\": %lu, \"restores\": %lu, \"snapshots\": %lu, "
               "\"early_exits\": %lu, \"labelled\": %lu, \"saves\": %lu, \"resets\": %lu, ",
          port->name, (unsigned)opt->adapt, (unsigned long)c->samples, (unsigned long)t->accepted,
          (unsigned long)c->rejected, (unsigned long)c->updates, (unsigned long)c->restores,
          (unsigned long)c->snapshots, (unsigned long)c->early_exits, (unsigned long)c->labelled,
          (unsigned long)c->saves, (unsigned long)t->resets);
  fprintf(out, "\"bad_labels\": %lu, \"resumed\": %s, \"resume_reason\": \"%s\", ", (unsigned long)t->bad_labels,
          t->resumed ? "true" : "false", t->resume_reason);
  fprintf(out, "\"boot_seq\": %lu, \"save_seq\": %lu, \"payload_bytes\": %lu, \"clock_hz\": %s, ",
          (unsigned long)t->boot_seq, (unsigned long)t->save_seq, (unsigned long)t->payload,
          et_u64(hooks->clock_hz, b[0]));
  fprintf(out, "\"ticks\": {\"step\": %s, ", et_u64(t->step, b[0]));
  fprintf(out, "\"frozen\": %s, \"method\": %s, \"guard\": %s}, ", et_u64(t->frozen, b[1]), et_u64(t->method, b[2]),
          et_u64(t->guard, b[3]));
  fprintf(out, "\"stack_used_bytes\": %lu, \"stack_bytes\": %lu}\n", (unsigned long)t->stack_used,
          (unsigned long)hooks->stack_bytes);
}

static void et_record(uint8_t rec[ET_APP_RESULT_BYTES], const et_step_result *r, uint32_t flags, uint32_t step) {
  et_put32(rec, (uint32_t)r->prediction);
  et_put32(rec + 4, flags);
  et_put32(rec + 8, step);
  et_put32(rec + 12, r->ticks_frozen);
  et_put32(rec + 16, r->ticks_method);
  et_put32(rec + 20, r->ticks_guard);
  et_put32(rec + 24, et_float_bits(r->loss));
}

/* --resume: boot from the checkpoint, or say why not (stderr + summary) and stop unless --fresh-ok. */
static int et_resume(et_runtime *rt, et_ckpt *ck, const et_app_port *port, const et_app_options *opt,
                     const et_app_hooks *hooks, et_run_totals *t) {
  et_status st = et_runtime_boot(rt, ck, &t->boot_seq);
  if (st == ET_OK) {
    t->resumed = 1u;
    return 0;
  }
  if (st == ET_E_NO_CHECKPOINT && !opt->checkpoint_found) {
    t->resume_reason = "no checkpoint file yet (first start)";
    return 0;
  }
  if (st == ET_E_NO_CHECKPOINT)
    t->resume_reason = "no valid slot (empty, truncated, damaged or another model's file)";
  else if (st == ET_E_BAD_STATE)
    t->resume_reason = "every valid slot holds non-finite state or inconsistent counters";
  else if (st == ET_E_CORRUPT)
    t->resume_reason = "the checkpoint changed while it was read";
  else
    return et_fail("boot from the checkpoint", st);
  t->boot_seq = 0u;
  if (!opt->fresh_ok) {
    fprintf(stderr, "edgetune-run: error: checkpoint %s is unusable: %s; nothing was written. Restore a backup of "
                    "it, or pass --fresh-ok to start again from the bundle's state\n", opt->checkpoint,
            t->resume_reason);
    printf("edgetune-run: error: checkpoint unusable: %s\n", t->resume_reason);
    fflush(stdout);
    return ET_APP_EXIT_CHECKPOINT_UNUSABLE;
  }
  fprintf(stderr, "edgetune-run: warning: checkpoint %s is unusable: %s; starting from the bundle's state "
                  "(--fresh-ok)\n", opt->checkpoint, t->resume_reason);
  /* the failed load may have left partial state in the buffers */
  if ((st = et_start(rt, port, opt, hooks)) != ET_OK) return et_fail("runtime init", st);
  return 0;
}

int et_app_run(const et_app_options *opt, const et_app_hooks *hooks, const et_io *checkpoint_io) {
  static et_runtime rt;
  static et_ckpt ck;
  static et_cut_io cut;
  static et_run_totals t;
  const et_app_port *port;
  const et_model *m;
  et_io io;
  et_counters c;
  FILE *in, *res = NULL;
  uint32_t count, i, seq;
  int rc, last_saved = 0;
  et_status st;
  if (opt == NULL || hooks == NULL) return et_fail("no options", ET_E_ARG);
  if ((st = et_app_port_get(&port)) != ET_OK) return et_fail("model port", st);
  m = port->model;
  memset(&t, 0, sizeof t);
  t.resume_reason = opt->resume ? "" : "not asked (no --resume)";
  in = strcmp(opt->stream, "-") == 0 ? stdin : fopen(opt->stream, "rb");
  if (in == NULL) return et_fail("cannot open the stream", ET_E_IO);
  if ((rc = et_read_header(in, m, &count)) != 0) return rc;
  if (opt->max_samples != 0u && opt->max_samples < count) count = opt->max_samples;
  if ((st = et_start(&rt, port, opt, hooks)) != ET_OK) return et_fail("runtime init", st);

  if (checkpoint_io != NULL) {
    io = *checkpoint_io;
    if (opt->cut_after > 0u && hooks->power_cut != NULL) {
      cut.inner = *checkpoint_io;
      cut.budget = opt->cut_after;
      cut.written = 0;
      cut.power_cut = hooks->power_cut;
      io.read = et_cut_read;
      io.write = et_cut_write;
      io.sync = et_cut_sync;
      io.ctx = &cut;
    }
    if ((st = et_runtime_payload_bytes(&rt, &t.payload)) != ET_OK) return et_fail("checkpoint payload", st);
    if ((st = et_ckpt_open(&ck, &io, 0, ET_CKPT_SLOT_BYTES(t.payload))) != ET_OK) return et_fail("checkpoint", st);
    if (opt->resume && (rc = et_resume(&rt, &ck, port, opt, hooks, &t)) != 0) return rc;
  }
  if (opt->results != NULL) {
    uint8_t h[16];
    if ((res = fopen(opt->results, "wb")) == NULL) return et_fail("cannot create the results file", ET_E_IO);
    et_put32(h, ET_APP_RESULTS_MAGIC);
    et_put32(h + 4, ET_APP_VERSION);
    et_put32(h + 8, count);
    et_put32(h + 12, ET_APP_RESULT_BYTES);
    if (fwrite(h, 1, 16, res) != 16) return et_fail("cannot write the results file", ET_E_IO);
  }

  for (i = 0; i < count; ++i) {
    et_step_result r;
    uint8_t rec[ET_APP_RESULT_BYTES];
    uint64_t t0 = 0, t1 = 0;
    uint32_t flags = 0, in_flags;
    int32_t label;
    if (!et_read_sample(in, port->input, m->input_len, &label, &in_flags)) return et_fail("stream ended early", ET_E_IO);
    if ((in_flags & 1u) && i > 0u) { /* a new episode: the model starts again from the bundle's state */
      if ((st = et_runtime_counters(&rt, &c)) != ET_OK) return et_fail("counters", st);
      et_add_counters(&t.counters, &c);
      if ((st = et_start(&rt, port, opt, hooks)) != ET_OK) return et_fail("reset", st);
      t.resets += 1u;
      flags |= ET_APP_F_RESET;
    }
    last_saved = 0;
    if (hooks->stack_reset != NULL) hooks->stack_reset();
    if (hooks->clock != NULL) hooks->clock(hooks->clock_ctx, &t0);
    st = et_runtime_step(&rt, port->input, &r);
    if (hooks->clock != NULL) hooks->clock(hooks->clock_ctx, &t1);
    if (hooks->stack_used != NULL) {
      uint32_t used = hooks->stack_used();
      if (used > t.stack_used) t.stack_used = used;
    }
    if (st != ET_OK && st != ET_E_INPUT) return et_fail("step", st);
    if (st == ET_E_INPUT) {
      flags |= ET_APP_F_REJECTED;
    } else {
      t.accepted += 1u;
      t.step += t1 - t0;
      t.frozen += r.ticks_frozen;
      t.method += r.ticks_method;
      t.guard += r.ticks_guard;
      flags |= (r.updated ? ET_APP_F_UPDATED : 0u) | (r.early_exit ? ET_APP_F_EARLY_EXIT : 0u) |
               (r.restored ? ET_APP_F_RESTORED : 0u) | (r.snapshot ? ET_APP_F_SNAPSHOT : 0u);
      if (label >= 0 && (uint32_t)label >= m->classes) { /* a bad label is not learned from; the stream goes on */
        flags |= ET_APP_F_BAD_LABEL;
        t.bad_labels += 1u;
      } else if (label >= 0 && opt->adapt) { /* scored above; only now is the label revealed */
        et_step_result fb;
        if ((st = et_runtime_feedback(&rt, port->input, (uint32_t)label, &fb)) != ET_OK) return et_fail("feedback", st);
        flags |= ET_APP_F_FEEDBACK;
      }
      if (checkpoint_io != NULL && opt->adapt &&
          (r.snapshot || (opt->save_every != 0u && t.accepted % opt->save_every == 0u))) {
        if ((st = et_runtime_save(&rt, &ck, &t.save_seq)) != ET_OK) return et_fail("checkpoint save", st);
        flags |= ET_APP_F_SAVED;
        last_saved = 1;
      }
    }
    et_record(rec, &r, flags, (uint32_t)(t1 - t0));
    if (res != NULL && fwrite(rec, 1, sizeof rec, res) != sizeof rec) return et_fail("results write", ET_E_IO);
  }
  if (in != stdin) fclose(in);
  if (res != NULL && fclose(res) != 0) return et_fail("results close", ET_E_IO);
  /* the final state is saved unless the last sample's save just did it */
  if (checkpoint_io != NULL && opt->adapt && !last_saved) {
    if ((st = et_runtime_save(&rt, &ck, &seq)) != ET_OK) return et_fail("final checkpoint save", st);
    t.save_seq = seq;
  }
  if (opt->state != NULL && (rc = et_write_state(opt->state, m)) != 0) return rc;
  if ((st = et_runtime_counters(&rt, &c)) != ET_OK) return et_fail("counters", st);
  et_add_counters(&c, &t.counters);
  if (opt->summary != NULL) {
    FILE *f = fopen(opt->summary, "w");
    if (f == NULL) return et_fail("cannot create the summary file", ET_E_IO);
    et_summary(f, port, opt, hooks, &t, &c);
    if (fclose(f) != 0) return et_fail("summary close", ET_E_IO);
  }
  et_summary(stdout, port, opt, hooks, &t, &c);
  fflush(stdout);
  return 0;
}
