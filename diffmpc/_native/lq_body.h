/* The Riccati pass of lqr.riccati (fixed-set or unconstrained mode), for one scalar type.
 *
 * Included by lq.c once per type with REAL (the scalar), VEC (its name for LANES of them) and
 * NAME(x) (the exported symbol's suffix) defined. LANES samples run side by side in the lanes of
 * one vector: every operation below is one vector instruction for LANES samples, whatever n and
 * m are. Tensors are read through element strides, so batch-first, time-major, broadcast
 * (stride 0) and homogeneous views need no copy.
 *
 * Each exported kernel takes first the number of threads to split its samples over (check_cost:
 * its blocks; RANGES): its X_range function computes the samples [lo, hi) and leaves the others'
 * outputs alone. The ranges of the kernels that put samples in lanes start at multiples of LANES,
 * so that every sample meets the same arithmetic whatever the split.
 */

typedef REAL VEC __attribute__((vector_size(LANES * sizeof(REAL))));

/* C (+)= A B for M x K by K x N blocks of vectors, with a(i, k) = A[i * ars + k * acs],
 * b(k, j) = B[k * ldb + j], c(i, j) = C[i * ldc + j]; upper: only blocks that reach j >= i
 * (entries below the diagonal inside such blocks are written too). Two rows by four columns at a
 * time, accumulated in registers. */
static void NAME(gemm)(int64_t M, int64_t N, int64_t K, const VEC *A, int64_t ars, int64_t acs,
                       const VEC *Bm, int64_t ldb, VEC *Cm, int64_t ldc, int accumulate,
                       int upper)
{
    for (int64_t i = 0; i < M; i += 2) {
        const int64_t rows = M - i < 2 ? M - i : 2;
        for (int64_t j = upper ? (i / 4) * 4 : 0; j < N; j += 4) {
            const int64_t cols = N - j < 4 ? N - j : 4;
            VEC acc[2][4];
            for (int r = 0; r < 2; ++r)
                for (int c = 0; c < 4; ++c)
                    acc[r][c] = (VEC){0};
            const VEC *a0 = A + i * ars, *a1 = A + (i + rows - 1) * ars;
            if (cols == 4) {
                for (int64_t k = 0; k < K; ++k) {
                    const VEC x0 = a0[k * acs], x1 = a1[k * acs];
                    const VEC *bk = Bm + k * ldb + j;
                    const VEC y0 = bk[0], y1 = bk[1], y2 = bk[2], y3 = bk[3];
                    acc[0][0] += x0 * y0;
                    acc[0][1] += x0 * y1;
                    acc[0][2] += x0 * y2;
                    acc[0][3] += x0 * y3;
                    acc[1][0] += x1 * y0;
                    acc[1][1] += x1 * y1;
                    acc[1][2] += x1 * y2;
                    acc[1][3] += x1 * y3;
                }
            } else {
                for (int64_t k = 0; k < K; ++k) {
                    const VEC x0 = a0[k * acs], x1 = a1[k * acs];
                    const VEC *bk = Bm + k * ldb + j;
                    for (int64_t c = 0; c < cols; ++c) {
                        acc[0][c] += x0 * bk[c];
                        acc[1][c] += x1 * bk[c];
                    }
                }
            }
            for (int64_t r = 0; r < rows; ++r) {
                VEC *cr = Cm + (i + r) * ldc + j;
                for (int64_t c = 0; c < cols; ++c)
                    cr[c] = accumulate ? cr[c] + acc[r][c] : acc[r][c];
            }
        }
    }
}

/* Riccati recursion for B problems with T steps, n states and m controls (p = n + m):
 *
 *   Q_t = C_t + F_t' V_{t+1} F_t,  q_t = c_t + F_t' (V_{t+1} d_t + v_{t+1})   (t < T-1)
 *   [k_t | K_t] = -Q_uu^-1 [q_u | Q_ux]  on the free controls (zero rows elsewhere)
 *   V_t = Q_xx + Q_xu K_t,  v_t = q_x + Q_xu k_t
 *
 * C: p x p blocks, strides sC = {batch, time, row, column}; c: p vectors, sc = {batch, time,
 * entry}; Fh: (n+1) x (p+1) homogeneous dynamics [[1, 0], [d, F]] (only rows 1.. are read),
 * sF as sC, NULL if T == 1; fr: free controls as bytes (NULL: all free), sfr = {batch, time,
 * control}. Outputs, contiguous: Kh [T, B, m, n+1] ([k | K]), L [T, B, m, m] (Cholesky factors
 * of Q_uu restricted to the free controls, identity elsewhere), info [T, B] (0: positive
 * definite; 1: not, and the factor's pivot was replaced by 1 to go on), dV [B, 2] or NULL
 * (sum_t k_t' q_u,t and 1/2 sum_t k_t' Q_uu,t k_t). Returns 0, or -1 if out of memory.
 *
 * Held values (fr and hv given): the held controls are fixed at hv (shv as sc; the free ones'
 * entries, multiplied by zero, must be finite) instead of at zero. Their terms move into the
 * linear terms of each step, q += Q[:, held] hv (the same as c += C[:, held] hv and
 * d += F[:, held] hv), and their rows of k are hv, so that u_t = K_t x_t + k_t holds for every
 * control. Qu, or NULL: the control rows
 * of [Q | q] before the held terms move (with C, c and the offsets d), stored as vectors of
 * LANES samples, [T, groups, m, p+1, LANES]: along the solution, Qu_t [tau_t; 1] is the gradient
 * of the Lagrangian in u_t (the costate is the gradient of the value function), the bounds'
 * multipliers on the held controls (diffmpc_multipliers).
 */
