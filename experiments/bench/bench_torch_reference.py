"""BiDf-MKD's four hot computations in dfml_jax and in plain PyTorch, timed in the same run.

Rows (sizes of the paper's CIFAR-FS configuration, ``shared/specs/bidf_mkd.md``):

* ``inversion_b150_q100`` / ``inversion_b50_q20``: one zero-order inversion iteration, B images
  (5 classes x B/5), q directions: the DCGAN generator (nz=256, ngf=64, 32x32x3, sigmoid head,
  batch-statistics BN) -> batch-shared zero-pad-4 crop + flip + normalisation -> the Conv4 API
  (width 32, BN with running statistics, eval mode) on the clean batch and on ``B * q`` points
  ``x + mu * u`` (``u`` uniform on the unit sphere, mu = 0.005), the forward-difference estimate
  ``(d / q) * sum_j (f(x + mu u_j) - f(x)) / mu * u_j`` of the per-sample CE, evaluated in the
  official code's 5 groups of ``q / 5`` directions (``--numsplit``; the JAX side uses
  ``chunk_size = q / 5``, the same chunks), pulled back through augmentation and generator with
  the cotangent ``g / B``, Adam (lr 1e-3, betas 0.5/0.999) on the generator weights and Z.
  JAX: :func:`dfml_jax.bidf_mkd.make_inverter` (``--inv-iters`` iterations per timed call, the
  time divided by them; the call also draws Z and runs one generator forward for its
  best-image buffer, which is counted). It is built with ``return_final=True`` so that every
  timed iteration includes its pull-back and Adam update as PyTorch's does: a library call
  returns only the selected images, which no update after the last iteration can change, and
  XLA drops that last pull-back as dead code (before 2026-12-07, late, the rows timed
  ``2 forward + 1 backward`` against PyTorch's 2 + 2).
* ``replay_meta_iteration``: 4 replay tasks, 5-way 1-shot 15-query, 5 inner second-order SGD
  steps (lr 0.01) with CE, outer CE losses summed, one Adam step (lr 1e-3) of the Conv4
  meta-model (width 32, batch-statistics BN). JAX: :func:`dfml_jax.bidf_mkd.metastep.replay_loss`
  under ``jax.value_and_grad`` + optax Adam (what ``make_meta_steps().replay`` jits); PyTorch:
  ``torch.autograd.grad(create_graph=True)`` per inner step, tasks one after the other, as the
  official MAML class does.
* ``kd_task``: one KD task, 150 support and 150 query images, 10 inner second-order SGD steps of
  the KD loss ``KL(p_api || p_student)`` (``kd_loss="kl"``, the library default), the outer KD
  loss on the query set and one Adam step. JAX:
  :func:`dfml_jax.bidf_mkd.metastep.kd_task_loss` + optax Adam.

The PyTorch side is written from the spec, NCHW, ``torch.nn.functional`` ops, float32, with
``torch.set_num_threads(cores)``. For each row the two sides alternate (JAX, torch, JAX, torch,
...) for ``--rounds`` rounds after compilation and one warm-up call each; the JSON reports the
per-row medians, ``speedup = torch_ms / jax_ms`` (above 1: JAX faster), the environment
(device, versions, thread settings) and ``os.getloadavg()`` before and after (``"loaded": true``
when the 1-minute load exceeds the core count: then the timings are not a quiet-machine result).

Every row also carries ``check``: the two sides run on the SAME weights (ported from JAX to
PyTorch layouts) and data. Inversion rows: generator output, API logits on the augmented batch
(the same crop offset and flip) and the pull-back of one fixed image-space gradient into
(generator weights, Z); the zero-order directions themselves are drawn independently by each
side (not compared). Replay and KD rows: the outer loss at initialisation and its full
second-order gradient with respect to every meta-parameter (relative L2 error). At the real
sizes the KD row's gradient through 10 second-order steps is ill-conditioned in float32: measured
once (random images and targets, the weights of this script), PyTorch float32 differs from
PyTorch float64 by 2.1% and JAX float32 from PyTorch float64 by 2.9%, so a ``grad_rel_err`` of
~2% there is float32 rounding on both sides, not a mismatch (at the ``--smoke`` sizes: ~1e-6).

Every row also carries ``bound``: the matmul + convolution FLOPs of the JAX step, counted on its
jaxpr (a ``lax.scan`` counts ``length`` times; XLA's own cost analysis counts a loop body once),
the GFLOP/s each side achieves on them, and the time those FLOPs take at this run's XLA f32 GEMM
rate (``environment.gemm_peak``: a 2048^3 matmul in XLA and in PyTorch, interleaved): a row whose
``max_speedup_at_jax_gemm_peak`` is below 2 cannot reach 2x PyTorch without fewer FLOPs or faster
kernels than XLA's GEMM.

The inversion rows' API is a Conv4 built with ``conv_impl="lax"``, as ``dfml_jax.teachers.load_pool``
builds the black-box APIs of every BiDf-MKD run (``--api-conv-impl im2col`` measures the other
back-end); the generator and the meta-model use the library default (im2col).

Each inversion row also times, in the same interleaved rounds, the JAX side with the generator
variants of ``GEN_ALTERNATIVES`` (``alternatives`` in the row: the generator's upsample-conv pairs
computed at the lower resolution, ``upsample="subpixel"``): the same function with its
arithmetic arranged differently, so results equal the default's up to float rounding
(``generator_output_max_abs_diff_vs_default``), but they are not what the library runs by
default. The replay and KD rows likewise time
``META_ALTERNATIVES`` (the inner ``lax.scan`` fully unrolled, ``unroll=True`` of
:func:`dfml_jax.meta.adapt`; with it the channel-major meta-model, ``Conv4(layout="CNHW")``),
with their loss and gradient checked against the default step's.
``--alternatives all`` also times the variants with every generator / meta-model convolution
on the ``"lax"`` back-end (slow here: minutes per row); ``--alternatives none`` skips them all.

Command lines::

    python experiments/bench/bench_torch_reference.py --rounds 3 --out docs/bench_torch_reference.json
    python experiments/bench/bench_torch_reference.py --smoke --rounds 1      # tiny sizes (test)
    python experiments/bench/bench_torch_reference.py --rows replay_meta_iteration kd_task

Requires PyTorch (benchmark-only: ``pip install -r requirements-bench.txt``); the library and
its tests never import it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from dfml_jax.api import APIGroup, BlackBoxAPI
from dfml_jax.bidf_mkd import InversionConfig, KDTask, ReplayTasks, make_inverter
from dfml_jax.bidf_mkd.metastep import kd_task_loss, replay_loss
from dfml_jax.models import create_model, functional
from dfml_jax.models.layers import CONV_IMPLS
from dfml_jax.teachers import load_pool
from dfml_jax.training.augment import batch_shared_augment
from dfml_jax.training.host_malloc import reuse_freed_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import step_flops  # noqa: E402  (experiments/bench/flops.py)

ROWS = ("inversion_b150_q100", "inversion_b50_q20", "replay_meta_iteration", "kd_task")

REAL = dict(image_size=32, channels=3, ways=5, width=32, nz=256, ngf=64, pad=4, mu=0.005,
            glr=1e-3, numsplit=5, inner_lr=0.01, outer_lr=1e-3,
            inversion={"inversion_b150_q100": (150, 100), "inversion_b50_q20": (50, 20)},
            replay=dict(tasks=4, shots=1, query=15, steps=5), kd=dict(images=150, steps=10))
SMOKE = dict(REAL, image_size=16, width=8, nz=16, ngf=8,
             inversion={"inversion_b150_q100": (10, 10), "inversion_b50_q20": (5, 5)},
             replay=dict(tasks=2, shots=1, query=2, steps=2), kd=dict(images=10, steps=2))
LOADED_NOTE = ("1-minute load above the core count during the run: NOT a quiet-machine "
               "measurement. PyTorch's OpenMP intra-op threads degrade far more than XLA's when "
               "the cores are oversubscribed (they synchronise at every parallel region), so under "
               "load the speedups overstate JAX; compare with --torch-threads 1 or rerun quiet")
# the back-end load_pool gives the black-box APIs of every BiDf-MKD run
API_CONV_IMPL = inspect.signature(load_pool).parameters["conv_impl"].default
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # CIFAR-FS statistics
# generator variants the inversion rows also time (--alternatives): the same function, other
# arrangements of its arithmetic (results equal up to float rounding; not the library default)
GEN_ALTERNATIVES = {"generator_upsample=subpixel": dict(upsample="subpixel")}
# meta-model variants the replay and KD rows also time: the inner loop's lax.scan fully unrolled,
# and with it the channel-major Conv4 (layout="CNHW")
META_ALTERNATIVES = {"inner_unroll=full": dict(unroll=True),
                     "meta_layout=CNHW,inner_unroll=full": dict(unroll=True, layout="CNHW")}
# --alternatives all adds these: every convolution of the generator / meta-model on the "lax"
# back-end. Slow on XLA:CPU (measured: the generator's lax convolutions inside the inversion's
# iteration loop, 36-38 s per B=50 iteration against 0.7 s; the vmapped replay tasks, grouped
# convolutions, ~10x), hence not timed unless asked
GEN_ALTERNATIVES_LAX = {
    "generator_conv_impl=lax": dict(conv_impl="lax"),
    "generator_upsample=subpixel,conv_impl=lax": dict(upsample="subpixel", conv_impl="lax"),
}
META_ALTERNATIVES_LAX = {
    "meta_conv_impl=lax": dict(conv_impl="lax"),
    "inner_unroll=full,meta_conv_impl=lax": dict(unroll=True, conv_impl="lax"),
}


def chosen_alternatives(which: str, fast: dict, lax: dict) -> dict:
    """The variants ``--alternatives`` asks for (``none`` / ``fast`` / ``all``)."""
    return {} if which == "none" else dict(fast) | (dict(lax) if which == "all" else {})


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment
def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import jaxlib
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "cpu": cpu_model(),
            "cores": cores(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_cpu_threads": ("XLA:CPU default: one intra-op thread per core"
                                if "xla_cpu_multi_thread_eigen=false" not in
                                os.environ.get("XLA_FLAGS", "") else "single-threaded Eigen"),
            "jax_devices": len(jax.devices())}


def loadavg() -> list:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------- weight porting
def flat_params(tree) -> dict:
    """``nnx.State`` (or nested dict) -> ``{"convs.0.kernel": np.ndarray}``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for k in path:
            v = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
            if v is not None and v != "value":
                parts.append(str(v))
        out[".".join(parts)] = np.asarray(leaf, np.float32)
    return out


