"""The tasks of the fair protocol (``bench/protocol.py``): cells, backdoored models, measurements, re-tuning.

A **cell** is one backdoored model plus the defender's clean set: (architecture, attack, seed, clean-set size,
poison rate).  Everything here is deterministic in the cell (the data split, the trigger, the poisoned samples,
the training of the backdoored model), so a cell can be rebuilt in any process and its results re-run.

Data: the bundled MNIST-5k (:func:`fip_fast.evaluation.data.load_mnist5k`; 28×28, [0, 1]).  20 % is the test set
(1000 images); 10 % of the rest (400 images) is set aside for the defender, and the attacker trains on the
other 3600 images (poisoned at the cell's rate).  The defender's clean set is that 10 % (``clean = 0.10``) or a
class-stratified subset of it (``clean = 0.02``: 80 images, 8 per class) — so the two clean-set sizes purify the *same*
backdoored model.  A cell with ``data="textures"`` uses the same digits blended onto colour textures
(:func:`fip_fast.evaluation.data.mnist_on_textures`, 3×28×28, the textures seeded by the cell's seed): the held-out
data of ``python -m bench protocol heldout``.

Architectures (CPU-feasible, chosen so the full suite fits the time budget):

* ``cnn``: the demo CNN at width 16, hidden 128 (72 k parameters);
* ``resnet``: PreAct-ResNet-18 at width 8 with a stride-2 stem (18 layers, four stages, 176 k parameters).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The re-tuning attack lives in the package (``fip-fast demo`` reports it too); re-exported here for bench.protocol.
from fip_fast.evaluation.retune import Retune
from fip_fast.evaluation.retune import retune_asr as _retune_asr

ARCHS = ("cnn", "resnet")
ATTACKS = ("badnets", "blend", "sig", "trojan", "wanet")
#: Epochs of the attacker's training (Adam, lr 2e-3, cosine, batch 64) per architecture.
TRAIN_EPOCHS = {"cnn": 8, "resnet": 8}
POOL_CLEAN = 0.10          # share of the training pool set aside for the defender
#: The data sets and their channels: MNIST-5k, and the same digits on colour textures
#: (:func:`fip_fast.evaluation.data.mnist_on_textures`, the held-out data of ``python -m bench protocol heldout``).
DATA = {"mnist": 1, "textures": 3}


@dataclass(frozen=True)
class Cell:
    """One backdoored model and the defender's clean set."""

    arch: str
    attack: str
    seed: int
    clean: float            # share of the training pool the defender holds (≤ POOL_CLEAN)
    poison: float           # share of the attacker's training set that is poisoned
    target: int = 0
    data: str = "mnist"     # one of DATA; MNIST's keys carry no suffix (the runs made before the field stay valid)

    @property
    def _suffix(self) -> str:
        return "" if self.data == "mnist" else f"/{self.data}"

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.attack}/s{self.seed}/c{self.clean:g}/p{self.poison:g}/t{self.target}{self._suffix}"

    @property
    def model_key(self) -> str:   # the clean-set size does not change the backdoored model
        return (f"{self.arch}/{self.attack}/s{self.seed}/p{self.poison:g}/t{self.target}/e{TRAIN_EPOCHS[self.arch]}"
                f"{self._suffix}")

    @property
    def benign_key(self) -> str:
        return f"{self.arch}/benign/s{self.seed}/e{TRAIN_EPOCHS[self.arch]}{self._suffix}"

    @property
    def channels(self) -> int:
        return DATA[self.data]


def build_arch(arch: str, channels: int = 1) -> nn.Module:
    from fip_fast.evaluation.models import DemoCNN, preact_resnet18

    if arch == "cnn":
        return DemoCNN(10, channels, width=16, hidden=128)
    if arch == "resnet":
        return preact_resnet18(10, channels, width=8, stem_stride=2)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")


@dataclass
class Task:
    """A built cell: the backdoored model, the defender's clean set, the clean and triggered test sets."""

    cell: Cell
    model: nn.Module
    clean: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]
    triggered: Tuple[Tensor, Tensor]
    attack: object