static int NAME(riccati_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n, int64_t m,
                               const REAL *C, const int64_t *sC, const REAL *c, const int64_t *sc,
                               const REAL *Fh, const int64_t *sF, const uint8_t *fr,
                               const int64_t *sfr, REAL *Kh, REAL *L, int32_t *info, REAL *dV,
                               const REAL *hv, const int64_t *shv, REAL *Qu)
{
    const int64_t p = n + m, nh = n + 1, groups = (B + LANES - 1) / LANES;
    const int64_t mine = (hi - lo + LANES - 1) / LANES;  /* this range's groups */
    /* per group of LANES samples, kept across steps: V, v and the two sums of dV */
    const int64_t state = n * n + n + 2;
    const int64_t ph = p + 1;  /* Q and the products carry the linear terms as column p */
    const int64_t count = mine * state + n * ph + p * ph + p + n * ph + m * m + m * nh + 4 * m;
    VEC *buf = (VEC *)aligned_alloc(64, (size_t)((count * (int64_t)sizeof(VEC) + 63) / 64 * 64));
    if (buf == NULL)
        return -1;
    VEC *W = buf + mine * state, *Q = W + n * ph, *q = Q + p * ph;
    VEC *Fv = q + p, *Lv = Fv + n * ph, *Y = Lv + m * m, *inv = Y + m * nh, *y = inv + m;
    VEC *held = y + m, *hval = held + m;  /* held controls (1 or 0 per lane) and their values */
    const VEC zero = {0};
    for (int64_t i = 0; i < mine * state; ++i)
        buf[i] = zero;
    /* time outside, groups of samples inside: the time-major operands are read in order */
    for (int64_t t = T - 1; t >= 0; --t) {
        const int last = t == T - 1;
        for (int64_t b0 = lo; b0 < hi; b0 += LANES) {
            const int lanes = (int)(hi - b0 < LANES ? hi - b0 : LANES);
            VEC *V = buf + ((b0 - lo) / LANES) * state, *v = V + n * n;
            VEC *dv = v + n;
            /* one block pointer per lane (padding lanes repeat the last sample); each vector is
             * built from its LANES numbers in registers and stored once */
            const REAL *Cl[LANES], *cl[LANES], *Fl[LANES];
            for (int s = 0; s < LANES; ++s) {
                const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                Cl[s] = C + b * sC[0] + t * sC[1];
                cl[s] = c + b * sc[0] + t * sc[1];
                Fl[s] = last ? NULL : Fh + b * sF[0] + t * sF[1] + sF[2];
            }
            for (int64_t i = 0; i < p; ++i) {
                for (int64_t j = 0; j < p; ++j)
                    Q[i * ph + j] = GATHER(Cl, i * sC[2] + j * sC[3]);
                Q[i * ph + p] = GATHER(cl, i * sc[2]);
            }
            if (!last) {
                for (int64_t i = 0; i < n; ++i) {
                    for (int64_t j = 0; j < p; ++j)
                        Fv[i * ph + j] = GATHER(Fl, i * sF[2] + (j + 1) * sF[3]);
                    Fv[i * ph + p] = GATHER(Fl, i * sF[2]);
                }
            }
            if (!last) {
                /* [W | w] = V [F | d] + [0 | v], then [Q | q] += F' [W | w] (upper triangle) */
                NAME(gemm)(n, ph, n, V, n, 1, Fv, ph, W, ph, 0, 0);
                for (int64_t i = 0; i < n; ++i)
                    W[i * ph + p] += v[i];
                NAME(gemm)(p, ph, n, Fv, 1, ph, W, ph, Q, ph, 1, 1);
                for (int64_t i = 0; i < p; ++i)
                    for (int64_t j = i + 1; j < p; ++j)
                        Q[j * ph + i] = Q[i * ph + j];
            }
            for (int64_t i = 0; i < p; ++i)
                q[i] = Q[i * ph + p];
            if (Qu != NULL) {
                VEC *Qt = (VEC *)Qu + (t * groups + b0 / LANES) * m * ph;
                for (int64_t a = 0; a < m * ph; ++a)
                    Qt[a] = Q[n * ph + a];
            }
            if (fr != NULL) {
                /* the held controls (1 in their lanes, 0 where free) and their values (zero
                 * where free), built in registers */
                const uint8_t *fl[LANES];
                const REAL *hl[LANES];
                for (int s = 0; s < LANES; ++s) {
                    const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                    fl[s] = fr + b * sfr[0] + t * sfr[1];
                    hl[s] = hv == NULL ? NULL : hv + b * shv[0] + t * shv[1];
                }
                int any = 0;
                for (int64_t a = 0; a < m; ++a) {
                    const VEC h = 1 - GATHER(fl, a * sfr[2]);
                    held[a] = h;
                    hval[a] = hv == NULL ? zero : h * GATHER(hl, a * shv[2]);
                    for (int s = 0; s < LANES; ++s)
                        any |= h[s] != 0;
                }
                if (hv != NULL && any)  /* q += Q[:, held] hv, from the full Q */
                    for (int64_t a = 0; a < m; ++a)
                        for (int64_t i = 0; i < p; ++i)
                            q[i] += Q[i * ph + n + a] * hval[a];
                /* held controls: identity rows of Q_uu, zero rows of [q_u | Q_ux] (a product
                 * by 1 leaves the free lanes as they are) */
                for (int64_t a = 0; a < m && any; ++a) {
                    const VEC h = held[a], keep = 1 - h;
                    const int64_t ra = (n + a) * ph;
                    for (int64_t j = 0; j < p; ++j)
                        Q[ra + j] *= keep;
                    for (int64_t j = n; j < p; ++j)
                        Q[j * ph + n + a] *= keep;
                    Q[ra + n + a] += h;
                    q[n + a] *= keep;
                }
            }
            /* Cholesky factor of Q_uu (lower) */
            int32_t bad[LANES] = {0};
            for (int64_t i = 0; i < m; ++i) {
                for (int64_t j = 0; j <= i; ++j) {
                    VEC sum = Q[(n + i) * ph + n + j];
                    for (int64_t k = 0; k < j; ++k)
                        sum -= Lv[i * m + k] * Lv[j * m + k];
                    if (i == j) {
                        for (int s = 0; s < LANES; ++s) {
                            if (!(sum[s] > 0)) {
                                bad[s] = 1;
                                sum[s] = 1;
                            }
                            sum[s] = (REAL)sqrt((double)sum[s]);
                        }
                        Lv[i * m + i] = sum;
                        inv[i] = 1 / sum;
                    } else {
                        Lv[i * m + j] = sum * inv[j];
                    }
                }
            }
            /* [k | K] = -Q_uu^-1 [q_u | Q_ux], column by column */
            for (int64_t r = 0; r < nh; ++r) {
                for (int64_t i = 0; i < m; ++i) {
                    VEC sum = r == 0 ? -q[n + i] : -Q[(n + i) * ph + r - 1];
                    for (int64_t k = 0; k < i; ++k)
                        sum -= Lv[i * m + k] * y[k];
                    y[i] = sum * inv[i];
                }
                for (int64_t i = m - 1; i >= 0; --i) {
                    VEC sum = y[i];
                    for (int64_t k = i + 1; k < m; ++k)
                        sum -= Lv[k * m + i] * y[k];
                    y[i] = sum * inv[i];
                }
                for (int64_t i = 0; i < m; ++i)
                    Y[i * nh + r] = y[i];
            }
            if (dV != NULL) {
                for (int64_t a = 0; a < m; ++a) {
                    const VEC ka = Y[a * nh];
                    VEC Hk = zero;
                    for (int64_t j = 0; j < m; ++j)
                        Hk += Q[(n + a) * ph + n + j] * Y[j * nh];
                    dv[0] += ka * q[n + a];
                    dv[1] += (REAL)0.5 * ka * Hk;
                }
            }
            /* V = Q_xx + Q_xu K (upper triangle, mirrored), v = q_x + Q_xu k */
            for (int64_t i = 0; i < n; ++i) {
                VEC vi = q[i];
                VEC *Vi = V + i * n;
                const VEC *Qi = Q + i * ph;
                for (int64_t j = i; j < n; ++j)
                    Vi[j] = Qi[j];
                for (int64_t a = 0; a < m; ++a) {
                    const VEC qa = Qi[n + a];
                    const VEC *Ya = Y + a * nh + 1;
                    for (int64_t j = i; j < n; ++j)
                        Vi[j] += qa * Ya[j];
                    vi += qa * Y[a * nh];
                }
                v[i] = vi;
                for (int64_t j = i + 1; j < n; ++j)
                    V[j * n + i] = Vi[j];
            }
            for (int s = 0; s < lanes; ++s) {
                const int64_t b = b0 + s, tb = t * B + b;
                REAL *Kt = Kh + tb * m * nh, *Lt = L + tb * m * m;
                for (int64_t a = 0; a < m * nh; ++a)
                    Kt[a] = Y[a][s];
                for (int64_t i = 0; i < m; ++i)
                    for (int64_t j = 0; j < m; ++j)
                        Lt[i * m + j] = j <= i ? Lv[i * m + j][s] : 0;
                info[tb] = bad[s];
                if (hv != NULL)
                    for (int64_t a = 0; a < m; ++a)
                        if (held[a][s])
                            Kt[a * nh] = hval[a][s];
            }
        }
    }
    if (dV != NULL)
        for (int64_t b = lo; b < hi; ++b) {
            const VEC *dv = buf + ((b - lo) / LANES) * state + n * n + n;
            dV[b * 2] = dv[0][(b - lo) % LANES];
            dV[b * 2 + 1] = dv[1][(b - lo) % LANES];
        }
    free(buf);
    return 0;
}

int NAME(diffmpc_riccati)(int threads, int64_t B, int64_t T, int64_t n, int64_t m, const REAL *C,
                          const int64_t *sC, const REAL *c, const int64_t *sc, const REAL *Fh,
                          const int64_t *sF, const uint8_t *fr, const int64_t *sfr, REAL *Kh,
                          REAL *L, int32_t *info, REAL *dV, const REAL *hv, const int64_t *shv,
                          REAL *Qu)
{
    int rc = 0;
    RANGES(threads, B, LANES, rc, NAME(riccati_range)(lo, hi, B, T, n, m, C, sC, c, sc, Fh, sF, fr,
                                                      sfr, Kh, L, info, dV, hv, shv, Qu));
    return rc;
}

/* gu_t = Qu_t [x_t; u_t; 1] for B samples and T steps, Qu from diffmpc_riccati ([T, groups, m,
 * n+m+1, LANES]); x: sx = {batch, time, entry}, u: su likewise. Output, contiguous: gu [B, T, m].
 * Returns 0. */
static int NAME(multipliers_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n,
                                   int64_t m, const REAL *Qu, const REAL *x, const int64_t *sx,
                                   const REAL *u, const int64_t *su, REAL *gu)
{
    const int64_t p = n + m, ph = p + 1, groups = (B + LANES - 1) / LANES;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t b0 = lo; b0 < hi; b0 += LANES) {
            const int lanes = (int)(hi - b0 < LANES ? hi - b0 : LANES);
            const VEC *Qt = (const VEC *)Qu + (t * groups + b0 / LANES) * m * ph;
            const REAL *xl[LANES], *ul[LANES];
            for (int s = 0; s < LANES; ++s) {
                const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                xl[s] = x + b * sx[0] + t * sx[1];
                ul[s] = u + b * su[0] + t * su[1];
            }
            VEC g[m], tau[p];
            for (int64_t j = 0; j < n; ++j)
                tau[j] = GATHER(xl, j * sx[2]);
            for (int64_t j = 0; j < m; ++j)
                tau[n + j] = GATHER(ul, j * su[2]);
            for (int64_t a = 0; a < m; ++a) {
                const VEC *row = Qt + a * ph;
                VEC sum = row[p];
                for (int64_t j = 0; j < p; ++j)
                    sum += row[j] * tau[j];
                g[a] = sum;
            }
            for (int s = 0; s < lanes; ++s) {
                REAL *gs = gu + ((b0 + s) * T + t) * m;
                for (int64_t a = 0; a < m; ++a)
                    gs[a] = g[a][s];
            }
        }
    return 0;
}

int NAME(diffmpc_multipliers)(int threads, int64_t B, int64_t T, int64_t n, int64_t m,
                              const REAL *Qu, const REAL *x, const int64_t *sx, const REAL *u,
                              const int64_t *su, REAL *gu)
{
    int rc = 0;
    RANGES(threads, B, LANES, rc, NAME(multipliers_range)(lo, hi, B, T, n, m, Qu, x, sx, u, su,
                                                          gu));
    return rc;
}

/* Closed-loop rollout of the linear dynamics (lqr.rollout_affine):
 *
 *   u_t = K_t x_t + k_t,   x_{t+1} = F_t [x_t; u_t] + (d_t if offsets)
 *
 * K: m x n blocks, sK = {batch, time, row, column}; k: sk = {batch, time, entry}; Fh as in
 * diffmpc_riccati (NULL if T == 1); x0: sx0 = {batch, entry}. Outputs, contiguous: x [B, T, n],
 * u [B, T, m]. The loop runs over time outside and samples inside: the operands are stored
 * time-major, so each step reads one block of memory. Returns 0.
 */
