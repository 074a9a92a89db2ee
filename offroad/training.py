"""The training loop: head optimisation on a frozen backbone, per-epoch validation, best model, resume.

Read `fit` top to bottom; `train_epoch` is one pass over the train split. The backbone is frozen, so
features of un-augmented images never change: val features (and train features when augmentation is
off) are computed once per run and reused every epoch. Train metrics come from the training forward
passes themselves. With several processes (offroad.launch) each takes an interleaved share of every global
batch and of the val split; confusion matrices and loss sums are all-reduced, rank 0's resume state is the
one every rank starts from, and each node's local rank 0 writes the files.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from offroad import artifacts, metrics
from offroad.artifacts import PreparedSplit
from offroad.augment import build_augment
from offroad.codebase import ROOT, import_closure
from offroad.config import Params, Train
from offroad.data import SegmentationDataset
from offroad.errors import PipelineError, check_interrupt, warn
from offroad.evaluation import Evaluation, eval_features, evaluate
from offroad.losses import build_loss, pixel_weight
from offroad.runtime import Dist, Run, synchronize
from offroad.segmenter import Segmenter, head_checkpoint, predicted_labels

TRAIN_ENTRY = "stages.train"  # its import closure is the code a resume state depends on


class TrainingError(PipelineError):
    pass


@dataclass(frozen=True)
class Outputs:
    best: Path = artifacts.CHECKPOINTS["best"]
    final: Path = artifacts.CHECKPOINTS["final"]
    last: Path = artifacts.LAST  # resume state
    history: Path = artifacts.HISTORY


@dataclass
class State:
    """Everything needed to continue a run after the last completed epoch."""
    fingerprint: str
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_iou: float = -1.0
    best_head: dict | None = None
    head: dict | None = None
    optimizer: dict | None = None
    scaler: dict | None = None  # fp16 loss scale
    complete: bool = False


def warn_about_weights(root: str, weights: str) -> None:
    """The backbone weights that most likely do not fit the data: pretrained on the synthetic set, random on
    real data."""
    synthetic = Path(root) == artifacts.SYNTHETIC
    if synthetic and weights == "dinov2":
        warn(f"model.weights is {weights!r} but data.root is the synthetic desert ({root}); "
             "set data.root to the real dataset (README: The real dataset)")
    elif not synthetic and weights == "random":
        warn(f"model.weights is 'random' with data.root {root}: the backbone is untrained, so the scores "
             "measure the pipeline, not DINOv2's features; add -S model.weights=dinov2 (README: Pretrained weights)")


def lr_at(epoch: int, params: Params) -> float:
    """Learning rate for 0-based `epoch`; cosine anneals per epoch to min_lr at epoch == epochs."""
    lr, sched = params.optimizer.lr, params.scheduler
    if sched.name == "constant":
        return lr
    return sched.min_lr + (lr - sched.min_lr) * (1 + math.cos(math.pi * epoch / params.train.epochs)) / 2


def make_optimizer(params: Params, parameters) -> torch.optim.Optimizer:
    cfg = params.optimizer
    # fused: one kernel for all parameters (AdamW step 0.6 ms instead of 2.7 ms for the head on the CPU)
    if cfg.name == "sgd":
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, dist: Dist) -> list[tuple[np.ndarray, bool]]:
    """Shuffled global batches for this epoch, each cut to this process's interleaved share, with whether the
    share counts. A share left empty by a last batch smaller than the world still joins the gradient
    all-reduce (DDP needs every process in every step): it runs image 0 with weight 0."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
    shares = [order[i:i + batch_size][dist.rank::dist.world] for i in range(0, n, batch_size)]
    return [(b, True) if len(b) else (np.zeros(1, np.int64), False) for b in shares]


class FeatureCache:
    """Backbone features of un-augmented images, each computed once on first use.

    Kept in the autocast dtype under amp: the head's first convolution casts them to it anyway, so this
    halves the memory without changing a result.
    """

    def __init__(self, model: Segmenter, images: np.ndarray, run: Run):
        self.model, self.images, self.run = model, images, run
        self.store: dict[int, torch.Tensor] = {}
        self.computed, self.seconds = 0, 0.0

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        missing = sorted({int(i) for i in idx} - self.store.keys())
        if missing:
            start = time.perf_counter()
            feats = eval_features(self.model, self.images[missing], self.run)
            self.store.update(zip(missing, feats.to(self.run.amp_dtype) if self.run.amp else feats))
            synchronize(self.run.device)
            self.computed += len(missing)
            self.seconds += time.perf_counter() - start
        return torch.stack([self.store[int(i)] for i in idx])


