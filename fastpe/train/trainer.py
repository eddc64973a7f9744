"""One training run: data, model, training loop, model selection on validation, test once.

Checkpoints: ``last.pt`` is written atomically after every epoch and holds everything a resumed
run needs to continue exactly as an uninterrupted one (model, optimizer, schedule, every RNG
state including the negative sampler's, epoch counter, early-stopping state, metric history);
``best.pt`` holds the weights of the best validation epoch. The test metrics are computed once,
at the end, with the best weights.

Started by ``torchrun`` with several processes, the run trains data parallel (see
:mod:`fastpe.train.distributed`): every process builds the same global batch from the same
seeded generator and trains on its contiguous share of the rows through
``DistributedDataParallel``; evaluation is split over the processes and gathered; only the first
process writes files and logs. Checkpoints hold the bare model, so a run resumes with any number
of processes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastpe.data import leave_one_out, load_dataset
from fastpe.data.readers import InteractionData
from fastpe.data.split import Split, epoch_batches, n_batches
from fastpe.models import build_model
from fastpe.nn.factory import needs_timestamps
from fastpe.ops import _dispatch as dispatch
from fastpe.train import checkpoint as ckpt
from fastpe.train import distributed
from fastpe.train.config import EVALUATION_ONLY, TrainConfig
from fastpe.train.evaluate import ModelScorer, PopularityScorer, evaluate, prepare_stage
from fastpe.train.lock import FolderLock
from fastpe.train.steps import STEPS, sampled_bce_loss
from fastpe.train.validation import RunInterrupted, TrainingDiverged, check_config, check_data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    if amp in ("off", "none", "fp32"):
        return None
    raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")


def model_defaults(cfg: TrainConfig) -> tuple[bool, str]:
    """``(causal, residual)`` after applying the model's defaults."""
    sasrec = cfg.model.lower() == "sasrec"
    causal = cfg.causal if cfg.causal is not None else sasrec
    residual = cfg.residual or ("add" if sasrec else "mul")
    return causal, residual


def target_mode(cfg: TrainConfig, causal: bool) -> str:
    if cfg.target == "auto":
        return "all" if causal else "prefix"
    if cfg.target == "all" and not causal:
        raise ValueError("target 'all' (every position is a training target) needs a causal encoder: a bidirectional "
                         "profile sees the item it should predict; use --target prefix or --causal")
    if cfg.target not in ("all", "prefix"):
        raise ValueError(f"target must be 'auto', 'all' or 'prefix', got {cfg.target!r}")
    return cfg.target


def make_model(cfg: TrainConfig, split: Split) -> torch.nn.Module:
    causal, residual = model_defaults(cfg)
    if cfg.next_slot and cfg.model.lower() != "carca":
        raise ValueError("next_slot is a CARCA option; SASRec already reads its most recent position")
    options = {"next_slot": True} if cfg.next_slot else {}
    features = None
    if cfg.use_attributes and split.data.item_features is not None and split.data.item_features.shape[1]:
        features = torch.as_tensor(split.data.item_features)
    return build_model(
        cfg.model, split.n_items, d_model=cfg.d_model, n_blocks=cfg.n_blocks, n_heads=cfg.n_heads,
        dropout=cfg.dropout, max_len=cfg.max_len, encoding=cfg.encoding, item_features=features,
        context_dim=split.context_dim if cfg.use_context else 0, causal=causal, residual=residual,
        cross_residual=cfg.cross_residual, ffn_mult=cfg.ffn_mult, activation=cfg.activation,
        rope_base=cfg.rope_base, backend=cfg.backend, **options,
    )


def make_optimizer(cfg: TrainConfig, model, device: torch.device, graphed: bool = False):
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in classes:
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")
    options = {"betas": (0.9, 0.98), "weight_decay": cfg.weight_decay}
    lr = cfg.lr
    if device.type == "cuda":
        options["fused"] = True  # one kernel for the whole update
        if graphed:
            options["capturable"] = True
            lr = torch.tensor(cfg.lr, device=device)  # updated in place by the schedule, outside the graph
    return classes[cfg.optimizer](model.parameters(), lr=lr, **options)


