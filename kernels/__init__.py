"""Triton kernels and their launchers (installed as ``vcrd.kernels``): pure Triton, no autograd.

- :mod:`.stats`: one streaming read of both logits → per-row statistics (LSEs, label log-probs,
  argmaxes and the teacher's judgement of them, H_u, CE_su, fkl/rkl D).
- :mod:`.grad`: second sweep → the student-logit gradient (and JSD's D).
- :mod:`.label_logprob`: per-row LSE and label log-prob, no [N, V] output.
"""
