/* libbullet_tpc: per-stream and launch-hook TPC masks. See tpc_mask.h for the API and
 * docs/tpc-masks.md for the facts (record indirection and offsets, export-table UUID,
 * descriptor layouts) used here. */
#define _GNU_SOURCE /* RTLD_NOLOAD, process_vm_readv */
#include "tpc_mask.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---- errors ------------------------------------------------------------------------------ */

static _Thread_local char last_error[512];

static int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return code;
}

EXPORT int bullet_tpc_abi_version(void) { return BULLET_TPC_ABI_VERSION; }
EXPORT const char* bullet_tpc_last_error(void) { return last_error; }

/* ---- reading memory we do not own ----------------------------------------------------------- */

/* Copy n bytes at addr into out without faulting: 0, or -1 where they are not readable. */
static int safe_read(const void* addr, void* out, size_t n) {
  struct iovec local = {out, n}, remote = {(void*)addr, n};
  return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : -1;
}

/* ---- per-stream mask record ----------------------------------------------------------------- */

/* Offset of { uint32 enabled; uint32 disabled[4]; } in the driver's stream struct (x86-64).
 * 13000 was measured on an H200 (driver 580.159.04) behind the handle's first word. */
static const struct { int version, offset; } stream_offsets[] = {
    {12000, 0x4cc}, {12010, 0x4cc}, {12020, 0x4e4}, {12030, 0x49c}, {12040, 0x4ac},
    {12050, 0x4ec}, {12060, 0x4ec}, {12070, 0x4fc}, {12080, 0x4fc}, {13000, 0x51c},
};
#define N_OFFSETS ((int)(sizeof stream_offsets / sizeof stream_offsets[0]))

/* Handles below this are the driver's special streams (0 legacy default, 1 legacy, 2
 * per-thread), not pointers; the record stays well inside the struct. */
#define MIN_POINTER 4096
#define MAX_OFFSET 0x10000
#define RECORD_BYTES (5 * sizeof(uint32_t))

EXPORT int bullet_tpc_stream_mask_offset(int driver_api_version) {
  for (int i = 0; i < N_OFFSETS; i++)
    if (stream_offsets[i].version == driver_api_version) return stream_offsets[i].offset;
  return -1;
}

EXPORT int bullet_tpc_stream_mask_table(int* versions, int* offsets, int capacity) {
  for (int i = 0; i < N_OFFSETS && i < capacity; i++) {
    if (versions) versions[i] = stream_offsets[i].version;
    if (offsets) offsets[i] = stream_offsets[i].offset;
  }
  return N_OFFSETS;
}