static int NAME(rollout_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n, int64_t m,
                               const REAL *K, const int64_t *sK, const REAL *k, const int64_t *sk,
                               const REAL *Fh, const int64_t *sF, const REAL *x0,
                               const int64_t *sx0, int offsets, REAL *x, REAL *u)
{
    for (int64_t b = lo; b < hi; ++b)
        for (int64_t i = 0; i < n; ++i)
            x[b * T * n + i] = x0[b * sx0[0] + i * sx0[1]];
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t b = lo; b < hi; ++b) {
            const REAL *xt = x + (b * T + t) * n;
            REAL *ut = u + (b * T + t) * m;
            const REAL *Kt = K + b * sK[0] + t * sK[1], *kt = k + b * sk[0] + t * sk[1];
            for (int64_t a = 0; a < m; ++a) {
                const REAL *row = Kt + a * sK[2];
                REAL s = kt[a * sk[2]];
                for (int64_t j = 0; j < n; ++j)
                    s += row[j * sK[3]] * xt[j];
                ut[a] = s;
            }
            if (t == T - 1)
                continue;
            const REAL *Ft = Fh + b * sF[0] + t * sF[1];
            REAL *xn = x + (b * T + t + 1) * n;
            for (int64_t i = 0; i < n; ++i) {
                const REAL *row = Ft + (i + 1) * sF[2];
                REAL s = offsets ? row[0] : 0;
                for (int64_t j = 0; j < n; ++j)
                    s += row[(j + 1) * sF[3]] * xt[j];
                for (int64_t a = 0; a < m; ++a)
                    s += row[(n + 1 + a) * sF[3]] * ut[a];
                xn[i] = s;
            }
        }
    }
    return 0;
}

int NAME(diffmpc_rollout)(int threads, int64_t B, int64_t T, int64_t n, int64_t m, const REAL *K,
                          const int64_t *sK, const REAL *k, const int64_t *sk, const REAL *Fh,
                          const int64_t *sF, const REAL *x0, const int64_t *sx0, int offsets,
                          REAL *x, REAL *u)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(rollout_range)(lo, hi, B, T, n, m, K, sK, k, sk, Fh, sF, x0,
                                                  sx0, offsets, x, u));
    return rc;
}

/* Costate recursion (lqr.costate): lam_{T-1} = gx_{T-1}, lam_t = gx_t + Fx_t' lam_{t+1}.
 *
 * gx: sg = {batch, time, entry}; Fx: n x n blocks, sF = {batch, time, row, column} (NULL if
 * T == 1). Output lam [B, T, n], contiguous. Time outside, samples inside. Returns 0.
 */
static int NAME(costate_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n,
                               const REAL *gx, const int64_t *sg, const REAL *Fx,
                               const int64_t *sF, REAL *lam)
{
    for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t b = lo; b < hi; ++b) {
            const REAL *gt = gx + b * sg[0] + t * sg[1];
            REAL *lt = lam + (b * T + t) * n;
            for (int64_t i = 0; i < n; ++i)
                lt[i] = gt[i * sg[2]];
            if (t == T - 1)
                continue;
            const REAL *Ft = Fx + b * sF[0] + t * sF[1], *next = lt + n;
            for (int64_t j = 0; j < n; ++j) {
                const REAL *row = Ft + j * sF[2];
                const REAL lj = next[j];
                for (int64_t i = 0; i < n; ++i)
                    lt[i] += row[i * sF[3]] * lj;
            }
        }
    }
    return 0;
}

int NAME(diffmpc_costate)(int threads, int64_t B, int64_t T, int64_t n, const REAL *gx,
                          const int64_t *sg, const REAL *Fx, const int64_t *sF, REAL *lam)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(costate_range)(lo, hi, B, T, n, gx, sg, Fx, sF, lam));
    return rc;
}

/* Feedforward terms for a new linear term c (lqr.feedforward), reusing a fixed-set or
 * unconstrained pass's K, L and dynamics:
 *
 *   q_t = c_t + F_t' v_{t+1},  q_u held at zero off the free set,  v_t = q_x + K_t' q_u,
 *   k_t = -(L_t L_t')^-1 q_u
 *
 * c: sc = {batch, time, entry}; Fh, K, fr as in diffmpc_riccati / diffmpc_rollout (fr NULL: all
 * free); L: m x m blocks, sL = {batch, time, row, column}. Output k [B, T, m], contiguous.
 * Time outside, samples inside. Returns 0, or -1 if out of memory.
 */
static int NAME(feedforward_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n,
                                   int64_t m, const REAL *c, const int64_t *sc, const REAL *Fh,
                                   const int64_t *sF, const REAL *K, const int64_t *sK,
                                   const uint8_t *fr, const int64_t *sfr, const REAL *L,
                                   const int64_t *sL, REAL *k)
{
    const int64_t p = n + m;
    REAL *buf = (REAL *)malloc((size_t)((hi - lo) * n + p + m) * sizeof(REAL));
    if (buf == NULL)
        return -1;
    REAL *vall = buf, *q = vall + (hi - lo) * n, *y = q + p;
    for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t b = lo; b < hi; ++b) {
            REAL *v = vall + (b - lo) * n;
            const REAL *ct = c + b * sc[0] + t * sc[1];
            for (int64_t i = 0; i < p; ++i)
                q[i] = ct[i * sc[2]];
            if (t < T - 1) {
                const REAL *Ft = Fh + b * sF[0] + t * sF[1];
                for (int64_t r = 0; r < n; ++r) {
                    const REAL *row = Ft + (r + 1) * sF[2];
                    const REAL vr = v[r];
                    for (int64_t i = 0; i < p; ++i)
                        q[i] += row[(i + 1) * sF[3]] * vr;
                }
            }
            if (fr != NULL) {
                const uint8_t *ft = fr + b * sfr[0] + t * sfr[1];
                for (int64_t a = 0; a < m; ++a)
                    if (!ft[a * sfr[2]])
                        q[n + a] = 0;
            }
            const REAL *Kt = K + b * sK[0] + t * sK[1];
            for (int64_t i = 0; i < n; ++i)
                v[i] = q[i];
            for (int64_t a = 0; a < m; ++a) {
                const REAL *row = Kt + a * sK[2];
                const REAL qa = q[n + a];
                for (int64_t i = 0; i < n; ++i)
                    v[i] += row[i * sK[3]] * qa;
            }
            /* k = -L^-T L^-1 q_u */
            const REAL *Lt = L + b * sL[0] + t * sL[1];
            for (int64_t i = 0; i < m; ++i) {
                REAL s = q[n + i];
                for (int64_t j = 0; j < i; ++j)
                    s -= Lt[i * sL[2] + j * sL[3]] * y[j];
                y[i] = s / Lt[i * sL[2] + i * sL[3]];
            }
            REAL *kt = k + (b * T + t) * m;
            for (int64_t i = m - 1; i >= 0; --i) {
                REAL s = y[i];
                for (int64_t j = i + 1; j < m; ++j)
                    s -= Lt[j * sL[2] + i * sL[3]] * y[j];
                y[i] = s / Lt[i * sL[2] + i * sL[3]];
                kt[i] = -y[i];
            }
        }
    }
    free(buf);
    return 0;
}

int NAME(diffmpc_feedforward)(int threads, int64_t B, int64_t T, int64_t n, int64_t m,
                              const REAL *c, const int64_t *sc, const REAL *Fh, const int64_t *sF,
                              const REAL *K, const int64_t *sK, const uint8_t *fr,
                              const int64_t *sfr, const REAL *L, const int64_t *sL, REAL *k)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(feedforward_range)(lo, hi, B, T, n, m, c, sc, Fh, sF, K, sK, fr,
                                                      sfr, L, sL, k));
    return rc;
}

/* The checks of a quadratic cost's C (mpc._check_cost) in one pass over N blocks p x p, strides
 * sC = {block, row, column}: out[0] the number of NaN or infinite entries, out[1] the largest
 * |C_ij| of the finite ones, out[2] the largest |C_ij - C_ji|, out[3] the number of blocks whose
 * control block C[n:, n:] is not positive definite (a non-positive or NaN pivot of its Cholesky
 * factorization). Returns 0, or -1 if out of memory.
 */
static int NAME(check_cost_range)(int64_t lo, int64_t hi, int64_t N, int64_t p, int64_t n,
                                  const REAL *C, const int64_t *sC, double *out)
{
    const int64_t m = p - n;
    REAL *Lw = (REAL *)malloc((size_t)(m * m + 1) * sizeof(REAL));
    if (Lw == NULL)
        return -1;
    double bad = 0, big = 0, asym = 0, indefinite = 0;
    for (int64_t k = lo; k < hi; ++k) {
        const REAL *A = C + k * sC[0];
        for (int64_t i = 0; i < p; ++i) {
            const REAL *row = A + i * sC[1], *col = A + i * sC[2];
            for (int64_t j = i; j < p; ++j) {  /* the pair (i, j), (j, i) */
                const REAL a = row[j * sC[2]], b = col[j * sC[1]];
                if (!(isfinite(a) && isfinite(b))) {
                    bad += !isfinite(a) + (j != i && !isfinite(b));
                    continue;
                }
                const double ma = fabs((double)a) > fabs((double)b) ? fabs((double)a)
                                                                    : fabs((double)b);
                const double d = fabs((double)(a - b));
                big = ma > big ? ma : big;
                asym = d > asym ? d : asym;
            }
        }
        int ok = 1;
        for (int64_t i = 0; i < m && ok; ++i)
            for (int64_t j = 0; j <= i; ++j) {
                REAL s = A[(n + i) * sC[1] + (n + j) * sC[2]];
                for (int64_t l = 0; l < j; ++l)
                    s -= Lw[i * m + l] * Lw[j * m + l];
                if (i == j) {
                    if (!(s > 0)) {
                        ok = 0;
                        break;
                    }
                    Lw[i * m + i] = (REAL)sqrt((double)s);
                } else {
                    Lw[i * m + j] = s / Lw[j * m + j];
                }
            }
        indefinite += !ok;
    }
    free(Lw);
    out[0] = bad;
    out[1] = big;
    out[2] = asym;
    out[3] = indefinite;
    return 0;
}