class WarmupSchedule:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total`` steps."""

    def __init__(self, optimizer, lr: float, warmup: int, total: int, kind: str = "constant"):
        if kind not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {kind!r}")
        self.optimizer, self.lr, self.warmup, self.total, self.kind = optimizer, lr, warmup, max(total, 1), kind
        self.step_count = 0

    def value(self, step: int) -> float:
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.kind == "cosine" and step >= self.warmup:
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * factor

    def apply(self) -> None:
        """Set the learning rate of the next step."""
        lr = self.value(self.step_count)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    train_sequences: int = 0
    epoch_seconds: list = field(default_factory=list)  # [epoch, train s, validation s] (metrics.jsonl)
    cpu_seconds: float = 0.0  # CPU time of this run's processes (all threads): its cost on an idle machine

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_out_dir(prefix: str = "train") -> Path:
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _move(a, device):
    if a is None:
        return None
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _batch_tensors(batch, device, use_context: bool, use_times: bool = False):
    """``(items, context, targets, target_context)``; with ``use_times`` also ``(None, timestamps)``,
    so that the step's ``loss_fn(*tensors)`` gets them as ``n_targets=None, timestamps=...``."""
    ctx = use_context and batch.context is not None
    tensors = (_move(batch.items, device), _move(batch.context, device) if ctx else None, _move(batch.targets, device),
               _move(batch.target_context, device) if ctx else None)
    return (*tensors, None, _move(batch.times, device)) if use_times else tensors


def short_candidates_warning(stage, eval_negatives: int) -> list[str]:
    """Users whose history covers most of the catalogue get fewer sampled negatives than asked."""
    short = int((stage.candidates[:, 1:] == 0).any(axis=1).sum())
    if not short or short == len(stage.candidates):  # all short: check_data's warning says it already
        return []
    return [f"warning: {short} of {len(stage.candidates)} evaluated users have fewer than --eval-negatives "
            f"{eval_negatives} items they never interacted with; their sampled candidates are fewer, which makes "
            "their sampled metrics easier"]


def _metric_name(key: str) -> str:
    """``ndcg@10`` -> ``NDCG@10``, ``hit@10`` -> ``HR@10``."""
    return key.replace("ndcg", "NDCG").replace("hit", "HR").replace("mrr", "MRR")


# The files of a run in its folder (what --restart removes).
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "config.json")


