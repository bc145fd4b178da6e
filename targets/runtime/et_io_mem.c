#include "et_io.h"

#include <string.h>

static et_status et_mem_span(const et_io_mem *m, uint32_t offset, uint32_t len) {
  if (m == NULL || m->base == NULL) return ET_E_ARG;
  if (offset > m->bytes || len > m->bytes - offset) return ET_E_IO;
  return ET_OK;
}

static et_status et_mem_read(void *ctx, uint32_t offset, void *dst, uint32_t len) {
  const et_io_mem *m = (const et_io_mem *)ctx;
  et_status st = et_mem_span(m, offset, len);
  if (st != ET_OK) return st;
  if (dst == NULL && len != 0) return ET_E_ARG;
  if (len != 0) memcpy(dst, m->base + offset, len);
  return ET_OK;
}

static et_status et_mem_write(void *ctx, uint32_t offset, const void *src, uint32_t len) {
  const et_io_mem *m = (const et_io_mem *)ctx;
  et_status st = et_mem_span(m, offset, len);
  if (st != ET_OK) return st;
  if (src == NULL && len != 0) return ET_E_ARG;
  if (len != 0) memcpy(m->base + offset, src, len);
  return ET_OK;
}

static et_status et_mem_sync(void *ctx) { return ctx == NULL ? ET_E_ARG : ET_OK; }

et_status et_io_mem_open(et_io *io, et_io_mem *mem, void *region, uint32_t bytes) {
  if (io == NULL || mem == NULL || region == NULL) return ET_E_ARG;
  mem->base = (uint8_t *)region;
  mem->bytes = bytes;
  io->read = et_mem_read;
  io->write = et_mem_write;
  io->sync = et_mem_sync;
  io->ctx = mem;
  return ET_OK;
}
