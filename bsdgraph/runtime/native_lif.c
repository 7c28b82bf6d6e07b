/* Fused LIF forward for the cpu backend (loaded by bsdgraph/runtime/native.py, which says why and how fast).

   Bit-identical to bsdgraph/runtime/cpu.py's _lif_loop: every expression below is the torch loop's expression
   in the same order, in fp32, and the file is compiled with -ffp-contract=off so that no multiply-add is fused.
   The products by s in {0, 1} are exact, so torch's own fused add-with-alpha rounds the same way. */

#include <stddef.h>
#include <stdint.h>

/* Neurons per block: a block's membranes stay in L1 (2 KiB) while its T steps run. */
#define BLOCK 512

enum { RESET_HARD_ZERO, RESET_HARD, RESET_SOFT };

static inline __attribute__((always_inline)) void
lif_block(const float *restrict cur, int64_t T, int64_t N, int64_t n0, int64_t nb, float tau, float v_th,
          float v_reset, const int mode, const float *restrict v_init, uint8_t *restrict spikes,
          float *restrict hs, const int want_h)
{
    float v[BLOCK];
    for (int64_t j = 0; j < nb; j++)
        v[j] = v_init ? v_init[n0 + j] : 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const float *restrict in = cur + t * N + n0;
        uint8_t *restrict so = spikes + t * N + n0;
        float *restrict ho = want_h ? hs + t * N + n0 : NULL;
        for (int64_t j = 0; j < nb; j++) {
            float leak = mode == RESET_HARD_ZERO ? v[j] : v[j] - v_reset;
            float h = ((in[j] - leak) / tau) + v[j];
            int fired = h >= v_th;
            float s = (float)fired; /* `fired ? 1.0f : 0.0f` kept GCC 12 from vectorising */
            so[j] = (uint8_t)fired;
            if (want_h)
                ho[j] = h;
            if (mode == RESET_SOFT)
                v[j] = h - v_th * s;
            else if (mode == RESET_HARD_ZERO)
                v[j] = h - h * s; /* +0 where it fired, as torch's h.sub_(h * fired) */
            else
                v[j] = h * (1.0f - s) + v_reset * s;
        }
    }
}

/* current, spikes, hs: [T, N] contiguous; v_init: [N] or NULL; hs may be NULL. mode: the enum above, chosen by
   the caller with the torch loop's own test (v_reset == 0 on the Python float). */
void bsd_lif_forward(const float *cur, int64_t T, int64_t N, float tau, float v_th, float v_reset, int mode,
                     const float *v_init, uint8_t *spikes, float *hs, int nthreads)
{
    int64_t nblocks = (N + BLOCK - 1) / BLOCK;
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * N >= 16384)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * BLOCK, nb = N - n0 < BLOCK ? N - n0 : BLOCK;
        /* Constant mode and want_h in each call: the compiler then emits a branch-free vector loop for each of
           the six cases (with a run-time test inside, the loop was not vectorised: 1.4 ms against 0.2 ms). */
#define LIF_BLOCK(m, h, w) lif_block(cur, T, N, n0, nb, tau, v_th, v_reset, m, v_init, spikes, h, w)
        if (mode == RESET_SOFT)
            hs ? LIF_BLOCK(RESET_SOFT, hs, 1) : LIF_BLOCK(RESET_SOFT, NULL, 0);
        else if (mode == RESET_HARD_ZERO)
            hs ? LIF_BLOCK(RESET_HARD_ZERO, hs, 1) : LIF_BLOCK(RESET_HARD_ZERO, NULL, 0);
        else
            hs ? LIF_BLOCK(RESET_HARD, hs, 1) : LIF_BLOCK(RESET_HARD, NULL, 0);
#undef LIF_BLOCK
    }
}
