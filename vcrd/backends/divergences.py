"""The divergences D of SPEC §3 on the CPU side: one home each, shared by every CPU path.

A divergence is an object with the few formulas the paths need, each on ``[C]`` rows or ``[C, V]``
tiles of one chunk:

- ``dense_sums(t, beta)``: its ``[C]`` sums over the vocabulary from the dense statistics sweep's shifted
  rows ``t`` (:func:`vcrd.backends.torch_dense.row_sweep`), and ``dense_rows(sums, t, beta, scale)``: ``D`` (and
  the row its gradient needs) from those sums and ``t``'s ``[C]`` rows (:func:`vcrd.backends.torch_dense.finish_rows`);
- ``dense_grad(s, u, lse_s, lse_u, row, T, beta)``: ``∂D/∂(s/T)`` ``[C, V]`` from the logits and LSEs
  (``lse`` ``[C]`` or ``(max/T, log Σe)`` ``[C, 2]``: :func:`minus_lse`);
- ``sparse_rows(rows, c, beta)``: ``D`` on the completed top-K teacher (:mod:`vcrd.backends.torch_sparse`);
- ``grad(p, logp, q, logq, row, beta)``: ``∂D/∂(s/T)`` element-wise (the sparse path calls it off the
  top-K with the tail's ``qf, zf`` and at the K ids);
- ``shard_partial`` / ``shard_rows``: this vocabulary shard's partial sum and the combined ``D``
  (:mod:`vcrd.distributed.vocab_parallel`) when ``one_shard_sweep``; otherwise the shards exchange
  their sums of the element-wise ``terms`` once both global LSEs are known.

``fkl`` and ``rkl`` have closed forms that stay finite for any fp32 logits; ``jsd`` is a
:class:`PointwiseDivergence`: ``D`` a function of sums of element-wise ``terms(p, logp, q, logq)``,
from which every path above is derived. A new divergence is usually one such subclass (three short
methods) and one line in :data:`DIVERGENCES`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

Rows = Dict[str, torch.Tensor]


def weighted(w: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``w · log_ratio`` with ``0 · anything = 0`` (the ``0 log 0`` terms of a divergence vanish)."""
    return torch.where(w > 0, w * log_ratio, 0.0)


