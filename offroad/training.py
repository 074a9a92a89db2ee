"""The training loop: head optimisation on a frozen backbone, per-epoch validation, best model, resume.

Read `fit` top to bottom: it builds a `Trainer` (what every step uses) once, then runs
`train_epoch`, one pass over the train split, and `evaluate` on val each epoch. The backbone is frozen, so
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
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from offroad import artifacts, atomic, metrics
from offroad.artifacts import PreparedSplit
from offroad.augment import build_augment
from offroad.codebase import source_digest
from offroad.config import Params, Train
from offroad.data import SegmentationDataset
from offroad.errors import PipelineError, check_interrupt, warn
from offroad.evaluation import Evaluation, Scoring, eval_features, evaluate
from offroad.losses import PixelLoss, build_loss
from offroad.runtime import Dist, Run, choose_attention, synchronize
from offroad.segmenter import Segmenter, head_checkpoint, predicted_labels


class TrainingError(PipelineError):
    pass


@dataclass(frozen=True)
class Outputs:
    best: Path = artifacts.CHECKPOINTS["best"]
    final: Path = artifacts.CHECKPOINTS["final"]
    last: Path = artifacts.LAST  # resume state
    live: Path = artifacts.LIVE  # DVCLive's log: per-epoch history and the run's results
    facts: Path = artifacts.TRAIN_RUN  # how the run ran

    @classmethod
    def inside(cls, folder: Path) -> "Outputs":
        """Every output in `folder` (a run outside the pipeline's files)."""
        return cls(*(folder / f"{k}.pt" for k in ("best", "final", "last")), folder / "dvclive", folder / "run.json")


@dataclass(frozen=True)
class RunInputs:
    """What a run is made from besides params: the prepared splits, the class weights (None unless
    loss.class_weighted) and a digest of the code that trains (codebase.source_digest of the entry point)."""
    train: PreparedSplit
    val: PreparedSplit
    class_weights: torch.Tensor | None = None
    code: str = field(default_factory=lambda: source_digest("offroad.training"))


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


Batches = list[tuple[np.ndarray, bool]]  # an epoch's shares of its global batches, and whether each counts


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, dist: Dist) -> Batches:
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


def fingerprint(params: Params, inputs: RunInputs) -> str:
    """Identity of a run: the params that change results, the prepared data, the class weights, the code."""
    keyed = params.model_dump(mode="json", include={"data": {"classes", "ignore_index"}, "model": True,
                                                    "optimizer": True, "scheduler": True, "loss": True,
                                                    "augment": True, "train": True})
    for k in ("num_workers", "compile", "processes", "nodes"):  # how it runs, not what it computes
        keyed["train"].pop(k)
    h = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode())
    for split in (inputs.train, inputs.val):
        h.update(json.dumps([split.names, split.images.shape, split.made_with]).encode())
    if inputs.class_weights is not None:
        h.update(inputs.class_weights.numpy().tobytes())
    h.update(inputs.code.encode())
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


def resume(state: State, t: Trainer) -> str | None:
    """Load the state's head, optimizer and loss scale; what does not fit the model (a state from a damaged or
    hand-edited file), or None."""
    try:
        t.model.head.load_state_dict(state.head)
        t.optimizer.load_state_dict(state.optimizer)
        if state.scaler:
            t.scaler.load_state_dict(state.scaler)
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


