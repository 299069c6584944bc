"""The suite's shared helpers, in one module (tests import them from here, never from another test module).

- realistic logits, step ids, ignored rows and the three-way parity rule of DESIGN.md (``parity_check``:
  ``|impl - truth| <= 2·|base - truth| + tol[dtype]·max|truth|``), on the loss and every gradient;
- the logits-level batch and configs the CPU path, Triton and parity-helper tests share;
- starting multi-process tests without a port race (:func:`spawn`, :func:`torchrun`), vocabulary shard
  layouts and a collective counter;
- counting the bytes Triton kernels load and store under the interpreter (:class:`TrafficCounter`);
- tiny Hugging Face models, the trainer's setup and ``vcrd train`` workspaces (tests/train, tests/distributed,
  tests/select), the teacher cache's rows, and the fused-linear loss's parity harness (``linear_heads``,
  ``fused_three_way``).

The suite runs vcrd's default settings (``torch.compile`` of the CPU path's per-chunk math, 64-row
chunks): nothing here sets a ``VCRD_*`` variable. A test that means the eager path sets
``VCRD_COMPILE=0`` itself (``monkeypatch.setenv``), and says so.

Multi-process tests: :func:`spawn` runs ``worker(rank, world, *args)`` in ``world`` spawned processes whose
gloo process group is already initialised through a rendezvous FILE in a fresh temporary folder
(``init_method="file://..."``): no port is picked in one process and bound later in another. The torchrun
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) are set, so the Hugging
Face Trainer / accelerate adopt the group as they would under torchrun. :func:`torchrun` runs ``torchrun
--standalone --nproc_per_node N -m MODULE ARGS`` as a subprocess (the standalone rendezvous binds port 0
itself, and the workers reuse its store: race-free too).

Traffic: every load and store of the interpreter goes through ``InterpreterBuilder.create_masked_load`` /
``create_masked_store`` (the unmasked forms call them), so wrapping those two and summing mask-true
elements × item size gives exact counts, attributed to named tensors by address.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from vcrd import VCRDConfig, fused_linear_vcrd_loss, vcrd_loss
from vcrd.app.synthetic import make_dataset
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.distributed.ranks import exit_without_teardown
from vcrd.train.data import DistillCollator, Example

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def realistic_logits(n: int, V: int, *, std: float = 10.0, agreement: float = 0.8, seed: int = 0,
                     dtype=torch.float32):
    """Student/teacher logits like trained LMs': ``randn·std`` with correlated teacher and student.

    ``agreement`` in [0, 1] mixes the student into the teacher (1 → near-equal models). Labels are
    the teacher's trace: mostly its argmax, some sampled from its distribution, some random.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, V, generator=g, dtype=torch.float64) * std
    noise = torch.randn(n, V, generator=g, dtype=torch.float64) * std
    s = agreement * u + (1 - agreement ** 2) ** 0.5 * noise
    pick = torch.rand(n, generator=g)
    sampled = torch.multinomial(torch.softmax(u / std * 3, -1).float(), 1, generator=g).squeeze(1)
    y = torch.where(pick < 0.5, u.argmax(-1), torch.where(pick < 0.8, sampled, torch.randint(0, V, (n,), generator=g)))
    return s.to(dtype), u.to(dtype), y


def step_ids_for(n: int, seed: int = 0, p_new: float = 0.2) -> torch.Tensor:
    """Non-decreasing step ids starting at 0 (a new step with probability ``p_new`` per token)."""
    g = torch.Generator().manual_seed(seed + 1)
    new = (torch.rand(n, generator=g) < p_new).long()
    new[:1] = 0
    return torch.cumsum(new, 0)


