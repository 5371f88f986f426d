/* GPU-free checks of libbullet_tpc: offset table, record address and compare-and-write,
 * argument checks, descriptor writes. */
#include <stdio.h>
#include <string.h>

#include "tpc_mask.h"

static int failures;
#define CHECK(cond)                                               \
  do {                                                            \
    if (!(cond)) {                                                \
      fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                 \
    }                                                             \
  } while (0)

static void offsets(void) {
  CHECK(bullet_tpc_stream_mask_offset(12000) == 0x4cc);
  CHECK(bullet_tpc_stream_mask_offset(12080) == 0x4fc);
  CHECK(bullet_tpc_stream_mask_offset(13000) == 0x51c);
  CHECK(bullet_tpc_stream_mask_offset(13010) == -1);
  CHECK(bullet_tpc_stream_mask_offset(11080) == -1);
  CHECK(bullet_tpc_stream_mask_table(NULL, NULL, 0) == 10);
}

/* A fake CUstream: the handle points at an object whose first word points at the stream
 * struct; the record is at struct + offset, not at handle + offset. */
static void stream_record(void) {
  _Alignas(16) unsigned char fake_struct[0x600] = {0};
  _Alignas(16) unsigned char fake_handle[0x600] = {0};
  void* struct_ptr = fake_struct;
  memcpy(fake_handle, &struct_ptr, sizeof struct_ptr);
  void* address = NULL;
  CHECK(bullet_tpc_stream_record_address(fake_handle, 0x51c, &address) == 0);
  CHECK(address == (void*)(fake_struct + 0x51c));

  const uint32_t empty[5] = {0, 0, 0, 0, 0}, masked[5] = {1, 1, 2, 3, 4}, other[5] = {1, 5, 0, 0, 0};
  uint32_t rec[5];
  CHECK(bullet_tpc_replace_stream_record(fake_handle, 0x51c, empty, masked) == 0);
  CHECK(bullet_tpc_read_stream_record(fake_handle, 0x51c, rec) == 0 && memcmp(rec, masked, sizeof rec) == 0);
  uint32_t in_struct[5];
  memcpy(in_struct, fake_struct + 0x51c, sizeof in_struct);
  CHECK(memcmp(in_struct, masked, sizeof in_struct) == 0);
  for (size_t i = sizeof(void*); i < sizeof fake_handle; i++) CHECK(fake_handle[i] == 0); /* handle object untouched */

  /* read before write: a record that is not what we expect is left alone */
  CHECK(bullet_tpc_replace_stream_record(fake_handle, 0x51c, empty, other) == BULLET_TPC_E_STATE);
  CHECK(strstr(bullet_tpc_last_error(), "nothing written") != NULL);
  CHECK(bullet_tpc_read_stream_record(fake_handle, 0x51c, rec) == 0 && memcmp(rec, masked, sizeof rec) == 0);
  CHECK(bullet_tpc_replace_stream_record(fake_handle, 0x51c, masked, empty) == 0);
  CHECK(bullet_tpc_read_stream_record(fake_handle, 0x51c, rec) == 0 && memcmp(rec, empty, sizeof rec) == 0);

  CHECK(bullet_tpc_read_stream_record(NULL, 0x51c, rec) == BULLET_TPC_E_ARG);
  CHECK(strstr(bullet_tpc_last_error(), "special stream") != NULL);
  CHECK(bullet_tpc_read_stream_record(fake_handle, 0x51d, rec) == BULLET_TPC_E_ARG);

  void* null_ptr = NULL;
  memcpy(fake_handle, &null_ptr, sizeof null_ptr);
  CHECK(bullet_tpc_stream_record_address(fake_handle, 0x51c, &address) == BULLET_TPC_E_ARG && address == NULL);
  CHECK(strstr(bullet_tpc_last_error(), "not a pointer to a stream struct") != NULL);
  void* misaligned = fake_struct + 4;
  memcpy(fake_handle, &misaligned, sizeof misaligned);
  CHECK(bullet_tpc_stream_record_address(fake_handle, 0x51c, &address) == BULLET_TPC_E_ARG);
  void* unmapped = (void*)(uintptr_t)0x8000; /* below vm.mmap_min_addr: never mapped */
  memcpy(fake_handle, &unmapped, sizeof unmapped);
  CHECK(bullet_tpc_stream_record_address(fake_handle, 0x51c, &address) == BULLET_TPC_E_ARG);
  CHECK(strstr(bullet_tpc_last_error(), "not readable") != NULL);
  CHECK(bullet_tpc_stream_record_address((void*)(uintptr_t)0x8000, 0x51c, &address) == BULLET_TPC_E_ARG);
  CHECK(strstr(bullet_tpc_last_error(), "not a live CUstream") != NULL);
}

static uint32_t u32_at(const unsigned char* qmd, int at) {
  uint32_t w;
  memcpy(&w, qmd + at, 4);
  return w;
}

static void hook_writes_hopper_descriptor(void) {
  unsigned char qmd[512] = {0};
  qmd[72] = 0x40;
  uint64_t params[5] = {40, 0, 0, 0, (uint64_t)(uintptr_t)qmd};
  const uint32_t disabled[4] = {0xffffff00u, ~0u, ~0u, ~0u};
  bullet_tpc_hook_reset_stats();
  bullet_tpc_set_next_mask(disabled);
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(u32_at(qmd, 304) == 0xffffff00u);
  CHECK(u32_at(qmd, 0) >> 31 == 1);
  bullet_tpc_hook_stats_t s;
  CHECK(bullet_tpc_hook_stats(&s) == 0 && s.writes == 1 && s.last_qmd_version == 0x40);
}

/* Word 0's high half held stack bytes on driver 580: only the low 32 bits are the size. */
static void hook_thread_mask(void) {
  unsigned char qmd[512] = {0};
  qmd[72] = 0x40;
  uint64_t params[11] = {0x7fff00000058ull, 0, 0, 0, (uint64_t)(uintptr_t)qmd};
  const uint32_t mask_t[4] = {0xffff0000u, ~0u, ~0u, ~0u}, mask_n[4] = {0xfffffff0u, ~0u, ~0u, ~0u};
  bullet_tpc_hook_reset_stats();
  CHECK(bullet_tpc_set_thread_mask(mask_t) == 0);
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(u32_at(qmd, 304) == 0xffff0000u);
  CHECK(bullet_tpc_set_next_mask(mask_n) == 0); /* the next-launch mask wins, once */
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(u32_at(qmd, 304) == 0xfffffff0u);
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(u32_at(qmd, 304) == 0xffff0000u);
  CHECK(bullet_tpc_set_thread_mask(NULL) == 0);
  memset(qmd + 304, 0, 16);
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params); /* cleared: untouched */
  CHECK(u32_at(qmd, 304) == 0);
  bullet_tpc_hook_stats_t s;
  CHECK(bullet_tpc_hook_stats(&s) == 0 && s.writes == 3 && s.thread_writes == 2 && s.last_params_size == 0x58);
}

int main(void) {
  offsets();
  stream_record();
  hook_writes_hopper_descriptor();
  hook_thread_mask();
  if (failures) return 1;
  puts("tpc_mask_selftest: ok");
  return 0;
}