class TrainFeed:
    """(features, target) of each train batch: cached features of the plain images, or, with augmentation,
    the backbone on augmented images from a DataLoader kept for the whole run.

    The backbone is frozen, so the features of the next `batches_per_forward` batches can come from one
    larger forward (faster on CPUs whose matmuls need more rows to reach their peak); the steps stay the same.
    """

    def __init__(self, model: Segmenter, split: PreparedSplit, params: Params, run: Run):
        self.model, self.split, self.run = model, split, run
        self.per_forward = batches_per_forward(params.train)
        augment = build_augment(params.augment, run.ignore_index)
        dataset = SegmentationDataset(split, augment, params.train.seed)
        self.loader = augmented_loader(dataset, params.train.num_workers, run) if augment else None
        self.cache = None if augment else FeatureCache(model, split.images, run)
        self.augmented = 0  # images the backbone saw augmented

    @property
    def forwards(self) -> int:
        return self.cache.computed if self.cache else self.augmented

    def __call__(self, epoch: int, batches: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        run = self.run
        if self.loader is None:
            for b, _ in batches:
                yield self.cache(b), torch.from_numpy(self.split.masks[b]).to(run.device).long()
            return
        self.augmented += sum(len(b) for b, _ in batches)
        groups = [batches[i:i + self.per_forward] for i in range(0, len(batches), self.per_forward)]
        self.loader.batch_sampler.batches = [[(epoch, int(i)) for b, _ in group for i in b] for group in groups]
        for group, (images, target, _) in zip(groups, self.loader):
            with run.autocast():
                feats = self.model.features(images.to(run.device, non_blocking=True))
            target = target.to(run.device, non_blocking=True)
            start = 0
            for b, _ in group:
                yield feats[start:start + len(b)], target[start:start + len(b)]
                start += len(b)


@dataclass
class Trainer:
    """What every training step uses, built once per run: the model and the module the optimizer updates
    (model.head, or a compiled or DDP wrapper of it), the optimizer, the fp16 loss scale, the loss with its
    class weights, and how the run runs."""
    model: Segmenter
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss: PixelLoss
    run: Run

    @classmethod
    def build(cls, model: Segmenter, params: Params, class_weights: torch.Tensor | None, run: Run) -> "Trainer":
        head = torch.compile(model.head) if params.train.compile else model.head
        if torch.distributed.is_initialized():
            head = torch.nn.parallel.DistributedDataParallel(head)
        weights = None if class_weights is None else class_weights.to(run.device)
        return cls(model, head, make_optimizer(params, [p for p in head.parameters() if p.requires_grad]),
                   run.grad_scaler(), build_loss(params.loss, weights, run.ignore_index), run)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def train_epoch(t: Trainer, inputs: Iterable[tuple[torch.Tensor, torch.Tensor]], batches: Batches,
                desc: str) -> Evaluation:
    """One optimizer step per batch. Each process scales its mean loss by its share of the global batch's
    pixel weight (x world, as DDP averages gradients), so N processes take the same steps as one."""
    t.model.train()
    run, dist = t.run, t.run.dist
    K = run.num_classes
    cm = torch.zeros(K, K, dtype=torch.long, device=run.device)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # weighted loss, weight
    bar = tqdm(zip(batches, inputs), total=len(batches), desc=desc, leave=False, disable=None, file=sys.stderr)
    for step, ((_, counted), (feats, target)) in enumerate(bar):
        check_interrupt()
        with run.autocast():
            logits = t.model.decode(feats, target.shape[-2:], t.head)
        loss = t.loss(logits.float(), target)
        weight = t.loss.pixel_weight(target) * counted
        if not torch.isfinite(loss) and weight > 0:
            raise TrainingError(f"loss is {loss.item()} at {desc}, batch {step + 1}")
        global_weight = dist.sum(weight.clone())
        if global_weight == 0:  # no labelled pixel in the whole global batch: nothing to learn from
            continue
        sums += torch.stack([torch.where(weight > 0, loss.detach() * weight, 0.0), weight])
        scale = dist.world * weight / global_weight
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(torch.where(weight > 0, loss, 0.0) * scale.float()).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        if counted:
            cm += metrics.confusion_matrix(predicted_labels(logits.detach()), target, K, run.ignore_index)
    loss_sum, weight_sum = dist.sum(sums).tolist()
    return Evaluation(loss_sum / weight_sum if weight_sum else math.nan, dist.sum(cm).cpu(), np.zeros(0))


def fit(model: Segmenter, params: Params, inputs: RunInputs, run: Run, out: Outputs = Outputs(),
        log: Callable[[str], None] = print) -> dict:
    """Train model.head, writing out.last and DVCLive's log in out.live as each epoch ends; at the end
    out.best, out.final, out.last and out.facts as one set, then the results into the log. Returns the run's
    summary."""
    cfg, dist = params.train, run.dist
    fp = fingerprint(params, inputs)
    others = [rank for rank, theirs in enumerate(dist.gather(fp)) if theirs != fp]
    if others:
        raise TrainingError(f"rank(s) {others} train with other params, prepared data, class weights or code than "
                            f"rank {dist.rank}: every node needs the same commit and data (`dvc pull` or `dvc repro`)")
    torch.manual_seed(cfg.seed)
    t = Trainer.build(model, params, inputs.class_weights, run)
    state = initial_state(t, params, dist.from_rank0(lambda: load_state(out.last, fp, log)), out.last, log)
    feed = TrainFeed(model, inputs.train, params, run)
    val_cache = FeatureCache(model, inputs.val.images, run)
    val = Scoring(val_cache, inputs.val.masks, np.arange(dist.rank, len(inputs.val), dist.world), cfg.batch_size)
    live = open_log(out.live, state.history) if dist.writes_outputs else None

    start_epoch, started = state.epoch, time.perf_counter()
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.early_stopping_patience and epoch - state.best_epoch >= cfg.early_stopping_patience:
            log(f"early stopping: no val mIoU gain in {epoch - state.best_epoch} epochs after epoch {state.best_epoch} "
                f"({state.best_val_iou:.4f}); stopped after epoch {epoch} of {cfg.epochs}")
            break
        t.set_lr(lr_at(epoch, params))
        batches = epoch_batches(len(inputs.train), cfg.batch_size, cfg.seed, epoch, dist)
        try:
            train_stats = train_epoch(t, feed(epoch, batches), batches, f"epoch {epoch + 1}")
        except TrainingError as e:
            kept = (f"the last good state (epoch {state.epoch}) is kept in {out.last}" if state.epoch
                    else "no epoch had completed, nothing was saved")
            raise TrainingError(f"{e}; stopped, {kept}. Try a lower optimizer.lr, or check "
                                f"{artifacts.CLASS_WEIGHTS}") from None
        val_stats = evaluate(model, t.loss, val, run)
        row = history_row(epoch + 1, lr_at(epoch + 1, params), train_stats, val_stats)
        improved = record_epoch(state, row, t)
        if dist.writes_outputs:  # the resume state and the live log; the models are written once, at the end
            atomic.save_torch(out.last, vars(state))
            log_epoch(live, row)
        log(epoch_line(row, cfg.epochs) + eta(time.perf_counter() - started, epoch + 1 - start_epoch,
                                              cfg.epochs - epoch - 1) + (" *best" if improved else ""))

    seconds = time.perf_counter() - started
    state.complete = True
    local = [val_cache.computed + feed.forwards, val_cache.computed, val_cache.seconds]
    work = BackboneWork(*dist.sum(torch.tensor(local, dtype=torch.float64, device=run.device)).tolist(),
                        len(inputs.train), len(inputs.val))
    summary = run_summary(state, cfg.epochs, start_epoch, seconds, work)
    if dist.writes_outputs:
        with atomic.together():  # all of this run's or, if a write fails, all of the previous one's
            save_models(model, params, state, out)
            artifacts.write_run_facts(out.facts, {**summary, **run_facts(params, run)})
        close_log(live, state, summary)
    return summary


def initial_state(t: Trainer, params: Params, state: State, last: Path, log: Callable[[str], None]) -> State:
    """The run's first state: `state` loaded into the head, optimizer and loss scale, or a fresh one (the head
    as initialised) when it does not fit them."""
    if state.head is None:
        return state
    fresh_head = {k: v.clone() for k, v in t.model.head.state_dict().items()}
    problem = resume(state, t)
    if problem is None:
        log(f"resume: continuing after epoch {state.epoch} from {last}")
        return state
    log(f"resume: ignoring {last} ({problem}); starting fresh")
    t.model.head.load_state_dict(fresh_head)
    t.optimizer = make_optimizer(params, [p for p in t.head.parameters() if p.requires_grad])
    t.scaler = t.run.grad_scaler()
    return State(state.fingerprint)


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:3d}/{epochs} | loss {row['train_loss']:.4f}/{row['val_loss']:.4f} | "
            f"mIoU {row['train_iou']:.4f}/{row['val_iou']:.4f} | acc {row['train_acc']:.4f}/{row['val_acc']:.4f} | "
            f"lr {row['lr']:.3g}")


