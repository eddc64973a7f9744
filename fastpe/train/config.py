"""The configuration of one training run (every field is a ``fastpe train`` option)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# Options that only change how the run is evaluated and reported: a resumed run may change them.
# ``valid_users`` changes the per-epoch validation set, so epochs before and after the change were
# selected on different users (the resumed run says so).
EVALUATION_ONLY = {"full_ranking", "full_ranking_users", "exclude_history", "cutoffs", "valid_users", "eval_batch_size"}

# Fields that may change between a run and its resumption. Of the training options only ``epochs``
# changes what is computed (more epochs continue training; with the cosine schedule the remaining
# decay is stretched).
RESUMABLE_CHANGES = {"epochs", "resume", "restart", "progress", "out_dir", "benchmark_steps", "stop_after_epochs",
                     "threads", "patience", "data_root"} | EVALUATION_ONLY


@dataclass
class TrainConfig:
    # data
    data: str = "synthetic"
    data_root: str | None = None
    data_format: str = "auto"
    columns: str | None = None  # pairs files: the role of each column, e.g. "user,item,rating,timestamp"
    synthetic: dict = field(default_factory=dict)
    use_attributes: bool = True
    use_context: bool = True
    # model
    model: str = "carca"
    encoding: str = "learnt"
    d_model: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    causal: bool | None = None  # None: the model's default (CARCA bidirectional, SASRec causal)
    residual: str | None = None  # None: CARCA "mul", SASRec "add"
    cross_residual: str = "mul"
    next_slot: bool = False  # CARCA: a learned slot after the most recent item for the item to predict
    ffn_mult: int = 1
    activation: str = "gelu"
    rope_base: float = 1000.0
    backend: str = "auto"
    # training
    target: str = "auto"  # "all" (every position, causal only), "prefix" (one held-out next item), auto
    samples_per_user: int = 1
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "constant"  # after warm-up: "constant" or "cosine"
    clip_grad: float = 0.0
    negatives: int = 1
    seed: int = 0
    # evaluation
    eval_negatives: int = 100
    eval_seed: int = 0
    cutoffs: tuple[int, ...] = (10,)
    full_ranking: bool = True
    full_ranking_users: int = 0  # 0: every user; else a fixed random subset (full ranking is users x items)
    exclude_history: bool = True
    select_metric: str = "sampled_ndcg@10"
    patience: int = 5
    valid_users: int = 0  # 0: every user; else a fixed random subset for the per-epoch validation
    eval_batch_size: int = 256
    # execution
    device: str = "auto"
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" traces without generating code
    cuda_graphs: bool = False
    threads: int = 0
    benchmark_steps: int = 0
    progress: bool = True
    out_dir: str | None = None
    resume: bool = False
    restart: bool = False  # discard the run in out_dir (checkpoints, metrics, summary) and start again
    stop_after_epochs: int = 0  # stop (as if interrupted) after this many epochs in this process

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cutoffs"] = list(self.cutoffs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration fields: {', '.join(unknown)}")
        d = dict(d)
        if "cutoffs" in d:
            d["cutoffs"] = tuple(d["cutoffs"])
        return cls(**d)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Fields (other than :data:`RESUMABLE_CHANGES`) that differ."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