int NAME(diffmpc_check_cost)(int threads, int64_t N, int64_t p, int64_t n, const REAL *C,
                             const int64_t *sC, double *out)
{
    double parts[MAX_RANGES][4] = {{0}};
    int rc = 0;
    RANGES(threads, N, 1, rc, NAME(check_cost_range)(lo, hi, N, p, n, C, sC, parts[part]));
    for (int i = 0; i < 4; ++i)
        out[i] = 0;
    for (int r = 0; r < MAX_RANGES; ++r) {  /* counts add up, maxima take the largest */
        out[0] += parts[r][0];
        out[1] = parts[r][1] > out[1] ? parts[r][1] : out[1];
        out[2] = parts[r][2] > out[2] ? parts[r][2] : out[2];
        out[3] += parts[r][3];
    }
    return rc;
}

/* Batched products of [B, T] blocks (expand.matvec, expand.matvec_pair and their gradients).
 * Every operand is a 4-d (blocks) or 3-d (vectors) view given by element strides {batch, time,
 * row[, column]}; outputs are contiguous. */

/* y = A x (trans = 0, y [B, T, r]) or y = A' x (trans = 1, y [B, T, c]) for A [B, T, r, c]. */
static int NAME(matvec_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t r, int64_t c,
                              const REAL *A, const int64_t *sA, const REAL *x, const int64_t *sx,
                              int trans, REAL *y)
{
    const int64_t out = trans ? c : r;
    for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const REAL *At = A + b * sA[0] + t * sA[1], *xt = x + b * sx[0] + t * sx[1];
            REAL *yt = y + (b * T + t) * out;
            if (!trans) {
                for (int64_t i = 0; i < r; ++i) {
                    const REAL *row = At + i * sA[2];
                    REAL s = 0;
                    if (sA[3] == 1 && sx[2] == 1)
                        for (int64_t j = 0; j < c; ++j)
                            s += row[j] * xt[j];
                    else
                        for (int64_t j = 0; j < c; ++j)
                            s += row[j * sA[3]] * xt[j * sx[2]];
                    yt[i] = s;
                }
            } else {
                for (int64_t j = 0; j < c; ++j)
                    yt[j] = 0;
                for (int64_t i = 0; i < r; ++i) {
                    const REAL *row = At + i * sA[2];
                    const REAL xi = xt[i * sx[2]];
                    if (sA[3] == 1)
                        for (int64_t j = 0; j < c; ++j)
                            yt[j] += row[j] * xi;
                    else
                        for (int64_t j = 0; j < c; ++j)
                            yt[j] += row[j * sA[3]] * xi;
                }
            }
        }
    return 0;
}

int NAME(diffmpc_matvec)(int threads, int64_t B, int64_t T, int64_t r, int64_t c, const REAL *A,
                         const int64_t *sA, const REAL *x, const int64_t *sx, int trans, REAL *y)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(matvec_range)(lo, hi, B, T, r, c, A, sA, x, sx, trans, y));
    return rc;
}

/* ax = A x [B, T, r] and aty = A' y [B, T, c] in one pass over A [B, T, r, c]. */
static int NAME(matvec_pair_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t r,
                                   int64_t c, const REAL *A, const int64_t *sA, const REAL *x,
                                   const int64_t *sx, const REAL *y, const int64_t *sy, REAL *ax,
                                   REAL *aty)
{
    for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const REAL *At = A + b * sA[0] + t * sA[1], *xt = x + b * sx[0] + t * sx[1];
            const REAL *yt = y + b * sy[0] + t * sy[1];
            REAL *axt = ax + (b * T + t) * r, *atyt = aty + (b * T + t) * c;
            for (int64_t j = 0; j < c; ++j)
                atyt[j] = 0;
            for (int64_t i = 0; i < r; ++i) {
                const REAL *row = At + i * sA[2];
                const REAL yi = yt[i * sy[2]];
                REAL s = 0;
                for (int64_t j = 0; j < c; ++j) {
                    const REAL a = row[j * sA[3]];
                    s += a * xt[j * sx[2]];
                    atyt[j] += a * yi;
                }
                axt[i] = s;
            }
        }
    return 0;
}

int NAME(diffmpc_matvec_pair)(int threads, int64_t B, int64_t T, int64_t r, int64_t c,
                              const REAL *A, const int64_t *sA, const REAL *x, const int64_t *sx,
                              const REAL *y, const int64_t *sy, REAL *ax, REAL *aty)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(matvec_pair_range)(lo, hi, B, T, r, c, A, sA, x, sx, y, sy, ax,
                                                      aty));
    return rc;
}

/* G [B, T, r, c] = alpha (g x' + y z') (y, z NULL: alpha g x'), contiguous; with sym (r = c,
 * alpha = 1/2, y = x, z = g) the symmetrized gradient (g x' + x g') / 2. */
static int NAME(outer_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t r, int64_t c,
                             const REAL *g, const int64_t *sg, const REAL *x, const int64_t *sx,
                             const REAL *y, const int64_t *sy, const REAL *z, const int64_t *sz,
                             double alpha, REAL *G)
{
    const REAL al = (REAL)alpha;
    for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const REAL *gt = g + b * sg[0] + t * sg[1], *xt = x + b * sx[0] + t * sx[1];
            REAL *Gt = G + (b * T + t) * r * c;
            if (y == NULL) {
                for (int64_t i = 0; i < r; ++i) {
                    const REAL gi = al * gt[i * sg[2]];
                    for (int64_t j = 0; j < c; ++j)
                        Gt[i * c + j] = gi * xt[j * sx[2]];
                }
            } else {
                const REAL *yt = y + b * sy[0] + t * sy[1], *zt = z + b * sz[0] + t * sz[1];
                for (int64_t i = 0; i < r; ++i) {
                    const REAL gi = al * gt[i * sg[2]], yi = al * yt[i * sy[2]];
                    for (int64_t j = 0; j < c; ++j)
                        Gt[i * c + j] = gi * xt[j * sx[2]] + yi * zt[j * sz[2]];
                }
            }
        }
    return 0;
}

int NAME(diffmpc_outer)(int threads, int64_t B, int64_t T, int64_t r, int64_t c, const REAL *g,
                        const int64_t *sg, const REAL *x, const int64_t *sx, const REAL *y,
                        const int64_t *sy, const REAL *z, const int64_t *sz, double alpha, REAL *G)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(outer_range)(lo, hi, B, T, r, c, g, sg, x, sx, y, sy, z, sz,
                                                alpha, G));
    return rc;
}

/* Stage costs of a quadratic cost: v [B, T] = 1/2 tau' C tau + c' tau, C [B, T, p, p],
 * c and tau [B, T, p]; and, if Cx is not NULL, Cx [B, T, p] = C tau (the gradient's part). */
static int NAME(quad_value_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t p,
                                  const REAL *C, const int64_t *sC, const REAL *c,
                                  const int64_t *sc, const REAL *tau, const int64_t *st, REAL *v,
                                  REAL *Cx)
{
    for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const REAL *Ct = C + b * sC[0] + t * sC[1], *ct = c + b * sc[0] + t * sc[1];
            const REAL *tt = tau + b * st[0] + t * st[1];
            REAL total = 0;
            for (int64_t i = 0; i < p; ++i) {
                const REAL *row = Ct + i * sC[2];
                REAL s = 0;
                for (int64_t j = 0; j < p; ++j)
                    s += row[j * sC[3]] * tt[j * st[2]];
                if (Cx != NULL)
                    Cx[(b * T + t) * p + i] = s;
                total += tt[i * st[2]] * ((REAL)0.5 * s + ct[i * sc[2]]);
            }
            v[b * T + t] = total;
        }
    return 0;
}

int NAME(diffmpc_quad_value)(int threads, int64_t B, int64_t T, int64_t p, const REAL *C,
                             const int64_t *sC, const REAL *c, const int64_t *sc, const REAL *tau,
                             const int64_t *st, REAL *v, REAL *Cx)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(quad_value_range)(lo, hi, B, T, p, C, sC, c, sc, tau, st, v,
                                                     Cx));
    return rc;
}

/* Homogeneous blocks (lqr.homogeneous_dynamics, lqr.homogeneous_cost): for B samples and T
 * steps, H_t = [[corner, top_t'], [left_t, M_t]] with M_t rows x cols (strides sM = {batch, time,
 * row, column}), top_t cols and left_t rows (st, sl = {batch, time, entry}; NULL: zeros); the
 * dynamics [[1, 0], [d, F]] and the cost [[0, c'], [c, C]]. Output H through the strides so =
 * {time, batch, row, column} (time-major, or batch-last with so[1] == 1: then the samples are the
 * inner loop, so that every write is adjacent to the last). Returns 0. */
