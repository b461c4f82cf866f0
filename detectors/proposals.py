"""Pre-computed proposals on disk: the folder `libra proposals` writes and Fast R-CNN reads.

A proposals folder holds both splits of one dataset, keyed by image id:

    DIR/manifest.json         {"format": "libra-proposals/1", "checkpoint", "splits": {...}, ...}
    DIR/<split>.index.npy     int64 [I, 2]: (image id, number of proposals R_i), one row per image
    DIR/<split>.boxes.npy     float32 [sum R_i, 4]: x1, y1, x2, y2 in the stored image's pixels
    DIR/<split>.scores.npy    float32 [sum R_i]: objectness, each image's rows best first

with <split> "train" and "val". The arrays are plain .npy files opened memory-mapped (a COCO
train split at 2000 proposals per image is about 4 GB; no process holds it in memory) and
read with allow_pickle=False, so opening one can never run code. mmdetection's proposal
pickles (a list of [R, 5] arrays in the annotation file's image order) are imported through an
unpickler that admits numpy arrays and nothing else (`load_mmdet_pickle`).

Everything a mismatch between a folder and a dataset can be (a split or an image id missing,
wrong shapes, non-finite values, boxes outside their image, scores out of order, a foreign
pickle) is a `ProposalsError` naming the file and the first bad image id.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from detectors.data.errors import DatasetError

FORMAT = "libra-proposals/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# A proposal may reach this far past its image's border (pixels) before it counts as outside:
# the RPN clips in the resized frame and the boxes are scaled back, which rounds a little; the
# reference's pickles clip to (W - 1, H - 1).
BORDER_TOLERANCE = 1.0
_CHUNK = 1 << 20  # boxes validated per step, so a COCO-sized split never sits in memory at once
_FIX = "regenerate the folder with `libra proposals CONFIG --checkpoint CKPT --out DIR`"


class ProposalsError(DatasetError):
    """A proposals folder or pickle that does not fit its dataset; names the file and image id."""


def split_files(folder: str, split: str) -> dict[str, str]:
    """{"index", "boxes", "scores"} -> the split's three paths under `folder`."""
    return {part: os.path.join(folder, f"{split}.{part}.npy") for part in ("index", "boxes", "scores")}


# ---------------------------------------------------------------------------------- writing
class SplitWriter:
    """Writes one split image by image, streaming the boxes to disk (a COCO split's proposals
    need not fit in memory), then turns the stream into the split's three .npy files.

    Use: `with SplitWriter(folder, "train") as w: w.add(image_id, boxes [R, 4], scores [R])`.
    Nothing is left under the final names unless the block ends without an exception.
    """

    def __init__(self, folder: str, split: str) -> None:
        self.files = split_files(folder, split)
        self._raw = {part: self.files[part] + ".part" for part in ("boxes", "scores")}
        self._handles = {part: open(path, "wb") for part, path in self._raw.items()}
        self._index: list[tuple[int, int]] = []

    def add(self, image_id: int, boxes: np.ndarray, scores: np.ndarray) -> None:
        """One image's proposals: boxes [R, 4] xyxy pixels, scores [R]; stored best first."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        order = np.argsort(-scores, kind="stable")  # best first: a reader keeps the top N rows
        self._handles["boxes"].write(np.ascontiguousarray(boxes[order]).tobytes())
        self._handles["scores"].write(np.ascontiguousarray(scores[order]).tobytes())
        self._index.append((int(image_id), int(boxes.shape[0])))

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for handle in self._handles.values():
            handle.close()
        if kind is None:
            total = sum(count for _, count in self._index)
            for part, width in (("boxes", (4,)), ("scores", ())):
                _raw_to_npy(self._raw[part], self.files[part], (total, *width))
            np.save(self.files["index"], np.asarray(self._index, dtype=np.int64).reshape(-1, 2))
        for path in self._raw.values():
            if os.path.exists(path):
                os.remove(path)


def _raw_to_npy(raw_path: str, npy_path: str, shape: tuple[int, ...]) -> None:
    """A headerless float32 stream -> a .npy file of `shape` (header, then the bytes copied)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    with open(npy_path + ".tmp", "wb") as out, open(raw_path, "rb") as raw:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(raw, out, length=16 << 20)
    os.replace(npy_path + ".tmp", npy_path)


