/* et_io over a POSIX file descriptor: pread/pwrite, and fsync as the durability barrier.
 * Linux, Android and the host; on targets without POSIX every call returns ET_E_IO. */
#ifndef ET_IO_POSIX_H
#define ET_IO_POSIX_H

#include "et_io.h"

typedef struct et_io_posix {
  int fd;
} et_io_posix;

/* Opens `path` read-write, creating it (mode 0644) when missing. */
et_status et_io_posix_open(et_io *io, et_io_posix *f, const char *path);
et_status et_io_posix_close(et_io_posix *f);

#endif /* ET_IO_POSIX_H */
