/* libbullet_tpc: restrict CUDA kernels to a subset of TPCs (2 SMs each on Volta and later).
 *
 * Two mechanisms, both undocumented driver internals (facts in docs/tpc-masks.md):
 *   1. a per-stream mask record in the driver's stream struct. A CUstream handle points at an
 *      object whose first 8 bytes hold a pointer to that struct; the record sits at a byte
 *      offset of the struct that depends on the driver API version:
 *      record = *(void**)handle + offset (bullet_tpc_stream_record_address);
 *   2. a launch hook, registered through cuGetExportTable's callback table, that edits the
 *      TPC-disable words of each kernel's launch descriptor (QMD) just before upload, from a
 *      per-thread mask or a next-launch mask (it cannot tell streams apart).
 *
 * Masks are 128 bits as four uint32 words, word 0 = TPCs 0..31; a SET bit DISABLES that TPC.
 * Every function returns 0 (BULLET_TPC_OK) on success or a negative BULLET_TPC_E* code, and
 * then bullet_tpc_last_error() (per thread) says what went wrong. Nothing here aborts.
 * Plain C11; no CUDA headers: libcuda.so.1 is found at run time with dlopen.
 *
 * ABI: a change that is not backwards compatible bumps BULLET_TPC_ABI_VERSION (the Python
 * binding checks bullet_tpc_abi_version). 3: records behind the handle's first word,
 * compare-and-write only; global masks, hook stream masks, trace and peek removed.
 */
#ifndef BULLET_TPC_MASK_H
#define BULLET_TPC_MASK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BULLET_TPC_ABI_VERSION 3

#define BULLET_TPC_OK 0
#define BULLET_TPC_E_ARG (-1)     /* bad argument (NULL, special stream, bad offset, unreadable memory) */
#define BULLET_TPC_E_DRIVER (-2)  /* libcuda.so.1 or one of its symbols could not be found */
#define BULLET_TPC_E_CUDA (-3)    /* a driver call failed (its CUresult is in the message) */
#define BULLET_TPC_E_STATE (-4)   /* a stream record does not hold what the caller expected */

int bullet_tpc_abi_version(void);

/* The last error of the calling thread ("" if none yet). Valid until its next failing call. */
const char* bullet_tpc_last_error(void);

/* ---- per-stream mask record: { uint32 enabled; uint32 disabled[4]; } ------------------ */

/* Byte offset of the mask record in the driver's stream struct for a cuDriverGetVersion()
 * value, or -1 when the version is unknown (never guess: a write at a wrong offset corrupts
 * driver memory). */
int bullet_tpc_stream_mask_offset(int driver_api_version);

/* Copy up to `capacity` known (version, offset) pairs; returns how many pairs exist. */
int bullet_tpc_stream_mask_table(int* versions, int* offsets, int capacity);

/* *out = *(void**)stream + offset. The handle's first word and the 20 record bytes are read
 * without faulting (process_vm_readv), so a dead or foreign handle is an error, not a crash.
 * Refused: special handles (< 4096: default, legacy, per-thread streams), an offset that is
 * not a multiple of 4 in 0..0xfffc, a first word that is NULL, misaligned or not a user-space
 * address, and a record that cannot be read. */
int bullet_tpc_stream_record_address(void* stream, int offset, void** out);

/* out[0] = enabled word, out[1..4] = disabled words, as found at the record of `stream`. */
int bullet_tpc_read_stream_record(void* stream, int offset, uint32_t out[5]);

/* Compare-and-write: when the record holds exactly `expected`, write `record`; otherwise write
 * nothing and fail with BULLET_TPC_E_STATE, naming what was found. A launch never sees
 * enabled=1 beside half-written mask words: the enabled word is cleared first (if set), then
 * the mask words are written, then the new enabled word. The stream must be idle on the CPU
 * side (no launch in progress from another thread). */
int bullet_tpc_replace_stream_record(void* stream, int offset, const uint32_t expected[5],
                                     const uint32_t record[5]);

/* ---- launch hook ------------------------------------------------------------------------ */

/* Subscribe our callback to kernel launches (idempotent, thread safe). Until a thread or
 * next-launch mask is set, the callback only counts calls. Once subscribed, the driver
 * refuses to create green contexts in this process. */
int bullet_tpc_hook_install(void);

/* Turn the installed callback off (0) or on again (1); the subscription stays. */
int bullet_tpc_hook_enable(int on);

/* Mask for the next kernel launched from the calling thread (wins over the thread mask),
 * consumed by that launch. NULL cancels a pending one. */
int bullet_tpc_set_next_mask(const uint32_t disabled[4]);

/* Mask for every launch from the calling thread until cleared (NULL clears); not consumed. */
int bullet_tpc_set_thread_mask(const uint32_t disabled[4]);

typedef struct bullet_tpc_hook_stats {
  uint64_t calls;            /* callbacks seen (any domain / id) */
  uint64_t writes;           /* descriptors we wrote a mask into */
  uint64_t skips;            /* a mask was wanted but not written: unknown QMD version or
                                params too small / NULL */
  uint64_t last_params_size; /* size in bytes (low 32 bits of word 0) of the last params */
  uint32_t last_qmd_version; /* version byte of the last descriptor examined */
  uint32_t installed;        /* 1 once bullet_tpc_hook_install succeeded */
  uint64_t thread_writes;    /* descriptors written from a thread mask */
} bullet_tpc_hook_stats_t;

int bullet_tpc_hook_stats(bullet_tpc_hook_stats_t* out);
void bullet_tpc_hook_reset_stats(void);

/* The callback itself, exported so tests can feed it fake params and descriptors on a
 * machine without a GPU. `params` is what the driver passes: 8-byte words; the low 32 bits of
 * word 0 are the size in bytes (the high half is not part of it: on driver 580 it held stack
 * garbage), word 4 is the descriptor pointer. */
void bullet_tpc_hook_callback(void* userdata, int domain, int cbid, const void* params);

#ifdef __cplusplus
}
#endif
#endif /* BULLET_TPC_MASK_H */