def conv4_to_torch(flat: dict, feat_hw: tuple) -> dict:
    """JAX Conv4 arrays (HWIO kernels, (in, out) Linear on NHWC-flattened features) -> PyTorch
    layouts (OIHW, (out, in) on NCHW-flattened features). A permutation: gradients port alike."""
    out = {}
    for name, a in flat.items():
        if name == "classifier.kernel":
            fh, fw = feat_hw
            c = a.shape[0] // (fh * fw)
            a = a.reshape(fh, fw, c, -1).transpose(2, 0, 1, 3).reshape(c * fh * fw, -1).T
        elif a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        out[name] = np.ascontiguousarray(a)
    return out


def generator_to_torch(flat: dict, s0: int) -> dict:
    """JAX DCGAN arrays -> PyTorch layouts (the Linear's outputs reshape NHWC vs NCHW)."""
    out = {}
    for name, a in flat.items():
        if name == "fc.kernel":
            nz = a.shape[0]
            a = a.reshape(nz, s0, s0, -1).transpose(0, 3, 1, 2).reshape(nz, -1).T
        elif name == "fc.bias":
            a = a.reshape(s0, s0, -1).transpose(2, 0, 1).reshape(-1)
        elif a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        out[name] = np.ascontiguousarray(a)
    return out


