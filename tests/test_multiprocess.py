"""Multi-process training equals one process, method by method (gloo on CPU; docs/performance.md,
"Multi-process training").

For every method whose loss depends on more than one sample of the batch (in-batch contrast, batch means,
an ensemble fitted on the batch, a sum over the batch, state written from the batch), one training step of
2 processes x B/2 must give the loss terms, the (DDP-averaged) gradients and the method state of 1
process x B. BatchNorm is frozen to its running statistics in both runs: its per-process batch statistics
are the one documented exception (``sync_bn`` on CUDA), and with them frozen nothing else may differ.

Every ReLU is replaced by softplus (beta = 5) in both runs, as BatchNorm is frozen: the comparison must be
a smooth function of the float rounding. Through ReLU it is not: a gradient, and much more L-MCL's
hyper-gradient (three forward passes and a double backward through 1.3 M ReLU inputs here), jumps where a
pre-activation changes sign, and the one closest to zero lay 4e-8 from it (72 within 1e-5 of their layer's
largest). The two runs' last-bit differences (the global batch gathered in rank order, DDP's all-reduce,
other kernels for 16 and 32 rows) then flip a unit now and then: at the same parameters the float32 and
float64 hyper-gradients differed by 1.3 % of the momenta's largest entry, the size of the mismatch the
two runs showed with the CPU's fast kernels (2.8e-4 against 0.025). With softplus a 1e-6 relative
perturbation of the parameters moves the float64 hyper-gradient by 8e-6 of its scale, and float32 is
within 1e-6 of float64.

All cases run in ONE pair of worker processes (process start and ``import torch`` dominate the cost): the
pytest process computes the one-process references, the workers the two-process results, rank 0 saves
them, and each case is compared here.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from peerdistill.config import load
from peerdistill.engine.trainer import Trainer
from peerdistill.methods.base import all_ranks

ROOT = Path(__file__).resolve().parents[1]
BASE = ["data.name=synthetic", "data.size=256", "data.image_size=8", "data.num_classes=4", "model=resnet8",
        "batch_size=32", "epochs=1", "progress=false", "tensorboard=false", "precision=fp32", "device=cpu",
        "data.val_split=0"]

# name -> (overrides, prefixes of the method buffers (and ``ema.`` parameters) that must agree after the step)
CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "mcl": (["method=mcl"], ()),  # in-batch VCL / ICL / soft terms over the global batch
    "mcl_bank": (["method=mcl", "method.contrast=bank", "method.neg_k=16", "method.logit_distill=true"],
                 ("banks",)),  # global-batch negative draws, every rank's keys enter the bank
    # weighted in-batch contrast over every stage pair; the meta step's hyper-gradient on the global batch
    # (the weight network's momentum after its first step is that hyper-gradient plus weight decay)
    "lmcl": (["method=lmcl", "method.times=1"], ("weight_momentum",)),
    # bank form: draws made for the global batch, every rank's final-stage rows written to the banks, and the
    # meta step on the global batch with its draws (the weight network's momenta: that hyper-gradient)
    "lmcl_bank": (["method=lmcl", "method.contrast=bank", "method.neg_k=16", "method.times=1"],
                  ("banks", "weight_momentum")),
    "ddgsd": (["method=ddgsd"], ()),  # channel batch means of both views
    "ddgsd_scalar": (["method=ddgsd", "method.mmd=scalar"], ()),
    "kdcl_linear": (["method=kdcl", "method.ensemble=linear"], ()),  # ensemble weights fitted on the batch
    "byotl": (["method=byot", "method.variant=byotl"], ()),  # hint summed over the batch
    "ps_kd": (["method=ps_kd"], ("store",)),  # per-sample store written by every rank
    "msa": (["method=msa", "method.se_teacher=temporal"], ("bank",)),  # temporal ensemble written by every rank
    "dkel": (["method=dkel"], ("ema.",)),  # teacher initialisation before training, on the global batch
    "pcl": (["method=pcl"], ()),  # EMA teacher (its BN frozen too) and the ensemble classifier
    "cs_kd": (["method=cs_kd"], ()),  # same-class pairs kept on one rank by the pair sampler
    "dml": (["method=dml"], ()),  # per-sample terms: the control
}


def run_case(overrides: list[str]) -> dict[str, Any]:
    """One training step from the first batch of epoch 0: mean loss terms over the processes, the
    gradients DDP left in every parameter, and every floating-point method buffer afterwards."""
    tr = Trainer(load(None, [*BASE, *overrides]), out_dir=None)
    try:
        tr.before_training()
        tr.module.train()
        tr.train_loader.set_epoch(0)
        tr.gen.manual_seed(tr.cfg.seed * 1_000_003)  # as train_epoch seeds epoch 0
        batch = next(iter(tr.train_loader))
        terms = tr.dist.mean(tr.train_step(batch))
        grads = {n: p.grad.detach().clone() for n, p in tr.module.named_parameters() if p.grad is not None}
        buffers = {n: b.detach().clone() for n, b in tr.method.named_buffers() if b.is_floating_point()}
        if tr.ema is not None:  # the EMA copy / temporal-mean teacher after the step's update
            buffers.update({f"ema.{n}": p.detach().clone() for n, p in tr.ema.module.named_parameters()})
        (index,) = all_ranks(batch.index)  # the global batch's images
        return {"terms": {k: float(v) for k, v in terms.items()}, "grads": grads, "buffers": buffers,
                "index": index.sort().values}
    finally:
        tr.release()


def _frozen_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5):
    """BatchNorm that always normalises with the running statistics: no dependence on the batch."""
    return _BATCH_NORM(input, running_mean, running_var, weight, bias, False, momentum, eps)


_BATCH_NORM = torch.nn.functional.batch_norm


def _smooth_relu(input, inplace=False):
    """softplus with beta = 5 in place of ReLU: no kink (see the module's docstring)."""
    return _SOFTPLUS(input, beta=5.0)


_SOFTPLUS = torch.nn.functional.softplus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(one-process, two-process) result of every case."""
    out = tmp_path_factory.mktemp("multiprocess") / "two.pt"
    port, procs = _free_port(), []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for rank in range(2):  # started first: they import torch while this process computes the references
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], cwd=ROOT, text=True,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(torch.nn.functional, "batch_norm", _frozen_batch_norm)
        mp.setattr(torch.nn.functional, "relu", _smooth_relu)
        one = {name: run_case(overrides) for name, (overrides, _) in CASES.items()}
    finally:
        mp.undo()
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("two-process workers failed:\n" + "\n".join(log[-3000:] for log in logs))
    two = torch.load(out, weights_only=True)
    return {name: (one[name], two[name]) for name in CASES}


# Tolerances: both runs compute the same float32 sums in another order (the global batch gathered in rank
# order, DDP's all-reduce of two half-batch gradients). Measured: terms agree to <= 5e-6 relative (most ~1e-7),
# gradients to <= 2.2e-5 of each tensor's largest entry (MCL's projection head; the contrastive logits are
# divided by tau = 0.1 and the soft terms scaled by T^2 = 9: the conditioning here), the banks and stores
# exactly, the EMA teachers to 7e-7 and the weight network's momenta (L-MCL's hyper-gradient) to 3.1e-6 of
# their largest entry. Per-process statistics instead (each method's gather replaced by the local rows) move
# the terms by 0.05 .. 24 relative (MCL's contrast over the local 16 rows ~0.2, DDGSD's local means 0.85,
# KDCL's locally fitted weights 0.4 .. 0.7, BYOT-L's local sum 0.5) and the gradients by up to 0.5 of their
# scale; L-MCL's meta step per process (``meta_batch=local``) moves the momenta by 2.3 (in-batch) and 0.31
# (bank) of their scale, and its learning rate 0.1 % off by 5e-3: these bounds separate them all.
TERM_RTOL, GRAD_RTOL, STATE_RTOL = 1e-5, 1e-4, 1e-4


@pytest.mark.slow
@pytest.mark.numerical
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process(results, name):
    one, two = results[name]
    assert torch.equal(one["index"], two["index"]), name  # the same images in the global batch
    assert one["terms"].keys() == two["terms"].keys()
    for k, v in one["terms"].items():
        assert two["terms"][k] == pytest.approx(v, rel=TERM_RTOL, abs=1e-7), (name, k)
    assert one["grads"].keys() == two["grads"].keys(), name
    for k, g in one["grads"].items():
        scale = float(g.abs().max())
        err = float((two["grads"][k] - g).abs().max())
        assert err <= GRAD_RTOL * scale + 1e-9, (name, k, err, scale)
    for prefix in CASES[name][1]:
        compared = [k for k in one["buffers"] if k.startswith(prefix)]
        assert compared, (name, prefix, list(one["buffers"]))
        for k in compared:
            a, b = one["buffers"][k], two["buffers"][k]
            scale, err = float(a.abs().max()), float((a - b).abs().max())
            assert err <= STATE_RTOL * scale + 1e-9, (name, k, err, scale)


def _worker(out: str) -> int:
    from peerdistill.engine.distributed import teardown

    torch.nn.functional.batch_norm, torch.nn.functional.relu = _frozen_batch_norm, _smooth_relu
    results = {name: run_case(overrides) for name, (overrides, _) in CASES.items()}
    if os.environ["RANK"] == "0":
        torch.save(results, out)
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))


def test_cutmixpick_keeps_each_process_share_of_n_pick():
    """``n_pick`` counts the images kept of the global batch: each of N processes keeps n_pick / N of its pool
    (it kept n_pick each, an N-fold larger global batch); a count the processes cannot share is one line."""
    from types import SimpleNamespace

    from peerdistill.data.mix import MIXERS
    from peerdistill.errors import PeerdistillError

    picker = MIXERS.build("cutmixpick", n_pick=8, criterion="student_entropy")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # one process's 8 of 16 rows
    ctx = SimpleNamespace(peer=lambda i, t: t.flatten(1)[:, :5], n_peers=1, shard=(0, 2))
    rec, _ = picker.pick(x, torch.Generator().manual_seed(1), ctx)
    assert rec.perms.shape[1] == 4
    ctx.shard = (0, 1)
    assert picker.pick(x, torch.Generator().manual_seed(1), ctx)[0].perms.shape[1] == 8
    with pytest.raises(PeerdistillError, match="not divisible by 3 processes"):
        picker.check(3)
