#if defined(__unix__) || defined(__APPLE__)
#define _POSIX_C_SOURCE 200809L
#endif

#include "et_io_posix.h"

#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

static et_status et_posix_read(void *ctx, uint32_t offset, void *dst, uint32_t len) {
  et_io_posix *f = (et_io_posix *)ctx;
  uint8_t *p = (uint8_t *)dst;
  if (f == NULL || f->fd < 0 || (dst == NULL && len != 0)) return ET_E_ARG;
  while (len > 0) {
    ssize_t n = pread(f->fd, p, len, (off_t)offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ET_E_IO; /* 0: end of file before `len` bytes (a truncated slot) */
    p += n;
    offset += (uint32_t)n;
    len -= (uint32_t)n;
  }
  return ET_OK;
}

static et_status et_posix_write(void *ctx, uint32_t offset, const void *src, uint32_t len) {
  et_io_posix *f = (et_io_posix *)ctx;
  const uint8_t *p = (const uint8_t *)src;
  if (f == NULL || f->fd < 0 || (src == NULL && len != 0)) return ET_E_ARG;
  while (len > 0) {
    ssize_t n = pwrite(f->fd, p, len, (off_t)offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ET_E_IO;
    p += n;
    offset += (uint32_t)n;
    len -= (uint32_t)n;
  }
  return ET_OK;
}

static et_status et_posix_sync(void *ctx) {
  et_io_posix *f = (et_io_posix *)ctx;
  if (f == NULL || f->fd < 0) return ET_E_ARG;
  return fsync(f->fd) == 0 ? ET_OK : ET_E_IO;
}

et_status et_io_posix_open(et_io *io, et_io_posix *f, const char *path) {
  int fd;
  if (io == NULL || f == NULL || path == NULL) return ET_E_ARG;
  do {
    fd = open(path, O_RDWR | O_CREAT, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ET_E_IO;
  f->fd = fd;
  io->read = et_posix_read;
  io->write = et_posix_write;
  io->sync = et_posix_sync;
  io->ctx = f;
  return ET_OK;
}

et_status et_io_posix_close(et_io_posix *f) {
  int rc;
  if (f == NULL || f->fd < 0) return ET_E_ARG;
  rc = close(f->fd);
  f->fd = -1;
  return rc == 0 ? ET_OK : ET_E_IO;
}

#else /* no POSIX (bare metal): same API, always unavailable */

et_status et_io_posix_open(et_io *io, et_io_posix *f, const char *path) {
  if (io == NULL || f == NULL || path == NULL) return ET_E_ARG;
  f->fd = -1;
  return ET_E_IO;
}

et_status et_io_posix_close(et_io_posix *f) { return f == NULL ? ET_E_ARG : ET_E_IO; }

#endif