EXPORT int bullet_tpc_stream_record_address(void* stream, int offset, void** out) {
  if (!out) return fail(BULLET_TPC_E_ARG, "stream_record_address: out is NULL");
  *out = NULL;
  if ((uintptr_t)stream < MIN_POINTER)
    return fail(BULLET_TPC_E_ARG,
                "stream handle %p is a special stream (default/legacy/per-thread) or NULL; masks need a "
                "stream created with cuStreamCreate / torch.cuda.Stream()", stream);
  if (offset < 0 || offset >= MAX_OFFSET || offset % 4 != 0)
    return fail(BULLET_TPC_E_ARG, "stream mask offset %d is not a multiple of 4 in 0..0x%x", offset,
                MAX_OFFSET - 4);
  uintptr_t object = 0;
  if (safe_read(stream, &object, sizeof object) != 0)
    return fail(BULLET_TPC_E_ARG, "stream handle %p is not readable memory: not a live CUstream of this process",
                stream);
  /* The first word must point at the driver's stream struct: a heap pointer, 8-aligned, in
   * user space (below 2^48). Anything else means this driver lays out streams differently. */
  if (object < MIN_POINTER || object % 8 != 0 || object >> 48 != 0)
    return fail(BULLET_TPC_E_ARG,
                "the first word of stream handle %p is %#lx, not a pointer to a stream struct (NULL, "
                "misaligned or outside user space): this driver's streams are laid out differently; "
                "refusing to touch them", stream, (unsigned long)object);
  char* record = (char*)object + offset;
  uint32_t probe[5];
  if (safe_read(record, probe, RECORD_BYTES) != 0)
    return fail(BULLET_TPC_E_ARG, "the stream record at %p (struct %p + %#x) is not readable memory",
                (void*)record, (void*)object, offset);
  *out = record;
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_read_stream_record(void* stream, int offset, uint32_t out[5]) {
  if (!out) return fail(BULLET_TPC_E_ARG, "read_stream_record: out is NULL");
  void* record;
  int rc = bullet_tpc_stream_record_address(stream, offset, &record);
  if (rc != BULLET_TPC_OK) return rc;
  if (safe_read(record, out, RECORD_BYTES) != 0)
    return fail(BULLET_TPC_E_ARG, "the stream record at %p became unreadable", record);
  return BULLET_TPC_OK;
}

static void format_record(char* buf, size_t n, const uint32_t r[5]) {
  snprintf(buf, n, "[%u, %#x, %#x, %#x, %#x]", r[0], r[1], r[2], r[3], r[4]);
}

EXPORT int bullet_tpc_replace_stream_record(void* stream, int offset, const uint32_t expected[5],
                                            const uint32_t record[5]) {
  if (!expected || !record) return fail(BULLET_TPC_E_ARG, "replace_stream_record: expected or record is NULL");
  void* address;
  int rc = bullet_tpc_stream_record_address(stream, offset, &address);
  if (rc != BULLET_TPC_OK) return rc;
  uint32_t found[5];
  if (safe_read(address, found, RECORD_BYTES) != 0)
    return fail(BULLET_TPC_E_ARG, "the stream record at %p became unreadable", address);
  if (memcmp(found, expected, RECORD_BYTES) != 0) { /* read before write: never write blind */
    char want[96], got[96];
    format_record(want, sizeof want, expected);
    format_record(got, sizeof got, found);
    return fail(BULLET_TPC_E_STATE, "the stream record at offset %#x holds %s, not the expected %s; nothing written",
                offset, got, want);
  }
  volatile uint32_t* rec = address;
  if (found[0] != 0) { /* never let a launch see enabled=1 beside half-written words */
    rec[0] = 0;
    atomic_thread_fence(memory_order_seq_cst);
  }
  for (int i = 1; i < 5; i++) rec[i] = record[i];
  atomic_thread_fence(memory_order_seq_cst);
  rec[0] = record[0];
  return BULLET_TPC_OK;
}

/* ---- launch hook: masks to apply ------------------------------------------------------------ */

struct pending_mask {
  int set;
  uint32_t words[4];
};

/* Per thread, because the driver calls back on the launching thread (for graphs: the thread
 * that uploads or first launches the executable). */
static _Thread_local struct pending_mask next_mask;
static _Thread_local struct pending_mask thread_mask;

EXPORT int bullet_tpc_set_next_mask(const uint32_t disabled[4]) {
  next_mask.set = disabled != NULL;
  if (disabled) memcpy(next_mask.words, disabled, sizeof next_mask.words);
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_set_thread_mask(const uint32_t disabled[4]) {
  thread_mask.set = disabled != NULL;
  if (disabled) memcpy(thread_mask.words, disabled, sizeof thread_mask.words);
  return BULLET_TPC_OK;
}

enum source { NONE, NEXT, THREAD };

/* Which mask applies: the next-launch mask (consumed) wins over the thread mask. */
static enum source wanted_mask(uint32_t words[4]) {
  if (next_mask.set) {
    memcpy(words, next_mask.words, sizeof next_mask.words);
    next_mask.set = 0;
    return NEXT;
  }
  if (thread_mask.set) {
    memcpy(words, thread_mask.words, sizeof thread_mask.words);
    return THREAD;
  }
  return NONE;
}

/* ---- launch hook: descriptor (QMD) layouts -------------------------------------------------- */

enum { QMD_VERSION_AT = 72, QMD_VERSION_AT_BLACKWELL = 58 };

struct qmd_layout {
  int mask_at;    /* byte offset of the first disable word */
  int n_words;    /* 4 (128 TPCs) or 2 (64 TPCs) */
  int enable_at;  /* byte offset of the u32 whose bit 31 enables the mask, -1 if none */
};

static const struct qmd_layout HOPPER = {304, 4, 0};     /* V04_xx: 0x40..0x4f at byte 72 */
static const struct qmd_layout BLACKWELL = {280, 4, 16}; /* V05_xx: 0x50..0x5f at byte 58 */
static const struct qmd_layout PRE_HOPPER = {84, 2, -1}; /* Kepler..Ada: 0x16..0x3f at 72 */

/* Layout for a descriptor, or NULL for versions we do not know (then we write nothing): an
 * unknown future layout must not be written into at a guessed position. */
static const struct qmd_layout* qmd_layout(const uint8_t* qmd, uint32_t* version) {
  uint8_t v = qmd[QMD_VERSION_AT];
  if (v == 0) {
    v = qmd[QMD_VERSION_AT_BLACKWELL];
    *version = v;
    return v >= 0x50 && v < 0x60 ? &BLACKWELL : NULL;
  }
  *version = v;
  if (v >= 0x40 && v < 0x50) return &HOPPER;
  if (v >= 0x16 && v < 0x40) return &PRE_HOPPER;
  return NULL;
}

static void qmd_write_mask(uint8_t* qmd, const struct qmd_layout* l, const uint32_t words[4]) {
  memcpy(qmd + l->mask_at, words, 4 * (size_t)l->n_words);
  if (l->enable_at >= 0) {
    uint32_t w;
    memcpy(&w, qmd + l->enable_at, 4);
    w |= UINT32_C(1) << 31;
    memcpy(qmd + l->enable_at, &w, 4);
  }
}

/* ---- launch hook: callback and statistics ---------------------------------------------------- */

enum { HOOK_DOMAIN = 0xb, HOOK_CBID = 0x1 }; /* just before the QMD is uploaded */
enum { PARAMS_QMD_WORD = 4, PARAMS_MIN_BYTES = (PARAMS_QMD_WORD + 1) * 8 };

static atomic_uint_fast64_t st_calls, st_writes, st_skips, st_params_size, st_thread_writes;
static atomic_uint st_qmd_version, st_installed;

/* Params size in bytes: the low half of word 0 (the high half is not part of it). */
static uint32_t params_size(const void* params) {
  uint32_t size;
  memcpy(&size, params, sizeof size);
  return size;
}

/* The descriptor of this launch, or NULL when params are missing or too small to hold it. */
static uint8_t* launch_qmd(const void* params, uint32_t size) {
  return params && size >= PARAMS_MIN_BYTES ? (uint8_t*)(uintptr_t)((const uint64_t*)params)[PARAMS_QMD_WORD] : NULL;
}

EXPORT void bullet_tpc_hook_callback(void* userdata, int domain, int cbid, const void* params) {
  (void)userdata;
  atomic_fetch_add_explicit(&st_calls, 1, memory_order_relaxed);
  if (domain != HOOK_DOMAIN || cbid != HOOK_CBID) return;
  uint32_t size = params ? params_size(params) : 0;
  atomic_store_explicit(&st_params_size, size, memory_order_relaxed);
  uint8_t* qmd = launch_qmd(params, size);
  uint32_t version = 0;
  const struct qmd_layout* layout = qmd ? qmd_layout(qmd, &version) : NULL;
  if (qmd) atomic_store_explicit(&st_qmd_version, version, memory_order_relaxed);
  uint32_t words[4];
  enum source from = wanted_mask(words);
  if (from == NONE) return;
  if (!layout) { /* unknown layout: writing at a guessed position would corrupt the launch */
    atomic_fetch_add_explicit(&st_skips, 1, memory_order_relaxed);
    return;
  }
  qmd_write_mask(qmd, layout, words);
  atomic_fetch_add_explicit(&st_writes, 1, memory_order_relaxed);
  if (from == THREAD) atomic_fetch_add_explicit(&st_thread_writes, 1, memory_order_relaxed);
}

EXPORT int bullet_tpc_hook_stats(bullet_tpc_hook_stats_t* out) {
  if (!out) return fail(BULLET_TPC_E_ARG, "hook_stats: out is NULL");
  out->calls = atomic_load(&st_calls);
  out->writes = atomic_load(&st_writes);
  out->skips = atomic_load(&st_skips);
  out->last_params_size = atomic_load(&st_params_size);
  out->last_qmd_version = atomic_load(&st_qmd_version);
  out->installed = atomic_load(&st_installed);
  out->thread_writes = atomic_load(&st_thread_writes);
  return BULLET_TPC_OK;
}

EXPORT void bullet_tpc_hook_reset_stats(void) {
  atomic_store(&st_calls, 0);
  atomic_store(&st_writes, 0);
  atomic_store(&st_skips, 0);
  atomic_store(&st_params_size, 0);
  atomic_store(&st_qmd_version, 0);
  atomic_store(&st_thread_writes, 0);
}

/* ---- launch hook: installation through the driver's export table ---------------------------- */

typedef int (*get_export_table_fn)(const void** table, const void* uuid);
typedef void (*callback_fn)(void*, int, int, const void*);
typedef int (*subscribe_fn)(uint32_t* handle, callback_fn cb, void* userdata);
typedef int (*enable_fn)(uint32_t on, uint32_t handle, int domain, int cbid);

static const unsigned char CALLBACK_TABLE_UUID[16] = {0x2c, 0x8e, 0x0a, 0xd8, 0x07, 0x10, 0xab, 0x4e,
                                                      0x90, 0xdd, 0x54, 0x71, 0x9f, 0xe5, 0xf7, 0x4b};
enum { TABLE_SUBSCRIBE = 3, TABLE_ENABLE = 6 };

static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static enable_fn hook_enable_fn; /* kept to turn the callback off and on again */
static uint32_t hook_handle;

/* libcuda.so.1, preferring the copy the process already has (torch loaded it). Never
 * closed: the driver keeps calling into this library once the hook is installed. */
static void* open_driver(void) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) fail(BULLET_TPC_E_DRIVER, "cannot load libcuda.so.1 (%s); is the NVIDIA driver installed?", dlerror());
  return lib;
}