def tt(a, grad=False) -> torch.Tensor:
    t = torch.tensor(np.array(a, np.float32, copy=True))  # a copy: Adam updates it in place
    return t.requires_grad_(grad)


def nchw(x) -> torch.Tensor:
    return tt(np.asarray(x, np.float32).transpose(0, 3, 1, 2))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel_err(ja: dict, to: dict) -> float:
    """Relative L2 error over all leaves together (both dicts in PyTorch layout)."""
    keys = sorted(ja)
    return rel_err(np.concatenate([to[k].ravel() for k in keys]),
                   np.concatenate([ja[k].ravel() for k in keys]))


def shapes(d: dict) -> dict:
    return {k: list(v.shape) for k, v in sorted(d.items())}


# ----------------------------------------------------------------------------- PyTorch models
def torch_bn(x, p, name, stats=None):
    if stats is None:  # batch statistics (meta-model, generator)
        return F.batch_norm(x, None, None, p[f"{name}.scale"], p[f"{name}.bias"], training=True,
                            eps=1e-5)
    return F.batch_norm(x, stats[f"{name}.mean"], stats[f"{name}.var"], p[f"{name}.scale"],
                        p[f"{name}.bias"], training=False, eps=1e-5)


def torch_conv4(p: dict, x: torch.Tensor, stats=None, depth: int = 4) -> torch.Tensor:
    """Conv4: depth x [Conv3x3 pad 1 + bias -> BN -> ReLU -> MaxPool 2], flatten, Linear."""
    for i in range(depth):
        x = F.conv2d(x, p[f"convs.{i}.kernel"], p[f"convs.{i}.bias"], padding=1)
        x = F.max_pool2d(F.relu(torch_bn(x, p, f"bns.{i}", stats)), 2)
    return F.linear(x.flatten(1), p["classifier.kernel"], p["classifier.bias"])


def torch_generator(p: dict, z: torch.Tensor, s0: int) -> torch.Tensor:
    """DCGAN generator (spec 2.1), batch-statistics BN, sigmoid head, NCHW in [0, 1]."""
    h = F.linear(z, p["fc.kernel"], p["fc.bias"])
    h = h.view(z.shape[0], -1, s0, s0)
    h = F.interpolate(torch_bn(h, p, "bn0"), scale_factor=2, mode="nearest")
    h = F.leaky_relu(torch_bn(F.conv2d(h, p["conv1.kernel"], padding=1), p, "bn1"), 0.2)
    h = F.interpolate(h, scale_factor=2, mode="nearest")
    h = F.leaky_relu(torch_bn(F.conv2d(h, p["conv2.kernel"], padding=1), p, "bn2"), 0.2)
    return torch.sigmoid(F.conv2d(h, p["conv3.kernel"], p["conv3.bias"], padding=1))


def torch_augment(x, oy: int, ox: int, flip: bool, pad: int, mean, std):
    """Batch-shared zero pad -> crop at (oy, ox) -> optional horizontal flip -> normalise."""
    s = x.shape[-1]
    xp = F.pad(x, (pad, pad, pad, pad))
    crop = xp[:, :, oy:oy + s, ox:ox + s]
    if flip:
        crop = crop.flip(3)
    return (crop - mean) / std