class Run:
    """Everything one training run holds; ``Run(cfg).execute()`` trains and returns the summary."""

    def __init__(self, cfg: TrainConfig, data: InteractionData | None = None, log=print):
        check_config(cfg)  # every option, before anything is read
        self.cfg = cfg
        self.log = log
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if cfg.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device (got {self.device}); on the CPU use the eager or "
                             "--compile step")
        self.device = distributed.setup(self.device)  # a torchrun launch: this process's device
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        if not self.main:
            self.log = lambda *args: None
        if self.world > 1:
            if cfg.cuda_graphs:
                raise ValueError(f"--cuda-graphs is not supported with {self.world} processes (torchrun): the "
                                 "gradient all-reduce is not captured; use the eager or --compile step")
            self.rows = distributed.local_rows(cfg.batch_size, self.world, self.rank)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_dataset(cfg.data, cfg.data_root, cfg.data_format, cfg.synthetic,
                                                               cfg.columns)
        self.split = leave_one_out(self.data)
        self.warnings = check_data(self.split, cfg)
        self.use_times = needs_timestamps(cfg.encoding)
        if self.use_times and self.data.timestamps is None:
            raise ValueError(f"encoding {cfg.encoding!r} needs timestamps, and the data set {self.data.name!r} has none")
        self.causal, _ = model_defaults(cfg)
        self.mode = target_mode(cfg, self.causal)
        torch.manual_seed(cfg.seed)
        self.model = make_model(cfg, self.split).to(self.device)
        self.train_model = self.model  # what the training step calls: DDP's wrapper with several processes
        if self.world > 1:
            self.train_model = distributed.wrap(self.model, self.device)
        self.optimizer = make_optimizer(cfg, self.model, self.device, graphed=cfg.cuda_graphs)
        self.steps_per_epoch = n_batches(self.split, cfg.batch_size, cfg.samples_per_user)
        self.schedule = WarmupSchedule(self.optimizer, cfg.lr, cfg.warmup_steps, cfg.epochs * self.steps_per_epoch,
                                       cfg.schedule)
        self.rng = np.random.default_rng([cfg.seed, 1])
        # The graphed step draws from the default CUDA generator (graph-safe); the others from their own.
        self.sampler = None
        if not cfg.cuda_graphs:
            self.sampler = torch.Generator(device=self.device)
            self.sampler.manual_seed(cfg.seed + 7919)
        else:
            torch.cuda.manual_seed(cfg.seed + 7919)
        self.valid = prepare_stage(self.split, "valid", cfg.max_len, cfg.eval_negatives, cfg.eval_seed, cfg.valid_users)
        self.warnings += short_candidates_warning(self.valid, cfg.eval_negatives)
        self.state = RunState()
        self.saved_epoch = 0  # the epoch last.pt holds
        # The default name holds the start time: the first process's, so that all write and read one folder.
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else distributed.from_main(default_out_dir())
        self.use_context = cfg.use_context and self.split.context is not None and cfg.model.lower() == "carca"
        self.select = cfg.select_metric
        self.describe()

    def describe(self) -> None:
        """Say what is about to run, before the first step: the data, the model, where the outputs go."""
        cfg = self.cfg
        self.log(f"data: {self.data.describe()}")
        for note in self.data.notes:
            self.log(f"data: {note}")
        parameters = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {cfg.model} + {cfg.encoding}, {parameters:,} parameters, device {self.device}, "
                 f"{cfg.epochs} epochs x {self.steps_per_epoch} steps of {cfg.batch_size}")
        self.log(f"output: {self.out_dir}")
        for warning in self.warnings:
            self.log(warning)

    # ----------------------------------------------------------------------------------- steps
    def loss_fn(self, items, context, targets, target_context, n_targets=None, timestamps=None):
        return sampled_bce_loss(self.train_model, items, context, targets, target_context, self.split.n_items,
                                self.cfg.negatives, self.sampler, self.mode == "all", n_targets,
                                (self.rank, self.world), timestamps)

    def batch_tensors(self, batch) -> tuple:
        """The step's inputs: the batch, or with several processes this process's rows of it and the
        global batch's number of targets (known to every process from the same global batch)."""
        if self.world == 1:
            return _batch_tensors(batch, self.device, self.use_context, self.use_times)
        n_targets = np.asarray(max(int((batch.targets != 0).sum()), 1), dtype=np.float32)
        rows = batch.rows(*self.rows)
        times = (_move(rows.times, self.device),) if self.use_times else ()
        return (*_batch_tensors(rows, self.device, self.use_context), _move(n_targets, self.device), *times)

    def make_step(self, kind: str, model=None, optimizer=None):
        model = model or self.model
        optimizer = optimizer or self.optimizer
        if model is self.model:
            loss_fn = self.loss_fn
        else:
            def loss_fn(items, context, targets, target_context, n_targets=None, timestamps=None):
                return sampled_bce_loss(model, items, context, targets, target_context, self.split.n_items,
                                        self.cfg.negatives, None if kind == "graphed" else self.sampler,
                                        self.mode == "all", timestamps=timestamps)
        if kind == "graphed" and self.cfg.compile:
            loss_fn = torch.compile(loss_fn, dynamic=False, backend=self.cfg.compile_backend)
        options = {"compile_backend": self.cfg.compile_backend} if kind == "compiled" else {}
        return STEPS[kind](loss_fn, model, optimizer, self.device, self.amp_dtype, self.cfg.clip_grad, **options)

    def step_kind(self) -> str:
        return "graphed" if self.cfg.cuda_graphs else "compiled" if self.cfg.compile else "eager"

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": ckpt.rng_state(self.rng, self.sampler),
            "state": self.state.to_dict(),
        }

    def restore(self, path: Path) -> None:
        try:
            saved = ckpt.load(path, self.device, keys=("config", "model", "optimizer", "schedule", "rng", "state"))
        except ckpt.CorruptCheckpointError as exc:
            raise ckpt.CorruptCheckpointError(f"{exc}; it cannot be resumed. {self.best_note()}Start the run again "
                                              "with --restart, or use another --out-dir") from exc
        old = TrainConfig.from_dict(saved["config"])
        diffs = old.differences(self.cfg)
        if diffs:
            raise ValueError(f"{path}: cannot resume, options that change training differ from the saved run: "
                             f"{'; '.join(diffs)} (saved != given)")
        changed = [k for k in sorted(EVALUATION_ONLY) if saved["config"].get(k) != self.cfg.to_dict()[k]]
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        ckpt.restore_rng_state(saved["rng"], self.rng, self.sampler)
        self.state = RunState(**saved["state"])
        self.saved_epoch = self.state.epoch
        self.log(f"resumed {path} after epoch {self.state.epoch}")
        if changed:
            self.log("evaluation options changed on resumption: " + ", ".join(
                f"{k} {saved['config'].get(k)!r} -> {self.cfg.to_dict()[k]!r}" for k in changed)
                + (" (epochs before and after were validated on different users)" if "valid_users" in changed else ""))

    def best_note(self) -> str:
        best = self.out_dir / "best.pt"
        try:
            epoch = ckpt.load(best, "cpu", keys=("model",)).get("epoch")
        except (OSError, ckpt.CorruptCheckpointError):
            return ""
        return f"{best} (the weights of epoch {epoch}, the best so far) is intact. "

    def prepare_folder(self) -> None:
        """After taking the lock: resume, restart or refuse a folder that holds a run."""
        cfg, last = self.cfg, self.out_dir / "last.pt"
        if cfg.restart:
            removed = [name for name in RUN_FILES if (self.out_dir / name).exists()]
            for name in removed:
                (self.out_dir / name).unlink()
            if removed:
                self.log(f"--restart: removed {', '.join(removed)} from {self.out_dir}")
        if last.exists():
            if not cfg.resume:
                raise FileExistsError(f"{self.out_dir} already holds a run (last.pt); pass --resume to continue it, "
                                      "--restart to start it again, or choose another --out-dir")
            self.restore(last)

    # ---------------------------------------------------------------------------------- training
    def train_epoch(self, step, epoch: int) -> float:
        cfg = self.cfg
        self.model.train()
        if self.rank > 0:
            # Dropout: one seed everywhere would give every shard the same masks. The first process
            # keeps the run's stream (saved in last.pt); the others are re-seeded each epoch, so a
            # resumed run with as many processes continues exactly.
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, self.rank, epoch]).generate_state(1)[0]))
        total = torch.zeros((), device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        count = 0
        sequences = 0  # of the global batch: the throughput counts every process's sequences
        bar = tqdm(total=self.steps_per_epoch, desc=f"{cfg.encoding} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and self.main), dynamic_ncols=True)
        start = time.perf_counter()
        for batch in epoch_batches(self.split, cfg.batch_size, cfg.max_len, self.mode, self.rng, cfg.samples_per_user):
            sequences += int((batch.targets != 0).any(axis=1).sum())
            self.schedule.apply()
            loss = step(*self.batch_tensors(batch))
            total += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), count, first_bad)
            count += 1
            bar.update(1)
            if count % 50 == 0:  # reading the loss syncs: only now and then, between steps
                self.check_finite(first_bad, epoch)
                bar.set_postfix(loss=f"{float(total) / count:.4f}")
        if self.world > 1:  # each process's loss is its share of the global mean, times the world size
            total = distributed.all_reduce_sum(total) / self.world
        mean_loss = float(total) / max(count, 1)  # also waits for the device
        self.check_finite(first_bad, epoch)
        self.state.train_seconds += time.perf_counter() - start
        self.state.train_sequences += sequences
        bar.close()
        return mean_loss

    def check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        bad = int(first_bad)
        if bad >= 0:
            step = epoch * self.steps_per_epoch + bad
            raise TrainingDiverged(
                f"training diverged: the loss is not finite at epoch {epoch + 1}, step {bad + 1} of "
                f"{self.steps_per_epoch} (step {step + 1} of the run), learning rate {self.schedule.value(step):.3g} "
                f"(--lr {self.cfg.lr:g}); the learning rate is the likely cause: lower --lr, or add --clip-grad 1.0 "
                "or more --warmup-steps")

    def evaluate_stage(self, stage, sampled=True, full=False, model=None, progress: str | None = None) -> dict:
        scorer = ModelScorer(model or self.model, stage, self.device, self.amp_dtype)
        try:
            return evaluate(scorer, stage, self.split.n_items, self.cfg.cutoffs, sampled, full,
                            self.cfg.exclude_history, self.cfg.eval_batch_size, self.device, sharded=True,
                            progress=progress if self.cfg.progress and self.main else None)
        except ValueError as exc:
            if "NaN" not in str(exc):
                raise
            raise TrainingDiverged(f"the model's scores are NaN after epoch {self.state.epoch}: training diverged "
                                   f"(--lr {self.cfg.lr:g}); lower --lr, or add --clip-grad 1.0") from None

    def charge_cpu(self) -> None:
        now = time.process_time()
        self.state.cpu_seconds += now - self.cpu_mark
        self.cpu_mark = now

    def execute(self) -> dict:
        lock = None
        if self.main:
            cfg = self.cfg
            lock = FolderLock(self.out_dir, f"fastpe train ({cfg.model} + {cfg.encoding}, seed {cfg.seed})")
            lock.acquire()
            if lock.note:
                self.log(f"note: {lock.note}")
        try:
            return self.train_and_test()
        except KeyboardInterrupt:
            kept = (f"{self.out_dir / 'last.pt'} keeps epoch {self.saved_epoch} (the epoch in progress is not saved)"
                    if self.saved_epoch else f"no epoch was complete, {self.out_dir} holds no checkpoint")
            raise RunInterrupted(self.out_dir, kept) from None
        finally:
            if lock is not None:
                lock.release()

    def train_and_test(self) -> dict:
        cfg = self.cfg
        self.cpu_mark = time.process_time()
        best = self.out_dir / "best.pt"
        self.prepare_folder()
        distributed.barrier()  # every process has looked at the folder before the first one writes to it
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(json.dumps(cfg.to_dict(), indent=2), self.out_dir / "config.json")
        step = self.make_step(self.step_kind())
        full_select = self.select.startswith("full_")
        kind, key = self.select.split("_", 1)
        cutoff = cfg.cutoffs[0] if 10 not in cfg.cutoffs else 10
        epochs_here = 0
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            epoch = self.state.epoch
            started = time.perf_counter()
            loss = self.train_epoch(step, epoch)
            trained = time.perf_counter()
            metrics = self.evaluate_stage(self.valid, sampled=not full_select, full=full_select,
                                          progress=f"validation, epoch {epoch + 1}")
            validated = time.perf_counter()
            value = metrics[self.select]
            improved = value > self.state.best
            if improved:
                self.state.best, self.state.best_epoch, self.state.bad_epochs = value, epoch + 1, 0
                if self.main:
                    ckpt.atomic_save({"model": self.model.state_dict(), "epoch": epoch + 1}, best)
            else:
                self.state.bad_epochs += 1
            self.state.epoch = epoch + 1
            self.charge_cpu()
            self.state.history.append({"epoch": epoch + 1, "loss": loss, **{f"valid_{k}": v for k, v in metrics.items()}})
            self.state.epoch_seconds.append([epoch + 1, trained - started, validated - trained])
            if cfg.patience and self.state.bad_epochs >= cfg.patience:
                self.state.stopped_early = True
            if self.main:
                ckpt.atomic_save(self.checkpoint(), self.out_dir / "last.pt")
                self.saved_epoch = self.state.epoch
                ckpt.atomic_write_text(self.metrics_lines(), self.out_dir / "metrics.jsonl")
            distributed.barrier()  # no process reads best.pt or stops before this epoch's files are complete
            others = [name for name in (f"hit@{cutoff}", f"ndcg@{cutoff}")
                      if name != key and f"{kind}_{name}" in metrics]
            shown = ", ".join(f"{_metric_name(name)} {metrics[f'{kind}_{name}']:.4f}" for name in others)
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, valid {kind} {_metric_name(key)} {value:.4f}"
                     f"{' (best)' if improved else ''}{', ' + shown if shown else ''}; {validated - started:.1f} s "
                     f"(train {trained - started:.1f} s, validation {validated - trained:.1f} s)")
            epochs_here += 1
            if cfg.stop_after_epochs and epochs_here >= cfg.stop_after_epochs and self.state.epoch < cfg.epochs:
                return {"interrupted": True, "epoch": self.state.epoch, "out_dir": str(self.out_dir)}
        return self.finish(best)

    def metrics_lines(self) -> str:
        """metrics.jsonl: one line per epoch, the history plus the epoch's train and validation seconds."""
        seconds = {e: {"train_seconds": t, "valid_seconds": v} for e, t, v in self.state.epoch_seconds}
        return "".join(ckpt.json_text({**entry, **seconds.get(entry["epoch"], {})}, indent=None) + "\n"
                       for entry in self.state.history)

    # ------------------------------------------------------------------------------- final report
    def finish(self, best_path: Path) -> dict:
        cfg = self.cfg
        if best_path.exists():
            self.model.load_state_dict(ckpt.load(best_path, self.device, keys=("model",))["model"])
        start = time.perf_counter()
        metrics = {}
        popularity = {}
        pop_scorer = PopularityScorer(self.split, self.device)
        dispatch.RAN.clear()
        for name in ("valid", "test"):
            stage = prepare_stage(self.split, name, cfg.max_len, cfg.eval_negatives, cfg.eval_seed)
            # Full ranking costs users x items scores: optionally on a fixed random subset of users.
            subset = cfg.full_ranking_users and cfg.full_ranking_users < len(stage.data.targets)
            full_users = (cfg.full_ranking_users if subset else len(stage.data.targets)) if cfg.full_ranking else 0
            self.log(f"evaluating {name} (best epoch {self.state.best_epoch}): {len(stage.data.targets)} users, each "
                     f"its item among 1 + {cfg.eval_negatives} sampled candidates"
                     + (f"; {full_users} users against all {self.split.n_items} items" if full_users else ""))
            metrics[name] = self.evaluate_stage(stage, True, cfg.full_ranking and not subset, progress=f"{name}")
            if cfg.full_ranking and subset:
                few = prepare_stage(self.split, name, cfg.max_len, cfg.eval_negatives, cfg.eval_seed,
                                    cfg.full_ranking_users)
                metrics[name].update(self.evaluate_stage(few, False, True, progress=f"{name}, full ranking"))
            if name == "test":
                popularity = evaluate(pop_scorer, stage, self.split.n_items, cfg.cutoffs, True,
                                      cfg.full_ranking and not subset, cfg.exclude_history, cfg.eval_batch_size,
                                      self.device, sharded=True)
                if cfg.full_ranking and subset:
                    popularity.update(evaluate(pop_scorer, few, self.split.n_items, cfg.cutoffs, False, True,
                                               cfg.exclude_history, cfg.eval_batch_size, self.device, sharded=True))
        valid_metrics, test_metrics = metrics["valid"], metrics["test"]
        ran = dict(sorted(dispatch.RAN.items()))  # what the evaluation of this model called
        eval_seconds = time.perf_counter() - start
        self.charge_cpu()
        throughput = {self.step_kind(): self.state.train_sequences / max(self.state.train_seconds, 1e-9)}
        if cfg.benchmark_steps and self.world == 1:
            throughput.update(self.benchmark(cfg.benchmark_steps))
        elif cfg.benchmark_steps and self.main:
            # The benchmark times one process's step on its own device (no DDP): named apart from
            # the data-parallel training throughput.
            throughput.update({f"{k} (1 process)": v for k, v in self.benchmark(cfg.benchmark_steps).items()})
        summary = {
            "data": self.data.name,
            "dataset": self.data.describe(),
            "model": cfg.model,
            "encoding": cfg.encoding,
            "rope_base": cfg.rope_base if cfg.encoding.strip().lower() == "rope" else None,
            "seed": cfg.seed,
            "device": str(self.device),
            "world_size": self.world,
            "backend": ", ".join(sorted(set(ran.values()))) or "none (no fused op in this model)",
            "backends": ran,
            "step": self.step_kind(),
            "threads": torch.get_num_threads(),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "target": self.mode,
            "causal": self.causal,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "epochs_run": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            "stopped_early": self.state.stopped_early,
            "train_seconds": self.state.train_seconds,
            "cpu_seconds": self.state.cpu_seconds,
            "eval_seconds": eval_seconds,
            "train_seq_per_s": throughput[self.step_kind()],
            "throughput_seq_per_s": throughput,
            "users": {"total": self.data.n_users, "evaluated": len(self.split.eval_users),
                      "not_evaluated": self.data.n_users - len(self.split.eval_users)},
            "data_notes": list(self.data.notes),
            "warnings": list(self.warnings),
            "full_ranking_users": (min(cfg.full_ranking_users, len(self.split.eval_users)) if cfg.full_ranking_users
                                   else len(self.split.eval_users)) if cfg.full_ranking else 0,
            "valid": valid_metrics,
            "test": test_metrics,
            "popularity_test": popularity,
            "history": self.state.history,
            "out_dir": str(self.out_dir),
        }
        if self.main:
            ckpt.atomic_write_text(ckpt.json_text(summary), self.out_dir / "summary.json")
        distributed.barrier()
        return summary

    def benchmark(self, steps: int) -> dict:
        """Training sequences/s of the eager, compiled and (on CUDA) graphed step on copies of the model."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 99])
        warmup = 5
        batches = []
        for batch in epoch_batches(self.split, cfg.batch_size, cfg.max_len, self.mode, rng, max(1, cfg.samples_per_user)):
            batches.append(_batch_tensors(batch, self.device, self.use_context, self.use_times))
            if len(batches) == warmup + steps:
                break
        while len(batches) < warmup + steps:
            batches.append(batches[len(batches) % max(1, len(batches))])
        results = {}
        for kind in ("eager", "compiled", "graphed"):
            if kind == "graphed" and self.device.type != "cuda":
                results[kind] = "not run: CUDA graphs need a CUDA device"
                continue
            model = copy.deepcopy(self.model).train()
            optimizer = make_optimizer(cfg, model, self.device, graphed=kind == "graphed")
            try:
                step = self.make_step(kind, model, optimizer)
                for b in batches[:warmup]:
                    step(*b)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = None
                for b in batches[warmup:]:
                    loss = step(*b)
                float(loss)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                results[kind] = steps * cfg.batch_size / (time.perf_counter() - start)
            except Exception as exc:  # a mode that fails here must not lose the finished run
                results[kind] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return results


def train(cfg: TrainConfig, data: InteractionData | None = None, log=print) -> dict:
    """Train one configuration (see :class:`TrainConfig`) and return its summary."""
    return Run(cfg, data, log).execute()