def log_mixture(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """``log m`` with ``m = β q + (1-β) p``, from the probabilities themselves (one log per element;
    clamped at the smallest normal float so a subnormal ``p`` never meets ``log 0``)."""
    return (beta * q + (1 - beta) * p).clamp_min(torch.finfo(p.dtype).tiny).log()


def minus_lse(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``x - lse`` for ``x [C, V]`` and ``lse [C]``, or ``lse [C, 2]`` holding ``(max, log Σe)``: then
    ``(x - max) - log Σe``, exact for ties at a maximum so large that ``max + log Σe`` rounds to ``max``."""
    if lse.dim() == 2:
        return (x - lse[:, :1]) - lse[:, 1:]
    return x - lse[:, None]


def log_probs(s: torch.Tensor, u: torch.Tensor, lse_s: torch.Tensor, lse_u: torch.Tensor,
              temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``log p = s/T - lse_s``, ``log q = u/T - lse_u`` ``[C, V]`` (:func:`minus_lse`); ``-inf`` only where
    the true value is below fp32's range."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    return minus_lse(s.to(dtype) / temperature, lse_s), minus_lse(u.to(dtype) / temperature, lse_u)


def write_gradient(out: torch.Tensor, s: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, grad_D: torch.Tensor,
                   lse_untempered: Optional[torch.Tensor], coef_kd: torch.Tensor, coef_ce: torch.Tensor,
                   temperature: float, with_ce: bool) -> None:
    """``out = coef_kd/T ⊙ ∂D/∂(s/T) + coef_ce ⊙ (softmax(s) - onehot(y))`` ``[C, V]`` in valid rows, 0 elsewhere.

    Entries below the smallest normal float become 0 (they make CPU GEMMs on the gradient ~5×
    slower); NaN is kept (SPEC §6: never a finite gradient beside a NaN loss).
    """
    grad = (coef_kd / temperature)[:, None] * grad_D
    if with_ce:
        grad = grad + coef_ce[:, None] * minus_lse(s.to(grad.dtype), lse_untempered).exp()
        grad = grad.scatter_add(1, y[:, None], -coef_ce[:, None])
    flush = grad.abs() < torch.finfo(grad.dtype).tiny
    out.copy_(torch.where(valid[:, None] & ~flush, grad, 0.0))


class Divergence:
    """The formulas of one divergence for every CPU path (see the module docstring). ``grad_row`` names
    the ``[C]`` row the gradient needs (``D`` itself, or another sum such as JSD's ``KL(p‖m)``)."""

    name = ""
    grad_row = "D"
    # D from sums against each row's own maxima: vocab-parallel, one exchange of shard_partial (else a second
    # one); the dense CPU path, its sums in the statistics sweep (else a second sweep once both LSEs are known)
    one_shard_sweep = True

    def dense_sums(self, t: Rows, beta: float) -> Tuple[torch.Tensor, ...]:
        """``[C]`` sums over the vocabulary of the shifted rows ``t`` (``xs, zs, xc, zc, es, eu`` ``[C, V]``;
        ``sum_s, sum_u, log_sum_s, log_sum_u`` ``[C]``); reductions only."""
        raise NotImplementedError

    def dense_rows(self, sums: Tuple[torch.Tensor, ...], t: Rows, beta: float, scale: float) -> Rows:
        """``D`` (and ``grad_row``) ``[C]`` from :meth:`dense_sums` and ``t``'s ``sum_*``, ``log_sum_*`` ``[C]``."""
        raise NotImplementedError

    def dense_grad(self, s, u, lse_s, lse_u, row, temperature: float, beta: float) -> torch.Tensor:
        logp, logq = log_probs(s, u, lse_s, lse_u, temperature)
        return self.grad(logp.exp(), logp, logq.exp(), logq, row[:, None], beta)

    def sparse_rows(self, rows: Rows, c: Rows, beta: float) -> Rows:
        raise NotImplementedError

    def grad(self, p, logp, q, logq, row, beta: float) -> torch.Tensor:
        raise NotImplementedError

    def shard_partial(self, xs, zs, es, eu) -> Optional[torch.Tensor]:
        """This shard's ``[C]`` partial sum against its local maxima (None when not ``one_shard_sweep``)."""
        return None

    def shard_rows(self, B: torch.Tensor, g: Rows) -> Rows:
        """``D`` from the shards' partials ``B [world, C]`` and the combine's rescaling factors ``g``."""
        raise NotImplementedError


class ClosedFormKL(Divergence):
    """``KL(a‖b)`` between the two tempered distributions in one sweep of each chunk (``a`` the teacher ``"u"``
    and ``b`` the student ``"s"`` for fkl, the other way round for rkl): ``Σ e_a (a' - b') / Σ e_a + log Σ e_b -
    log Σ e_a`` on the rows shifted by their maxima, finite for any fp32 logits."""

    a, b = "u", "s"
    LOGITS = {"s": "xc", "u": "zc"}

    def dense_sums(self, t: Rows, beta: float) -> Tuple[torch.Tensor, ...]:
        a, b, c = self.a, self.b, self.LOGITS
        return (weighted(t["e" + a], t[c[a]] - t[c[b]]).sum(-1),)

    def dense_rows(self, sums: Tuple[torch.Tensor, ...], t: Rows, beta: float, scale: float) -> Rows:
        a, b = self.a, self.b
        return dict(D=sums[0] / t["sum_" + a] * (1.0 / scale) + t["log_sum_" + b] - t["log_sum_" + a])

    def shard_partial(self, xs, zs, es, eu) -> torch.Tensor:
        shifted, e = {"s": xs, "u": zs}, {"s": es, "u": eu}
        return weighted(e[self.a], shifted[self.a] - shifted[self.b]).sum(-1)

    def shard_rows(self, B: torch.Tensor, g: Rows) -> Rows:
        a, b = self.a, self.b
        rescaled = g["c" + a] * (B + g["part_sum_" + a] * (g["d" + a] - g["d" + b]))
        return dict(D=rescaled.sum(0) / g["sum_" + a] + g["L" + b.upper()] - g["L" + a.upper()])


class ForwardKL(ClosedFormKL):
    """``D = KL(q‖p) = Σ q (log q - log p)``; ``∂D/∂(s/T) = p - q``."""

    name = "fkl"
    a, b = "u", "s"

    def dense_grad(self, s, u, lse_s, lse_u, row, temperature: float, beta: float) -> torch.Tensor:
        logp, logq = log_probs(s, u, lse_s, lse_u, temperature)
        return logp.exp() - logq.exp()

    def sparse_rows(self, rows: Rows, c: Rows, beta: float) -> Rows:
        """``D = Σ_k qk (zq - lp_k) + Σ_{v∉I} qf (zf - lp_v)``, ``Σ_{v∉I} lp_v = Σ_v lp_v - Σ_k lp_k``."""
        off_top_lp = c["xs"].sum(-1) - c["lpk"].sum(-1) - c["xs"].shape[-1] * c["log_sum_s"]
        tail_kl = torch.where(c["Q"] > 0, c["Q"] * c["zf"] - c["qf"] * off_top_lp, 0.0)
        return dict(D=weighted(c["qk"], c["zq"] - c["lpk"]).sum(-1) + tail_kl)

    def grad(self, p, logp, q, logq, row, beta: float) -> torch.Tensor:
        return p - q


class ReverseKL(ClosedFormKL):
    """``D = KL(p‖q) = Σ p (log p - log q)``; ``∂D/∂(s/T) = p ⊙ (log p - log q - D)``."""

    name = "rkl"
    a, b = "s", "u"

    def dense_grad(self, s, u, lse_s, lse_u, row, temperature: float, beta: float) -> torch.Tensor:
        """Taken on halves and doubled once (bit-identical where nothing overflows): ``log p - log q`` can
        exceed fp32's range where the product with ``p`` does not."""
        dtype = torch.promote_types(s.dtype, torch.float32)
        logp = minus_lse(s.to(dtype) / temperature, lse_s)
        half_logq = minus_lse(u.to(dtype) / temperature * 0.5, lse_u * 0.5)
        p = logp.exp()
        return torch.where(p > 0, p * ((logp * 0.5 - half_logq) - row[:, None] * 0.5) * 2, 0.0)

    def sparse_rows(self, rows: Rows, c: Rows, beta: float) -> Rows:
        """``D = Σ_v p lp - Σ_v p log q = Σ_v p lp + CE_su``."""
        return dict(D=weighted(c["es"], c["xs"]).sum(-1) / c["sum_s"] - c["log_sum_s"] + rows["CE_su"])

    def grad(self, p, logp, q, logq, row, beta: float) -> torch.Tensor:
        return weighted(p, logp - logq - row)


class PointwiseDivergence(Divergence):
    """A divergence given by sums of element-wise terms: ``terms(p, logp, q, logq, beta)`` → a tuple of
    ``[..., V]`` summands, ``finish(sums, beta)`` → ``D`` (and ``grad_row``) from their ``[C]`` sums over
    the vocabulary, and the element-wise ``grad``. Every CPU path follows from these three:

    - dense: the sums over the row;
    - sparse (top-K teacher, tail ``qf``/``zf`` on the ``V - K`` other tokens): the row swept as if every
      token were off the top-K, then corrected at the K ids (O(K) teacher work);
    - vocab-parallel: the shards' sums, exchanged once both global LSEs are known.
    """

    one_shard_sweep = False

    def terms(self, p, logp, q, logq, beta: float) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def finish(self, sums: Tuple[torch.Tensor, ...], beta: float) -> Rows:
        raise NotImplementedError

    def sums(self, p, logp, q, logq, beta: float) -> Tuple[torch.Tensor, ...]:
        return tuple(term.sum(-1) for term in self.terms(p, logp, q, logq, beta))

    def dense_sums(self, t: Rows, beta: float) -> Tuple[torch.Tensor, ...]:
        logp, logq = t["xs"] - t["log_sum_s"][:, None], t["zs"] - t["log_sum_u"][:, None]
        p, q = t["es"] / t["sum_s"][:, None], t["eu"] / t["sum_u"][:, None]
        return self.sums(p, logp, q, logq, beta)

    def dense_rows(self, sums: Tuple[torch.Tensor, ...], t: Rows, beta: float, scale: float) -> Rows:
        return self.finish(sums, beta)

    def sparse_rows(self, rows: Rows, c: Rows, beta: float) -> Rows:
        p, lp = c["es"] / c["sum_s"][:, None], c["xs"] - c["log_sum_s"][:, None]
        qf, zf = c["qf"][:, None], c["zf"][:, None]
        off = self.sums(p, lp, qf, zf, beta)  # every token as if off the top-K
        off_k = self.sums(c["pk"], c["lpk"], qf, zf, beta)
        at_k = self.sums(c["pk"], c["lpk"], c["qk"], c["zq"], beta)
        return self.finish(tuple(a - b + k for a, b, k in zip(off, off_k, at_k)), beta)

    def shard_terms(self, x, z, lse_s, lse_u, temperature: float, beta: float) -> torch.Tensor:
        """``[C, J]``: this shard's sums of the terms, given the global LSEs ``[C]``."""
        logp, logq = x / temperature - lse_s[:, None], z / temperature - lse_u[:, None]
        return torch.stack(self.sums(logp.exp(), logp, logq.exp(), logq, beta), -1)


class JensenShannon(PointwiseDivergence):
    """``D = β KL(q‖m) + (1-β) KL(p‖m)``, ``m = β q + (1-β) p``; ``∂D/∂(s/T) = (1-β) p ⊙ (log p - log m -
    KL(p‖m))`` (its ``grad_row`` is ``kl_pm = KL(p‖m)``)."""

    name = "jsd"
    grad_row = "kl_pm"

    def terms(self, p, logp, q, logq, beta: float) -> Tuple[torch.Tensor, ...]:
        logm = log_mixture(p, q, beta)
        return weighted(q, logq - logm), weighted(p, logp - logm)

    def finish(self, sums: Tuple[torch.Tensor, ...], beta: float) -> Rows:
        kl_qm, kl_pm = sums
        return dict(D=beta * kl_qm + (1 - beta) * kl_pm, kl_pm=kl_pm)

    def grad(self, p, logp, q, logq, row, beta: float) -> torch.Tensor:
        return (1 - beta) * weighted(p, logp - log_mixture(p, q, beta) - row)


DIVERGENCES: Dict[str, Divergence] = {d.name: d for d in (ForwardKL(), ReverseKL(), JensenShannon())}

__all__ = ["DIVERGENCES", "ClosedFormKL", "Divergence", "ForwardKL", "JensenShannon", "PointwiseDivergence",
           "ReverseKL", "log_mixture", "log_probs", "minus_lse", "weighted", "write_gradient"]