static int NAME(homogeneous_range)(int64_t lo, int64_t hi, int64_t T, int64_t rows, int64_t cols,
                                   const REAL *M, const int64_t *sM, const REAL *top,
                                   const int64_t *st, const REAL *left, const int64_t *sl,
                                   double corner, REAL *H, const int64_t *so)
{
    const REAL c0 = (REAL)corner;
    if (so[1] == 1) {
        for (int64_t t = 0; t < T; ++t) {
            REAL *Ht = H + t * so[0];
            for (int64_t b = lo; b < hi; ++b)
                Ht[b] = c0;
            for (int64_t j = 0; j < cols; ++j) {
                REAL *dst = Ht + (j + 1) * so[3];
                for (int64_t b = lo; b < hi; ++b)
                    dst[b] = top == NULL ? 0 : top[b * st[0] + t * st[1] + j * st[2]];
            }
            for (int64_t i = 0; i < rows; ++i) {
                REAL *row = Ht + (i + 1) * so[2];
                for (int64_t b = lo; b < hi; ++b)
                    row[b] = left == NULL ? 0 : left[b * sl[0] + t * sl[1] + i * sl[2]];
                for (int64_t j = 0; j < cols; ++j) {
                    const REAL *src = M + t * sM[1] + i * sM[2] + j * sM[3];
                    REAL *dst = row + (j + 1) * so[3];
                    for (int64_t b = lo; b < hi; ++b)
                        dst[b] = src[b * sM[0]];
                }
            }
        }
        return 0;
    }
    for (int64_t t = 0; t < T; ++t)
        for (int64_t b = lo; b < hi; ++b) {
            REAL *out = H + t * so[0] + b * so[1];
            const REAL *Mt = M + b * sM[0] + t * sM[1];
            out[0] = c0;
            for (int64_t j = 0; j < cols; ++j)
                out[(j + 1) * so[3]] = top == NULL ? 0 : top[b * st[0] + t * st[1] + j * st[2]];
            for (int64_t i = 0; i < rows; ++i) {
                REAL *row = out + (i + 1) * so[2];
                const REAL *src = Mt + i * sM[2];
                row[0] = left == NULL ? 0 : left[b * sl[0] + t * sl[1] + i * sl[2]];
                if (sM[3] == 1 && so[3] == 1)
                    for (int64_t j = 0; j < cols; ++j)
                        row[j + 1] = src[j];
                else
                    for (int64_t j = 0; j < cols; ++j)
                        row[(j + 1) * so[3]] = src[j * sM[3]];
            }
        }
    return 0;
}

int NAME(diffmpc_homogeneous)(int threads, int64_t B, int64_t T, int64_t rows, int64_t cols,
                              const REAL *M, const int64_t *sM, const REAL *top, const int64_t *st,
                              const REAL *left, const int64_t *sl, double corner, REAL *H,
                              const int64_t *so)
{
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(homogeneous_range)(lo, hi, T, rows, cols, M, sM, top, st, left,
                                                      sl, corner, H, so));
    return rc;
}

/* The one-control Riccati pass (lqr._scalar_riccati), in every mode that pass has: box
 * (lw/up given: the step's one-variable QP is the clipped minimizer), fixed free set (fr),
 * Levenberg-Marquardt term (reg [B]) and curvature floor (floor [B]). Homogeneous operands:
 * Ch (p+1) x (p+1) blocks, sC = {batch, time, row, column}; Fh (n+1) x (p+1) blocks, sF as sC
 * (NULL if T == 1); lw, up: sl, sh = {batch, time}; fr: sfr = {batch, time}; reg, floor: one
 * number per sample (stride sr, sf) or NULL. The value function Vh (n+1) x (n+1) is kept as the
 * PyTorch pass forms it (not symmetrized: with a clipped control it is not symmetric).
 * Outputs, contiguous: Kh [T, B, n+1] ([k | K]), free [T, B] (bytes), qu, h, hr [T, B] (q_u,
 * the floored and the regularized curvature). Returns 0, or -1 if out of memory.
 */
/* dst[i * cols + j] = the LANES numbers at (i, j) of the blocks P[0..LANES-1] (strides s[2],
 * s[3]); adjacent: the lanes' blocks are interleaved (batch stride 1), one vector load each. */
static inline __attribute__((always_inline)) void NAME(load_blocks)(VEC *dst, const REAL *const *P, int64_t rows, int64_t cols,
                              const int64_t *s, int adjacent)
{
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
            const int64_t o = i * s[2] + j * s[3];
            if (adjacent)
                memcpy(&dst[i * cols + j], P[0] + o, sizeof(VEC));
            else
                dst[i * cols + j] = GATHER(P, o);
        }
}

#ifndef DM_RAW_DEFINED
#define DM_RAW_DEFINED
/* the raw operands of diffmpc_scalar_riccati_raw beside C and F (REAL-typed pointers as void) */
struct dm_raw {
    const void *c;
    const int64_t *sc;
    const void *Hb;
    int64_t first;
    const uint8_t *nw;
    const int64_t *snw;
};
#endif

/* The homogeneous blocks [[0, c'], [c, C (+ Hb)]] and [[1, 0], [0, F]] of step t for the lanes'
 * samples b0 .. b0 + lanes - 1 (the last repeated), composed from the raw operands (Cl, Fl: the
 * lanes' pointers to their C_t and F_t blocks). */
static inline __attribute__((always_inline)) void NAME(load_raw)(
    VEC *Cv, VEC *Fv, const struct dm_raw *raw, int64_t b0, int lanes, int64_t t, int last,
    int64_t n, int64_t B, const REAL *const *Cl, const int64_t *sC, const REAL *const *Fl,
    const int64_t *sF)
{
    const int64_t p = n + 1, ph = n + 2, nh = n + 1;
    const REAL *c = (const REAL *)raw->c;
    const REAL *cl[LANES];
    int64_t bs[LANES];
    for (int s = 0; s < LANES; ++s) {
        bs[s] = b0 + (s < lanes ? s : lanes - 1);
        cl[s] = c + bs[s] * raw->sc[0] + t * raw->sc[1];
    }
    Cv[0] = (VEC){0};
    for (int64_t j = 0; j < p; ++j) {
        const VEC v = GATHER(cl, j * raw->sc[2]);
        Cv[1 + j] = v;
        Cv[(1 + j) * ph] = v;
    }
    for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < p; ++j)
            Cv[(1 + i) * ph + 1 + j] = GATHER(Cl, i * sC[2] + j * sC[3]);
    if (raw->Hb != NULL && !last) {  /* + the curvature block (zero where a sample has none) */
        const REAL *H = (const REAL *)raw->Hb;
        const int64_t a = 1 + raw->first;
        int on[LANES];
        for (int s = 0; s < LANES; ++s)
            on[s] = raw->nw == NULL || raw->nw[bs[s] * raw->snw[0]] != 0;
        for (int64_t k = 0; k < 16; ++k) {
            const int64_t o = (t * 16 + k) * B;
            VEC v;
            for (int s = 0; s < LANES; ++s)
                v[s] = on[s] ? H[o + bs[s]] : (REAL)0;
            Cv[(a + k / 4) * ph + a + k % 4] += v;
        }
    }
    if (!last) {
        for (int64_t i = 0; i < nh * ph; ++i)
            Fv[i] = (VEC){0};
        for (int s = 0; s < LANES; ++s)
            Fv[0][s] = 1;
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < p; ++j)
                Fv[(1 + i) * ph + 1 + j] = GATHER(Fl, i * sF[2] + j * sF[3]);
    }
}

static inline __attribute__((always_inline)) int NAME(scalar_riccati_body)(
    int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n, const REAL *Ch, const int64_t *sC,
    const REAL *Fh, const int64_t *sF, const REAL *lw, const int64_t *sl, const REAL *up,
    const int64_t *sh, const uint8_t *fr, const int64_t *sfr, const REAL *reg, const int64_t *sr,
    const REAL *floor_, const int64_t *sf, REAL *Kh, uint8_t *free_out, REAL *qu, REAL *h_out,
    REAL *hr_out, const struct dm_raw *raw)
{
    const int64_t nh = n + 1, ph = n + 2, c = n + 1;  /* c: the control's homogeneous index */
    const int64_t groups = (hi - lo + LANES - 1) / LANES;  /* this range's */
    VEC *buf = (VEC *)aligned_alloc(
        64, (size_t)(((groups * nh * nh + nh * ph + ph * ph + ph * ph + nh * ph + nh)
                      * (int64_t)sizeof(VEC) + 63) / 64 * 64));
    if (buf == NULL)
        return -1;
    VEC *W = buf + groups * nh * nh, *Q = W + nh * ph, *Cv = Q + ph * ph, *Fv = Cv + ph * ph;
    VEC *kh = Fv + nh * ph;
    for (int64_t t = T - 1; t >= 0; --t) {
        const int last = t == T - 1;
        for (int64_t b0 = lo; b0 < hi; b0 += LANES) {
            const int lanes = (int)(hi - b0 < LANES ? hi - b0 : LANES);
            VEC *V = buf + ((b0 - lo) / LANES) * nh * nh;
            const REAL *Cl[LANES], *Fl[LANES];
            for (int s = 0; s < LANES; ++s) {
                const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                Cl[s] = Ch + b * sC[0] + t * sC[1];
                Fl[s] = last ? NULL : Fh + b * sF[0] + t * sF[1];
            }
            if (raw == NULL) {
                /* batch-last storage and a full group: each vector is LANES adjacent numbers */
                NAME(load_blocks)(Cv, Cl, ph, ph, sC, lanes == LANES && sC[0] == 1);
                if (!last)
                    NAME(load_blocks)(Fv, Fl, nh, ph, sF, lanes == LANES && sF[0] == 1);
            } else {
                NAME(load_raw)(Cv, Fv, raw, b0, lanes, t, last, n, B, Cl, sC, Fl, sF);
            }
            for (int64_t i = 0; i < ph * ph; ++i)
                Q[i] = Cv[i];
            if (!last) {
                /* W = Vh Fh, then Q += Fh' W (Vh as the PyTorch pass forms it). Raw operands:
                 * Fh = [[1, 0], [0, F]], so W[:, 0] = Vh[:, 0], Q[0, :] += W[0, :], and the
                 * sums start at k = 1 (the terms left out are exact zeros: the same sums) */
                const int64_t k0 = raw != NULL;
                for (int64_t i = 0; i < nh; ++i) {
                    if (k0)
                        W[i * ph] = V[i * nh];
                    for (int64_t j = k0; j < ph; ++j) {
                        VEC acc = {0};
                        for (int64_t k = k0; k < nh; ++k)
                            acc += V[i * nh + k] * Fv[k * ph + j];
                        W[i * ph + j] = acc;
                    }
                }
                if (k0)
                    for (int64_t j = 0; j < ph; ++j)
                        Q[j] += W[j];
                for (int64_t i = k0; i < ph; ++i)
                    for (int64_t j = 0; j < ph; ++j) {
                        VEC acc = {0};
                        for (int64_t k = k0; k < nh; ++k)
                            acc += Fv[k * ph + i] * W[k * ph + j];
                        Q[i * ph + j] += acc;
                    }
            }
            VEC h = Q[c * ph + c], hr;
            for (int s = 0; s < LANES; ++s) {  /* one number per lane: the step's decisions */
                const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                REAL hs = h[s];
                if (floor_ != NULL) {  /* torch.maximum: a NaN propagates */
                    const REAL fl = floor_[b * sf[0]];
                    hs = hs != hs ? hs : (fl != fl ? fl : (hs > fl ? hs : fl));
                }
                h[s] = hs;
                hr[s] = reg == NULL ? hs : hs + reg[b * sr[0]];
            }
            for (int64_t j = 0; j < nh; ++j)
                kh[j] = Q[c * ph + j] / -hr;
            uint8_t f[LANES];
            for (int s = 0; s < LANES; ++s) {
                const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                f[s] = 1;
                if (lw != NULL) {  /* torch.clamp(k, lo, hi): min(max(k, lo), hi), NaN kept */
                    const REAL kf = kh[0][s], l = lw[b * sl[0] + t * sl[1]];
                    const REAL u = up[b * sh[0] + t * sh[1]];
                    REAL k = kf != kf ? kf : (kf < l ? l : kf);
                    k = k != k ? k : (k > u ? u : k);
                    f[s] = k == kf;
                    if (!f[s])
                        for (int64_t j = 0; j < nh; ++j)
                            kh[j][s] = 0;
                    kh[0][s] = k;
                } else if (fr != NULL) {
                    f[s] = fr[b * sfr[0] + t * sfr[1]] != 0;
                    if (!f[s])
                        for (int64_t j = 0; j < nh; ++j)
                            kh[j][s] = 0;
                }
            }
            for (int64_t i = 0; i < nh; ++i)
                for (int64_t j = 0; j < nh; ++j)
                    V[i * nh + j] = Q[i * ph + j] + Q[i * ph + c] * kh[j];
            if (reg != NULL)
                for (int64_t i = 0; i < nh; ++i)
                    for (int64_t j = 0; j < nh; ++j)
                        V[i * nh + j] += kh[i] * (Q[c * ph + j] + h * kh[j]);
            for (int s = 0; s < lanes; ++s) {
                const int64_t tb = t * B + b0 + s;
                for (int64_t j = 0; j < nh; ++j)
                    Kh[tb * nh + j] = kh[j][s];
                free_out[tb] = f[s];
                qu[tb] = Q[c * ph][s];
                h_out[tb] = h[s];
                hr_out[tb] = hr[s];
            }
        }
    }
    free(buf);
    return 0;
}