def eta(seconds: float, done: int, left: int) -> str:
    """` | 41 s/epoch, 9m20s left`: the mean epoch so far, and the time to the last epoch (early stopping may
    end the run sooner)."""
    per = seconds / done
    minutes, rest = divmod(round(per * left), 60)
    return f" | {per:.0f} s/epoch, {minutes}m{rest:02d}s left"


def record_epoch(state: State, row: dict, t: Trainer) -> bool:
    """Append the epoch to the state; keep the head as the best if its val mIoU beats every earlier epoch."""
    state.history.append(row)
    state.epoch = row["epoch"]
    state.head = {k: v.detach().cpu().clone() for k, v in t.model.head.state_dict().items()}
    state.optimizer = t.optimizer.state_dict()
    state.scaler = t.scaler.state_dict() if t.scaler.is_enabled() else None
    improved = row["val_iou"] > state.best_val_iou
    if improved:
        state.best_epoch, state.best_val_iou, state.best_head = row["epoch"], row["val_iou"], state.head
    return improved


def save_models(model: Segmenter, params: Params, state: State, out: Outputs) -> None:
    final = head_checkpoint(model, params, epoch=state.epoch, val_iou=state.history[-1]["val_iou"])
    model.head.load_state_dict(state.best_head)
    best = head_checkpoint(model, params, epoch=state.best_epoch, val_iou=state.best_val_iou)
    atomic.save_torch(out.final, final)
    atomic.save_torch(out.best, best)
    atomic.save_torch(out.last, vars(state))


