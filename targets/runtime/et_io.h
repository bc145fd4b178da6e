/* The storage behind checkpoints: read / write / sync at a byte offset. Implementations:
 * et_io_mem (a RAM or memory-mapped region), et_io_stdio (a C stdio file: newlib + rdimon
 * semihosting on bare metal, any hosted libc) and et_io_posix (open/pwrite/fsync). */
#ifndef ET_IO_H
#define ET_IO_H

#include "et_types.h"

typedef struct et_io {
  /* ET_OK only when all `len` bytes were transferred. */
  et_status (*read)(void *ctx, uint32_t offset, void *dst, uint32_t len);
  et_status (*write)(void *ctx, uint32_t offset, const void *src, uint32_t len);
  /* Returns once everything written before is durable (the checkpoint's commit order relies on it). */
  et_status (*sync)(void *ctx);
  void *ctx;
} et_io;

/* A region of memory; reads or writes past its end fail. */
typedef struct et_io_mem {
  uint8_t *base;
  uint32_t bytes;
} et_io_mem;

et_status et_io_mem_open(et_io *io, et_io_mem *mem, void *region, uint32_t bytes);

#endif /* ET_IO_H */