/* scalar_riccati_body with the state size a constant where it is a built-in model's (3:
 * Pendulum, 5: Cartpole): loops of known trip count, unrolled into registers */
static int NAME(scalar_riccati_range)(int64_t lo, int64_t hi, int64_t B, int64_t T, int64_t n,
                                      const REAL *Ch, const int64_t *sC, const REAL *Fh,
                                      const int64_t *sF, const REAL *lw, const int64_t *sl,
                                      const REAL *up, const int64_t *sh, const uint8_t *fr,
                                      const int64_t *sfr, const REAL *reg, const int64_t *sr,
                                      const REAL *floor_, const int64_t *sf, REAL *Kh,
                                      uint8_t *free_out, REAL *qu, REAL *h_out, REAL *hr_out,
                                      const struct dm_raw *raw)
{
#define DM_SCALAR_PASS(N)                                                                       \
    NAME(scalar_riccati_body)(lo, hi, B, T, N, Ch, sC, Fh, sF, lw, sl, up, sh, fr, sfr, reg, sr, \
                              floor_, sf, Kh, free_out, qu, h_out, hr_out, raw)
    switch (n) {
    case 3:
        return DM_SCALAR_PASS(3);
    case 5:
        return DM_SCALAR_PASS(5);
    default:
        return DM_SCALAR_PASS(n);
    }
#undef DM_SCALAR_PASS
}

int NAME(diffmpc_scalar_riccati)(int threads, int64_t B, int64_t T, int64_t n, const REAL *Ch,
                                 const int64_t *sC, const REAL *Fh, const int64_t *sF,
                                 const REAL *lw, const int64_t *sl, const REAL *up,
                                 const int64_t *sh, const uint8_t *fr, const int64_t *sfr,
                                 const REAL *reg, const int64_t *sr, const REAL *floor_,
                                 const int64_t *sf, REAL *Kh, uint8_t *free_out, REAL *qu,
                                 REAL *h_out, REAL *hr_out)
{
    int rc = 0;
    RANGES(threads, B, LANES, rc, NAME(scalar_riccati_range)(lo, hi, B, T, n, Ch, sC, Fh, sF, lw,
                                                             sl, up, sh, fr, sfr, reg, sr, floor_,
                                                             sf, Kh, free_out, qu, h_out, hr_out,
                                                             NULL));
    return rc;
}

/* The same pass on the raw operands of an iLQR step, with no homogeneous copies: C (p x p
 * blocks, sC = {batch, time, row, column}, broadcast strides allowed), c (sc = {batch, time,
 * entry}), F (n x p blocks, sF as sC; no offsets), and optionally the curvature blocks Hb
 * [T-1, 4, 4, B] added at coordinate `first` of [x, u] in the steps t < T-1 of the samples
 * whose byte in nw (stride snw) is nonzero (all, if nw is NULL). */
int NAME(diffmpc_scalar_riccati_raw)(int threads, int64_t B, int64_t T, int64_t n, const REAL *C,
                                     const int64_t *sC, const REAL *c, const int64_t *sc,
                                     const REAL *F, const int64_t *sF, const REAL *Hb,
                                     int64_t first, const uint8_t *nw, const int64_t *snw,
                                     const REAL *lw, const int64_t *sl, const REAL *up,
                                     const int64_t *sh, const REAL *reg, const int64_t *sr,
                                     const REAL *floor_, const int64_t *sf, REAL *Kh,
                                     uint8_t *free_out, REAL *qu, REAL *h_out, REAL *hr_out)
{
    const struct dm_raw raw = {c, sc, Hb, first, nw, snw};
    int rc = 0;
    RANGES(threads, B, LANES, rc, NAME(scalar_riccati_range)(lo, hi, B, T, n, C, sC, F, sF, lw,
                                                             sl, up, sh, NULL, NULL, reg, sr,
                                                             floor_, sf, Kh, free_out, qu, h_out,
                                                             hr_out, &raw));
    return rc;
}

/* Rollouts of the built-in models (diffmpc.systems' explicit Euler steps, in double precision):
 * for each step size alphas[a] and sample b, the row r = a B + b of
 *   x_0 = x_init_b,  u_t = clamp(u0_t + alpha k_t + K_t (x_t - x0_t), lower_t, upper_t),
 *   x_{t+1} = f(x_t, u_t)
 * (ilqr._closed_loop's line search); K == NULL: the open loop u_t = u0_t (A = 1, no clamp).
 *
 * model 1: Pendulum, consts {dt alpha, dt beta, dt} (its _constants' products):
 *   w' = w + dt alpha s + dt beta u,  th' = atan2(s, c) + dt w',  x' = [cos th', sin th', w'];
 * model 2: Cartpole, consts {l, g, 1/M, m_p l, m_p/M, m_p l/M, dt}: its accelerations from
 *   x = [p, v, c, s, w] as in Cartpole.accel, then x' = [p + dt v, v + dt pdd, cos th', sin th',
 *   w + dt thdd] with th' = atan2(s, c) + dt w.
 * cos th', sin th' come from (c, s) / |(c, s)| and the increment's sine and cosine (the same
 * numbers as through atan2, to rounding; atan2 where |(c, s)| is 0 or not finite).
 *
 * With C (QuadCost's [B, T, p, p], p = n + m) and c ([B, T, p]), also each row's cost
 * J = sum_t tau_t' (C_t tau_t / 2 + c_t), tau_t = [x_t; u_t] (TrajCost.value, summed over time).
 *
 * Inputs are views (strides {batch, time, entry...}); X [A, B, T, n], U [A, B, T, m], J [A, B]
 * contiguous. Returns 0, or 1 for an unknown model or sizes that are not the model's. */
#ifndef DM_MODEL_SHARED  /* in double whatever REAL is: compiled once, not per type */
#define DM_MODEL_SHARED
/* whether `model` is a built-in model with n states (both take one control) */
static int dm_model_known(int model, int64_t n)
{
    return (model == 1 && n == 3) || (model == 2 && n == 5);
}

static void dm_turn(double c, double s, double d, double *out)
{
    const double r = sqrt(c * c + s * s);
    if (r > 0 && r < HUGE_VAL) {
        const double sd = sin(d), cd = cos(d);
        out[0] = (c * cd - s * sd) / r;
        out[1] = (s * cd + c * sd) / r;
    } else {
        const double th = atan2(s, c) + d;
        out[0] = cos(th);
        out[1] = sin(th);
    }
}
#endif

