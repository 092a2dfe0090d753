/* The Riccati pass of lqr.riccati (fixed-set or unconstrained mode), for one scalar type.
 *
 * Included by lq.c once per type with REAL (the scalar), VEC (its name for LANES of them) and
 * NAME(x) (the exported symbol's suffix) defined. LANES samples run side by side in the lanes of
 * one vector: every operation below is one vector instruction for LANES samples, whatever n and
 * m are. Tensors are read through element strides, so batch-first, time-major, broadcast
 * (stride 0) and homogeneous views need no copy.
 */

typedef REAL VEC __attribute__((vector_size(LANES * sizeof(REAL))));

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
 */
int NAME(diffmpc_riccati)(int64_t B, int64_t T, int64_t n, int64_t m,
                          const REAL *C, const int64_t *sC, const REAL *c, const int64_t *sc,
                          const REAL *Fh, const int64_t *sF, const uint8_t *fr,
                          const int64_t *sfr, REAL *Kh, REAL *L, int32_t *info, REAL *dV)
{
    const int64_t p = n + m, nh = n + 1;
    const int64_t count = n * n + n + n * p + n + p * p + p + n * p + m * m + m * nh + n + m + m;
    VEC *buf = (VEC *)aligned_alloc(64, (size_t)((count * (int64_t)sizeof(VEC) + 63) / 64 * 64));
    if (buf == NULL)
        return -1;
    VEC *V = buf, *v = V + n * n, *W = v + n, *g = W + n * p, *Q = g + n, *q = Q + p * p;
    VEC *Fv = q + p, *Lv = Fv + n * p, *Y = Lv + m * m, *gd = Y + m * nh, *inv = gd + n;
    VEC *y = inv + m;
    const VEC zero = {0};
    for (int64_t b0 = 0; b0 < B; b0 += LANES) {
        const int lanes = (int)(B - b0 < LANES ? B - b0 : LANES);
        VEC dv0 = zero, dv1 = zero;
        for (int64_t t = T - 1; t >= 0; --t) {
            const int last = t == T - 1;
            for (int s = 0; s < LANES; ++s) {  /* padding lanes repeat the last sample */
                const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                const REAL *Ct = C + b * sC[0] + t * sC[1], *ct = c + b * sc[0] + t * sc[1];
                for (int64_t i = 0; i < p; ++i) {
                    for (int64_t j = 0; j < p; ++j)
                        Q[i * p + j][s] = Ct[i * sC[2] + j * sC[3]];
                    q[i][s] = ct[i * sc[2]];
                }
                if (!last) {
                    const REAL *Ft = Fh + b * sF[0] + t * sF[1];
                    for (int64_t i = 0; i < n; ++i) {
                        const REAL *row = Ft + (i + 1) * sF[2];
                        g[i][s] = row[0];
                        for (int64_t j = 0; j < p; ++j)
                            Fv[i * p + j][s] = row[(j + 1) * sF[3]];
                    }
                }
            }
            if (!last) {
                /* W = V F, gd = V d + v; then Q += F' W (upper triangle), q += F' gd */
                for (int64_t i = 0; i < n; ++i) {
                    VEC gi = v[i];
                    VEC *Wi = W + i * p;
                    for (int64_t j = 0; j < p; ++j)
                        Wi[j] = zero;
                    for (int64_t k = 0; k < n; ++k) {
                        const VEC vik = V[i * n + k];
                        const VEC *Fk = Fv + k * p;
                        for (int64_t j = 0; j < p; ++j)
                            Wi[j] += vik * Fk[j];
                        gi += vik * g[k];
                    }
                    gd[i] = gi;
                }
                for (int64_t i = 0; i < p; ++i) {
                    VEC qi = q[i];
                    VEC *Qi = Q + i * p;
                    for (int64_t k = 0; k < n; ++k) {
                        const VEC fki = Fv[k * p + i];
                        const VEC *Wk = W + k * p;
                        for (int64_t j = i; j < p; ++j)
                            Qi[j] += fki * Wk[j];
                        qi += fki * gd[k];
                    }
                    q[i] = qi;
                    for (int64_t j = i + 1; j < p; ++j)
                        Q[j * p + i] = Qi[j];
                }
            }
            if (fr != NULL) {  /* held controls: identity rows of Q_uu, zero rows of [q_u | Q_ux] */
                for (int s = 0; s < LANES; ++s) {
                    const int64_t b = b0 + (s < lanes ? s : lanes - 1);
                    const uint8_t *ft = fr + b * sfr[0] + t * sfr[1];
                    for (int64_t a = 0; a < m; ++a) {
                        if (ft[a * sfr[2]])
                            continue;
                        const int64_t ra = (n + a) * p;
                        for (int64_t j = 0; j < p; ++j)
                            Q[ra + j][s] = 0;
                        for (int64_t j = n; j < p; ++j)
                            Q[j * p + n + a][s] = 0;
                        Q[ra + n + a][s] = 1;
                        q[n + a][s] = 0;
                    }
                }
            }
            /* Cholesky factor of Q_uu (lower) */
            int32_t bad[LANES] = {0};
            for (int64_t i = 0; i < m; ++i) {
                for (int64_t j = 0; j <= i; ++j) {
                    VEC sum = Q[(n + i) * p + n + j];
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
                    VEC sum = r == 0 ? -q[n + i] : -Q[(n + i) * p + r - 1];
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
                        Hk += Q[(n + a) * p + n + j] * Y[j * nh];
                    dv0 += ka * q[n + a];
                    dv1 += (REAL)0.5 * ka * Hk;
                }
            }
            /* V = Q_xx + Q_xu K (upper triangle, mirrored), v = q_x + Q_xu k */
            for (int64_t i = 0; i < n; ++i) {
                VEC vi = q[i];
                VEC *Vi = V + i * n;
                const VEC *Qi = Q + i * p;
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
            }
        }
        if (dV != NULL)
            for (int s = 0; s < lanes; ++s) {
                dV[(b0 + s) * 2] = dv0[s];
                dV[(b0 + s) * 2 + 1] = dv1[s];
            }
    }
    free(buf);
    return 0;
}