def _stratified_subset(y: Tensor, share: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 31)
    out = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        k = max(1, int(round(share * idx.numel())))
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    return torch.cat(out).sort().values


def _split(cell: Cell):
    from fip_fast.evaluation.attacks import make_attack
    from fip_fast.evaluation.data import load_mnist5k, mnist_on_textures, split_dataset

    if not 0 < cell.clean <= POOL_CLEAN:
        raise ValueError(f"clean share must lie in (0, {POOL_CLEAN}], got {cell.clean}")
    if cell.data not in DATA:
        raise ValueError(f"unknown data {cell.data!r}; choose from {tuple(DATA)}")
    x, y = load_mnist5k()
    if cell.data == "textures":
        x = mnist_on_textures(x, seed=cell.seed)
    sp = split_dataset(x, y, test_fraction=0.2, val_fraction=POOL_CLEAN, seed=cell.seed)
    atk = make_attack(cell.attack, target=cell.target, image_shape=tuple(x.shape[1:]), seed=cell.seed)
    xc, yc = sp.val
    if cell.clean < POOL_CLEAN:
        idx = _stratified_subset(yc, cell.clean / POOL_CLEAN, cell.seed)
        xc, yc = xc[idx], yc[idx]
    return sp, atk, (xc, yc)


def _train(cell: Cell, sp, atk, poison: bool = True) -> nn.Module:
    import warnings

    from fip_fast.evaluation.train import train_backdoored

    xt, yt = sp.train
    if poison:
        with warnings.catch_warnings():          # a clean-label attack at 10 % poisons all target samples
            warnings.simplefilter("ignore")
            xt, yt, _ = atk.poison_train(xt, yt, rate=cell.poison, seed=cell.seed)
    torch.manual_seed(cell.seed)
    model = build_arch(cell.arch, cell.channels)
    return train_backdoored(model, xt, yt, epochs=TRAIN_EPOCHS[cell.arch], lr=2e-3, seed=cell.seed,
                            progress=False)


def _cached(cache: Path, cell: Cell, key: str, make) -> nn.Module:
    """The model ``make()`` builds, stored under ``cache`` by ``key`` (safetensors, weights only)."""
    from safetensors.torch import load_file, save_file

    f = cache / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".safetensors")
    model = build_arch(cell.arch, cell.channels)
    if f.exists():
        model.load_state_dict(load_file(str(f)))
        return model.eval()
    model = make()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"key": key})
    tmp.replace(f)
    return model.eval()


def build_task(cell: Cell, cache: Path) -> Task:
    sp, atk, clean = _split(cell)
    model = _cached(cache, cell, cell.model_key, lambda: _train(cell, sp, atk))
    return Task(cell, model, clean, sp.test, atk.triggered_test(*sp.test), atk)


def benign_model(cell: Cell, cache: Path) -> nn.Module:
    """The same architecture trained on the same (unpoisoned) training set: the re-tuning attack's control."""
    sp, atk, _ = _split(cell)
    return _cached(cache, cell, cell.benign_key, lambda: _train(cell, sp, atk, poison=False))


def model_digest(model: nn.Module) -> str:
    """The first 16 hex digits of θ0's fingerprint (:func:`fip_fast.pipeline.checkpoint.theta0_fingerprint`): which
    backdoored model a run purified.  The cache retrains a missing model, and training is not bit-reproducible
    across machines, so the report checks that every run of a cell saw the same one."""
    from fip_fast.pipeline.checkpoint import theta0_fingerprint

    return theta0_fingerprint(model)[:16]


# --------------------------------------------------------------------------------------------- measurements
def retune_asr(model: nn.Module, task: Task, rt: Retune = Retune()) -> float:
    """ASR of a copy of ``model`` after the re-tuning attack ``rt`` on the cell's clean set (``model`` itself is
    not modified): :func:`fip_fast.evaluation.retune.retune_asr`, seeded with the cell's seed."""
    return _retune_asr(model, task.clean, task.triggered, task.attack, task.cell.target, rt, seed=task.cell.seed)


