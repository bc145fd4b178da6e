#include "et_io_stdio.h"

#include <stdio.h>

static et_status et_stdio_seek(FILE *fp, uint32_t offset) {
  /* long is 32 bits on Cortex-M: offsets above LONG_MAX cannot be reached */
  if ((unsigned long)offset > 0x7FFFFFFFul) return ET_E_IO;
  return fseek(fp, (long)offset, SEEK_SET) == 0 ? ET_OK : ET_E_IO;
}

static et_status et_stdio_read(void *ctx, uint32_t offset, void *dst, uint32_t len) {
  et_io_stdio *f = (et_io_stdio *)ctx;
  FILE *fp;
  if (f == NULL || f->file == NULL || (dst == NULL && len != 0)) return ET_E_ARG;
  fp = (FILE *)f->file;
  if (et_stdio_seek(fp, offset) != ET_OK) return ET_E_IO;
  if (len == 0) return ET_OK;
  return fread(dst, 1, len, fp) == len ? ET_OK : ET_E_IO;
}

static et_status et_stdio_write(void *ctx, uint32_t offset, const void *src, uint32_t len) {
  et_io_stdio *f = (et_io_stdio *)ctx;
  FILE *fp;
  if (f == NULL || f->file == NULL || (src == NULL && len != 0)) return ET_E_ARG;
  fp = (FILE *)f->file;
  if (et_stdio_seek(fp, offset) != ET_OK) return ET_E_IO;
  if (len == 0) return ET_OK;
  return fwrite(src, 1, len, fp) == len ? ET_OK : ET_E_IO;
}

static et_status et_stdio_sync(void *ctx) {
  et_io_stdio *f = (et_io_stdio *)ctx;
  if (f == NULL || f->file == NULL) return ET_E_ARG;
  return fflush((FILE *)f->file) == 0 ? ET_OK : ET_E_IO;
}

et_status et_io_stdio_open(et_io *io, et_io_stdio *f, const char *path) {
  FILE *fp;
  if (io == NULL || f == NULL || path == NULL) return ET_E_ARG;
  fp = fopen(path, "r+b");
  if (fp == NULL) fp = fopen(path, "w+b"); /* missing: create; "w+" would truncate an existing one */
  if (fp == NULL) return ET_E_IO;
  f->file = fp;
  io->read = et_stdio_read;
  io->write = et_stdio_write;
  io->sync = et_stdio_sync;
  io->ctx = f;
  return ET_OK;
}

et_status et_io_stdio_close(et_io_stdio *f) {
  int rc;
  if (f == NULL || f->file == NULL) return ET_E_ARG;
  rc = fclose((FILE *)f->file);
  f->file = NULL;
  return rc == 0 ? ET_OK : ET_E_IO;
}