def fingerprint(params: Params, train: PreparedSplit, val: PreparedSplit, class_weights: torch.Tensor | None) -> str:
    """Identity of a run: the params that change results, the prepared data, the class weights, the code."""
    keyed = params.model_dump(mode="json", include={"data": {"classes", "ignore_index"}, "model": True,
                                                    "optimizer": True, "scheduler": True, "loss": True,
                                                    "augment": True, "train": True})
    for k in ("num_workers", "compile", "processes", "nodes"):  # how it runs, not what it computes
        keyed["train"].pop(k)
    h = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode())
    for split in (train, val):
        h.update(json.dumps([split.names, split.images.shape, split.made_with]).encode())
    if class_weights is not None:
        h.update(class_weights.numpy().tobytes())
    for f in import_closure(TRAIN_ENTRY):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:16]


def load_state(path: Path, fp: str, log: Callable[[str], None]) -> State:
    if not path.exists():
        return State(fp)
    try:
        state = State(**artifacts.read_torch(path, "resume state"))
    except Exception as e:  # an unreadable resume file only costs the resume, never the run
        log(f"resume: ignoring unreadable {path} ({type(e).__name__}); starting fresh")
        return State(fp)
    if state.fingerprint != fp:
        log(f"resume: {path} was made with other params, data or code; starting fresh")
        return State(fp)
    problem = inconsistency(state)
    if problem:
        log(f"resume: ignoring {path} ({problem}); starting fresh")
        return State(fp)
    if state.complete:
        return State(fp)
    return state


def inconsistency(state: State) -> str | None:
    """What makes a resume state unusable (a damaged or hand-edited file), or None."""
    if not isinstance(state.epoch, int) or state.epoch < 0:
        return f"epoch {state.epoch!r} is not a count"
    if not isinstance(state.history, list) or len(state.history) != state.epoch:
        return f"it holds {len(state.history) if isinstance(state.history, list) else 'no'} history rows for {state.epoch} epochs"
    if state.epoch and not all(isinstance(x, dict) for x in (state.head, state.best_head, state.optimizer)):
        return f"epoch {state.epoch} without its head, best head or optimizer state"
    if not 0 <= state.best_epoch <= state.epoch:
        return f"best epoch {state.best_epoch} is not one of its {state.epoch} epochs"
    return None


def resume(state: State, model: Segmenter, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> str | None:
    """Load the state's head, optimizer and loss scale; what does not fit the model (a state from a damaged or
    hand-edited file), or None."""
    try:
        model.head.load_state_dict(state.head)
        optimizer.load_state_dict(state.optimizer)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def history_row(epoch: int, lr: float, train: Evaluation, val: Evaluation) -> dict:
    ti, td, ta = metrics.epoch_scores(train.cm)
    vi, vd, va = metrics.epoch_scores(val.cm)
    r = lambda x: round(float(x), 6)  # noqa: E731
    return {"epoch": epoch, "train_loss": r(train.loss), "val_loss": r(val.loss), "train_iou": r(ti),
            "val_iou": r(vi), "train_dice": r(td), "val_dice": r(vd), "train_acc": r(ta), "val_acc": r(va),
            "lr": float(f"{lr:.6g}")}


class EpochBatches(torch.utils.data.Sampler):
    """Batch sampler of a DataLoader kept for the whole run, so its workers persist: `batches` is set to each
    epoch's (epoch, index) keys before the loader is iterated."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def augmented_loader(dataset: SegmentationDataset, workers: int, run: Run,
                     context: str | None = None) -> torch.utils.data.DataLoader:
    """Workers receive the dataset pickled once (memory maps by path) and live until the run ends."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=EpochBatches(), num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=run.device.type == "cuda",
                                       multiprocessing_context=context if workers else None)


