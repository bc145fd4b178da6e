/* et_io over a C stdio file. On bare metal with newlib + rdimon this is semihosting file I/O
 * (the file lives on the host running QEMU or the debugger); anywhere else it is a plain file.
 * sync is fflush: durable on the semihosting host, not across an OS crash (use et_io_posix). */
#ifndef ET_IO_STDIO_H
#define ET_IO_STDIO_H

#include "et_io.h"

typedef struct et_io_stdio {
  void *file; /* FILE *, kept opaque so this header needs no <stdio.h> */
} et_io_stdio;

/* Opens `path` for update, creating it (empty) when missing. */
et_status et_io_stdio_open(et_io *io, et_io_stdio *f, const char *path);
et_status et_io_stdio_close(et_io_stdio *f);

#endif /* ET_IO_STDIO_H */
