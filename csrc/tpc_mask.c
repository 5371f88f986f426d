/* libbullet_tpc: per-stream and launch-hook TPC masks. See tpc_mask.h for the API and
 * docs/tpc-masks.md for the facts (offsets, export-table UUID, descriptor layouts) used here. */
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

/* ---- per-stream mask record ----------------------------------------------------------------- */

/* Offset of { uint32 enabled; uint32 disabled[4]; } in the driver's stream object (x86-64). */
static const struct { int version, offset; } stream_offsets[] = {
    {12000, 0x4cc}, {12010, 0x4cc}, {12020, 0x4e4}, {12030, 0x49c}, {12040, 0x4ac},
    {12050, 0x4ec}, {12060, 0x4ec}, {12070, 0x4fc}, {12080, 0x4fc}, {13000, 0x51c},
};
#define N_OFFSETS ((int)(sizeof stream_offsets / sizeof stream_offsets[0]))

/* Handles below this are the driver's special streams (0 legacy default, 1 legacy, 2
 * per-thread), not pointers to a stream object; the record stays well inside one page. */
#define MIN_STREAM_HANDLE 4096
#define MAX_OFFSET 0x10000

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

/* The record, or NULL (with the error set) when stream/offset cannot be a real record. */
static volatile uint32_t* stream_record(void* stream, int offset) {
  if ((uintptr_t)stream < MIN_STREAM_HANDLE) {
    fail(BULLET_TPC_E_ARG,
         "stream handle %p is a special stream (default/legacy/per-thread) or NULL; masks need a "
         "stream created with cuStreamCreate / torch.cuda.Stream()", stream);
    return NULL;
  }
  if (offset < 0 || offset >= MAX_OFFSET || offset % 4 != 0) {
    fail(BULLET_TPC_E_ARG, "stream mask offset %d is not a multiple of 4 in 0..0x%x", offset,
         MAX_OFFSET - 4);
    return NULL;
  }
  return (volatile uint32_t*)((char*)stream + offset);
}