static int install_locked(void) {
  void* lib = open_driver();
  if (!lib) return BULLET_TPC_E_DRIVER;
  get_export_table_fn get_table = (get_export_table_fn)(uintptr_t)dlsym(lib, "cuGetExportTable");
  if (!get_table) return fail(BULLET_TPC_E_DRIVER, "libcuda.so.1 has no cuGetExportTable");
  const void* table = NULL;
  int rc = get_table(&table, CALLBACK_TABLE_UUID);
  if (rc != 0 || !table)
    return fail(BULLET_TPC_E_CUDA, "cuGetExportTable(callback table) failed: CUresult %d (was cuInit called?)", rc);
  void* const* entries = table;
  /* Driver export tables usually start with their own size in bytes; where entry 0 is such
   * a size (not a pointer), it must reach entry 6, or this is not the table we expect. */
  uintptr_t head = (uintptr_t)entries[0];
  if (head < 4096 && head < (TABLE_ENABLE + 1) * sizeof(void*))
    return fail(BULLET_TPC_E_CUDA, "callback table is %lu bytes, too small for entry %d", (unsigned long)head, TABLE_ENABLE);
  subscribe_fn subscribe = (subscribe_fn)(uintptr_t)entries[TABLE_SUBSCRIBE];
  enable_fn enable = (enable_fn)(uintptr_t)entries[TABLE_ENABLE];
  if (!subscribe || !enable) return fail(BULLET_TPC_E_CUDA, "callback table has NULL subscribe/enable entries");
  /* The doc types the handle uint32_t; 8 bytes of room cost nothing if a driver writes more. */
  uint32_t handle[2] = {0, 0};
  rc = subscribe(handle, bullet_tpc_hook_callback, NULL);
  if (rc != 0) return fail(BULLET_TPC_E_CUDA, "callback subscribe failed: CUresult %d", rc);
  rc = enable(1, handle[0], HOOK_DOMAIN, HOOK_CBID);
  hook_enable_fn = enable;
  hook_handle = handle[0];
  if (rc != 0) return fail(BULLET_TPC_E_CUDA, "enabling the launch callback (domain 0x%x, id 0x%x) failed: CUresult %d", HOOK_DOMAIN, HOOK_CBID, rc);
  atomic_store(&st_installed, 1);
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_hook_enable(int on) {
  pthread_mutex_lock(&install_lock);
  int rc = BULLET_TPC_OK;
  if (!atomic_load(&st_installed)) {
    rc = fail(BULLET_TPC_E_ARG, "hook_enable: the hook is not installed");
  } else {
    int r = hook_enable_fn(on ? 1 : 0, hook_handle, HOOK_DOMAIN, HOOK_CBID);
    if (r != 0) rc = fail(BULLET_TPC_E_CUDA, "hook_enable(%d) failed: CUresult %d", on, r);
  }
  pthread_mutex_unlock(&install_lock);
  return rc;
}

EXPORT int bullet_tpc_hook_install(void) {
  pthread_mutex_lock(&install_lock);
  int rc = atomic_load(&st_installed) ? BULLET_TPC_OK : install_locked();
  pthread_mutex_unlock(&install_lock);
  return rc;
}
