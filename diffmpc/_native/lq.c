/* Native kernels of diffmpc's linear-quadratic passes (see diffmpc/native.py, which compiles
 * this file on first use and falls back to PyTorch operations where it cannot). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* RANGES(threads, count, align, rc, CALL): CALL for `threads` ranges [lo, hi) of [0, count) (part:
 * the range's index, lo a multiple of align), on OpenMP's threads where the build has them (when
 * PyTorch has loaded its OpenMP runtime, the same threads as its operations: no second pool
 * spinning beside them), one after the other otherwise; rc: the OR of their return codes. */
#ifdef _OPENMP
#define DM_PRAGMA(x) _Pragma(#x)
#else
#define DM_PRAGMA(x)
#endif
#define MAX_RANGES 64
#define RANGES(threads, count, align, rc, CALL)                                                 \
    do {                                                                                        \
        const int nt_ = (threads) < 1 ? 1 : ((threads) > MAX_RANGES ? MAX_RANGES : (threads));  \
        const int64_t units_ = ((count) + (align) - 1) / (align);                               \
        int rc_ = 0;                                                                            \
        if (nt_ == 1) { /* no OpenMP call at all (a forked child must not make one) */          \
            const int part = 0;                                                                 \
            const int64_t lo = 0, hi = (count);                                                 \
            (void)part;                                                                         \
            (void)units_;                                                                       \
            (rc) = (CALL);                                                                      \
            break;                                                                              \
        }                                                                                       \
        DM_PRAGMA(omp parallel for num_threads(nt_) reduction(| : rc_))                        \
        for (int part = 0; part < nt_; ++part) {                                                \
            const int64_t lo = units_ * part / nt_ * (align);                                   \
            const int64_t end_ = units_ * (part + 1) / nt_ * (align);                           \
            const int64_t hi = end_ < (count) ? end_ : (count);                                 \
            if (lo < hi)                                                                        \
                rc_ |= (CALL);                                                                  \
        }                                                                                       \
        (rc) = rc_;                                                                             \
    } while (0)

/* samples side by side in one vector: 8 where the CPU has 512-bit vectors, else 4; GATHER is
 * the vector of the LANES numbers at offset o from the LANES pointers P */
#ifdef __AVX512F__
#define LANES 8
#define GATHER(P, o) ((VEC){(P)[0][o], (P)[1][o], (P)[2][o], (P)[3][o], (P)[4][o], (P)[5][o], \
                            (P)[6][o], (P)[7][o]})
#else
#define LANES 4
#define GATHER(P, o) ((VEC){(P)[0][o], (P)[1][o], (P)[2][o], (P)[3][o]})
#endif

/* the samples per vector of this build (diffmpc_riccati's Qu is stored in groups of them) */
int diffmpc_lanes(void) { return LANES; }

#define REAL double
#define VEC vec_f64
#define NAME(x) x##_f64
#include "lq_body.h"
#undef REAL
#undef VEC
#undef NAME

#define REAL float
#define VEC vec_f32
#define NAME(x) x##_f32
#include "lq_body.h"
#undef REAL
#undef VEC
#undef NAME