EXPORT int bullet_tpc_read_stream_mask(void* stream, int offset, uint32_t out[5]) {
  if (!out) return fail(BULLET_TPC_E_ARG, "read_stream_mask: out is NULL");
  volatile uint32_t* rec = stream_record(stream, offset);
  if (!rec) return BULLET_TPC_E_ARG;
  for (int i = 0; i < 5; i++) out[i] = rec[i];
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_write_stream_record(void* stream, int offset, const uint32_t record[5]) {
  if (!record) return fail(BULLET_TPC_E_ARG, "write_stream_record: record is NULL");
  volatile uint32_t* rec = stream_record(stream, offset);
  if (!rec) return BULLET_TPC_E_ARG;
  for (int i = 1; i < 5; i++) rec[i] = record[i];
  atomic_thread_fence(memory_order_release); /* mask words before the enabled word */
  rec[0] = record[0];
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_set_stream_mask(void* stream, int offset, const uint32_t disabled[4]) {
  if (!disabled) return fail(BULLET_TPC_E_ARG, "set_stream_mask: disabled is NULL");
  uint32_t record[5] = {1, disabled[0], disabled[1], disabled[2], disabled[3]};
  return bullet_tpc_write_stream_record(stream, offset, record);
}

EXPORT int bullet_tpc_clear_stream_mask(void* stream, int offset) {
  volatile uint32_t* rec = stream_record(stream, offset);
  if (!rec) return BULLET_TPC_E_ARG;
  rec[0] = 0; /* disable first: a launch in between sees no mask rather than a partial one */
  atomic_thread_fence(memory_order_release);
  for (int i = 1; i < 5; i++) rec[i] = 0;
  return BULLET_TPC_OK;
}

/* ---- launch hook: masks to apply ------------------------------------------------------------ */

struct pending_mask {
  int set;
  uint32_t words[4];
};

/* Next-launch and thread masks: per thread, because the driver calls back on the launching
 * thread (for graphs: the thread that instantiates or launches them). */
static _Thread_local struct pending_mask next_mask;
static _Thread_local struct pending_mask thread_mask;

/* Hook stream masks: a small table searched on every launch. A read-write lock, because a
 * torn read of a mask being replaced could disable every TPC and hang the kernel. */
static pthread_rwlock_t streams_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct { void* stream; uint32_t words[4]; } hook_streams[BULLET_TPC_MAX_HOOK_STREAMS];
static int n_hook_streams;
static atomic_int stream_word = -1;

/* Global mask: read on every launch from any thread, so a mutex guards the words (a torn
 * read could disable every TPC and hang the kernel); the flag keeps the unset case lock-free. */
static pthread_mutex_t global_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pending_mask global_mask;
static atomic_int global_on;

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

enum { PARAMS_QMD_WORD = 4 };

EXPORT int bullet_tpc_hook_set_stream_word(int word) {
  if (word != -1 && (word < 1 || word >= BULLET_TPC_TRACE_WORDS || word == PARAMS_QMD_WORD))
    return fail(BULLET_TPC_E_ARG, "stream word %d: allowed -1 (off) or 1..%d except %d (the descriptor)", word,
                BULLET_TPC_TRACE_WORDS - 1, PARAMS_QMD_WORD);
  atomic_store(&stream_word, word);
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_hook_stream_word(void) { return atomic_load(&stream_word); }

EXPORT int bullet_tpc_hook_set_stream_mask(void* stream, const uint32_t disabled[4]) {
  if (!stream) return fail(BULLET_TPC_E_ARG, "hook stream mask: the stream handle is NULL (default stream)");
  int rc = BULLET_TPC_OK;
  pthread_rwlock_wrlock(&streams_lock);
  int i = 0;
  while (i < n_hook_streams && hook_streams[i].stream != stream) i++;
  if (!disabled) { /* remove: move the last entry into the hole */
    if (i < n_hook_streams) hook_streams[i] = hook_streams[--n_hook_streams];
  } else if (i == n_hook_streams && n_hook_streams == BULLET_TPC_MAX_HOOK_STREAMS) {
    rc = fail(BULLET_TPC_E_ARG, "hook stream masks: all %d slots in use; remove one first", BULLET_TPC_MAX_HOOK_STREAMS);
  } else {
    hook_streams[i].stream = stream;
    memcpy(hook_streams[i].words, disabled, sizeof hook_streams[i].words);
    if (i == n_hook_streams) n_hook_streams++;
  }
  pthread_rwlock_unlock(&streams_lock);
  return rc;
}

static int take_stream(void* stream, uint32_t words[4]) {
  int found = 0;
  pthread_rwlock_rdlock(&streams_lock);
  for (int i = 0; i < n_hook_streams; i++)
    if (hook_streams[i].stream == stream) {
      memcpy(words, hook_streams[i].words, sizeof hook_streams[i].words);
      found = 1;
      break;
    }
  pthread_rwlock_unlock(&streams_lock);
  return found;
}

EXPORT int bullet_tpc_set_global_mask(const uint32_t disabled[4], int enable) {
  if (enable && !disabled)
    return fail(BULLET_TPC_E_ARG, "set_global_mask: enable=1 needs a mask, got NULL");
  pthread_mutex_lock(&global_lock);
  global_mask.set = enable != 0;
  if (enable) memcpy(global_mask.words, disabled, sizeof global_mask.words);
  atomic_store(&global_on, enable != 0);
  pthread_mutex_unlock(&global_lock);
  return BULLET_TPC_OK;
}

static int take_global(uint32_t words[4]) {
  if (!atomic_load_explicit(&global_on, memory_order_acquire)) return 0;
  pthread_mutex_lock(&global_lock);
  int set = global_mask.set;
  if (set) memcpy(words, global_mask.words, sizeof global_mask.words);
  pthread_mutex_unlock(&global_lock);
  return set;
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

/* Layout for a descriptor, or NULL for versions we do not know (then we write nothing).
 * Versions are only trusted where the doc found them: an unknown future layout must not be
 * written into at a guessed position. */
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

/* Whether the descriptor already restricts TPCs (a stream mask): some disable bit set and,
 * where the layout has one, the enable bit. A zero mask restricts nothing, so it counts as
 * none even if a driver sets the enable bit on every launch. */
static int qmd_has_mask(const uint8_t* qmd, const struct qmd_layout* l) {
  uint32_t w;
  if (l->enable_at >= 0) {
    memcpy(&w, qmd + l->enable_at, 4);
    if (!(w >> 31)) return 0;
  }
  for (int i = 0; i < l->n_words; i++) {
    memcpy(&w, qmd + l->mask_at + 4 * i, 4);
    if (w) return 1;
  }
  return 0;
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
enum { PARAMS_MIN_BYTES = (PARAMS_QMD_WORD + 1) * 8 };

static atomic_uint_fast64_t st_calls, st_writes, st_skips, st_params_size, st_stream_writes, st_thread_writes;
static atomic_uint st_qmd_version, st_installed;

/* Params size in bytes: the low half of word 0 (the high half is not part of it). */
static uint32_t params_size(const void* params) {
  uint32_t size;
  memcpy(&size, params, sizeof size);
  return size;
}

/* ---- diagnostics: trace of callback params ------------------------------------------------- */

#define TRACE_MAX 64
static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;
static bullet_tpc_trace_record_t trace[TRACE_MAX];
static int trace_want, trace_have;
static atomic_int trace_on;

EXPORT int bullet_tpc_hook_trace_start(int count) {
  if (count < 0 || count > TRACE_MAX) return fail(BULLET_TPC_E_ARG, "trace count %d: allowed 0..%d", count, TRACE_MAX);
  pthread_mutex_lock(&trace_lock);
  if (count > 0) { /* a new trace; 0 stops the current one and keeps its records */
    trace_want = count;
    trace_have = 0;
  } else {
    trace_want = trace_have;
  }
  atomic_store(&trace_on, count > 0);
  pthread_mutex_unlock(&trace_lock);
  return BULLET_TPC_OK;
}

EXPORT int bullet_tpc_hook_trace_read(bullet_tpc_trace_record_t* out, int capacity) {
  if (!out || capacity < 0) return fail(BULLET_TPC_E_ARG, "trace_read: out is NULL or capacity < 0");
  pthread_mutex_lock(&trace_lock);
  int n = trace_have < capacity ? trace_have : capacity;
  memcpy(out, trace, (size_t)n * sizeof *out);
  pthread_mutex_unlock(&trace_lock);
  return n;
}

EXPORT int bullet_tpc_peek(const void* addr, void* out, uint64_t n) {
  if (!out) return fail(BULLET_TPC_E_ARG, "peek: out is NULL");
  struct iovec local = {out, n}, remote = {(void*)addr, n};
  ssize_t got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
  if (got != (ssize_t)n) return fail(BULLET_TPC_E_ARG, "peek: %llu bytes at %p are not readable", (unsigned long long)n, addr);
  return BULLET_TPC_OK;
}

static void trace_params(int domain, int cbid, const void* params) {
  if (!atomic_load_explicit(&trace_on, memory_order_relaxed)) return;
  pthread_mutex_lock(&trace_lock);
  if (trace_have < trace_want) {
    bullet_tpc_trace_record_t* r = &trace[trace_have++];
    memset(r, 0, sizeof *r);
    r->domain = domain;
    r->cbid = cbid;
    if (params) {
      r->size = params_size(params);
      r->n_words = r->size / 8 < BULLET_TPC_TRACE_WORDS ? r->size / 8 : BULLET_TPC_TRACE_WORDS;
      memcpy(r->words, params, r->n_words * 8);
      for (uint32_t i = 1; i < r->n_words; i++)
        r->ok[i] = r->words[i] >= 4096 && bullet_tpc_peek((const void*)(uintptr_t)r->words[i], r->deref[i], sizeof r->deref[i]) == 0;
    }
    if (trace_have == trace_want) atomic_store(&trace_on, 0);
  }
  pthread_mutex_unlock(&trace_lock);
}


/* ---- launch hook: callback and statistics ---------------------------------------------------- */

/* The descriptor of this launch, or NULL when params are missing or too small to hold it. */
static uint8_t* launch_qmd(const void* params, uint32_t size) {
  return params && size >= PARAMS_MIN_BYTES ? (uint8_t*)(uintptr_t)((const uint64_t*)params)[PARAMS_QMD_WORD] : NULL;
}

/* The CUstream this launch goes to, or NULL when the stream word is unknown / out of range. */
static void* launch_stream(const void* params, uint32_t size) {
  int w = atomic_load_explicit(&stream_word, memory_order_relaxed);
  if (!params || w < 0 || (uint32_t)(w + 1) * 8 > size) return NULL;
  return (void*)(uintptr_t)((const uint64_t*)params)[w];
}

enum source { NONE, NEXT, THREAD, STREAM, GLOBAL };

/* Which mask applies: next-launch (consumed) > thread > hook stream > global. */
static enum source wanted_mask(const void* params, uint32_t size, uint32_t words[4]) {
  if (next_mask.set) {
    memcpy(words, next_mask.words, sizeof next_mask.words);
    next_mask.set = 0;
    return NEXT;
  }
  if (thread_mask.set) {
    memcpy(words, thread_mask.words, sizeof thread_mask.words);
    return THREAD;
  }
  void* stream = launch_stream(params, size);
  if (stream && take_stream(stream, words)) return STREAM;
  return take_global(words) ? GLOBAL : NONE;
}

EXPORT void bullet_tpc_hook_callback(void* userdata, int domain, int cbid, const void* params) {
  (void)userdata;
  atomic_fetch_add_explicit(&st_calls, 1, memory_order_relaxed);
  trace_params(domain, cbid, params);
  if (domain != HOOK_DOMAIN || cbid != HOOK_CBID) return;
  uint32_t size = params ? params_size(params) : 0;
  atomic_store_explicit(&st_params_size, size, memory_order_relaxed);
  uint8_t* qmd = launch_qmd(params, size);
  uint32_t version = 0;
  const struct qmd_layout* layout = qmd ? qmd_layout(qmd, &version) : NULL;
  if (qmd) atomic_store_explicit(&st_qmd_version, version, memory_order_relaxed);
  uint32_t words[4];
  enum source from = wanted_mask(params, size, words);
  if (from == NONE) return;
  if (!layout) { /* unknown layout: writing at a guessed position would corrupt the launch */
    atomic_fetch_add_explicit(&st_skips, 1, memory_order_relaxed);
    return;
  }
  if (from == GLOBAL && qmd_has_mask(qmd, layout)) return; /* a driver stream mask wins over global */
  qmd_write_mask(qmd, layout, words);
  atomic_fetch_add_explicit(&st_writes, 1, memory_order_relaxed);
  if (from == STREAM) atomic_fetch_add_explicit(&st_stream_writes, 1, memory_order_relaxed);
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
  out->stream_writes = atomic_load(&st_stream_writes);
  out->thread_writes = atomic_load(&st_thread_writes);
  return BULLET_TPC_OK;
}

EXPORT void bullet_tpc_hook_reset_stats(void) {
  atomic_store(&st_calls, 0);
  atomic_store(&st_writes, 0);
  atomic_store(&st_skips, 0);
  atomic_store(&st_params_size, 0);
  atomic_store(&st_qmd_version, 0);
  atomic_store(&st_stream_writes, 0);
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