def batches_per_forward(train: Train) -> int:
    """Train batches whose backbone features one forward computes: whole batches up to train.backbone_batch."""
    return max(1, train.backbone_batch // train.batch_size)


def train_inputs(model: Segmenter, train: PreparedSplit, epoch: int, batches: list,
                 loader: torch.utils.data.DataLoader | None, cache: FeatureCache | None, steps_per_forward: int,
                 run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, target) per batch: cached features of the plain images, or the backbone on augmented ones.

    The backbone is frozen, so the features of the next `steps_per_forward` batches can come from one larger
    forward (faster on CPUs whose matmuls need more rows to reach their peak); the steps stay the same.
    """
    if loader is None:
        for b, _ in batches:
            yield cache(b), torch.from_numpy(train.masks[b]).to(run.device).long()
        return
    groups = [batches[i:i + steps_per_forward] for i in range(0, len(batches), steps_per_forward)]
    loader.batch_sampler.batches = [[(epoch, int(i)) for b, _ in group for i in b] for group in groups]
    for group, (images, target, _) in zip(groups, loader):
        with run.autocast():
            feats = model.features(images.to(run.device, non_blocking=True))
        target = target.to(run.device, non_blocking=True)
        start = 0
        for b, _ in group:
            yield feats[start:start + len(b)], target[start:start + len(b)]
            start += len(b)


def train_epoch(model: Segmenter, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, loss_fn: torch.nn.Module, inputs: Iterator, batches: list,
                class_weights: torch.Tensor | None, run: Run, desc: str) -> Evaluation:
    """One optimizer step per batch. Each process scales its mean loss by its share of the global batch's
    pixel weight (x world, as DDP averages gradients), so N processes take the same steps as one."""
    model.train()
    K, dist = run.num_classes, run.dist
    cm = torch.zeros(K, K, dtype=torch.long, device=run.device)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # weighted loss, weight
    bar = tqdm(zip(batches, inputs), total=len(batches), desc=desc, leave=False, disable=None, file=sys.stderr)
    for step, ((_, counted), (feats, target)) in enumerate(bar):
        check_interrupt()
        with run.autocast():
            logits = model.decode(feats, target.shape[-2:], head)
        loss = loss_fn(logits.float(), target)
        weight = pixel_weight(target, class_weights, run.ignore_index) * counted
        if not torch.isfinite(loss) and weight > 0:
            raise TrainingError(f"loss is {loss.item()} at {desc}, batch {step + 1}")
        global_weight = dist.sum(weight.clone())
        if global_weight == 0:  # no labelled pixel in the whole global batch: nothing to learn from
            continue
        sums += torch.stack([torch.where(weight > 0, loss.detach() * weight, 0.0), weight])
        scale = dist.world * weight / global_weight
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(torch.where(weight > 0, loss, 0.0) * scale.float()).backward()
        scaler.step(optimizer)
        scaler.update()
        if counted:
            cm += metrics.confusion_matrix(predicted_labels(logits.detach()), target, K, run.ignore_index)
    loss_sum, weight_sum = dist.sum(sums).tolist()
    return Evaluation(loss_sum / weight_sum if weight_sum else math.nan, dist.sum(cm).cpu(), np.zeros(0))


def fit(model: Segmenter, head: torch.nn.Module, params: Params, train: PreparedSplit, val: PreparedSplit,
        class_weights: torch.Tensor | None, run: Run, out: Outputs = Outputs(),
        log: Callable[[str], None] = print) -> dict:
    """Train `head` (the module the optimizer sees: model.head, or a DDP / compiled wrapper of it), writing
    out.best, out.final, out.last and out.history. Returns the run's summary for metrics/train.json."""
    cfg, dist = params.train, run.dist
    fp = fingerprint(params, train, val, class_weights)
    others = [rank for rank, theirs in enumerate(dist.gather(fp)) if theirs != fp]
    if others:
        raise TrainingError(f"rank(s) {others} train with other params, prepared data, class weights or code than "
                            f"rank {dist.rank}: every node needs the same commit and data (`dvc pull` or `dvc repro`)")
    state = dist.from_rank0(lambda: load_state(out.last, fp, log))
    torch.manual_seed(cfg.seed)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    optimizer = make_optimizer(params, [p for p in head.parameters() if p.requires_grad])
    scaler = run.grad_scaler()
    if state.head is not None and (problem := resume(state, model, optimizer, scaler)):
        log(f"resume: ignoring {out.last} ({problem}); starting fresh")
        model.head.load_state_dict(fresh_head)
        state = State(fp)
        optimizer, scaler = make_optimizer(params, [p for p in head.parameters() if p.requires_grad]), run.grad_scaler()
    elif state.epoch:
        log(f"resume: continuing after epoch {state.epoch} from {out.last}")
    weights = None if class_weights is None else class_weights.to(run.device)
    loss_fn = build_loss(params.loss, weights, run.ignore_index)
    augment = build_augment(params.augment, run.ignore_index)
    loader = augmented_loader(SegmentationDataset(train, augment, cfg.seed), cfg.num_workers, run) if augment else None
    train_cache = None if augment else FeatureCache(model, train.images, run)
    val_cache, val_idx = FeatureCache(model, val.images, run), np.arange(dist.rank, len(val), dist.world)

    steps_per_forward = batches_per_forward(cfg)
    start_epoch, augmented_forwards, t0 = state.epoch, 0, time.perf_counter()
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.early_stopping_patience and epoch - state.best_epoch >= cfg.early_stopping_patience:
            break
        lr = lr_at(epoch, params)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batches = epoch_batches(len(train), cfg.batch_size, cfg.seed, epoch, dist)
        if loader is not None:
            augmented_forwards += sum(len(b) for b, _ in batches)
        inputs = train_inputs(model, train, epoch, batches, loader, train_cache, steps_per_forward, run)
        desc = f"epoch {epoch + 1}"
        try:
            train_stats = train_epoch(model, head, optimizer, scaler, loss_fn, inputs, batches, weights, run, desc)
        except TrainingError as e:
            kept = (f"the last good state (epoch {state.epoch}) is kept in {out.last}" if state.epoch
                    else "no epoch had completed, nothing was saved")
            raise TrainingError(f"{e}; stopped, {kept}. Try a lower optimizer.lr, or check "
                                f"{artifacts.CLASS_WEIGHTS}") from None
        val_stats = evaluate(model, val_cache, val.masks, val_idx, cfg.batch_size, loss_fn, weights, run)
        row = history_row(epoch + 1, lr_at(epoch + 1, params), train_stats, val_stats)
        improved = record_epoch(state, row, model, optimizer)
        state.scaler = scaler.state_dict() if scaler.is_enabled() else None
        if dist.main:  # the resume state; the other outputs are written once, at the end
            artifacts.save_torch(out.last, vars(state))
        log(f"epoch {epoch + 1:3d}/{cfg.epochs} | loss {row['train_loss']:.4f}/{row['val_loss']:.4f} | "
            f"mIoU {row['train_iou']:.4f}/{row['val_iou']:.4f} | acc {row['train_acc']:.4f}/{row['val_acc']:.4f} | "
            f"lr {row['lr']:.3g}" + (" *best" if improved else ""))

    seconds = time.perf_counter() - t0
    state.complete = True
    if dist.main:
        save_models(model, params, state, out)
    train_forwards = train_cache.computed if train_cache else augmented_forwards
    local = torch.tensor([val_cache.computed, val_cache.seconds, val_cache.computed + train_forwards],
                         dtype=torch.float64, device=run.device)
    return run_summary(state, cfg.epochs, start_epoch, seconds, dist.sum(local).tolist(), len(train), len(val))


def record_epoch(state: State, row: dict, model: Segmenter, optimizer: torch.optim.Optimizer) -> bool:
    """Append the epoch to the state; keep the head as the best if its val mIoU beats every earlier epoch."""
    state.history.append(row)
    state.epoch = row["epoch"]
    state.head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
    state.optimizer = optimizer.state_dict()
    improved = row["val_iou"] > state.best_val_iou
    if improved:
        state.best_epoch, state.best_val_iou, state.best_head = row["epoch"], row["val_iou"], state.head
    return improved


def save_models(model: Segmenter, params: Params, state: State, out: Outputs) -> None:
    final = head_checkpoint(model, params, epoch=state.epoch, val_iou=state.history[-1]["val_iou"])
    model.head.load_state_dict(state.best_head)
    best = head_checkpoint(model, params, epoch=state.best_epoch, val_iou=state.best_val_iou)
    artifacts.save_torch(out.final, final)
    artifacts.save_torch(out.best, best)
    artifacts.save_torch(out.last, vars(state))
    artifacts.write_history(state.history, out.history)


def run_summary(state: State, epochs: int, start_epoch: int, seconds: float, backbone: list[float],
                n_train: int, n_val: int) -> dict:
    """The run's figures for metrics/train.json. `backbone`: (cached forwards, their seconds, all forwards),
    summed over the processes."""
    cached, cache_seconds, forwards = backbone
    ran = state.epoch - start_epoch
    saved = ran * (n_train + n_val) - round(forwards)  # against no caching at all
    return {
        "best_epoch": state.best_epoch,
        "best_val_iou": state.best_val_iou,
        "epochs_run": state.epoch,
        "stopped_early": state.epoch < epochs,
        "resumed_from_epoch": start_epoch,
        "train_seconds": round(seconds, 1),
        "images_per_second": round(ran * n_train / seconds, 2) if seconds else None,
        "backbone_forwards": round(forwards),
        "backbone_forwards_saved": saved,
        # estimated from the time the val features took
        "backbone_seconds_saved": round(saved * cache_seconds / cached, 1) if cached else None,
    }
