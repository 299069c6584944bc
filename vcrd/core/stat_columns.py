"""The per-row statistics columns every statistics sweep writes, named once for the dense and the sparse
teacher (SPEC §2 and the parts the gradient sweeps and the CE term need).

``lse_s, lse_u``: the tempered LSEs; ``lp_s, lp_u``: the label's log-probs; ``lq_as, lq_au``: the teacher's
log-prob of each model's argmax; ``H_u, CE_su``; ``D``; ``agree`` (1.0 where the argmaxes match);
``lse_untempered``: ``logsumexp(s)`` for the CE term; each LSE in parts, ``max_*`` (the raw row maximum)
and ``log_sum_*`` (``log Σ exp((x - max)/T)``), and ``log_sum_untempered`` at T = 1; ``zf, qf``: a sparse
teacher's tempered log-prob and prob of a token off its top-K (0 for a dense teacher); ``kl_pm``: the row
a divergence given by element-wise terms needs for its gradient (JSD's ``KL(p‖m)``; 0 otherwise).
"""

from __future__ import annotations

STAT_COLUMNS = ("lse_s", "lse_u", "lp_s", "lp_u", "lq_as", "lq_au", "H_u", "CE_su", "D", "agree", "lse_untempered",
                "max_s", "max_u", "log_sum_s", "log_sum_u", "log_sum_untempered", "zf", "qf", "kl_pm")

__all__ = ["STAT_COLUMNS"]
