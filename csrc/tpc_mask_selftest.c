/* GPU-free checks of libbullet_tpc: offset table, argument checks, descriptor writes. */
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

static void stream_record(void) {
  _Alignas(16) unsigned char fake_stream[0x600] = {0};
  const uint32_t disabled[4] = {1, 2, 3, 4};
  uint32_t rec[5];
  CHECK(bullet_tpc_set_stream_mask(fake_stream, 0x51c, disabled) == 0);
  CHECK(bullet_tpc_read_stream_mask(fake_stream, 0x51c, rec) == 0);
  CHECK(rec[0] == 1 && rec[1] == 1 && rec[4] == 4);
  CHECK(bullet_tpc_clear_stream_mask(fake_stream, 0x51c) == 0);
  CHECK(bullet_tpc_read_stream_mask(fake_stream, 0x51c, rec) == 0 && rec[0] == 0 && rec[4] == 0);
  CHECK(bullet_tpc_read_stream_mask(NULL, 0x51c, rec) == BULLET_TPC_E_ARG);
  CHECK(strstr(bullet_tpc_last_error(), "special stream") != NULL);
  CHECK(bullet_tpc_read_stream_mask(fake_stream, 0x51d, rec) == BULLET_TPC_E_ARG);
}

static void hook_writes_hopper_descriptor(void) {
  unsigned char qmd[512] = {0};
  qmd[72] = 0x40;
  uint64_t params[5] = {40, 0, 0, 0, (uint64_t)(uintptr_t)qmd};
  const uint32_t disabled[4] = {0xffffff00u, ~0u, ~0u, ~0u};
  bullet_tpc_hook_reset_stats();
  bullet_tpc_set_next_mask(disabled);
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  uint32_t w;
  memcpy(&w, qmd + 304, 4);
  CHECK(w == 0xffffff00u);
  memcpy(&w, qmd, 4);
  CHECK(w >> 31 == 1);
  bullet_tpc_hook_stats_t s;
  CHECK(bullet_tpc_hook_stats(&s) == 0 && s.writes == 1 && s.last_qmd_version == 0x40);
}

static uint32_t first_mask_word(const unsigned char* qmd) {
  uint32_t w;
  memcpy(&w, qmd + 304, 4);
  return w;
}

/* Word 0's high half held stack bytes on driver 580: only the low 32 bits are the size. */
static void hook_stream_and_thread_masks(void) {
  unsigned char qmd[512] = {0};
  qmd[72] = 0x40;
  int stream_a, stream_b; /* any distinct addresses serve as handles: they are only compared */
  uint64_t params[11] = {0x7fff00000058ull, 0, 0, (uint64_t)(uintptr_t)&stream_a, (uint64_t)(uintptr_t)qmd};
  const uint32_t mask_a[4] = {0xfffffff0u, ~0u, ~0u, ~0u}, mask_t[4] = {0xffff0000u, ~0u, ~0u, ~0u};
  bullet_tpc_hook_reset_stats();
  CHECK(bullet_tpc_hook_set_stream_word(4) == BULLET_TPC_E_ARG); /* the descriptor word */
  CHECK(bullet_tpc_hook_set_stream_word(3) == 0);
  CHECK(bullet_tpc_hook_set_stream_mask(&stream_a, mask_a) == 0);
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(first_mask_word(qmd) == 0xfffffff0u);
  memset(qmd + 304, 0, 16);
  params[3] = (uint64_t)(uintptr_t)&stream_b; /* another stream: untouched */
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(first_mask_word(qmd) == 0);
  CHECK(bullet_tpc_set_thread_mask(mask_t) == 0); /* the thread mask covers every stream */
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(first_mask_word(qmd) == 0xffff0000u);
  CHECK(bullet_tpc_set_thread_mask(NULL) == 0);
  CHECK(bullet_tpc_hook_set_stream_mask(&stream_a, NULL) == 0);
  memset(qmd + 304, 0, 16);
  params[3] = (uint64_t)(uintptr_t)&stream_a; /* removed: untouched */
  bullet_tpc_hook_callback(NULL, 0xb, 0x1, params);
  CHECK(first_mask_word(qmd) == 0);
  bullet_tpc_hook_stats_t s;
  CHECK(bullet_tpc_hook_stats(&s) == 0 && s.stream_writes == 1 && s.thread_writes == 1 && s.last_params_size == 0x58);
  CHECK(bullet_tpc_hook_set_stream_word(-1) == 0);
}

static void trace_and_peek(void) {
  uint64_t params[6] = {48, 1, 2, 3, 4, 5};
  CHECK(bullet_tpc_hook_trace_start(2) == 0);
  for (int i = 0; i < 3; i++) bullet_tpc_hook_callback(NULL, 0x7, i, params);
  bullet_tpc_trace_record_t rec[4];
  CHECK(bullet_tpc_hook_trace_read(rec, 4) == 2);
  CHECK(rec[1].cbid == 1 && rec[1].size == 48 && rec[1].n_words == 6 && rec[1].words[5] == 5);
  CHECK(bullet_tpc_hook_trace_start(5) == 0);
  bullet_tpc_hook_callback(NULL, 0x7, 9, params);
  CHECK(bullet_tpc_hook_trace_start(0) == 0); /* stop: keeps the one record */
  bullet_tpc_hook_callback(NULL, 0x7, 10, params);
  CHECK(bullet_tpc_hook_trace_read(rec, 4) == 1 && rec[0].cbid == 9);
  uint64_t got = 0;
  CHECK(bullet_tpc_peek(&params[2], &got, 8) == 0 && got == 2);
  CHECK(bullet_tpc_peek((void*)16, &got, 8) == BULLET_TPC_E_ARG);
}

int main(void) {
  offsets();
  stream_record();
  hook_writes_hopper_descriptor();
  hook_stream_and_thread_masks();
  trace_and_peek();
  if (failures) return 1;
  puts("tpc_mask_selftest: ok");
  return 0;
}
