#include "et_ckpt.h"

#include "et_crc32.h"

#define ET_CKPT_CHUNK 128u /* stack buffer for streaming CRC checks: no payload-sized copy */

static void et_put_u32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}

static uint32_t et_get_u32(const uint8_t *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint32_t et_slot_offset(const et_ckpt *ck, int32_t slot) {
  return ck->base + (uint32_t)slot * ck->slot_bytes;
}

et_status et_ckpt_open(et_ckpt *ck, const et_io *io, uint32_t base, uint32_t slot_bytes) {
  if (ck == NULL || io == NULL || io->read == NULL || io->write == NULL || io->sync == NULL) return ET_E_ARG;
  if (slot_bytes < ET_CKPT_HEADER_BYTES || base > 0xFFFFFFFFu - 2u * slot_bytes) return ET_E_ARG;
  ck->io = *io;
  ck->base = base;
  ck->slot_bytes = slot_bytes;
  ck->newest = -1;
  ck->seq = 0;
  ck->older = -1;
  ck->older_seq = 0;
  ck->scanned = 0;
  ck->scanned_layout = 0;
  ck->scanned_payload = 0;
  return ET_OK;
}

et_status et_ckpt_payload_bytes(const et_state_list *lists, uint32_t nlists, uint32_t *bytes) {
  uint32_t i, j, total = 0;
  if (bytes == NULL || (lists == NULL && nlists != 0)) return ET_E_ARG;
  for (i = 0; i < nlists; ++i) {
    if (lists[i].bufs == NULL && lists[i].count != 0) return ET_E_ARG;
    for (j = 0; j < lists[i].count; ++j) {
      const et_state_buf *b = &lists[i].bufs[j];
      if (b->data == NULL && b->bytes != 0) return ET_E_ARG;
      if (b->bytes > 0xFFFFFFFFu - total) return ET_E_CAPACITY;
      total += b->bytes;
    }
  }
  *bytes = total;
  return ET_OK;
}

/* Header fields covered by the CRC (version, seq, length, layout) as stored. */
static void et_header_fields(uint8_t out[16], uint32_t seq, uint32_t payload, uint32_t layout) {
  et_put_u32(out, ET_CKPT_VERSION);
  et_put_u32(out + 4, seq);
  et_put_u32(out + 8, payload);
  et_put_u32(out + 12, layout);
}

/* Is `slot` a complete, committed checkpoint of this layout? Reads the storage only. */
static int et_slot_valid(const et_ckpt *ck, int32_t slot, uint32_t layout, uint32_t payload, uint32_t *seq) {
  uint8_t head[ET_CKPT_HEADER_BYTES];
  uint8_t chunk[ET_CKPT_CHUNK];
  uint32_t crc = 0, off, done;
  const uint32_t at = et_slot_offset(ck, slot);
  if (ck->io.read(ck->io.ctx, at, head, ET_CKPT_HEADER_BYTES) != ET_OK) return 0;
  if (et_get_u32(head) != ET_CKPT_MAGIC || et_get_u32(head + 4) != ET_CKPT_VERSION) return 0;
  if (et_get_u32(head + 12) != payload || et_get_u32(head + 16) != layout) return 0;
  if (et_crc32_update(&crc, head + 4, 16) != ET_OK) return 0;
  off = at + ET_CKPT_HEADER_BYTES;
  for (done = 0; done < payload;) {
    uint32_t n = payload - done < ET_CKPT_CHUNK ? payload - done : ET_CKPT_CHUNK;
    if (ck->io.read(ck->io.ctx, off + done, chunk, n) != ET_OK) return 0; /* truncated storage */
    if (et_crc32_update(&crc, chunk, n) != ET_OK) return 0;
    done += n;
  }
  if (crc != et_get_u32(head + 20)) return 0;
  *seq = et_get_u32(head + 8);
  return 1;
}

static et_status et_ckpt_scan(et_ckpt *ck, uint32_t layout, uint32_t payload) {
  uint32_t seq[2] = {0, 0};
  int valid[2];
  if (payload > ck->slot_bytes - ET_CKPT_HEADER_BYTES) return ET_E_CAPACITY;
  valid[0] = et_slot_valid(ck, 0, layout, payload, &seq[0]);
  valid[1] = et_slot_valid(ck, 1, layout, payload, &seq[1]);
  if (valid[0] && valid[1]) /* serial-number order: survives the 32-bit wrap */
    ck->newest = ((int32_t)(seq[1] - seq[0]) > 0) ? 1 : 0;
  else
    ck->newest = valid[0] ? 0 : (valid[1] ? 1 : -1);
  ck->seq = ck->newest < 0 ? 0u : seq[ck->newest];
  ck->older = (valid[0] && valid[1]) ? 1 - ck->newest : -1;
  ck->older_seq = ck->older < 0 ? 0u : seq[ck->older];
  ck->scanned = 1;
  ck->scanned_layout = layout;
  ck->scanned_payload = payload;
  return ET_OK;
}

static et_status et_ckpt_prepare(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout,
                                 uint32_t *payload) {
  et_status st;
  if (ck == NULL || ck->io.read == NULL) return ET_E_ARG;
  st = et_ckpt_payload_bytes(lists, nlists, payload);
  if (st != ET_OK) return st;
  if (*payload > ck->slot_bytes - ET_CKPT_HEADER_BYTES) return ET_E_CAPACITY;
  if (!ck->scanned || ck->scanned_layout != layout || ck->scanned_payload != *payload)
    return et_ckpt_scan(ck, layout, *payload);
  return ET_OK;
}

et_status et_ckpt_load(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout_id, uint32_t *seq) {
  return et_ckpt_load_rank(ck, lists, nlists, layout_id, 0u, seq);
}

et_status et_ckpt_load_rank(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout_id,
                            uint32_t rank, uint32_t *seq) {
  uint8_t head[ET_CKPT_HEADER_BYTES];
  uint32_t payload, crc = 0, off, i, j, want;
  int32_t slot;
  et_status st;
  if (rank > 1u) return ET_E_ARG;
  st = et_ckpt_prepare(ck, lists, nlists, layout_id, &payload);
  if (st != ET_OK) return st;
  slot = rank == 0u ? ck->newest : ck->older;
  want = rank == 0u ? ck->seq : ck->older_seq;
  if (slot < 0) return ET_E_NO_CHECKPOINT;
  off = et_slot_offset(ck, slot);
  if (ck->io.read(ck->io.ctx, off, head, ET_CKPT_HEADER_BYTES) != ET_OK) return ET_E_IO;
  if (et_get_u32(head) != ET_CKPT_MAGIC || et_get_u32(head + 8) != want) return ET_E_CORRUPT;
  if (et_crc32_update(&crc, head + 4, 16) != ET_OK) return ET_E_ARG;
  off += ET_CKPT_HEADER_BYTES;
  for (i = 0; i < nlists; ++i) {
    for (j = 0; j < lists[i].count; ++j) {
      const et_state_buf *b = &lists[i].bufs[j];
      if (b->bytes == 0) continue;
      if (ck->io.read(ck->io.ctx, off, b->data, b->bytes) != ET_OK) return ET_E_CORRUPT;
      if (et_crc32_update(&crc, b->data, b->bytes) != ET_OK) return ET_E_ARG;
      off += b->bytes;
    }
  }
  /* checked again on what landed in the buffers: the storage may have changed since the scan */
  if (crc != et_get_u32(head + 20)) return ET_E_CORRUPT;
  if (seq != NULL) *seq = want;
  return ET_OK;
}

et_status et_ckpt_drop_newest(et_ckpt *ck) {
  if (ck == NULL || !ck->scanned || ck->newest < 0 || ck->older < 0) return ET_E_ARG;
  ck->newest = ck->older; /* the next save goes to the other slot: the rejected one */
  ck->seq = ck->older_seq;
  ck->older = -1;
  ck->older_seq = 0;
  return ET_OK;
}

et_status et_ckpt_save(et_ckpt *ck, const et_state_list *lists, uint32_t nlists, uint32_t layout_id, uint32_t *seq) {
  uint8_t head[ET_CKPT_HEADER_BYTES];
  uint8_t magic[4] = {0, 0, 0, 0};
  uint32_t payload, crc = 0, at, off, i, j, next;
  int32_t target;
  et_status st = et_ckpt_prepare(ck, lists, nlists, layout_id, &payload);
  if (st != ET_OK) return st;
  target = ck->newest < 0 ? 0 : 1 - ck->newest;
  next = ck->seq + 1u;
  if (next == 0u) next = 1u; /* 0 means "none" */
  at = et_slot_offset(ck, target);
  ck->older = -1; /* the target is the older slot: from the next write on it is no longer valid */

  if (ck->io.write(ck->io.ctx, at, magic, 4) != ET_OK || ck->io.sync(ck->io.ctx) != ET_OK) return ET_E_IO;

  et_header_fields(head + 4, next, payload, layout_id);
  if (et_crc32_update(&crc, head + 4, 16) != ET_OK) return ET_E_ARG;
  off = at + ET_CKPT_HEADER_BYTES;
  for (i = 0; i < nlists; ++i) {
    for (j = 0; j < lists[i].count; ++j) {
      const et_state_buf *b = &lists[i].bufs[j];
      if (b->bytes == 0) continue;
      if (ck->io.write(ck->io.ctx, off, b->data, b->bytes) != ET_OK) return ET_E_IO;
      if (et_crc32_update(&crc, b->data, b->bytes) != ET_OK) return ET_E_ARG;
      off += b->bytes;
    }
  }
  et_put_u32(head + 20, crc);
  if (ck->io.write(ck->io.ctx, at + 4, head + 4, ET_CKPT_HEADER_BYTES - 4) != ET_OK) return ET_E_IO;
  if (ck->io.sync(ck->io.ctx) != ET_OK) return ET_E_IO;

  et_put_u32(magic, ET_CKPT_MAGIC);
  if (ck->io.write(ck->io.ctx, at, magic, 4) != ET_OK || ck->io.sync(ck->io.ctx) != ET_OK) return ET_E_IO;

  ck->older = ck->newest; /* the previous newest is still intact */
  ck->older_seq = ck->seq;
  ck->newest = target;
  ck->seq = next;
  if (seq != NULL) *seq = next;
  return ET_OK;
}
