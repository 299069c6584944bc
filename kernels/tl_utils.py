"""The pieces every vcrd kernel shares, as small ``@triton.jit`` helpers (inlined where they are called).

- the statistics columns (:data:`vcrd.core.stat_columns.STAT_COLUMNS`, named once for the dense and the
  sparse kernels) as ``COL_*`` constexprs, and the divergence codes of the ``DIVERGENCE`` constexpr;
- the online log-sum-exp lane update (per-lane running maximum and sums rescaled when it grows, as in
  flash-attention's online softmax) and the combination of the lanes after the loop;
- the element-wise divergence helpers: for ``DIVERGENCE >= POINTWISE`` (JSD, any divergence given by sums of
  element-wise terms) ``pointwise_terms`` / ``pointwise_finish`` give ``D`` and the row its gradient needs,
  and ``divergence_grad`` gives ``∂D/∂(s/T)`` element-wise (the CPU formulas of
  :mod:`vcrd.backends.divergences`, in Triton);
- the epilogues of an ignored row (zeros, reading no logits).

Overflow: differences are taken on logits times the power of two ``c = scale`` of
:func:`vcrd.core.overflow.overflow_scale` (``inv_scale = 1/c``), so logits anywhere in fp32's range give a
finite result wherever the true one is (see docs/numerics.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from vcrd.core.stat_columns import STAT_COLUMNS

# The columns of every statistics kernel's [N, NUM_STATS] fp32 output (one list: vcrd.core.stat_columns)
NUM_STATS = len(STAT_COLUMNS)
COL_LSE_S = tl.constexpr(STAT_COLUMNS.index("lse_s"))
COL_LSE_U = tl.constexpr(STAT_COLUMNS.index("lse_u"))
COL_LP_S = tl.constexpr(STAT_COLUMNS.index("lp_s"))
COL_LP_U = tl.constexpr(STAT_COLUMNS.index("lp_u"))
COL_LQ_AS = tl.constexpr(STAT_COLUMNS.index("lq_as"))
COL_LQ_AU = tl.constexpr(STAT_COLUMNS.index("lq_au"))
COL_H_U = tl.constexpr(STAT_COLUMNS.index("H_u"))
COL_CE_SU = tl.constexpr(STAT_COLUMNS.index("CE_su"))
COL_D = tl.constexpr(STAT_COLUMNS.index("D"))
COL_AGREE = tl.constexpr(STAT_COLUMNS.index("agree"))
COL_LSE_UNTEMPERED = tl.constexpr(STAT_COLUMNS.index("lse_untempered"))
COL_MAX_S = tl.constexpr(STAT_COLUMNS.index("max_s"))
COL_MAX_U = tl.constexpr(STAT_COLUMNS.index("max_u"))
COL_LOG_SUM_S = tl.constexpr(STAT_COLUMNS.index("log_sum_s"))
COL_LOG_SUM_U = tl.constexpr(STAT_COLUMNS.index("log_sum_u"))
COL_LOG_SUM_UNTEMPERED = tl.constexpr(STAT_COLUMNS.index("log_sum_untempered"))
COL_ZF = tl.constexpr(STAT_COLUMNS.index("zf"))
COL_QF = tl.constexpr(STAT_COLUMNS.index("qf"))
COL_KL_PM = tl.constexpr(STAT_COLUMNS.index("kl_pm"))
NUM_STATS_C = tl.constexpr(NUM_STATS)
NUM_STATS_POW2 = tl.constexpr(triton.next_power_of_2(NUM_STATS))

# divergence codes (the kernels' DIVERGENCE constexpr); codes from POINTWISE on are given by element-wise terms
FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
POINTWISE = tl.constexpr(2)
DIVERGENCE_CODES = {"fkl": FKL.value, "rkl": RKL.value, "jsd": JSD.value}

# A lane's running maximum before it has seen a finite logit: -FLT_MAX, finite (so no -inf - -inf =
# NaN inside the loop) and <= every finite fp32 logit (so each one counts); differences against it
# are finite once scaled by the overflow scale, and a lane's first rescale factor multiplies zeros.
LOWEST_LOGIT = tl.constexpr(-3.4028234663852886e38)
TINY = tl.constexpr(1.1754943508222875e-38)  # the smallest normal fp32: log m is clamped there (as on CPU)
INT32_MAX = tl.constexpr(2147483647)


def launch_config(V: int) -> dict:
    """``BLOCK_V`` (next power of two of V, at most 512) and ``num_warps`` (4): 4 elements per thread
    per tensor. The kernels keep per-lane accumulators (one register per element per thread for
    each), so registers grow with elements per thread: at 4 the statistics kernel needs ~72-80
    registers (5-7 CTAs per SM), at 8 ~164, at 16 all 255 (see ``vcrd aot`` and docs/kernels.md)."""
    return {"BLOCK_V": min(triton.next_power_of_2(V), 512), "num_warps": 4}


@triton.jit
def program_row(labels_ptr):
    """This program's row (int64: a row offset times a row stride exceeds 2³¹) and its label (negative: an
    ignored row, which reads no logits)."""
    row = tl.program_id(0).to(tl.int64)
    return row, tl.load(labels_ptr + row)


@triton.jit
def student_lse_parts(stats):
    """The student's LSE of a row in parts, from its statistics: ``(raw row maximum, log Σe at T, log Σe at 1)``."""
    return tl.load(stats + COL_MAX_S), tl.load(stats + COL_LOG_SUM_S), tl.load(stats + COL_LOG_SUM_UNTEMPERED)


