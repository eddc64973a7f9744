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
                 synthetic_options: dict | None = None, columns: str | None = None) -> InteractionData:
    """``synthetic`` (the built-in generator), a name of :data:`NAMED_DATASETS`, or a file/folder
    (``columns``: the role of each column of a pairs file, see :func:`fastpe.data.read_pairs`)."""
    if spec in (None, "", "synthetic"):
        return synthetic_dataset(**(synthetic_options or {}))
    if spec in NAMED_DATASETS:
        root = Path(data_root) if data_root is not None else default_data_root()
        path = root / NAMED_DATASETS[spec]
        if not path.exists():
            where = "--data-root" if data_root is not None else (
                "$FASTPE_DATA_ROOT" if os.environ.get("FASTPE_DATA_ROOT") else "the default data root ../shared/data")
            raise FileNotFoundError(
                f"data set {spec!r}: {path} does not exist ({where}); put the data sets in one folder "
                f"({', '.join(f'{k}: {v}' for k, v in list(NAMED_DATASETS.items())[:2])}, ...) and pass --data-root "
                "FOLDER or set FASTPE_DATA_ROOT, or pass --data PATH to a file")
        return read_dataset(path, fmt, name=spec, columns=columns)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec!r}: not 'synthetic', not one of {', '.join(NAMED_DATASETS)}, "
                                "and no such file or folder")
    return read_dataset(path, fmt, columns=columns)
