"""``--data`` names: the built-in synthetic set, the team's shared data sets, or a path."""

from __future__ import annotations

import os
from pathlib import Path

from fastpe.data.readers import InteractionData, read_dataset
from fastpe.data.synthetic import synthetic_dataset

# name -> path under the data root (the shared data folder, see default_data_root)
NAMED_DATASETS = {
    "ml-100k": "ml-100k/ml-100k.inter",
    "beauty": "amazon-beauty/Beauty.txt",
    "sports": "amazon-sports/Sports_and_Outdoors.txt",
    "beauty-pairs": "amazon-beauty/beauty_bert4rec_pairs.txt",
    "wikipedia": "wikipedia/wikipedia.txt",
}


def default_data_root() -> Path:
    """``$FASTPE_DATA_ROOT``, else ``../shared/data`` next to the working directory's project."""
    env = os.environ.get("FASTPE_DATA_ROOT")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def load_dataset(spec: str | None = "synthetic", data_root: str | Path | None = None, fmt: str = "auto",
                 synthetic_options: dict | None = None) -> InteractionData:
    """``synthetic`` (the built-in generator), a name of :data:`NAMED_DATASETS`, or a file/folder."""
    if spec in (None, "", "synthetic"):
        return synthetic_dataset(**(synthetic_options or {}))
    if spec in NAMED_DATASETS:
        root = Path(data_root) if data_root is not None else default_data_root()
        path = root / NAMED_DATASETS[spec]
        if not path.exists():
            raise FileNotFoundError(f"data set {spec!r}: {path} does not exist (set --data-root or FASTPE_DATA_ROOT "
                                    "to the folder holding the shared data, or pass a path)")
        return read_dataset(path, fmt, name=spec)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec!r}: not 'synthetic', not one of {', '.join(NAMED_DATASETS)}, "
                                "and no such file or folder")
    return read_dataset(path, fmt)