static void NAME(model_step)(int model, const double *p, const REAL *x, const REAL *u, REAL *xn)
{
    if (model == 1) {
        const double c = x[0], s = x[1], w = x[2];
        const double wn = (w + s * p[0]) + (double)u[0] * p[1];
        double cs[2];
        dm_turn(c, s, p[2] * wn, cs);
        xn[0] = (REAL)cs[0], xn[1] = (REAL)cs[1];
        xn[2] = (REAL)wn;
    } else {
        const double l = p[0], g = p[1], inv_M = p[2], mpl = p[3], k = p[4], mu = p[5], dt = p[6];
        const double pos = x[0], v = x[1], c = x[2], s = x[3], w = x[4];
        const double a = ((double)u[0] + (mpl * s) * (w * w)) * inv_M;
        const double thdd = (g * s - c * a) / (l * (4.0 / 3.0 - k * (c * c)));
        const double pdd = a - (thdd * c) * mu;
        xn[0] = (REAL)(pos + dt * v);
        xn[1] = (REAL)(v + dt * pdd);
        double cs[2];
        dm_turn(c, s, dt * w, cs);
        xn[2] = (REAL)cs[0], xn[3] = (REAL)cs[1];
        xn[4] = (REAL)(w + dt * thdd);
    }
}

/* MODEL_P: the largest n + m of the built-in models */
#ifndef MODEL_P
#define MODEL_P 6
#endif
/* the operands of one batch of model rollouts (see above) */
typedef struct {
    int model;
    const double *consts;
    int64_t B, T, n, m;
    const REAL *alphas, *xi, *x0, *u0, *K, *k, *ul, *uh, *C, *c;
    const int64_t *sxi, *sx0, *su0, *sK, *sk, *sl, *sh, *sC, *sc;
} NAME(model_ops);

/* Rolls sample b out with step size alpha into xr [T, n], ur [T, m]; returns its cost (0 without
 * C). With rest (sr: {batch, time}), the least the stages after each step can add, it stops
 * (returns INFINITY, the trajectory left partial) as soon as the cost so far plus that bound
 * exceeds limit by a relative 1e-6 (where the cost can no longer come out below limit). */
static double NAME(model_row)(const NAME(model_ops) *o, int64_t b, REAL alpha, REAL *xr, REAL *ur,
                              const REAL *rest, const int64_t *sr, double limit)
{
    const int64_t T = o->T, n = o->n, m = o->m, p = n + m;
    const int64_t *sK = o->sK, *sx0 = o->sx0, *sk = o->sk, *su0 = o->su0, *sl = o->sl,
                  *sh = o->sh, *sC = o->sC, *sc = o->sc;
    double cost = 0;
    for (int64_t i = 0; i < n; ++i)
        xr[i] = o->xi[b * o->sxi[0] + i * o->sxi[1]];
    for (int64_t t = 0; t < T; ++t) {
        REAL *xt = xr + t * n, *ut = ur + t * m;
        for (int64_t a = 0; a < m; ++a) {
            REAL v = o->u0[b * su0[0] + t * su0[1] + a * su0[2]];
            if (o->K) {
                const REAL *row = o->K + b * sK[0] + t * sK[1] + a * sK[2];
                const REAL *xo = o->x0 + b * sx0[0] + t * sx0[1];
                v += alpha * o->k[b * sk[0] + t * sk[1] + a * sk[2]];
                for (int64_t j = 0; j < n; ++j)
                    v += row[j * sK[3]] * (xt[j] - xo[j * sx0[2]]);
                if (o->ul) { /* torch.clamp's order; NaN stays NaN */
                    const REAL l = o->ul[b * sl[0] + t * sl[1] + a * sl[2]];
                    const REAL h = o->uh[b * sh[0] + t * sh[1] + a * sh[2]];
                    v = v < l ? l : v;
                    v = v > h ? h : v;
                }
            }
            ut[a] = v;
        }
        if (t < T - 1)
            NAME(model_step)(o->model, o->consts, xt, ut, xt + n);
        if (o->C) {
            const REAL *Ct = o->C + b * sC[0] + t * sC[1], *ct = o->c + b * sc[0] + t * sc[1];
            double tau[MODEL_P];
            for (int64_t i = 0; i < p; ++i)
                tau[i] = i < n ? xt[i] : ut[i - n];
            for (int64_t i = 0; i < p; ++i) {
                const REAL *row = Ct + i * sC[2];
                double z = 0;
                for (int64_t j = 0; j < p; ++j)
                    z += (double)row[j * sC[3]] * tau[j];
                cost += tau[i] * (0.5 * z + (double)ct[i * sc[2]]);
            }
            if (rest) {  /* (a limit of -inf or NaN takes no cost: stop at once) */
                const double r = rest[b * sr[0] + t * sr[1]];
                if (!(limit > -INFINITY))
                    return INFINITY;
                if (cost + r > limit + 1e-6 * (1 + fabs(limit) + fabs(r)))
                    return INFINITY;
            }
        }
    }
    return cost;
}

/* rows [lo, hi) of A B: X [A, B, T, n], U, J [A, B] (J NULL without C) */
static int NAME(model_rollout_range)(int64_t lo, int64_t hi, const NAME(model_ops) *o, REAL *X,
                                     REAL *U, REAL *J)
{
    for (int64_t r = lo; r < hi; ++r) {
        const double cost = NAME(model_row)(o, r % o->B, o->K ? o->alphas[r / o->B] : 0,
                                            X + r * o->T * o->n, U + r * o->T * o->m, NULL,
                                            NULL, 0);
        if (J)
            J[r] = (REAL)cost;
    }
    return 0;
}

/* The line search (ilqr._search) for samples [lo, hi): each tries alphas[0], alphas[1], ... in
 * turn and takes the first whose cost is below J0 (the full step also where near[b] and its cost
 * is at most J0 + floor[b]): X [B, T, n], U, J [B] of that step, first [B] its index, found [B];
 * where none is, found is 0, first 0, and X, U, J are the last step's (partial and infinite
 * where rest, model_row's bound, stopped it). */
static int NAME(model_search_range)(int64_t lo, int64_t hi, const NAME(model_ops) *o, int64_t A,
                                    const REAL *J0, const REAL *floor_, const uint8_t *near,
                                    const REAL *rest, const int64_t *sr, REAL *X, REAL *U,
                                    REAL *J, int64_t *first, uint8_t *found)
{
    for (int64_t b = lo; b < hi; ++b) {
        REAL *xr = X + b * o->T * o->n, *ur = U + b * o->T * o->m;
        found[b] = 0;
        first[b] = 0;
        for (int64_t a = 0; a < A; ++a) {
            const double limit = (double)J0[b] + (a == 0 && near[b] ? (double)floor_[b] : 0.0);
            const REAL cost = (REAL)NAME(model_row)(o, b, o->alphas[a], xr, ur, rest, sr, limit);
            J[b] = cost;
            if (cost < J0[b] || (a == 0 && near[b] && cost <= J0[b] + floor_[b])) {
                found[b] = 1;
                first[b] = a;
                break;
            }
        }
    }
    return 0;
}

static int NAME(model_ops_fill)(NAME(model_ops) *o, int model, const double *consts, int64_t B,
                                int64_t T, int64_t n, int64_t m, const REAL *alphas,
                                const REAL *const *ptr, const int64_t *const *str)
{
    if (!dm_model_known(model, n) || m != 1)
        return 1;
    *o = (NAME(model_ops)){model, consts, B, T, n, m, alphas, ptr[0], ptr[1], ptr[2], ptr[3],
                           ptr[4], ptr[5], ptr[6], ptr[7], ptr[8], str[0], str[1], str[2], str[3],
                           str[4], str[5], str[6], str[7], str[8]};
    return 0;
}

/* ptr, str: the operands x_init, x0, u0, K, k, lower, upper, C, c and their strides (NULL where
 * absent: K for the open loop, lower/upper without a box, C/c without costs) */
int NAME(diffmpc_model_rollout)(int threads, int model, const double *consts, int64_t A,
                                int64_t B, int64_t T, int64_t n, int64_t m, const REAL *alphas,
                                const REAL *const *ptr, const int64_t *const *str, REAL *X,
                                REAL *U, REAL *J)
{
    NAME(model_ops) o;
    if (NAME(model_ops_fill)(&o, model, consts, B, T, n, m, alphas, ptr, str))
        return 1;
    int rc = 0;
    RANGES(threads, A * B, 1, rc, NAME(model_rollout_range)(lo, hi, &o, X, U, J));
    return rc;
}

int NAME(diffmpc_model_search)(int threads, int model, const double *consts, int64_t A, int64_t B,
                               int64_t T, int64_t n, int64_t m, const REAL *alphas,
                               const REAL *const *ptr, const int64_t *const *str, const REAL *J0,
                               const REAL *floor_, const uint8_t *near, const REAL *rest,
                               const int64_t *sr, REAL *X, REAL *U, REAL *J, int64_t *first,
                               uint8_t *found)
{
    NAME(model_ops) o;
    if (NAME(model_ops_fill)(&o, model, consts, B, T, n, m, alphas, ptr, str) || !o.K || !o.C)
        return 1;
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(model_search_range)(lo, hi, &o, A, J0, floor_, near, rest, sr,
                                                       X, U, J, first, found));
    return rc;
}

/* Derivatives of the built-in models' Euler steps along a trajectory (the closed forms of
 * Pendulum.jacobian / curvature_block and Cartpole's, same constants as model_step): for each
 * sample b and transition t < T1, with z = [x_t; u_t] (p = n + m entries),
 *   J [B, T1, n, p] (contiguous): d x_{t+1} / d z;
 *   Hb [T1, k, k, B] (contiguous, batch last): sum_i lam_i Hess f_i, weighted by lam [B, T1, n],
 *   on the coordinates [first, first + k) of z where the curvature lives (pendulum: k = 4 from
 *   0; cartpole: k = 4 from 2, the cart's position and velocity enter linearly).
 * Either output may be NULL (then lam is not read). Returns 0, or 1 for an unknown model. */
