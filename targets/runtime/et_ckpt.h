/* Persistence of the adapted state in an A/B pair of slots.
 *
 * Slot i lives at base + i * slot_bytes: a 24-byte little-endian header
 *   {magic "ETCK", version, sequence number, payload length, layout id, CRC-32}
 * followed by the payload (the registered buffers, in order). The CRC covers version..layout
 * and the payload. A save goes to the OLDER slot (never the newest valid one) in this order:
 *   1. zero the magic, sync      (the slot is now invalid whatever happens next)
 *   2. payload, then version..CRC (the CRC is the last thing before the commit), sync
 *   3. magic, sync               (the commit: a torn 4-byte magic is never "ETCK")
 * so a power cut at any byte leaves the previous slot untouched and this one invalid.
 * Boot loads the newest slot whose magic, version, length, layout and CRC are all valid; when
 * the caller finds that slot's content unusable it can load the other valid one (rank 1). */
#ifndef ET_CKPT_H
#define ET_CKPT_H

#include "et_io.h"

#define ET_CKPT_MAGIC 0x4B435445u /* "ETCK" little-endian */
#define ET_CKPT_VERSION 1u
#define ET_CKPT_HEADER_BYTES 24u
/* Room for one slot holding `payload` bytes (8-byte aligned so slots start on flash-friendly offsets). */
#define ET_CKPT_SLOT_BYTES(payload) (ET_CKPT_HEADER_BYTES + ((((uint32_t)(payload)) + 7u) & ~7u))

typedef struct et_ckpt {
  et_io io;
  uint32_t base;       /* offset of slot A in the storage */
  uint32_t slot_bytes; /* capacity of each slot, header included */
  int32_t newest;      /* slot holding the newest valid checkpoint, -1 when none */
  uint32_t seq;        /* its sequence number (0 when none) */
  int32_t older;       /* the other slot when it is valid too, -1 otherwise */
  uint32_t older_seq;
  uint32_t scanned_layout;
  uint32_t scanned_payload;
  uint32_t scanned; /* 1 once `newest` reflects the storage for (scanned_layout, scanned_payload) */
} et_ckpt;

et_status et_ckpt_open(et_ckpt *ck, const et_io *io, uint32_t base, uint32_t slot_bytes);
/* Sum of the buffers' sizes (the payload length). */
et_status et_ckpt_payload_bytes(const et_state_list *lists, uint32_t nlists, uint32_t *bytes);
/* Copies the newest valid slot into the buffers; *seq (may be NULL) gets its sequence number.
 * ET_E_NO_CHECKPOINT (buffers untouched) when no slot is valid for this layout; ET_E_CORRUPT
 * (buffers undefined) when the slot changed while it was read. */
et_status et_ckpt_load(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout_id, uint32_t *seq);
/* As et_ckpt_load for rank 0; rank 1 loads the older valid slot (ET_E_NO_CHECKPOINT when there is
 * none). A save always goes to the slot that is not the newest, so it may overwrite rank 1. */
et_status et_ckpt_load_rank(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout_id,
                            uint32_t rank, uint32_t *seq);
/* The caller rejected the newest slot's content and loaded rank 1: from now on the loaded slot is
 * the newest, so the next save overwrites the rejected slot, never the one just loaded. */
et_status et_ckpt_drop_newest(et_ckpt *ck);
/* Writes the buffers into the older slot with the next sequence number (returned in *seq). */
et_status et_ckpt_save(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout_id, uint32_t *seq);

#endif /* ET_CKPT_H */