@triton.jit
def row_coefficients(coef_ptr, row, inv_T):
    """``(coef_kd / T, coef_ce)`` of a row (``coef [N, 2]``)."""
    return tl.load(coef_ptr + 2 * row) * inv_T, tl.load(coef_ptr + 2 * row + 1)


@triton.jit
def online_lane_update(v, lane_max, inv_T, scale, inv_scale):
    """One element per lane into running (max, Σ exp((v - max)/T)) accumulators, with one exp.

    Returns ``(new_max, grew, rel, shift, rescale, weight)``: ``rel = c·(v - new_max)/T`` (<= 0, -inf for
    masked entries), ``shift = c·(new_max - lane_max)/T`` (>= 0), ``rescale = exp(-shift/c)`` for the old
    sums and ``weight = exp(rel/c)`` for the new element. Exactly one of them is not 1, so both come
    from ``exp((rel - shift)/c)``. ``rel`` and ``shift`` are finite for any fp32 logits (T >= 1), and so
    are sums of them times weights <= 1. A NaN element gives a NaN weight and leaves the maximum alone.
    """
    grew = v > lane_max
    new_max = tl.where(grew, v, lane_max)
    scale_T = scale * inv_T
    rel = v * scale_T - new_max * scale_T
    shift = new_max * scale_T - lane_max * scale_T
    t = tl.exp((rel - shift) * inv_scale)
    rescale = tl.where(grew, t, 1.0)
    weight = tl.where(grew, 1.0, t)
    return new_max, grew, rel, shift, rescale, weight


@triton.jit
def untempered_lane_sum(v, lane_max, lane_sum_1, NEED: tl.constexpr):
    """``Σ exp(v - lane max)`` at temperature 1 (the CE term's LSE at T != 1), updated before the maximum is."""
    if NEED:
        _, _, _, _, rescale_1, e_1 = online_lane_update(v, lane_max, 1.0, 1.0, 1.0)
        lane_sum_1 = rescale_1 * lane_sum_1 + e_1
    return lane_sum_1


@triton.jit
def combine_lanes(lane_max, lane_sum, inv_T, scale, inv_scale):
    """The row maximum, each lane's ``shift`` (``c·(row max - lane max)/T``) and ``rescale`` to it, and the
    row's ``Σ exp((v - row max)/T)`` from the lanes' own."""
    row_max = tl.max(lane_max, 0)
    shift = (row_max * scale - lane_max * scale) * inv_T
    rescale = tl.exp(-shift * inv_scale)
    return row_max, shift, rescale, tl.sum(rescale * lane_sum, 0)


@triton.jit
def weighted_or_zero(weight, value):
    """``weight · value`` with ``0 · (±inf) = 0``: a masked entry (weight 0) adds nothing."""
    return tl.where(weight > 0, weight * value, 0.0)


@triton.jit
def lane_argmax(lane_max, lane_arg, row_max):
    """Lowest index among the lanes holding the row maximum (each lane keeps its first maximum)."""
    return tl.min(tl.where(lane_max == row_max, lane_arg, INT32_MAX), 0)


@triton.jit
def log_mixture(p, q, beta):
    """``log m``, ``m = β q + (1-β) p``, clamped at the smallest normal float (NaN stays NaN)."""
    m = beta * q + (1.0 - beta) * p
    return tl.log(tl.where(m < TINY, TINY, m))