class TorchInversion:
    """The official ZO synthesis loop (spec 2.2-2.4), one ``step()`` per iteration."""

    def __init__(self, gen_p: dict, api_p: dict, api_stats: dict, *, b: int, q: int, cfg: dict,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.b, self.q, self.cfg = b, q, cfg
        self.s0 = cfg["image_size"] // 4
        self.w = {k: tt(v, grad=True) for k, v in gen_p.items()}
        self.z = torch.randn(b, cfg["nz"]).requires_grad_(True)
        self.api_p = {k: tt(v) for k, v in api_p.items()}
        self.api_stats = {k: tt(v) for k, v in api_stats.items()}
        self.opt = torch.optim.Adam(list(self.w.values()) + [self.z], lr=cfg["glr"],
                                    betas=(0.5, 0.999))
        self.targets = torch.arange(cfg["ways"]).repeat(b // cfg["ways"])  # interleaved 0..4
        self.mean = torch.tensor(MEAN[:cfg["channels"]]).view(1, -1, 1, 1)
        self.std = torch.tensor(STD[:cfg["channels"]]).view(1, -1, 1, 1)
        self.best_cost, self.best = float("inf"), None

    def api(self, x):
        return torch_conv4(self.api_p, x, self.api_stats)

    def synth(self, w, z, oy, ox, flip):
        x01 = torch_generator(w, z, self.s0)
        return torch_augment(x01, oy, ox, flip, self.cfg["pad"], self.mean, self.std), x01

    @torch.no_grad()
    def zo_estimate(self, x):
        """Sphere forward differences in ``numsplit`` groups; returns (g_hat, clean CE)."""
        b, q, mu = self.b, self.q, self.cfg["mu"]
        d = x[0].numel()
        loss0 = F.cross_entropy(self.api(x), self.targets, reduction="none")
        g = torch.zeros_like(x)
        c = q // self.cfg["numsplit"]
        for _ in range(self.cfg["numsplit"]):
            u = torch.randn((c * b,) + tuple(x.shape[1:]))
            u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            pts = x.repeat(c, 1, 1, 1) + mu * u
            lt = F.cross_entropy(self.api(pts), self.targets.repeat(c), reduction="none")
            diff = (lt - loss0.repeat(c)) / mu
            g += (d / q) * (diff.view(c, b, 1, 1, 1) * u.view((c,) + tuple(x.shape))).sum(0)
        return g, loss0

    def step(self):
        pad = self.cfg["pad"]
        oy, ox = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        flip = bool(torch.rand(()) < 0.5)
        xa, x01 = self.synth(self.w, self.z, oy, ox, flip)
        g, loss0 = self.zo_estimate(xa.detach())
        self.opt.zero_grad(set_to_none=True)
        xa.backward(g / self.b)
        self.opt.step()
        ce = float(loss0.mean())
        if ce < self.best_cost:
            self.best_cost, self.best = ce, x01.detach()
        return g


def torch_maml_loss(p: dict, names, sx, sy, qx, qy, steps: int, lr: float, loss_fn):
    """Second-order MAML outer loss of one task (``create_graph=True`` in every inner step)."""
    fast = dict(p)
    for _ in range(steps):
        loss = loss_fn(torch_conv4(fast, sx), sy)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
        fast = {n: fast[n] - lr * g for n, g in zip(names, grads)}
    return loss_fn(torch_conv4(fast, qx), qy)


def torch_kd_kl(s, pt):
    """``KL(p_t || softmax(s))`` summed over classes, batch mean (dfml_jax.losses.kd_kl)."""
    return torch.mean(torch.sum(torch.xlogy(pt, pt) - pt * F.log_softmax(s, -1), -1))


class TorchMeta:
    """Conv4 meta-model with Adam; ``replay()`` and ``kd()`` are one meta-update each."""

    def __init__(self, meta_p: dict, cfg: dict):
        self.names = sorted(meta_p)
        self.p = {k: tt(v, grad=True) for k, v in meta_p.items()}
        self.opt = torch.optim.Adam([self.p[n] for n in self.names], lr=cfg["outer_lr"])
        self.cfg = cfg

    def _update(self, loss, want_grads):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = ({n: self.p[n].grad.detach().numpy().copy() for n in self.names}
                 if want_grads else None)
        self.opt.step()
        return float(loss.detach()), grads

    def replay(self, tasks, want_grads=False):
        steps = self.cfg["replay"]["steps"]
        total = 0.0
        for sx, sy, qx, qy in tasks:
            total = total + torch_maml_loss(self.p, self.names, sx, sy, qx, qy, steps,
                                            self.cfg["inner_lr"], F.cross_entropy)
        return self._update(total, want_grads)

    def kd(self, task, want_grads=False):
        sx, sp, qx, qp = task
        loss = torch_maml_loss(self.p, self.names, sx, sp, qx, qp, self.cfg["kd"]["steps"],
                               self.cfg["inner_lr"], torch_kd_kl)
        return self._update(loss, want_grads)


# ----------------------------------------------------------------------------- rows
def feat_hw(s: int) -> tuple:
    for _ in range(4):
        s //= 2
    return (s, s)


def build_api(cfg):
    s, c, k = cfg["image_size"], cfg["channels"], cfg["ways"]
    # built as dfml_jax.teachers.load_pool builds every black-box API (conv_impl="lax" unless
    # --api-conv-impl says otherwise)
    teacher = functional(create_model("conv4", num_classes=k, input_shape=(s, s, c),
                                      rngs_or_key=0, width=cfg["width"],
                                      conv_impl=cfg["api_conv_impl"]))
    # give the API non-trivial running statistics so that eval-mode BN is really exercised
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map_with_path(lambda path, a: jnp.asarray(
        rng.uniform(0.5, 1.5, a.shape) if "var" in jax.tree_util.keystr(path)
        else rng.normal(0.0, 0.1, a.shape), jnp.float32), teacher.state)
    apply_eval = lambda prm, x: teacher.apply(prm[0], prm[1], x, train=False)[0]  # noqa: E731
    api = BlackBoxAPI.from_jax(apply_eval, (s, s, c), k, params=(teacher.params, state),
                               name="conv4")
    torch_p = conv4_to_torch(flat_params(teacher.params), feat_hw(s))
    flat_state = flat_params(state)
    return api, apply_eval, (teacher.params, state), torch_p, flat_state


def aug_draw(key, pad: int, size: int):
    """The crop offset and flip ``batch_shared_augment`` draws from ``key`` (same splits)."""
    kx, ky, kf = jax.random.split(key, 3)
    oy = int(jax.random.randint(ky, (), 0, size + 2 * pad - size + 1))
    ox = int(jax.random.randint(kx, (), 0, size + 2 * pad - size + 1))
    return oy, ox, bool(jax.random.bernoulli(kf))


def setup_inversion(name: str, cfg: dict, inv_iters: int):
    b, q = cfg["inversion"][name]
    s, c, k, nz = cfg["image_size"], cfg["channels"], cfg["ways"], cfg["nz"]
    api, apply_eval, api_params, api_torch, api_stats = build_api(cfg)
    group = APIGroup([api])
    chunk = q // cfg["numsplit"]
    icfg = InversionConfig(iterations=inv_iters, per_class=b // k, num_directions=q,
                           chunk_size=chunk, smoothing=cfg["mu"], lr=cfg["glr"], pad=cfg["pad"])

    def jax_side(**gen_kw):
        """The JAX inversion with a generator built with ``gen_kw``. It returns the final
        generator too (``return_final``), so every timed iteration includes its Adam update, as
        PyTorch's does (otherwise no output reads the last one and XLA skips it)."""
        g = functional(create_model("dcgan", nz=nz, ngf=cfg["ngf"], img_size=s, nc=c,
                                    rngs_or_key=0, **gen_kw))
        return g, make_inverter(group, g.apply_batchstats, nz=nz, cfg=icfg, mean=MEAN[:c],
                                std=STD[:c], image_size=s, return_final=True)

    gen, inv = jax_side()
    gp = gen.init(jax.random.key(1))[0]
    gen_torch = generator_to_torch(flat_params(gp), s // 4)
    tinv = TorchInversion(gen_torch, api_torch, api_stats, b=b, q=q, cfg=cfg)

    counter = [0]

    def runner(inverter):
        def run():
            counter[0] += 1
            return jax.block_until_ready(inverter(jax.random.key(counter[0]), 0, gp,
                                                  group.operand))
        return run

    run_jax = runner(inv)

    def run_torch():
        for _ in range(inv_iters):
            g = tinv.step()
        return g

    # ---- same-weights checks: generator, augmentation + API, pull-back of a fixed gradient
    z = np.random.default_rng(1).standard_normal((b, nz)).astype(np.float32)
    key = jax.random.key(7)
    oy, ox, flip = aug_draw(key, cfg["pad"], s)
    synth = lambda p, zz: batch_shared_augment(  # noqa: E731
        gen.apply_batchstats(p, zz), key, pad=cfg["pad"], flip=True, out_size=s, mean=MEAN[:c],
        std=STD[:c])
    xa_j, vjp = jax.vjp(synth, gp, jnp.asarray(z))
    x01_j = gen.apply_batchstats(gp, jnp.asarray(z))
    logits_j = apply_eval(api_params, xa_j)
    ghat = np.random.default_rng(2).standard_normal(xa_j.shape).astype(np.float32)
    gw_j, gz_j = vjp(jnp.asarray(ghat) / b)
    w_t = {n: tt(v, grad=True) for n, v in gen_torch.items()}
    z_t = tt(z, grad=True)
    xa_t, x01_t = tinv.synth(w_t, z_t, oy, ox, flip)
    logits_t = tinv.api(xa_t.detach())
    xa_t.backward(nchw(ghat) / b)
    gw_t = {n: t.grad.numpy() for n, t in w_t.items()}
    gw_jt = generator_to_torch(flat_params(gw_j), s // 4)
    tg = tinv.zo_estimate(xa_t.detach())[0]
    jres = run_jax()  # also the compile
    check = {
        "generator_output_max_abs_diff": float(np.abs(
            np.asarray(x01_j).transpose(0, 3, 1, 2) - x01_t.detach().numpy()).max()),
        "api_logits_max_abs_diff": float(np.abs(np.asarray(logits_j)
                                                - logits_t.numpy()).max()),
        "pullback_generator_grad_rel_err": tree_rel_err(gw_jt, gw_t),
        "pullback_z_grad_rel_err": rel_err(z_t.grad.numpy(), np.asarray(gz_j)),
        "generator_grad_shapes_equal": shapes(gw_jt) == shapes(gw_t),
        "z_grad_shape": [list(np.asarray(gz_j).shape), list(z_t.grad.shape)],
        "image_grad_shape": [list(xa_j.shape), list(tg.permute(0, 2, 3, 1).shape)],
        "clean_ce_shape": [list(np.asarray(jres[0].clean_ce).shape), [inv_iters]],
        "zero_order_directions": "drawn independently by each side (not compared)",
    }
    info = {"batch": b, "q": q, "chunk_size": chunk, "numsplit": cfg["numsplit"],
            "iterations_per_call": inv_iters, "queries_per_iteration": b * (q + 1),
            "per_call_divisor": inv_iters,
            "_flops": lambda: step_flops(inv, jax.random.key(0), 0, gp, group.operand)}
    alternatives = {}
    chosen = chosen_alternatives(cfg["alternatives"], GEN_ALTERNATIVES, GEN_ALTERNATIVES_LAX)
    key_same = jax.random.key(10**6)
    images_same = inv(key_same, 0, gp, group.operand)[0].images if chosen else None
    for alt, gen_kw in chosen.items():
        g_alt, inv_alt = jax_side(**gen_kw)
        x01_alt = g_alt.apply_batchstats(gp, jnp.asarray(z))
        alternatives[alt] = {
            "run": runner(inv_alt),
            "_flops": lambda inv_alt=inv_alt: step_flops(inv_alt, jax.random.key(0), 0, gp,
                                                         group.operand),
            "settings": gen_kw,
            "check": {"generator_output_max_abs_diff_vs_default":
                      float(jnp.abs(x01_alt - x01_j).max()),
                      # the whole call, same key (same directions): its selected images
                      "inversion_images_max_abs_diff_vs_default": float(jnp.abs(
                          inv_alt(key_same, 0, gp, group.operand)[0].images
                          - images_same).max())}}
        alternatives[alt]["run"]()  # compile
    info["_alternatives"] = alternatives
    return run_jax, run_torch, check, info


def meta_setup(cfg):
    meta = meta_model(cfg)
    tm = TorchMeta(conv4_to_torch(flat_params(meta.params), feat_hw(cfg["image_size"])), cfg)
    return meta, tm


def meta_model(cfg, conv_impl=None, layout="NHWC"):
    s, c, k = cfg["image_size"], cfg["channels"], cfg["ways"]
    return functional(create_model("conv4", num_classes=k, input_shape=(s, s, c), rngs_or_key=3,
                                   width=cfg["width"], conv_impl=conv_impl, layout=layout))


def meta_alternatives(cfg, make_loss, params, opt, data, res_default):
    """The replay / KD row's JAX step with each :data:`META_ALTERNATIVES` variant: compiled,
    checked against the default step (same weights and data), ready to time."""
    out = {}
    _, _, loss0, g0 = res_default
    for alt, settings in chosen_alternatives(cfg["alternatives"], META_ALTERNATIVES,
                                             META_ALTERNATIVES_LAX).items():
        kw = dict(settings)
        apply_fn = meta_model(cfg, kw.pop("conv_impl", None),
                              kw.pop("layout", "NHWC")).apply_batchstats
        _, step = jax_step(make_loss(apply_fn, **kw), cfg["outer_lr"])
        run = lambda step=step: jax.block_until_ready(step(params, opt, data))  # noqa: E731
        _, _, loss, g = run()
        out[alt] = {
            "run": run, "settings": settings,
            "_flops": lambda step=step: step_flops(step, params, opt, data),
            "check": {"loss_rel_diff_vs_default": rel_err(loss, loss0),
                      "grad_rel_err_vs_default": tree_rel_err(flat_params(g),
                                                              flat_params(g0))}}
    return out


def jax_step(loss_fn, outer_lr):
    """Jitted ``value_and_grad`` + Adam; returns (params, opt, loss, grads)."""
    tx = optax.adam(outer_lr)

    @jax.jit
    def step(params, opt, data):
        loss, g = jax.value_and_grad(lambda p: loss_fn(p, data))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss, g

    return tx, step


def compare_meta(res_j, loss_t, grads_t, s):
    _, _, loss_j, g_j = res_j
    g_jt = conv4_to_torch(flat_params(g_j), feat_hw(s))
    return {"loss_jax": float(loss_j), "loss_torch": loss_t,
            "loss_rel_diff": abs(float(loss_j) - loss_t) / max(abs(float(loss_j)), 1e-30),
            "grad_rel_err": tree_rel_err(g_jt, grads_t),
            "grad_shapes_equal": shapes(g_jt) == shapes(grads_t),
            "num_param_tensors": len(grads_t), "weights": "JAX init ported to PyTorch"}


def replay_row(cfg):
    """The replay row's data, ``(sx, sy, qx, qy)`` as NumPy and as :class:`ReplayTasks`, and its
    loss builder ``make_loss(apply_fn, **variant) -> loss(params, tasks)``."""
    s, c, k, r = cfg["image_size"], cfg["channels"], cfg["ways"], cfg["replay"]
    rng = np.random.default_rng(4)
    t, ns, nq = r["tasks"], k * r["shots"], k * r["query"]
    sx = rng.standard_normal((t, ns, s, s, c)).astype(np.float32)
    qx = rng.standard_normal((t, nq, s, s, c)).astype(np.float32)
    sy = np.tile(np.repeat(np.arange(k), r["shots"]), (t, 1)).astype(np.int32)
    qy = np.tile(np.repeat(np.arange(k), r["query"]), (t, 1)).astype(np.int32)
    tasks = ReplayTasks(*(jnp.asarray(a) for a in (sx, sy, qx, qy)))
    make_loss = lambda apply_fn, **kw: lambda p, d: replay_loss(  # noqa: E731
        apply_fn, p, d, steps=r["steps"], lr=cfg["inner_lr"], **kw)[0]
    return (sx, sy, qx, qy), tasks, make_loss


def kd_row(cfg):
    """The KD row's data, ``(sx, sp, qx, qp)`` as NumPy and as a :class:`KDTask`, and its loss
    builder ``make_loss(apply_fn, **variant) -> loss(params, task)``."""
    s, c, k, kd = cfg["image_size"], cfg["channels"], cfg["ways"], cfg["kd"]
    rng = np.random.default_rng(5)
    n = kd["images"]
    soft = lambda a: np.exp(a) / np.exp(a).sum(-1, keepdims=True)  # noqa: E731
    sx = rng.standard_normal((n, s, s, c)).astype(np.float32)
    qx = rng.standard_normal((n, s, s, c)).astype(np.float32)
    sp = soft(rng.standard_normal((n, k))).astype(np.float32)
    qp = soft(rng.standard_normal((n, k))).astype(np.float32)
    task = KDTask(jnp.asarray(sx), jnp.asarray(sp), jnp.asarray(qx), jnp.asarray(qp),
                  jnp.tile(jnp.arange(k), n // k))
    make_loss = lambda apply_fn, **kw: lambda p, d: kd_task_loss(  # noqa: E731
        apply_fn, p, d, steps=kd["steps"], lr=cfg["inner_lr"], kd_loss="kl", **kw)[0]
    return (sx, sp, qx, qp), task, make_loss


def setup_replay(cfg):
    s, k, r = cfg["image_size"], cfg["ways"], cfg["replay"]
    t = r["tasks"]
    meta, tm = meta_setup(cfg)
    (sx, sy, qx, qy), tasks, make_loss = replay_row(cfg)
    tx, step = jax_step(make_loss(meta.apply_batchstats), cfg["outer_lr"])
    opt = tx.init(meta.params)
    ttasks = [(nchw(sx[i]), torch.from_numpy(sy[i]).long(), nchw(qx[i]),
               torch.from_numpy(qy[i]).long()) for i in range(t)]
    run_jax = lambda: jax.block_until_ready(step(meta.params, opt, tasks))  # noqa: E731
    res_j = run_jax()  # compile
    loss_t, grads_t = tm.replay(ttasks, want_grads=True)
    check = compare_meta(res_j, loss_t, grads_t, s)
    info = {"tasks": t, "ways": k, "shots": r["shots"], "query": r["query"],
            "inner_steps": r["steps"], "second_order": True, "per_call_divisor": 1,
            "_flops": lambda: step_flops(step, meta.params, opt, tasks),
            "_alternatives": meta_alternatives(cfg, make_loss, meta.params, opt, tasks, res_j)}
    return run_jax, lambda: tm.replay(ttasks), check, info


def setup_kd(cfg):
    s, kd = cfg["image_size"], cfg["kd"]
    n = kd["images"]
    meta, tm = meta_setup(cfg)
    (sx, sp, qx, qp), task, make_loss = kd_row(cfg)
    tx, step = jax_step(make_loss(meta.apply_batchstats), cfg["outer_lr"])
    opt = tx.init(meta.params)
    ttask = (nchw(sx), tt(sp), nchw(qx), tt(qp))
    run_jax = lambda: jax.block_until_ready(step(meta.params, opt, task))  # noqa: E731
    res_j = run_jax()  # compile
    loss_t, grads_t = tm.kd(ttask, want_grads=True)
    check = compare_meta(res_j, loss_t, grads_t, s)
    info = {"images": n, "inner_steps": kd["steps"], "kd_loss": "kl", "second_order": True,
            "per_call_divisor": 1, "_flops": lambda: step_flops(step, meta.params, opt, task),
            "_alternatives": meta_alternatives(cfg, make_loss, meta.params, opt, task, res_j)}
    return run_jax, lambda: tm.kd(ttask), check, info


def gemm_peak(rounds: int = 5, n: int = 2048) -> dict:
    """f32 GEMM throughput (GFLOP/s, median) of XLA and of PyTorch on this machine, interleaved."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    mm = jax.jit(lambda x, y: x @ y)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    jax.block_until_ready(mm(ja, ja))
    _ = ta @ ta
    js, ts = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(mm(ja, ja))
        js.append(time.perf_counter() - t)
        t = time.perf_counter()
        _ = ta @ ta
        ts.append(time.perf_counter() - t)
    f = 2.0 * n ** 3 / 1e9
    return {"gemm_n": n, "jax_gflops": round(f / statistics.median(js), 1),
            "torch_gflops": round(f / statistics.median(ts), 1)}


def flop_bound(flops, div, jax_ms, torch_ms, peak):
    """What the row's FLOPs allow: time at XLA's own GEMM peak and the speed-up it would give."""
    flops, exact = flops
    f = flops / div
    at_peak_ms = 1e3 * f / (peak["jax_gflops"] * 1e9)
    return {"gflop": round(f / 1e9, 3), "jax_gflops_achieved": round(f / jax_ms / 1e6, 1),
            "jax_ms_at_jax_gemm_peak": round(at_peak_ms, 2),
            "max_speedup_at_jax_gemm_peak": round(torch_ms / at_peak_ms, 3),
            "flops_exact": exact, "torch_gflops_if_same_flops": round(f / torch_ms / 1e6, 1),
            "note": "matmul + convolution FLOPs of the JAX step's jaxpr (scans times their "
                    "length; per iteration for inversion rows); at_peak = those FLOPs at this "
                    "run's XLA f32 GEMM rate (environment.gemm_peak)"}


def time_row(name, cfg, rounds, inv_iters, peak):
    t0 = time.perf_counter()
    if name.startswith("inversion"):
        run_jax, run_torch, check, info = setup_inversion(name, cfg, inv_iters)
    elif name == "replay_meta_iteration":
        run_jax, run_torch, check, info = setup_replay(cfg)
    else:
        run_jax, run_torch, check, info = setup_kd(cfg)
    setup_s = time.perf_counter() - t0
    run_jax()  # warm-up after compilation
    run_torch()
    div = info.pop("per_call_divisor")
    flops = info.pop("_flops")()
    alts = info.pop("_alternatives", {})
    for a in alts.values():
        a["run"]()  # warm-up
    js, ts = [], []
    alt_ms = {alt: [] for alt in alts}
    for r in range(rounds):
        sides = [(run_jax, js), (run_torch, ts)] + [(a["run"], alt_ms[alt])
                                                    for alt, a in alts.items()]
        for fn, acc in sides:
            t = time.perf_counter()
            fn()
            acc.append(1e3 * (time.perf_counter() - t) / div)
        log(f"  {name} round {r + 1}/{rounds}: jax {js[-1]:.1f} ms, torch {ts[-1]:.1f} ms, "
            + "".join(f"{alt} {v[-1]:.1f} ms, " for alt, v in alt_ms.items())
            + f"load {loadavg()[0]}")
    jm, tm = statistics.median(js), statistics.median(ts)
    row = {"row": name, **info, "jax_ms": round(jm, 2), "torch_ms": round(tm, 2),
           "speedup": round(tm / jm, 3), "jax_ms_rounds": [round(v, 2) for v in js],
           "torch_ms_rounds": [round(v, 2) for v in ts],
           "setup_and_compile_s": round(setup_s, 2), "check": check,
           "bound": flop_bound(flops, div, jm, tm, peak)}
    if alts:
        row["alternatives"] = {alt: alternative_result(a, alt_ms[alt], div, jm, tm, peak)
                               for alt, a in alts.items()}
    return row


def alternative_result(alt: dict, ms: list, div: int, jax_ms: float, torch_ms: float,
                       peak: dict) -> dict:
    """One variant of a row's JAX side, timed in the same interleaved rounds."""
    m = statistics.median(ms)
    return {"settings": alt["settings"], "jax_ms": round(m, 2),
            "jax_ms_rounds": [round(v, 2) for v in ms], "speedup": round(torch_ms / m, 3),
            "vs_default_jax": round(jax_ms / m, 3), "check": alt["check"],
            "bound": flop_bound(alt["_flops"](), div, m, torch_ms, peak)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved (JAX, torch) rounds per row")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a test, not a benchmark)")
    p.add_argument("--inv-iters", type=int, default=None,
                   help="inversion iterations per timed call (default 2; 1 with --smoke)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads (default: the core count)")
    p.add_argument("--api-conv-impl", choices=CONV_IMPLS, default=API_CONV_IMPL,
                   help="convolution back-end of the inversion rows' black-box API (default: "
                        f"{API_CONV_IMPL!r}, what dfml_jax.teachers.load_pool builds)")
    p.add_argument("--alternatives", choices=("none", "fast", "all"), default="fast",
                   help="JAX variants timed beside each row's default: none; fast "
                        "(GEN_ALTERNATIVES, META_ALTERNATIVES: the default); all (also the "
                        "slow lax-back-end variants)")
    p.add_argument("--malloc", choices=("reuse", "default"), default="default",
                   help="default: glibc's own mmap threshold (what the official PyTorch code "
                        "runs with); reuse: dfml_jax.training.host_malloc.reuse_freed_memory() "
                        "(what dfml_jax's experiment runners do; it speeds up BOTH sides, which "
                        "share the process)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    cfg = dict(SMOKE if args.smoke else REAL, api_conv_impl=args.api_conv_impl,
               alternatives=args.alternatives)
    inv_iters = args.inv_iters or (1 if args.smoke else 2)
    n = cores()
    torch.set_num_threads(args.torch_threads or n)
    load_before = loadavg()
    env = environment()
    env["malloc"] = ("reuse_freed_memory" if args.malloc == "reuse" and reuse_freed_memory()
                     else "glibc default")
    log(f"env: {json.dumps(env)}; load before {load_before}")
    peak = gemm_peak(rounds=3 if args.smoke else 5, n=256 if args.smoke else 2048)
    env["gemm_peak"] = peak
    log(f"f32 GEMM peak: {peak}")
    rows = []
    for name in args.rows:
        log(f"row {name} ...")
        rows.append(time_row(name, cfg, args.rounds, inv_iters, peak))
    load_after = loadavg()
    loaded = max(load_before[0], load_after[0]) > n
    res = {"bench": "torch_reference", "smoke": bool(args.smoke), "rounds": args.rounds,
           "environment": env, "load_before": load_before, "load_after": load_after,
           "loaded": loaded,
           "note": ("speedup = torch_ms / jax_ms (medians of interleaved rounds, same run); "
                    + (LOADED_NOTE if loaded else "1-minute load within the core count")),
           "sizes": {k: v for k, v in cfg.items() if k != "inversion"}
           | {"inversion": {k: list(v) for k, v in cfg["inversion"].items()}},
           "rows": rows}
    text = json.dumps(res, indent=1)
    print(text, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
