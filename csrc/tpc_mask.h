/* libbullet_tpc: restrict CUDA kernels to a subset of TPCs (2 SMs each on Volta and later).
 *
 * Two mechanisms, both undocumented driver internals (facts in docs/tpc-masks.md):
 *   1. a per-stream mask record inside the driver's CUstream object, at a byte offset that
 *      depends on the driver API version (bullet_tpc_stream_mask_offset);
 *   2. a launch hook, registered through cuGetExportTable's callback table, that edits the
 *      TPC-disable words of each kernel's launch descriptor (QMD) just before upload. The
 *      hook carries its own per-stream masks (keyed by the CUstream the launch names), a
 *      per-thread mask, a next-launch mask and a global mask, so it needs no stream offset.
 *
 * Masks are 128 bits as four uint32 words, word 0 = TPCs 0..31; a SET bit DISABLES that TPC.
 * Every function returns 0 (BULLET_TPC_OK) on success or a negative BULLET_TPC_E* code, and
 * then bullet_tpc_last_error() (per thread) says what went wrong. Nothing here aborts.
 * Plain C11; no CUDA headers: libcuda.so.1 is found at run time with dlopen.
 *
 * ABI: functions and the stats struct only ever grow at the end; a change that is not
 * backwards compatible bumps BULLET_TPC_ABI_VERSION (check it with bullet_tpc_abi_version).
 */
#ifndef BULLET_TPC_MASK_H
#define BULLET_TPC_MASK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BULLET_TPC_ABI_VERSION 2

#define BULLET_TPC_OK 0
#define BULLET_TPC_E_ARG (-1)     /* bad argument (NULL, misaligned or out-of-range offset) */
#define BULLET_TPC_E_DRIVER (-2)  /* libcuda.so.1 or one of its symbols could not be found */
#define BULLET_TPC_E_CUDA (-3)    /* a driver call failed (its CUresult is in the message) */

int bullet_tpc_abi_version(void);

/* The last error of the calling thread ("" if none yet). Valid until its next failing call. */
const char* bullet_tpc_last_error(void);

/* ---- per-stream mask record: { uint32 enabled; uint32 disabled[4]; } ------------------ */

/* Byte offset of the mask record in a CUstream for a cuDriverGetVersion() value, or -1 when
 * the version is unknown (never guess: a write at a wrong offset corrupts driver memory). */
int bullet_tpc_stream_mask_offset(int driver_api_version);

/* Copy up to `capacity` known (version, offset) pairs; returns how many pairs exist. */
int bullet_tpc_stream_mask_table(int* versions, int* offsets, int capacity);

/* out[0] = enabled word, out[1..4] = disabled words, as found at `offset` in `stream`. */
int bullet_tpc_read_stream_mask(void* stream, int offset, uint32_t out[5]);

/* Write the 4 disabled words, then enabled = 1. The stream must be idle on the CPU side
 * (no launch in progress from another thread); launches after the call use the mask. */
int bullet_tpc_set_stream_mask(void* stream, int offset, const uint32_t disabled[4]);

/* Write back a whole record (e.g. the one read before the first set): disabled words, then
 * the enabled word, so a launch never sees enabled=1 with a half-written mask. */
int bullet_tpc_write_stream_record(void* stream, int offset, const uint32_t record[5]);

/* enabled = 0 and a zero mask. */
int bullet_tpc_clear_stream_mask(void* stream, int offset);

/* ---- launch hook ------------------------------------------------------------------------ */

/* Subscribe our callback to kernel launches (idempotent, thread safe). Until a global or
 * next-launch mask is set, the callback only counts calls. */
int bullet_tpc_hook_install(void);

/* Turn the installed callback off (0) or on again (1); the subscription stays. */
int bullet_tpc_hook_enable(int on);

/* Mask applied to every launch whose descriptor carries no mask yet (i.e. launches on
 * streams without a stream mask); `enable` = 0 turns it off (`disabled` may then be NULL). */
int bullet_tpc_set_global_mask(const uint32_t disabled[4], int enable);