@triton.jit
def pointwise_terms(p, logp, q, logq, beta, DIVERGENCE: tl.constexpr):
    """The two element-wise summands of a divergence given by terms (``DIVERGENCE >= POINTWISE``);
    jsd: ``q (log q - log m)`` and ``p (log p - log m)``."""
    logm = log_mixture(p, q, beta)
    return weighted_or_zero(q, logq - logm), weighted_or_zero(p, logp - logm)


@triton.jit
def pointwise_finish(sum0, sum1, beta, DIVERGENCE: tl.constexpr):
    """``(D, the row its gradient needs)`` from the row sums of :func:`pointwise_terms`; jsd:
    ``(β KL(q‖m) + (1-β) KL(p‖m), KL(p‖m))``."""
    return beta * sum0 + (1.0 - beta) * sum1, sum1


@triton.jit
def divergence_grad(p, logp, q, logq, row, beta, DIVERGENCE: tl.constexpr):
    """``∂D/∂(s/T)`` element-wise: fkl ``p - q``, rkl ``p (log p - log q - D)``, jsd
    ``(1-β) p (log p - log m - KL(p‖m))`` (``row``: D, or the row the divergence's gradient needs)."""
    if DIVERGENCE == FKL:
        grad = p - q
    elif DIVERGENCE == RKL:
        grad = weighted_or_zero(p, logp - logq - row)
    else:
        grad = (1.0 - beta) * weighted_or_zero(p, logp - log_mixture(p, q, beta) - row)
    return grad


@triton.jit
def store_lse_columns(out, max_s, log_sum_s, max_u, log_sum_u, inv_T):
    """Both LSEs, whole (``max/T + log Σe``) and in parts (raw row maximum, log Σe relative to it: the
    gradient kernels and the CE term use the parts, whose sum rounds ``log Σe`` away when ``max/T`` is huge)."""
    tl.store(out + COL_LSE_S, max_s * inv_T + log_sum_s)
    tl.store(out + COL_LSE_U, max_u * inv_T + log_sum_u)
    tl.store(out + COL_MAX_S, max_s)
    tl.store(out + COL_MAX_U, max_u)
    tl.store(out + COL_LOG_SUM_S, log_sum_s)
    tl.store(out + COL_LOG_SUM_U, log_sum_u)


@triton.jit
def store_row_columns(out, H_u, CE_su, D, a_s, a_u, zf, qf, kl_pm):
    """``H_u, CE_su, D``, ``agree`` (``a_s == a_u``), a sparse teacher's ``zf, qf`` (0 for a dense one) and
    ``kl_pm`` (the row a divergence given by terms needs for its gradient; 0 until it is known)."""
    tl.store(out + COL_H_U, H_u)
    tl.store(out + COL_CE_SU, CE_su)
    tl.store(out + COL_D, D)
    tl.store(out + COL_AGREE, (a_s == a_u).to(tl.float32))
    tl.store(out + COL_ZF, zf)
    tl.store(out + COL_QF, qf)
    tl.store(out + COL_KL_PM, kl_pm)


@triton.jit
def store_untempered_columns(out, lane_max, row_max, lane_sum_1, log_sum_s, inv_T, NEED: tl.constexpr):
    """``logsumexp(s)`` (the CE term's LSE) and its ``log Σe`` part: from the untempered lane sums when
    ``NEED`` (T != 1), else the tempered ones (equal at T = 1)."""
    if NEED:
        log_sum_1 = tl.log(tl.sum(tl.exp(lane_max - row_max) * lane_sum_1, 0))
        tl.store(out + COL_LSE_UNTEMPERED, row_max + log_sum_1)
        tl.store(out + COL_LOG_SUM_UNTEMPERED, log_sum_1)
    else:
        tl.store(out + COL_LSE_UNTEMPERED, row_max * inv_T + log_sum_s)
        tl.store(out + COL_LOG_SUM_UNTEMPERED, log_sum_s)


@triton.jit
def store_zero_stats(out):
    """The ignored row's statistics: zeros in every column (no logits read)."""
    cols = tl.arange(0, NUM_STATS_POW2)
    tl.store(out + cols, tl.zeros([NUM_STATS_POW2], tl.float32), mask=cols < NUM_STATS_C)


@triton.jit
def store_zero_grad(g_row, V, BLOCK_V: tl.constexpr):
    """The ignored row's gradient: zeros over the vocabulary (no logits read)."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(g_row + offs, tl.zeros([BLOCK_V], g_row.dtype.element_ty), mask=offs < V)