def ignore_some(y: torch.Tensor, frac: float = 0.2, seed: int = 0, ignore_index: int = -100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return torch.where(torch.rand(y.shape, generator=g) < frac, torch.full_like(y, ignore_index), y)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# The three-way parity rule
# ---------------------------------------------------------------------------------------------

def base_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of "base" for a test in ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def parity_check(impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """``(ok, message)`` for ``max|impl - truth| <= 2·max|base - truth| + tol[dtype]·max|truth|``.

    The three tensors (a loss or a gradient) come from the same, already rounded inputs:

    - ``truth``: the reference formula (``impl="reference"``) in float64.
    - ``base``: the same reference formula at the precision the implementation computes in. SPEC §1
      says every implementation computes in fp32 whatever the input dtype (bf16/fp16 logits are
      upcast before the softmax; the reference itself upcasts them), so for fp32/bf16/fp16 tests
      ``base`` is the reference run on the fp32 upcast of the (rounded) inputs, with its gradient
      kept in fp32 (:func:`base_dtype`); for fp64 tests it is fp64. ``2·|base - truth|`` therefore
      only admits the fp32 arithmetic noise of the formula itself (large where the formula is ill
      conditioned, e.g. a steep weight sigmoid), never the rounding of the inputs (shared by all
      three) and never a "the dtype is coarse" allowance: that is ``tol[dtype]``.
    - ``impl``: the implementation under test, in the test dtype (a bf16 input gives a bf16
      gradient; its output rounding, <= 2^-8 relative per rounding, is what ``tol[bf16] = 1e-2`` covers).

    ``tol[dtype]`` scales with ``max|truth|``: an absolute tolerance lets an all-zero gradient pass
    whenever the gradient is smaller than the tolerance (it did, for bf16, in the first version).
    Non-finite entries must match exactly (same NaN positions, same infinities); the bound is
    checked on the finite ones. ``tests/core/test_parity_helper.py`` proves this rejects a zeroed and a
    halved gradient for every dtype.
    """
    if impl.shape != truth.shape or base.shape != truth.shape:
        return False, f"shapes differ: impl {tuple(impl.shape)}, base {tuple(base.shape)}, truth {tuple(truth.shape)}"
    a, b, t = impl.detach().double(), base.detach().double(), truth.detach().double()
    finite = t.abs() < torch.inf  # False at NaN and ±inf
    if not torch.equal(torch.isnan(a), torch.isnan(t)) or not torch.equal(torch.where(finite, 0.0, t).nan_to_num(),
                                                                          torch.where(finite, 0.0, a).nan_to_num()):
        return False, (f"non-finite entries differ: impl has {int((~(a.abs() < torch.inf)).sum())}, truth has "
                       f"{int((~finite).sum())}")
    if not bool(finite.any()):
        return True, "no finite entries"
    err = lambda x: torch.where(finite, (x - t).abs(), 0.0).max().item()  # noqa: E731  (NaN propagates)
    e_impl, e_base = err(a), err(b)
    scale = torch.where(finite, t.abs(), 0.0).max().item()
    bound = 2 * e_base + TOL[dtype] * scale
    ok = e_impl <= bound  # False for NaN
    return ok, (f"max|impl - truth| = {e_impl:.3e} {'<=' if ok else '>'} 2·{e_base:.3e} + {TOL[dtype]:g}·{scale:.3e}"
                f" = {bound:.3e}")


def assert_parity(name: str, impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    """Assert the three-way rule of :func:`parity_check` (the loss, or one gradient)."""
    ok, message = parity_check(impl, base, truth, dtype)
    assert ok, f"{name} ({dtype}): {message}"


def assert_parities(names: Sequence[str], impl: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
                    truth: Sequence[torch.Tensor], dtype) -> None:
    """:func:`assert_parity` for a loss and every gradient (all of them: a missing one fails)."""
    assert len(names) == len(impl) == len(base) == len(truth), "a loss or gradient is missing"
    for name, a, b, c in zip(names, impl, base, truth):
        assert_parity(name, a, b, c, dtype)


def upstream_gradient(shape: torch.Size, seed: int = 9) -> torch.Tensor:
    """A random upstream gradient (float64): magnitudes in [0.5, 1.5] with random signs, so it is
    never 1 and never near 0 (a near-zero upstream value would hide an error in its row)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return magnitude * sign


def run_with_grads(fn: Callable[..., torch.Tensor], leaves: List[Optional[torch.Tensor]], upstream: Optional[str],
                   seed: int = 9) -> List[torch.Tensor]:
    """``[loss, grad of each leaf]``: ``fn(*leaves)`` backpropagated with a random upstream gradient
    (``upstream="random"``) or ones. ``leaves`` are made leaves that require grad (None stays None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    g = upstream_gradient(loss.shape, seed) if upstream == "random" else torch.ones(loss.shape, dtype=torch.float64)
    loss.backward(g.to(loss.dtype))
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def logits_three_way(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, cfg, *, step_ids=None, reduction="mean",
                     upstream: Optional[str] = "random", impl: str = "torch", check: bool = True, seed: int = 9,
                     **kw) -> Dict[str, List[torch.Tensor]]:
    """Loss and student-logit gradient of ``vcrd_loss``: ``impl`` in the dtype of ``s`` and ``u``
    (already rounded), against the reference in float64 (truth) and at :func:`base_dtype` (base),
    all on the same rounded inputs and with the same random upstream gradient; then the three-way
    rule on the loss and the gradient. Returns ``{"impl", "base", "truth": [loss, grad]}``."""
    from vcrd import vcrd_loss

    dtype = s.dtype
    out = {}
    for name, run_dtype, which in [("impl", dtype, impl), ("base", base_dtype(dtype), "reference"),
                                   ("truth", torch.float64, "reference")]:
        fn = lambda x, which=which, run_dtype=run_dtype: vcrd_loss(  # noqa: E731
            x, u.to(run_dtype), y, step_ids=step_ids, config=cfg, reduction=reduction, impl=which, **kw)
        out[name] = run_with_grads(fn, [s.to(run_dtype)], upstream, seed)
    if check:
        assert_parities(("loss", "grad"), out["impl"], out["base"], out["truth"], dtype)
    return out


LOGITS_CONFIGS = {  # the configs of the logits-level parity tests (CPU path, Triton, helper)
    "kd": VCRDConfig.preset("kd"),
    "discord": VCRDConfig.preset("discord"),
    "vcrd": VCRDConfig.preset("vcrd"),
    "rkl-expected": VCRDConfig(divergence="rkl", validity="expected"),
    "jsd0.3-T2-ce": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5),
    "fkl-T2-tokens": VCRDConfig(temperature=2.0, normalize="tokens", window_steps=1),
}


def batch(N=63, V=1271, std=10.0, agreement=0.8, dtype=torch.float32, B=None, seed=0):
    s, u, y = realistic_logits(N, V, std=std, agreement=agreement, seed=seed)
    y = ignore_some(y, seed=seed)
    steps = step_ids_for(N, seed=seed)
    if B:
        s, u, y = s.reshape(B, N // B, V), u.reshape(B, N // B, V), y.reshape(B, N // B)
        steps = torch.stack([step_ids_for(N // B, seed=seed + b) for b in range(B)])
    return s.to(dtype), u.to(dtype), y, steps


def three_way(s, u, y, steps, cfg, reduction="mean", upstream="random", impl="torch", **kw):
    """Loss and gradient: ``impl`` in the input dtype vs the reference in fp64 (truth) and fp32
    (base), random upstream gradient (:func:`parity_check` documents the rule)."""
    return logits_three_way(s, u, y, cfg, step_ids=steps, reduction=reduction, upstream=upstream, impl=impl, **kw)


TIMEOUT_S = 120  # a collective waiting longer than this fails the test instead of hanging it


def _spawned_entry(rank: int, worker: Callable, world: int, init_method: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      VCRD_COMPILE="0")  # the eager CPU path: no torch.compile in every worker
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        worker(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    # a gloo group that DDP used can abort the interpreter's teardown (SIGABRT after a complete run:
    # vcrd.distributed.ranks.exit_without_teardown says why); end the worker as the CLI does
    exit_without_teardown(0)


def spawn(worker: Callable, world: int, *args) -> None:
    """Run ``worker(rank, world, *args)`` (a module-level function) on ``world`` gloo ranks; raises if any
    rank fails."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vcrd-rdzv-") as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_spawned_entry, args=(worker, world, init, args), nprocs=world, join=True,
                           start_method="spawn")


def torchrun(nproc: int, module: str, args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
             timeout: float = 300, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m module *args`` with this interpreter; its output
    captured (text). One torch thread per worker; ``env`` adds variables."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "VCRD_COMPILE": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    return subprocess.run(command, env=full, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def shard_layout(world: int, V: int, mode: str):
    """``[(start, width)]`` per rank: ``"even"`` splits (first shards one wider), ``"reversed"`` gives rank 0
    the last columns, ``"padded"`` gives every shard ceil(V/world) columns (the last runs past V)."""
    if mode == "padded":
        w = -(-V // world)
        return [(r * w, w) for r in range(world)]
    sizes = [V // world + (r < V % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    spans = list(zip(starts, sizes))
    return spans[::-1] if mode == "reversed" else spans


class CollectiveCounter:
    """Wraps ``dist.all_reduce`` and ``dist.all_gather_object`` and counts the calls."""

    def __init__(self, dist):
        self.dist, self.counts = dist, {"all_reduce": 0, "all_gather_object": 0}
        self.orig = {name: getattr(dist, name) for name in self.counts}
        for name in self.counts:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name):
        def call(*args, **kwargs):
            self.counts[name] += 1
            return self.orig[name](*args, **kwargs)
        return call

    def reset(self):
        for name in self.counts:
            self.counts[name] = 0

    def restore(self):
        for name, fn in self.orig.items():
            setattr(self.dist, name, fn)


class TrafficCounter:
    """``with TrafficCounter(s=s, u=u, grad=g) as t: ...`` then ``t.read["s"]``, ``t.written["grad"]`` (bytes)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.regions: Dict[str, tuple] = {
            name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()
        }
        self.read: Counter = Counter()
        self.written: Counter = Counter()

    def _count(self, counter: Counter, ptrs, mask, itemsize: int) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        counter["total"] += int(live.sum()) * itemsize
        for name, (lo, hi) in self.regions.items():
            counter[name] += int((live & (addr >= lo) & (addr < hi)).sum()) * itemsize

    def __enter__(self) -> TrafficCounter:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        self._saved = builder.create_masked_load, builder.create_masked_store
        load, store = self._saved
        counter = self

        def itemsize(ptrs) -> int:
            return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

        # the trailing cache/eviction arguments differ between triton versions (3.9: cache_policy,
        # is_volatile; 3.8: cache_modifier, eviction_policy, is_volatile): passed on as they come
        def masked_load(b, ptrs, mask, *rest):
            counter._count(counter.read, ptrs, mask, itemsize(ptrs))
            return load(b, ptrs, mask, *rest)

        def masked_store(b, ptrs, value, mask, *rest):
            counter._count(counter.written, ptrs, mask, itemsize(ptrs))
            return store(b, ptrs, value, mask, *rest)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        builder.create_masked_load, builder.create_masked_store = self._saved


# --- tiny models and training workspaces (tests/train, tests/distributed, tests/select) ------------------------------
KD = VCRDConfig.preset("kd")
WEIGHTED = VCRDConfig.preset("vcrd", normalize="weights")


def tiny_llama(tok, hidden: int, seed: int, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def make_setup():
    """Tokenizer, 16 terse problems (~140-310 tokens each), a 48-d teacher, the collator. The teacher's
    LM head is scaled up so that its distributions are peaked (logit std ~3, like a trained model's),
    not near-uniform like the fresh students': the losses and gradients are then far from zero."""
    tok = build_char_tokenizer()
    examples = [Example(p.question, p.solution("terse")) for p in make_dataset(16, seed=2)]
    teacher = tiny_llama(tok, 48, 1).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    return tok, examples, teacher, DistillCollator(tok, max_length=1024)


def student_like(teacher, seed: int, noise: float = 0.5):
    """A trainable copy of the teacher with every parameter perturbed by ``noise`` times its scale: it
    agrees with the teacher on ~40 % of the argmaxes, so the vcrd weights spread over (0, 1)."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            scale = p.std() if p.numel() > 1 and p.std() > 0 else p.abs().mean()
            p.add_(torch.randn(p.shape, generator=g) * noise * scale)
    return student


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def tiny_family(tok, family: str, seed: int):
    """A tiny Gemma-2 (final_logit_softcapping=30, its LM head scaled up so the cap bends its logits) or a
    tiny Granite (logits_scaling=8, logits divided by 8, head scaled up so the scaled logits stay peaked)."""
    import transformers as tr

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    if family == "gemma2":
        model = tr.Gemma2ForCausalLM(tr.Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0))
        boost = 150.0
    else:
        model = tr.GraniteForCausalLM(tr.GraniteConfig(**common, logits_scaling=8.0))
        boost = 200.0
    with torch.no_grad():
        model.lm_head.weight.mul_(boost)
    return model


def trainer_for(student, teacher, collate, examples, tmp_path, cfg, **overrides):
    from transformers import TrainingArguments

    from vcrd.train.trainer import VCRDTrainer

    args = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                train_sampling_strategy="sequential", disable_tqdm=True)
    args.update(overrides)
    return VCRDTrainer(model=student, teacher_model=teacher, vcrd_config=cfg, args=TrainingArguments(**args),
                       train_dataset=examples, data_collator=collate)


def assert_same_step(model, expected, init, what: str) -> None:
    """Every parameter equals the expected one within 1e-5 of its size, and its update (from ``init``)
    equals the expected update within 1e-5 of the largest update plus the fp32 rounding of the stored
    parameter (4 ulp), so a step scaled wrongly on any tensor fails even when that update is small."""
    before = dict(init.named_parameters())
    want = dict(expected.named_parameters()) if isinstance(expected, torch.nn.Module) else expected
    for name, p in model.named_parameters():
        p0, q = before[name].detach().double(), want[name].detach().double()
        step, step_ref = p.detach().double() - p0, q - p0
        assert step_ref.abs().max() > 0, f"{what} {name}: the step did not move this parameter"
        err = (step - step_ref).abs().max().item()
        bound = 1e-5 * step_ref.abs().max().item() + 4 * 2**-23 * p0.abs().max().item()
        assert err <= bound, f"{what} {name}: update differs by {err:.3e} > {bound:.3e}"
        assert rel_err(p.detach(), q) <= 1e-5, f"{what} {name}: parameters differ by {rel_err(p.detach(), q):.2e}"


def make_workspace(root, n_rows: int):
    """A teacher and a student model folder (with the char tokenizer) and ``n_rows`` data lines in ``root``."""
    tok = build_char_tokenizer()
    for name, hidden, seed in (("teacher", 48, 1), ("student", 32, 2)):
        tiny_llama(tok, hidden, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [{"prompt": p.question, "response": p.solution("terse")} for p in make_dataset(n_rows, seed=5)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, tok


def train_config(root, out, **over):
    cfg = {"teacher": str(root / "teacher"), "student": str(root / "student"), "data": str(root / "data.jsonl"),
           "output_dir": str(root / out), "max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1,
           "learning_rate": 3e-3, "max_length": 256, **over}
    path = root / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def saved_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


CACHE_K = 8


CACHE_ROWS = [{"prompt": f"What is {a}+{b}?", "response": f"First {a}+{b}. So {a + b}."}
        for a, b in ((1, 2), (13, 4), (7, 7), (20, 5), (3, 9), (11, 11))]


def tiny_model(kind: str, tok):
    """A tiny random model of another architecture: ``qwen3`` (q/k norms: the unpadded path), ``gpt2``
    (learned positions: Hugging Face's padded forward with shared prompt caches), ``mistral-sliding``
    (a sliding window: each window run with its whole prompt)."""
    import transformers as hf

    torch.manual_seed(1)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "qwen3":
        return hf.Qwen3ForCausalLM(hf.Qwen3Config(head_dim=16, **common)).eval()
    if kind == "mistral-sliding":
        return hf.MistralForCausalLM(hf.MistralConfig(sliding_window=4096, **common)).eval()
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()


# --- the fused-linear loss's parity harness (tests/loss, tests/backends, tests/core) ----------------------------------
def linear_heads(N=47, Hs=31, Ht=40, V=1271, Vt=None, bias=True, seed=0, dtype=torch.float32):
    """Hidden states and LM heads whose logits look like trained models' (std ~10, correlated)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, Hs, generator=g, dtype=torch.float64)
    Ws = torch.randn(V, Hs, generator=g, dtype=torch.float64) * (10 / Hs ** 0.5)
    ht = torch.cat([hs, torch.randn(N, Ht - Hs, generator=g, dtype=torch.float64)], 1) if Ht > Hs else hs[:, :Ht]
    Wt = torch.cat([Ws, torch.randn(V, Ht - Hs, generator=g, dtype=torch.float64) * 2], 1) if Ht > Hs else Ws[:, :Ht]
    Wt = Wt + torch.randn(Wt.shape, generator=g, dtype=torch.float64) * (4 / Ht ** 0.5)
    if Vt:
        Wt = torch.cat([Wt, torch.randn(Vt - V, Ht, generator=g, dtype=torch.float64)], 0)
    bs = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = ignore_some((hs @ Ws.T).argmax(-1), seed=seed)
    steps = step_ids_for(N, seed=seed, p_new=0.15)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(hs=cast(hs), Ws=cast(Ws), bs=cast(bs), ht=cast(ht), Wt=cast(Wt), y=y, steps=steps)


def run_fused_linear(d, cfg, dtype, impl, upstream="random", **kw):
    """Loss and the gradients of student hidden, weight, bias for one implementation in ``dtype``
    (random upstream gradient by default)."""
    fn = lambda hs, Ws, bs: fused_linear_vcrd_loss(  # noqa: E731
        hs, Ws, d["ht"].to(dtype), d["Wt"].to(dtype), d["y"], student_bias=bs, step_ids=d["steps"], config=cfg,
        impl=impl, **kw)
    return run_with_grads(fn, [None if d[k] is None else d[k].to(dtype) for k in ("hs", "Ws", "bs")], upstream)


def run_materialised(d, cfg, dtype, upstream="random", **kw):
    """The same loss as the reference formula on logits materialised in ``dtype`` (``h @ W^T + b``
    in that precision, then :func:`vcrd.core.reference.vcrd_loss`): "base" of the three-way rule."""
    def fn(hs, Ws, bs):
        s = hs @ Ws.T + (0 if bs is None else bs)
        u = d["ht"].to(dtype) @ d["Wt"].to(dtype).T
        return vcrd_loss(s, u, d["y"], step_ids=d["steps"], config=cfg, impl="reference", **kw)

    return run_with_grads(fn, [None if d[k] is None else d[k].to(dtype) for k in ("hs", "Ws", "bs")], upstream)


def fused_three_way(d, cfg, dtype=torch.float32, impl="torch", upstream="random", **kw):
    """The three-way rule on the loss and the gradients of hidden, weight (and bias): ``impl`` in
    ``dtype`` vs ``impl="reference"`` in fp64 (truth) and the reference formula on fp32 logits (base).
    ``d`` holds inputs already rounded to ``dtype`` (stored in any float dtype)."""
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    truth = run_fused_linear(d, cfg, torch.float64, "reference", upstream, **ref_kw)
    base = run_materialised(d, cfg, base_dtype(dtype), upstream, **ref_kw)
    got = run_fused_linear(d, cfg, dtype, impl, upstream, **kw)
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")[:len(truth)]
    assert_parities(names, got, base, truth, dtype)
    return dict(impl=got, base=base, truth=truth)


FUSED_CONFIGS = {"kd": VCRDConfig.preset("kd"), "discord": VCRDConfig.preset("discord"), "vcrd": VCRDConfig(),
           "jsd-T2-ce-expected": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.3,
                                            validity="expected"),
           "rkl-tokens": VCRDConfig(divergence="rkl", normalize="tokens", window_steps=1)}