#ifndef DM_DERIVATIVES_SHARED
#define DM_DERIVATIVES_SHARED
static void dm_model_derivatives(int model, const double *p, const double *xz, double u,
                                 const double *lam, double *J, double *H)
{
    /* the angle th' = atan2(s, c) + ...: its gradient phi (in r = [c, s, w, u]) and Hessian */
    const double c = xz[model == 1 ? 0 : 2], s = xz[model == 1 ? 1 : 3];
    const double w = xz[model == 1 ? 2 : 4];
    const double inv_r2 = 1.0 / (c * c + s * s), inv_r4 = inv_r2 * inv_r2;
    const double d_c = -s * inv_r2, d_s = c * inv_r2;
    const double h_cc = 2 * c * s * inv_r4, h_cs = (s * s - c * c) * inv_r4, h_ss = -h_cc;
    double phi[4], g1[4], g2[4], dth, cs_n[2];
    if (H)
        for (int i = 0; i < 16; ++i)
            H[i] = 0;
    if (model == 1) {  /* w' = w + dt (alpha s + beta u), th' = th + dt w' */
        const double dta = p[0], dtb = p[1], dt = p[2];
        const double wn = w + (dta * s + dtb * u);
        dth = dt * wn;
        const double gw[4] = {0, dta, 1, dtb};
        for (int i = 0; i < 4; ++i) {
            g2[i] = gw[i];  /* the velocity row */
            phi[i] = (i == 0 ? d_c : i == 1 ? d_s : 0) + dt * gw[i];
        }
    } else {  /* a, D, thddot q and their gradients, as in Cartpole._euler_expansion */
        const double l = p[0], g = p[1], inv_M = p[2], k = p[4], mu = p[5], dt = p[6];
        const double a = inv_M * u + mu * s * w * w;
        const double D = l * (4.0 / 3.0 - k * c * c);
        const double q = (g * s - c * a) / D;
        const double d = -2 * l * k * c;
        const double ga[4] = {0, mu * w * w, 2 * mu * s * w, inv_M};
        double gq[4];
        for (int i = 0; i < 4; ++i) {
            double gN = (i == 0 ? -a : i == 1 ? g : 0) - c * ga[i];
            if (i == 0)
                gN -= q * d;
            gq[i] = gN / D;
            g1[i] = dt * (ga[i] - mu * (c * gq[i] + (i == 0 ? q : 0)));  /* v' row */
            g2[i] = dt * gq[i] + (i == 2 ? 1 : 0);  /* w' row */
        }
        dth = dt * w;
        phi[0] = d_c, phi[1] = d_s, phi[2] = dt, phi[3] = 0;
        if (H) {
            const double lam_v = lam[1];
            const double beta = dt * (lam[4] - mu * c * lam_v) / D;
            double hv[4];
            for (int i = 0; i < 4; ++i)
                hv[i] = beta * (ga[i] + d * gq[i]) + (dt * mu * lam_v) * gq[i];
            for (int i = 0; i < 4; ++i) {
                H[i] -= hv[i];      /* row 0: - e_c h' */
                H[i * 4] -= hv[i];  /* column 0: - h e_c' */
            }
            H[0] += 2 * l * k * q * beta;
            const double ha = (dt * lam_v - beta * c) * 2 * mu;
            H[1 * 4 + 2] += ha * w;
            H[2 * 4 + 1] += ha * w;
            H[2 * 4 + 2] += ha * s;
        }
    }
    dm_turn(c, s, dth, cs_n);
    if (H) {  /* the angle's part: lam_c Hess cos th' + lam_s Hess sin th' */
        const double lc = lam[model == 1 ? 0 : 2], ls = lam[model == 1 ? 1 : 3];
        const double a = -(lc * cs_n[0] + ls * cs_n[1]), bb = ls * cs_n[0] - lc * cs_n[1];
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j)
                H[i * 4 + j] += a * phi[i] * phi[j];
        H[0] += bb * h_cc;
        H[1] += bb * h_cs;
        H[4] += bb * h_cs;
        H[5] += bb * h_ss;
    }
    if (J) {  /* rows of x' in z = [x, u]: the r part at columns off .. off + 3 */
        const int n = model == 1 ? 3 : 5, pz = n + 1, off = model == 1 ? 0 : 2;
        const int rc = model == 1 ? 0 : 2;  /* the row of cos th' */
        for (int i = 0; i < n * pz; ++i)
            J[i] = 0;
        for (int j = 0; j < 4; ++j) {
            J[rc * pz + off + j] = -cs_n[1] * phi[j];
            J[(rc + 1) * pz + off + j] = cs_n[0] * phi[j];
            J[(rc + 2) * pz + off + j] = g2[j];
            if (model == 2)
                J[1 * pz + off + j] = g1[j];
        }
        if (model == 2) {  /* p' = p + dt v, v' = v + dt pddot */
            J[0] = 1, J[1] = p[6], J[1 * pz + 1] = 1;
        }
    }
}
#endif

static int NAME(model_expansion_range)(int64_t lo, int64_t hi, int model, const double *p,
                                       int64_t B, int64_t T1, int64_t n, const REAL *x,
                                       const int64_t *sx, const REAL *u, const int64_t *su,
                                       const REAL *lam, const int64_t *sl, REAL *J, REAL *Hb)
{
    const int64_t pz = n + 1;
    for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < T1; ++t) {
            double xz[5], lv[5], Jd[30], Hd[16];
            for (int64_t i = 0; i < n; ++i) {
                xz[i] = x[b * sx[0] + t * sx[1] + i * sx[2]];
                lv[i] = Hb ? lam[b * sl[0] + t * sl[1] + i * sl[2]] : 0;
            }
            dm_model_derivatives(model, p, xz, u[b * su[0] + t * su[1]], lv, J ? Jd : NULL,
                                 Hb ? Hd : NULL);
            if (J)
                for (int64_t i = 0; i < n * pz; ++i)
                    J[(b * T1 + t) * n * pz + i] = (REAL)Jd[i];
            if (Hb)
                for (int64_t i = 0; i < 16; ++i)
                    Hb[(t * 16 + i) * B + b] = (REAL)Hd[i];
        }
    return 0;
}

/* model_expansion and the costate in one backward pass per sample, as a Newton iteration needs
 * them: J_t, the costate lam_{T-1} = gx_{T-1}, lam_t = gx_t + Fx_t' lam_{t+1} (Fx_t: the state
 * columns of J_t, as stored; the arithmetic of costate_range), and the curvature block of step t
 * weighted by lam_{t+1}. x [B, T, n], u [B, T, 1], gx [B, T, n] views (sx, su, sg: {batch,
 * time, entry}); outputs contiguous: J [B, T-1, n, n+1], lam [B, T, n], Hb [T-1, 4, 4, B]. */
static int NAME(model_newton_range)(int64_t lo, int64_t hi, int model, const double *p,
                                    int64_t B, int64_t T, int64_t n, const REAL *x,
                                    const int64_t *sx, const REAL *u, const int64_t *su,
                                    const REAL *gx, const int64_t *sg, REAL *J, REAL *lam,
                                    REAL *Hb)
{
    const int64_t pz = n + 1, T1 = T - 1;
    for (int64_t b = lo; b < hi; ++b) {
        REAL *lb = lam + b * T * n;
        for (int64_t i = 0; i < n; ++i)
            lb[(T - 1) * n + i] = gx[b * sg[0] + (T - 1) * sg[1] + i * sg[2]];
        for (int64_t t = T - 2; t >= 0; --t) {
            double xz[5], lv[5], Jd[30], Hd[16];
            REAL *lt = lb + t * n;
            const REAL *next = lt + n;
            for (int64_t i = 0; i < n; ++i) {
                xz[i] = x[b * sx[0] + t * sx[1] + i * sx[2]];
                lv[i] = next[i];
            }
            dm_model_derivatives(model, p, xz, u[b * su[0] + t * su[1]], lv, Jd, Hd);
            REAL *Jt = J + (b * T1 + t) * n * pz;
            for (int64_t i = 0; i < n * pz; ++i)
                Jt[i] = (REAL)Jd[i];
            for (int64_t i = 0; i < 16; ++i)
                Hb[(t * 16 + i) * B + b] = (REAL)Hd[i];
            for (int64_t i = 0; i < n; ++i)
                lt[i] = gx[b * sg[0] + t * sg[1] + i * sg[2]];
            for (int64_t j = 0; j < n; ++j) {
                const REAL *row = Jt + j * pz;
                const REAL lj = next[j];
                for (int64_t i = 0; i < n; ++i)
                    lt[i] += row[i] * lj;
            }
        }
    }
    return 0;
}

int NAME(diffmpc_model_newton)(int threads, int model, const double *consts, int64_t B,
                               int64_t T, int64_t n, const REAL *x, const int64_t *sx,
                               const REAL *u, const int64_t *su, const REAL *gx,
                               const int64_t *sg, REAL *J, REAL *lam, REAL *Hb)
{
    if (!dm_model_known(model, n))
        return 1;
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(model_newton_range)(lo, hi, model, consts, B, T, n, x, sx, u,
                                                       su, gx, sg, J, lam, Hb));
    return rc;
}

int NAME(diffmpc_model_expansion)(int threads, int model, const double *consts, int64_t B,
                                  int64_t T1, int64_t n, const REAL *x, const int64_t *sx,
                                  const REAL *u, const int64_t *su, const REAL *lam,
                                  const int64_t *sl, REAL *J, REAL *Hb)
{
    if (!dm_model_known(model, n))
        return 1;
    int rc = 0;
    RANGES(threads, B, 1, rc, NAME(model_expansion_range)(lo, hi, model, consts, B, T1, n, x, sx,
                                                          u, su, lam, sl, J, Hb));
    return rc;
}
