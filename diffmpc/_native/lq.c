/* Native kernels of diffmpc's linear-quadratic passes (see diffmpc/native.py, which compiles
 * this file on first use and falls back to PyTorch operations where it cannot). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
