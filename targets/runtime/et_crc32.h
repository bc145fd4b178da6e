/* CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320): zlib.crc32-compatible chaining. */
#ifndef ET_CRC32_H
#define ET_CRC32_H

#include "et_types.h"

/* *crc = crc32 of the bytes seen so far followed by data[0..len); start with *crc = 0. */
et_status et_crc32_update(uint32_t *crc, const void *data, size_t len);

#endif /* ET_CRC32_H */
