"""Named configurations for ``fastpe train/study --preset NAME``: the built-in demonstration and
the published SASRec and CARCA settings, each with the ways fastpe's run differs from the paper.

Options given on the command line override a preset's values. The deviations are written into
``results.md`` (and ``summary.json``) of every run that uses the preset.

Sources: SASRec, Kang & McAuley, ICDM 2018, section IV and the authors' code (kang205/SASRec:
``main.py`` defaults); CARCA, Rashed et al., RecSys 2022, and the authors' code
(ahmedrashed-ml/CARCA: ``CARCA.py``, one ``Args`` class per data set).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    description: str
    config: dict
    deviations: tuple[str, ...] = field(default_factory=tuple)


# Shared by both models' published training: Adam with betas (0.9, 0.98) is fastpe's only Adam
# setting; a constant learning rate without warm-up; BCE against one sampled negative per target.
_PUBLISHED = {"warmup_steps": 0, "schedule": "constant", "negatives": 1, "optimizer": "adam", "eval_negatives": 100,
              "weight_decay": 0.0, "samples_per_user": 1}

# What the published SASRec and CARCA configurations share; each preset adds its own values.
_SASREC = {**_PUBLISHED, "model": "sasrec", "encoding": "learnt", "d_model": 50, "max_len": 50, "n_blocks": 2,
           "n_heads": 1, "activation": "relu", "dropout": 0.5, "lr": 1e-3, "batch_size": 128, "epochs": 201,
           "target": "all", "residual": "add"}
_CARCA = {**_PUBLISHED, "model": "carca", "n_blocks": 3, "batch_size": 128, "activation": "leakyrelu",
          "residual": "mul", "target": "prefix"}

_SASREC_DEVIATIONS = (
    "pre-LN blocks normalise keys and values as well as queries, and the attention residual adds the raw input "
    "(the authors' code feeds unnormalised keys and adds the normalised queries)",
    "negatives are drawn uniformly and dropped from the loss when they hit an item of the row, instead of being "
    "redrawn until they miss the user's training items",
    "every evaluated user is ranked (the authors' code samples 10,000 users when there are more)",
    "the learnt position table counts from the most recent item (with left padding at a fixed length this is the "
    "same table, indexed the other way)",
)

_CARCA_DEVIATIONS = (
    "training targets: one held-out next item per sampled prefix (the profile before it), instead of the "
    "right-shifted sequence with a target at every position: a bidirectional profile would contain its own targets "
    "(in the authors' code each position's candidate attends to the whole profile, the target included)",
    "query, key and value projections are linear (the authors' code puts a leaky ReLU after each)",
    "pre-LN blocks normalise keys as well as queries (the authors' code attends with unnormalised keys)",
    "the attribute/context fusion layer is d wide (the authors' code: 5d)",
    "no L2 penalty on the item embeddings (the authors' code: l2_emb, 1e-4 on Beauty)",
    "time features are year, month, day, weekday, hour and minute (the authors': year, month, day, weekday, "
    "day of year, week); the S3Rec Beauty file has no timestamps, so there the context is absent",
    "every evaluated user is ranked (the authors' code samples 10,000 users when there are more)",
    "the paper's encoding: CARCA's released code adds no position (its position embedding is commented out); "
    "the preset keeps fastpe's default and a study runs every encoding",
)

# 100 items: the 100 sampled negatives are every item the user has not touched, so the sampled
# metrics equal the full ranking's.
_WALK_TASK = {"task": "walk", "n_users": 400, "n_items": 100, "min_len": 8, "max_len": 16, "rule_prob": 0.9,
              "n_categories": 10}

PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "the built-in default without --data: CARCA with a next-item slot on the synthetic walk task, small and "
        "fast enough for every encoding x 2 seeds in about 3 minutes of a 2-core CPU",
        {"synthetic": _WALK_TASK, "d_model": 32, "n_blocks": 1, "max_len": 16, "epochs": 30, "patience": 3,
         "lr": 5e-3, "dropout": 0.1, "samples_per_user": 10, "warmup_steps": 20, "negatives": 8,
         "next_slot": True, "cutoffs": (1, 10), "select_metric": "sampled_ndcg@10", "threads": 1},
    ),
    "sasrec": Preset(
        "SASRec as published for the Amazon data sets: d=50, L=50, 2 blocks, 1 head, ReLU, dropout 0.5, "
        "Adam lr 1e-3 betas (0.9, 0.98), batch 128, no warm-up, 201 epochs, learnt positions",
        _SASREC,
        _SASREC_DEVIATIONS,
    ),
    "sasrec-movielens": Preset(
        "SASRec as published for MovieLens-1M: as 'sasrec' with L=200 and dropout 0.2",
        {**_SASREC, "max_len": 200, "dropout": 0.2},
        _SASREC_DEVIATIONS,
    ),
    "carca-beauty": Preset(
        "CARCA as published for Amazon Beauty: d=90, L=75, 3 blocks, 1 head, dropout 0.5, lr 1e-4, batch 128, "
        "leaky ReLU, multiplicative residuals, 1801 epochs",
        {**_CARCA, "data": "beauty", "d_model": 90, "max_len": 75, "n_heads": 1, "dropout": 0.5, "lr": 1e-4,
         "cross_residual": "mul", "epochs": 1801},
        _CARCA_DEVIATIONS,
    ),
    "carca-games": Preset(
        "CARCA as published for Amazon Video Games (give --data): d=90, L=50, 3 blocks, 3 heads, dropout 0.5, "
        "lr 1e-4, batch 128, leaky ReLU, multiplicative residuals, 801 epochs",
        {**_CARCA, "d_model": 90, "max_len": 50, "n_heads": 3, "dropout": 0.5, "lr": 1e-4, "cross_residual": "mul",
         "epochs": 801},
        _CARCA_DEVIATIONS,
    ),
    "carca-men": Preset(
        "CARCA as published for Amazon Men (give --data): d=390, L=35, 3 blocks, 3 heads, dropout 0.3, lr 6e-6, "
        "batch 128, leaky ReLU, no cross-attention residual, 801 epochs",
        {**_CARCA, "d_model": 390, "max_len": 35, "n_heads": 3, "dropout": 0.3, "lr": 6e-6, "cross_residual": "none",
         "epochs": 801},
        _CARCA_DEVIATIONS,
    ),
    "carca-fashion": Preset(
        "CARCA as published for Amazon Fashion (give --data): d=390, L=35, 3 blocks, 3 heads, dropout 0.3, "
        "lr 1e-5, batch 100, leaky ReLU, no cross-attention residual, 801 epochs",
        {**_CARCA, "d_model": 390, "max_len": 35, "n_heads": 3, "dropout": 0.3, "lr": 1e-5, "batch_size": 100,
         "cross_residual": "none", "epochs": 801},
        _CARCA_DEVIATIONS,
    ),
}

DEFAULT_PRESET = "demo"  # without --data and --preset


def preset_help() -> str:
    return "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}") from None


# Options that change where or how fast a run executes, not what it computes.
_EXECUTION = {"out_dir", "resume", "progress", "threads", "data_root", "device", "backend", "benchmark_steps"}


def deviations_text(name: str, given: dict) -> str:
    """Markdown: the preset, the options given on the command line (those that change the preset's
    values are deviations from the paper too), and every deviation of fastpe's run from the paper."""
    preset = get_preset(name)
    lines = [f"Preset `{name}`: {preset.description}."]
    chosen = {k: v for k, v in given.items() if k not in _EXECUTION}
    if chosen:
        lines.append("Options given on the command line: " + ", ".join(
            f"{k}={v!r}" + (f" (preset {preset.config[k]!r})" if k in preset.config and preset.config[k] != v else "")
            for k, v in chosen.items()) + ".")
    if preset.deviations:
        lines.append("Deviations from the paper:")
        lines.extend(f"- {text}" for text in preset.deviations)
    return "\n".join(lines)