def write_manifest(folder: str, manifest: Mapping[str, Any]) -> str:
    """DIR/manifest.json with `format` filled in; returns its path."""
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def read_manifest(folder: str) -> dict:
    """The folder's manifest; ProposalsError when the folder or its manifest is not one of ours."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ProposalsError(f"proposals folder {folder} {what}; {_FIX}")
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ProposalsError(f"{path} does not exist, so {folder} is not a proposals folder; {_FIX}") from None
    except (OSError, ValueError) as err:
        raise ProposalsError(f"{path} is not a readable JSON manifest ({err}); {_FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ProposalsError(f"{path} is not a {FORMAT} manifest; {_FIX}")
    return manifest


# ---------------------------------------------------------------------------------- reading
@dataclass
class SplitProposals:
    """One split's proposals, memory-mapped: `[image_id]` -> (boxes [R, 4], scores [R]).

    Built by `open_split`, which has checked every array against the dataset, so lookups
    cannot fail for an image of that dataset.
    """

    folder: str
    split: str
    boxes: np.ndarray  # float32 [T, 4], memory-mapped
    scores: np.ndarray  # float32 [T]
    rows: dict[int, tuple[int, int]]  # image id -> (first row, count)

    def __getitem__(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        start, count = self.rows[image_id]
        return np.array(self.boxes[start:start + count]), np.array(self.scores[start:start + count])

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.rows

    def __getstate__(self) -> dict:
        # DataLoader workers and Ray pickle the dataset: send the paths, not the mapped arrays.
        return {"folder": self.folder, "split": self.split, "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        files = split_files(self.folder, self.split)
        self.boxes = np.load(files["boxes"], mmap_mode="r", allow_pickle=False)
        self.scores = np.load(files["scores"], mmap_mode="r", allow_pickle=False)


def _load_array(path: str, ndim: int, width: Optional[int], dtype_kind: str) -> np.ndarray:
    """A .npy file memory-mapped, checked for its rank, last dimension and dtype kind."""
    if not os.path.isfile(path):
        raise ProposalsError(f"{path} does not exist; {_FIX}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # an object array (a pickle inside), a bad header
        raise ProposalsError(f"{path} is not a plain numeric .npy array ({err}); {_FIX}") from None
    except OSError as err:
        raise ProposalsError(f"{path} cannot be read as a .npy array ({err}); {_FIX}") from None
    shape = "[N, %d]" % width if width else "[N]"
    if array.ndim != ndim or (width is not None and array.shape[1] != width) or array.dtype.kind != dtype_kind:
        raise ProposalsError(f"{path} holds a {array.dtype} array of shape {list(array.shape)}, "
                             f"expected {'an integer' if dtype_kind == 'i' else 'a float'} {shape}; {_FIX}")
    return array


def open_split(folder: str, split: str, image_sizes: Mapping[int, tuple[float, float]]) -> SplitProposals:
    """The split's proposals, checked against the dataset they must serve.

    Args:
        folder: a proposals folder (see the module docstring).
        split: "train" or "val".
        image_sizes: image id -> (width, height) in pixels of every image of the dataset split,
            in dataset order (the first image lacking proposals is the one named).

    Raises ProposalsError naming the file and the first bad image id when an image has no
    proposals, the arrays disagree in shape, a value is NaN or infinite, a box has negative
    size or lies outside its image (beyond BORDER_TOLERANCE), or scores are not best first.
    """
    read_manifest(folder)
    files = split_files(folder, split)
    index = _load_array(files["index"], 2, 2, "i")
    boxes = _load_array(files["boxes"], 2, 4, "f")
    scores = _load_array(files["scores"], 1, None, "f")
    counts = np.asarray(index[:, 1])
    if (counts < 0).any():
        first = int(index[np.argmax(counts < 0), 0])
        raise ProposalsError(f"{files['index']}: image id {first} has a negative proposal count; {_FIX}")
    total = int(counts.sum())
    if boxes.shape[0] != total or scores.shape[0] != total:
        raise ProposalsError(f"{files['index']} counts {total} proposals but {files['boxes']} holds "
                             f"{boxes.shape[0]} and {files['scores']} {scores.shape[0]}; {_FIX}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rows = {int(i): (int(s), int(c)) for i, s, c in zip(index[:, 0], starts, counts)}
    if len(rows) != index.shape[0]:
        ids, seen = index[:, 0].tolist(), set()
        first = next(i for i in ids if i in seen or seen.add(i))
        raise ProposalsError(f"{files['index']}: image id {first} is listed twice; {_FIX}")
    for image_id in image_sizes:
        if image_id not in rows:
            raise ProposalsError(f"{files['index']} has no proposals for image id {image_id} of the "
                                 f"{split} set (it lists {len(rows)} images); the folder was made for "
                                 f"another dataset: {_FIX}")
    ends = np.cumsum(counts)  # [I] one past each image's last row
    image_ids = np.asarray(index[:, 0])
    limits = np.array([image_sizes.get(i, (np.inf, np.inf)) for i in image_ids.tolist()],
                      dtype=np.float64).reshape(-1, 2)  # [I, 2] width, height per index row
    for lo in range(0, total, _CHUNK):
        hi = min(lo + _CHUNK, total)
        b = np.asarray(boxes[lo:hi], dtype=np.float64)
        s = np.asarray(scores[lo:hi], dtype=np.float64)
        owner = np.searchsorted(ends, np.arange(lo, hi), side="right")  # [hi - lo] index row of each
        wh = limits[owner]
        checks = (
            (~np.isfinite(b).all(axis=1) | ~np.isfinite(s), "has a NaN or infinite value"),
            ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]), "has a box with x2 < x1 or y2 < y1"),
            ((b[:, :2] < -BORDER_TOLERANCE).any(axis=1) | (b[:, 2] > wh[:, 0] + BORDER_TOLERANCE)
             | (b[:, 3] > wh[:, 1] + BORDER_TOLERANCE), "has a box outside the image"),
        )
        for bad, problem in checks:
            if bad.any():
                k = int(np.argmax(bad))
                image_id = int(image_ids[owner[k]])
                w, h = (f"{v:g}" for v in image_sizes.get(image_id, (float("nan"),) * 2))
                raise ProposalsError(f"{files['boxes']}: image id {image_id} {problem} "
                                     f"({[round(v, 2) for v in b[k].tolist()]} in a {w}x{h} image); {_FIX}")
        # Best first within each image: a later row may not score higher than the one before it.
        rise = (np.diff(s) > 0) & (owner[1:] == owner[:-1])
        if rise.any():
            image_id = int(image_ids[owner[1 + int(np.argmax(rise))]])
            raise ProposalsError(f"{files['scores']}: image id {image_id}'s proposals are not sorted "
                                 f"best first; {_FIX}")
    return SplitProposals(folder, split, boxes, scores, rows)


# ---------------------------------------------------------------------------------- mmdetection
class _NumpyOnly(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else: any other global (a
    function, a class, `os.system`) is refused before anything is called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def load_mmdet_pickle(path: str) -> list[np.ndarray]:
    """mmdetection's proposal file: a list (or tuple) of [R_i, 5] (x1, y1, x2, y2, score) or
    [R_i, 4] float arrays, one per image in the annotation file's order; -> [R_i, 5] float32.

    Raises ProposalsError naming `path` for a missing or corrupt file, a pickle that holds
    anything but numpy arrays (it was not run), or an element of the wrong shape.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ProposalsError(f"proposal pickle {path}: cannot read it ({err.strerror or err})") from None
    try:
        loaded = _NumpyOnly(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise ProposalsError(f"proposal pickle {path} holds objects other than numpy arrays ({err}), "
                             "which can run code, so it was not loaded; give mmdetection's list of "
                             "[N, 5] proposal arrays") from None
    except Exception as err:  # noqa: BLE001 (EOFError, ValueError, ...: a truncated or foreign file)
        raise ProposalsError(f"proposal pickle {path} is truncated or not a pickle ({type(err).__name__}); "
                             "give mmdetection's list of [N, 5] proposal arrays") from None
    if not isinstance(loaded, (list, tuple)):
        raise ProposalsError(f"proposal pickle {path} holds a {type(loaded).__name__}, not a list of "
                             "[N, 5] arrays (one per image)")
    out = []
    for i, item in enumerate(loaded):
        if not isinstance(item, np.ndarray) or item.ndim != 2 or item.shape[1] not in (4, 5) \
                or item.dtype.kind not in "fi":
            shape = list(item.shape) if isinstance(item, np.ndarray) else type(item).__name__
            raise ProposalsError(f"proposal pickle {path}: element {i} is {shape}, not an [N, 5] "
                                 "(or [N, 4]) numeric array")
        if item.shape[1] == 4:  # no scores: keep the file's order, best first by rank
            item = np.concatenate([item, -np.arange(item.shape[0], dtype=np.float64)[:, None]], axis=1)
        out.append(item.astype(np.float32))
    return out


def import_mmdet_split(path: str, folder: str, split: str, image_ids_in_file_order: Iterable[int]) -> int:
    """Write `split` of `folder` from mmdetection pickle `path`; returns the images written.

    `image_ids_in_file_order`: the annotation file's image ids in its `images` order, which is
    mmdetection's dataset order (before its filters; it filters the proposals alongside).
    """
    arrays = load_mmdet_pickle(path)
    ids = list(image_ids_in_file_order)
    if len(arrays) != len(ids):
        raise ProposalsError(f"proposal pickle {path} holds {len(arrays)} arrays but the {split} "
                             f"annotation file lists {len(ids)} images; it belongs to another set")
    with SplitWriter(folder, split) as writer:
        for image_id, array in zip(ids, arrays):
            writer.add(image_id, array[:, :4], array[:, 4])
    return len(ids)