/* Mask for the next kernel launched from the calling thread (overrides stream and global
 * masks), consumed by that launch. NULL cancels a pending one. Graph replays do not run
 * the hook, so a pending mask survives them: cancel it when done. */
int bullet_tpc_set_next_mask(const uint32_t disabled[4]);

/* Mask for every launch from the calling thread until cleared (NULL clears); not consumed.
 * Wins over stream and global masks, loses to a pending next-launch mask. */
int bullet_tpc_set_thread_mask(const uint32_t disabled[4]);

/* Which 8-byte word of the callback params holds the launch's CUstream (found at run time by
 * tracing a launch on a known stream: see bullet_tpc_hook_trace_*); -1 = unknown, which
 * turns the hook's stream masks off. Word 0 (size) and the descriptor word are refused. */
int bullet_tpc_hook_set_stream_word(int word);
int bullet_tpc_hook_stream_word(void);

/* Hook mask for launches into `stream` (NULL `disabled` removes it). At most
 * BULLET_TPC_MAX_HOOK_STREAMS streams at once. Only the handle is compared: the stream object
 * is never read or written. */
#define BULLET_TPC_MAX_HOOK_STREAMS 64
int bullet_tpc_hook_set_stream_mask(void* stream, const uint32_t disabled[4]);

typedef struct bullet_tpc_hook_stats {
  uint64_t calls;            /* callbacks seen (any domain / id) */
  uint64_t writes;           /* descriptors we wrote a mask into */
  uint64_t skips;            /* a mask was wanted but not written: unknown QMD version or
                                params too small / NULL */
  uint64_t last_params_size; /* size in bytes (low 32 bits of word 0) of the last params */
  uint32_t last_qmd_version; /* version byte of the last descriptor examined */
  uint32_t installed;        /* 1 once bullet_tpc_hook_install succeeded */
  uint64_t stream_writes;    /* descriptors written from a hook stream mask */
  uint64_t thread_writes;    /* descriptors written from a thread mask */
} bullet_tpc_hook_stats_t;

int bullet_tpc_hook_stats(bullet_tpc_hook_stats_t* out);
void bullet_tpc_hook_reset_stats(void);

/* The callback itself, exported so tests can feed it fake params and descriptors on a
 * machine without a GPU. `params` is what the driver passes: 8-byte words; the low 32 bits of
 * word 0 are the size in bytes (the high half is not part of it: on driver 580 it held stack
 * garbage), word 4 is the descriptor pointer. */
void bullet_tpc_hook_callback(void* userdata, int domain, int cbid, const void* params);

/* ---- diagnostics: what the driver passes the callback ----------------------------------- */

#define BULLET_TPC_TRACE_WORDS 16
#define BULLET_TPC_TRACE_DEREF 64
typedef struct bullet_tpc_trace_record {
  int32_t domain, cbid;
  uint32_t size;    /* params size in bytes */
  uint32_t n_words; /* words copied below: min(size / 8, BULLET_TPC_TRACE_WORDS) */
  uint64_t words[BULLET_TPC_TRACE_WORDS];
  /* deref[i]: the first BULLET_TPC_TRACE_DEREF words at address words[i], read during the
   * callback (stack pointers are only valid then) without faulting; ok[i] = 1 if readable. */
  uint64_t deref[BULLET_TPC_TRACE_WORDS][BULLET_TPC_TRACE_DEREF];
  uint8_t ok[BULLET_TPC_TRACE_WORDS];
} bullet_tpc_trace_record_t;

/* Record the params of the next `count` callbacks (at most 64); 0 stops recording and keeps
 * what was recorded. */
int bullet_tpc_hook_trace_start(int count);
/* Copy up to `capacity` records made since trace_start; returns how many were copied. */
int bullet_tpc_hook_trace_read(bullet_tpc_trace_record_t* out, int capacity);

/* Read `n` bytes at `addr` of this process without faulting (process_vm_readv): 0, or
 * BULLET_TPC_E_ARG when the memory is not readable. For looking around driver structs. */
int bullet_tpc_peek(const void* addr, void* out, uint64_t n);

#ifdef __cplusplus
}
#endif
#endif /* BULLET_TPC_MASK_H */
