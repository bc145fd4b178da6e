#include "et_crc32.h"

/* A nibble table: 64 bytes of flash instead of 1 KB, still ~2 lookups per byte. */
static const uint32_t et_crc_nibble[16] = {
  0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
  0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};

et_status et_crc32_update(uint32_t *crc, const void *data, size_t len) {
  const uint8_t *p = (const uint8_t *)data;
  uint32_t c;
  size_t i;
  if (crc == NULL || (data == NULL && len != 0)) return ET_E_ARG;
  c = ~*crc;
  for (i = 0; i < len; ++i) {
    c = et_crc_nibble[(c ^ p[i]) & 0xFu] ^ (c >> 4);
    c = et_crc_nibble[(c ^ ((uint32_t)p[i] >> 4)) & 0xFu] ^ (c >> 4);
  }
  *crc = ~c;
  return ET_OK;
}