@dataclass(frozen=True)
class MildRetune:
    """The milder re-tuning attack, PAM's own ("Uncovering, Explaining, and Mitigating the Superficial Safety of
    Backdoor Defense", NeurIPS 2024; ``fine_tune/ft_poison.py`` of AISafety-HKUST/stable_backdoor_purification:
    ``--split_ratio 0.02 --poison_num 5 --epochs 5 --lr 0.01``, SGD momentum 0.9, batch 128): fine-tune on a
    ``split`` share of the training pool (here the class-stratified 2 % subset of the defender's pool, 80 images —
    for the 2 % cells, their own clean set) in which ``n_trigger`` images of non-target classes carry the trigger
    and the target label, for ``epochs`` shuffled epochs.  With 80 images and batch 128 an epoch is one batch: 5
    steps, each with 5 triggered images among 80 (today's :class:`Retune`: 10 steps, 1 among 32)."""

    split: float = 0.02
    n_trigger: int = 5
    epochs: int = 5
    lr: float = 0.01
    batch: int = 128


def mild_retune_set(task: Task, rt: MildRetune = MildRetune()) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x, y, poisoned)``: the attack's fine-tuning set — the ``rt.split`` subset of the defender's pool (the same
    seeded stratified draw as the 2 % cells' clean set) with ``rt.n_trigger`` non-target images (seeded choice)
    replaced by their triggered versions labelled with the target; ``poisoned``: their indices."""
    xc, yc = task.clean
    if task.cell.clean > rt.split:
        idx = _stratified_subset(yc, rt.split / task.cell.clean, task.cell.seed)
        xc, yc = xc[idx], yc[idx]
    cand = torch.nonzero(yc != task.cell.target).flatten()
    if cand.numel() < rt.n_trigger:
        raise ValueError(f"the {rt.split:.0%} split holds {cand.numel()} non-target images, fewer than n_trigger="
                         f"{rt.n_trigger}")
    g = torch.Generator().manual_seed(task.cell.seed + 1307)
    pick = cand[torch.randperm(cand.numel(), generator=g)[:rt.n_trigger]].sort().values
    x, y = xc.clone(), yc.clone()
    x[pick] = task.attack.apply(xc[pick])
    y[pick] = task.cell.target
    return x, y, pick


def retune_mild_asr(model: nn.Module, task: Task, rt: MildRetune = MildRetune()) -> float:
    """ASR of a copy of ``model`` after the milder re-tuning attack ``rt`` (``model`` itself is not modified)."""
    from fip_fast.evaluation.metrics import attack_success_rate

    m = copy.deepcopy(model).train()
    x, y, _ = mild_retune_set(task, rt)
    g = torch.Generator().manual_seed(task.cell.seed + 1308)
    opt = torch.optim.SGD(m.parameters(), lr=rt.lr, momentum=0.9)
    for _ in range(rt.epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], rt.batch):
            b = perm[i:i + rt.batch]
            loss = F.cross_entropy(m(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    m.eval()
    return float(attack_success_rate(m, task.triggered[0], task.triggered[1], task.cell.target))


def measure(model: nn.Module, task: Task, *, lam: bool = False) -> Dict[str, float]:
    """Clean test ACC, ASR and RA on the triggered test set; optionally λ_max (power iteration, 256 clean test
    images, all parameters)."""
    from fip_fast.evaluation.metrics import evaluate

    out = evaluate(model, task.test, task.triggered, task.cell.target)
    if lam:
        from fip_fast.evaluation.smoothness import hessian_max_eigenvalue

        out["lambda_max"] = float(hessian_max_eigenvalue(model.eval(), task.test[0][:256], task.test[1][:256],
                                                         iters=30, tol=1e-3))
    return out


def config_fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_from_dict(d: dict) -> Cell:
    return Cell(**d)


def cell_dict(cell: Cell) -> dict:
    return asdict(cell)


def default_cache() -> Path:
    import os

    root = os.environ.get("FIP_FAST_CACHE") or str(Path.home() / ".cache" / "fip_fast")
    return Path(root) / "protocol"


def maybe(d: Optional[dict], k: str, default=float("nan")):
    return (d or {}).get(k, default)
