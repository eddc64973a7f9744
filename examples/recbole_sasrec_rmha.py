"""RecBole's own SASRec (or BERT4Rec) with RMHA-4 attention from fastpe, trained by RecBole's Trainer.

Needs RecBole: pip install 'fastpe[recbole]' (RecBole 1.2.1 installs beside torch 2.x with
"numpy<2" "pandas<3" "setuptools<81"). No download: the script writes a small synthetic
interaction file in RecBole's atomic format and trains for one epoch in seconds.

    python examples/recbole_sasrec_rmha.py                  # SASRec + rmha-4
    python examples/recbole_sasrec_rmha.py --model BERT4Rec --encoding rope

``run`` follows the steps of RecBole's quick-start (``recbole.quick_start.run_recbole``: config,
seed, dataset, data_preparation, model, Trainer, fit, evaluate with the best model). The fastpe
part is two calls: ``patch(model, encoding)`` after the model is built and before the Trainer
(which builds the optimizer): every RecBole attention layer becomes fastpe's, with its weights,
and the absolute position embedding stops being added; ``safe_checkpoints(trainer)``: the best
model is saved so that RecBole's own ``torch.load`` reads it with safe (weights-only) loading.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from fastpe.integrations.recbole import patch, safe_checkpoints


def write_dataset(root: Path, name: str = "tiny", users: int = 120, items: int = 60, per_user: int = 12, seed: int = 0) -> None:
    """``root/name/name.inter``: each user walks through items with a drift, so order matters."""
    gen = torch.Generator().manual_seed(seed)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(1, users + 1):
        item = int(torch.randint(1, items + 1, (1,), generator=gen))
        for t in range(per_user):
            lines.append(f"{user}\t{item}\t{t}")
            item = (item + int(torch.randint(1, 4, (1,), generator=gen)) - 1) % items + 1
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / f"{name}.inter").write_text("\n".join(lines) + "\n")


def run(model_name: str = "SASRec", encoding: str = "rmha-4", workdir: str | Path | None = None, epochs: int = 1,
        check_learnt: bool = False) -> dict:
    """Build, patch, train and test a RecBole model; returns the last training loss and test metrics.

    ``check_learnt`` also checks that ``patch(model, "learnt")`` leaves RecBole's model function
    unchanged (its own learnt position embedding kept, attention computed by fastpe).
    """
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_seed

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory())
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        write_dataset(workdir)
        previous = os.getcwd()
        os.chdir(workdir)  # RecBole writes log_tensorboard/ and saved/ into the working directory
        stack.callback(os.chdir, previous)
        logging.getLogger().setLevel(logging.ERROR)
        # RecBole 1.2.1 predates pandas 2.2 and torch 2.6: their deprecation notes are noise here.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=FutureWarning)
        config = Config(model=model_name, dataset="tiny", config_dict={
            "data_path": str(workdir), "checkpoint_dir": str(workdir / "saved"),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "MAX_ITEM_LIST_LENGTH": 8, "hidden_size": 16, "inner_size": 32, "n_layers": 2, "n_heads": 2,
            "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1,
            "loss_type": "CE", "train_neg_sample_args": None,
            "epochs": epochs, "train_batch_size": 128, "eval_batch_size": 256, "stopping_step": 10,
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
            "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
            "device": "cpu", "use_gpu": False, "show_progress": False, "seed": 0, "reproducibility": True,
        })
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        model = get_model(config["model"])(config, train_data.dataset).to(config["device"])

        if check_learnt:
            _check_learnt_keeps_function(model, test_data)

        patch(model, encoding)  # <- the fastpe part

        # RecBole's trainer reloads its best model with torch.load: this one writes checkpoints that
        # torch's safe (weights-only) loading reads, so no environment variable turns it off.
        trainer = safe_checkpoints(Trainer(config, model))
        trainer.fit(train_data, valid_data, saved=True, show_progress=False)
        loss = trainer.train_loss_dict[max(trainer.train_loss_dict)]
        test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        return {"model": model_name, "encoding": encoding, "loss": float(loss), "test": dict(test)}


def _check_learnt_keeps_function(model: torch.nn.Module, test_data) -> None:
    import copy

    reference = copy.deepcopy(model).eval()
    patched = patch(copy.deepcopy(model), "learnt").eval()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        want, got = reference.full_sort_predict(batch), patched.full_sort_predict(batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SASRec", choices=["SASRec", "BERT4Rec"])
    parser.add_argument("--encoding", default="rmha-4", help="rmha-<k>, rope, none, abs, learnt or rotatory")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    result = run(args.model, args.encoding, epochs=args.epochs, check_learnt=True)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result["test"].items())
    print(f"{result['model']} + {result['encoding']}: last train loss {result['loss']:.4f}; test {metrics}")


if __name__ == "__main__":
    main()