def run_facts(params: Params, run: Run) -> dict:
    """Where and how the run ran, besides its timings."""
    return {"device": run.device.type, "world_size": run.dist.world, "precision": run.precision,
            "attention": "{} ({})".format(*choose_attention(params.model.attention, device_type=run.device.type)),
            "backbone": params.model.backbone, "backbone_weights": params.model.weights}


def open_log(folder: Path, history: list[dict]):
    """DVCLive's log in `folder`, started afresh and filled with the epochs `history` already holds, so a
    resumed run continues the same log."""
    import sqlite3  # noqa: PLC0415
    from dvclive import Live  # noqa: PLC0415 (imports dvc, slow: only the process that writes outputs needs it)

    try:
        live = Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None)
    except sqlite3.Error as e:  # DVC's state database, e.g. on a full disk
        raise TrainingError(f"{folder}: cannot start DVCLive's log (DVC's state database: {e})") from None
    for row in history:
        log_epoch(live, row)
    return live


def log_epoch(live, row: dict) -> None:
    """One epoch's history row as DVCLive metrics at step = the epoch; written at once (`dvc exp show`,
    `dvc plots` and Studio see it while training runs)."""
    live.step = row["epoch"]
    for column in artifacts.HISTORY_COLUMNS[1:]:
        live.log_metric(artifacts.history_metric(column), row[column])
    live.next_step()


def close_log(live, state: State, summary: dict) -> None:
    """The run's results into DVCLive's summary (dvclive/metrics.json), at the last epoch's step."""
    live.step = state.epoch
    live.summary.update({k: summary[k] for k in artifacts.RESULT_FIELDS})
    live.end()


@dataclass(frozen=True)
class BackboneWork:
    """A run's backbone forwards, summed over the processes, and the images an epoch would need without
    caching."""
    forwards: float
    cached: float  # forwards of images whose features were cached
    cached_seconds: float
    train_images: int
    val_images: int


def run_summary(state: State, epochs: int, start_epoch: int, seconds: float, work: BackboneWork) -> dict:
    """The run's figures: its results (DVCLive's summary) and how it ran (metrics/run/train.json)."""
    ran = state.epoch - start_epoch
    saved = ran * (work.train_images + work.val_images) - round(work.forwards)  # against no caching at all
    return {
        "best_epoch": state.best_epoch,
        "best_val_iou": state.best_val_iou,
        "epochs_run": state.epoch,
        "stopped_early": state.epoch < epochs,
        "resumed_from_epoch": start_epoch,
        "train_seconds": round(seconds, 1),
        "images_per_second": round(ran * work.train_images / seconds, 2) if seconds else None,
        "backbone_forwards": round(work.forwards),
        "backbone_forwards_saved": saved,
        # estimated from the time the val features took
        "backbone_seconds_saved": round(saved * work.cached_seconds / work.cached, 1) if work.cached else None,
    }
