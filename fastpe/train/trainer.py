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

from fastpe.backends import resolve_backend
from fastpe.data import leave_one_out, load_dataset
from fastpe.data.readers import InteractionData
from fastpe.data.split import Split, epoch_batches, n_batches
from fastpe.models import build_model
from fastpe.train import checkpoint as ckpt
from fastpe.train import distributed
from fastpe.train.config import TrainConfig
from fastpe.train.evaluate import ModelScorer, PopularityScorer, evaluate, prepare_stage
from fastpe.train.steps import STEPS, sampled_bce_loss


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
    features = None
    if cfg.use_attributes and split.data.item_features is not None and split.data.item_features.shape[1]:
        features = torch.as_tensor(split.data.item_features)
    return build_model(
        cfg.model, split.n_items, d_model=cfg.d_model, n_blocks=cfg.n_blocks, n_heads=cfg.n_heads,
        dropout=cfg.dropout, max_len=cfg.max_len, encoding=cfg.encoding, item_features=features,
        context_dim=split.context_dim if cfg.use_context else 0, causal=causal, residual=residual,
        cross_residual=cfg.cross_residual, ffn_mult=cfg.ffn_mult, activation=cfg.activation,
        rope_base=cfg.rope_base, backend=cfg.backend,
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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_out_dir(prefix: str = "train") -> Path:
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _move(a, device):
    if a is None:
        return None
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _batch_tensors(batch, device, use_context: bool):
    ctx = use_context and batch.context is not None
    return (_move(batch.items, device), _move(batch.context, device) if ctx else None, _move(batch.targets, device),
            _move(batch.target_context, device) if ctx else None)


def resolved_backends(device: torch.device) -> str:
    """The backends ``auto`` resolves to on ``device``, e.g. ``"torch"`` or ``"relative_attention=cuda, ..."``."""
    ops = ("relative_attention", "rotary", "rotatory_add", "concat_projection")
    names = {op: resolve_backend("auto", op, device) for op in ops}
    distinct = set(names.values())
    return distinct.pop() if len(distinct) == 1 else ", ".join(f"{k}={v}" for k, v in names.items())


class Run:
    """Everything one training run holds; ``Run(cfg).execute()`` trains and returns the summary."""

    def __init__(self, cfg: TrainConfig, data: InteractionData | None = None, log=print):
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
        self.data = data if data is not None else load_dataset(cfg.data, cfg.data_root, cfg.data_format, cfg.synthetic)
        self.split = leave_one_out(self.data)
        if len(self.split.train_users()) == 0:
            raise ValueError(f"{self.data.name}: no user has 2 training interactions; nothing to train on")
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
        self.state = RunState()
        # The default name holds the start time: the first process's, so that all write and read one folder.
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else distributed.from_main(default_out_dir())
        self.use_context = cfg.use_context and self.split.context is not None and cfg.model.lower() == "carca"
        self.select = cfg.select_metric
        allowed = [f"{kind}_{m}" for kind in ("sampled", "full") for m in
                   [f"{name}@{k}" for k in cfg.cutoffs for name in ("hit", "ndcg")] + ["mrr"]]
        if self.select not in allowed:
            raise ValueError(f"select_metric must be one of {', '.join(allowed)} (cutoffs {list(cfg.cutoffs)}), "
                             f"got {self.select!r}")

    # ----------------------------------------------------------------------------------- steps
    def loss_fn(self, items, context, targets, target_context, n_targets=None):
        return sampled_bce_loss(self.train_model, items, context, targets, target_context, self.split.n_items,
                                self.cfg.negatives, self.sampler, self.mode == "all", n_targets,
                                (self.rank, self.world))

    def batch_tensors(self, batch) -> tuple:
        """The step's inputs: the batch, or with several processes this process's rows of it and the
        global batch's number of targets (known to every process from the same global batch)."""
        if self.world == 1:
            return _batch_tensors(batch, self.device, self.use_context)
        n_targets = np.asarray(max(int((batch.targets != 0).sum()), 1), dtype=np.float32)
        return (*_batch_tensors(batch.rows(*self.rows), self.device, self.use_context), _move(n_targets, self.device))

    def make_step(self, kind: str, model=None, optimizer=None):
        model = model or self.model
        optimizer = optimizer or self.optimizer
        if model is self.model:
            loss_fn = self.loss_fn
        else:
            def loss_fn(items, context, targets, target_context):
                return sampled_bce_loss(model, items, context, targets, target_context, self.split.n_items,
                                        self.cfg.negatives, None if kind == "graphed" else self.sampler,
                                        self.mode == "all")
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
        saved = ckpt.load(path, self.device)
        old = TrainConfig.from_dict(saved["config"])
        diffs = old.differences(self.cfg)
        if diffs:
            raise ValueError(f"{path}: cannot resume, the configuration differs: {'; '.join(diffs)}")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        ckpt.restore_rng_state(saved["rng"], self.rng, self.sampler)
        self.state = RunState(**saved["state"])
        self.log(f"resumed {path} after epoch {self.state.epoch}")

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
            count += 1
            bar.update(1)
            if count % 50 == 0:  # reading the loss syncs: only now and then, between steps
                bar.set_postfix(loss=f"{float(total) / count:.4f}")
        if self.world > 1:  # each process's loss is its share of the global mean, times the world size
            total = distributed.all_reduce_sum(total) / self.world
        mean_loss = float(total) / max(count, 1)  # also waits for the device
        self.state.train_seconds += time.perf_counter() - start
        self.state.train_sequences += sequences
        bar.close()
        return mean_loss

    def evaluate_stage(self, stage, sampled=True, full=False, model=None) -> dict:
        scorer = ModelScorer(model or self.model, stage, self.device, self.amp_dtype)
        return evaluate(scorer, stage, self.split.n_items, self.cfg.cutoffs, sampled, full, self.cfg.exclude_history,
                        self.cfg.eval_batch_size, self.device, sharded=True)

    def execute(self) -> dict:
        cfg = self.cfg
        last, best = self.out_dir / "last.pt", self.out_dir / "best.pt"
        if last.exists():
            if not cfg.resume:
                raise FileExistsError(f"{self.out_dir} already holds a run (last.pt); pass --resume to continue it "
                                      "or choose another --out-dir")
            self.restore(last)
        distributed.barrier()  # every process has looked at the folder before the first one writes to it
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(json.dumps(cfg.to_dict(), indent=2), self.out_dir / "config.json")
        step = self.make_step(self.step_kind())
        full_select = self.select.startswith("full_")
        key = self.select.split("_", 1)[1]
        epochs_here = 0
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            epoch = self.state.epoch
            loss = self.train_epoch(step, epoch)
            metrics = self.evaluate_stage(self.valid, sampled=not full_select, full=full_select)
            value = metrics[self.select]
            improved = value > self.state.best
            if improved:
                self.state.best, self.state.best_epoch, self.state.bad_epochs = value, epoch + 1, 0
                if self.main:
                    ckpt.atomic_save({"model": self.model.state_dict(), "epoch": epoch + 1}, best)
            else:
                self.state.bad_epochs += 1
            self.state.epoch = epoch + 1
            self.state.history.append({"epoch": epoch + 1, "loss": loss, **{f"valid_{k}": v for k, v in metrics.items()}})
            if cfg.patience and self.state.bad_epochs >= cfg.patience:
                self.state.stopped_early = True
            if self.main:
                ckpt.atomic_save(self.checkpoint(), last)
                ckpt.atomic_write_text("".join(json.dumps(h) + "\n" for h in self.state.history),
                                       self.out_dir / "metrics.jsonl")
            distributed.barrier()  # no process reads best.pt or stops before this epoch's files are complete
            self.log(f"epoch {epoch + 1}: loss {loss:.4f}, valid {key} {value:.4f}{' (best)' if improved else ''}")
            epochs_here += 1
            if cfg.stop_after_epochs and epochs_here >= cfg.stop_after_epochs and self.state.epoch < cfg.epochs:
                return {"interrupted": True, "epoch": self.state.epoch, "out_dir": str(self.out_dir)}
        return self.finish(best)

    # ------------------------------------------------------------------------------- final report
    def finish(self, best_path: Path) -> dict:
        cfg = self.cfg
        if best_path.exists():
            self.model.load_state_dict(ckpt.load(best_path, self.device)["model"])
        start = time.perf_counter()
        metrics = {}
        popularity = {}
        pop_scorer = PopularityScorer(self.split, self.device)
        for name in ("valid", "test"):
            stage = prepare_stage(self.split, name, cfg.max_len, cfg.eval_negatives, cfg.eval_seed)
            # Full ranking costs users x items scores: optionally on a fixed random subset of users.
            subset = cfg.full_ranking_users and cfg.full_ranking_users < len(stage.data.targets)
            metrics[name] = self.evaluate_stage(stage, True, cfg.full_ranking and not subset)
            if cfg.full_ranking and subset:
                few = prepare_stage(self.split, name, cfg.max_len, cfg.eval_negatives, cfg.eval_seed,
                                    cfg.full_ranking_users)
                metrics[name].update(self.evaluate_stage(few, False, True))
            if name == "test":
                popularity = evaluate(pop_scorer, stage, self.split.n_items, cfg.cutoffs, True,
                                      cfg.full_ranking and not subset, cfg.exclude_history, cfg.eval_batch_size,
                                      self.device, sharded=True)
                if cfg.full_ranking and subset:
                    popularity.update(evaluate(pop_scorer, few, self.split.n_items, cfg.cutoffs, False, True,
                                               cfg.exclude_history, cfg.eval_batch_size, self.device, sharded=True))
        valid_metrics, test_metrics = metrics["valid"], metrics["test"]
        eval_seconds = time.perf_counter() - start
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
            "backend": resolved_backends(self.device) if cfg.backend == "auto" else cfg.backend,
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
            "eval_seconds": eval_seconds,
            "train_seq_per_s": throughput[self.step_kind()],
            "throughput_seq_per_s": throughput,
            "full_ranking_users": (min(cfg.full_ranking_users, len(self.split.eval_users)) if cfg.full_ranking_users
                                   else len(self.split.eval_users)) if cfg.full_ranking else 0,
            "valid": valid_metrics,
            "test": test_metrics,
            "popularity_test": popularity,
            "history": self.state.history,
            "out_dir": str(self.out_dir),
        }
        if self.main:
            ckpt.atomic_write_text(json.dumps(summary, indent=2), self.out_dir / "summary.json")
        distributed.barrier()
        return summary

    def benchmark(self, steps: int) -> dict:
        """Training sequences/s of the eager, compiled and (on CUDA) graphed step on copies of the model."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 99])
        warmup = 5
        batches = []
        for batch in epoch_batches(self.split, cfg.batch_size, cfg.max_len, self.mode, rng, max(1, cfg.samples_per_user)):
            batches.append(_batch_tensors(batch, self.device, self.use_context))
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
