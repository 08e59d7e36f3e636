"""Score a user on an edge device with only onnxruntime, numpy and the files `adloop models export` wrote.

This file is copied into every export (`score_user.py`) and imports nothing of adloop: an edge device
needs onnxruntime, numpy and these files only (docs/models.md, "Export for the edge").

    python score_user.py EXPORT_DIR '{"recent_items": ["N1"], "recent_categories": ["news"], "page_view_24h": 3}'

prints the user's 10 best ads by cosine similarity. `EdgeScorer(folder).user_vectors(rows)` gives the
(n, dim) L2-normalised user vectors the serving user tower gives (equal to 1e-5, tested); ids are hashed
exactly as training hashed them (crc32 into the manifest's bucket counts).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class EdgeScorer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.manifest = json.loads((folder / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one user at a time on a small device
        self.session = ort.InferenceSession(
            str(folder / "user_tower.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.ad_ids = json.loads((folder / "ad_ids.json").read_text())
        self.ad_vectors = np.load(folder / "ad_vectors.npy")  # (n_ads, dim) float32, rows L2-normalised

    def inputs(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """The model's inputs: hashed ids padded to the longest list with a 0/1 mask, log1p activity."""
        m = self.manifest
        items = [_hash(_list(r.get("recent_items")), m["item_buckets"], "item:") for r in rows]
        cats = [_hash(_list(r.get("recent_categories")), m["category_buckets"], "cat:") for r in rows]
        activity = [[math.log1p(max(_number(r.get(name)), 0.0)) for name in m["activity"]] for r in rows]
        return {**_padded("items", items), **_padded("categories", cats),
                "activity": np.asarray(activity, dtype=np.float32).reshape(len(rows), len(m["activity"]))}  # fmt: skip

    def user_vectors(self, rows: list[dict[str, Any]]) -> np.ndarray:
        return self.session.run(["user_vector"], self.inputs(rows))[0]

    def top_ads(self, row: dict[str, Any], k: int = 10) -> list[tuple[str, float]]:
        scores = self.ad_vectors @ self.user_vectors([row])[0]
        best = np.argsort(-scores)[:k]
        return [(self.ad_ids[i], float(scores[i])) for i in best]


def _hash(values: list[Any], buckets: int, salt: str) -> list[int]:
    """As training (models.two_tower.hash_ids): 1 + crc32(salt + id) mod (buckets - 1); missing -> 0."""
    return [1 + zlib.crc32(f"{salt}{v}".encode()) % (buckets - 1) if _present(v) else 0 for v in values]


def _padded(name: str, bags: list[list[int]]) -> dict[str, np.ndarray]:
    width = max([1, *map(len, bags)])
    ids = np.zeros((len(bags), width), dtype=np.int64)
    mask = np.zeros((len(bags), width), dtype=np.float32)
    for i, bag in enumerate(bags):
        ids[i, : len(bag)], mask[i, : len(bag)] = bag, 1.0
    return {name: ids, f"{name}_mask": mask}


def _list(value: Any) -> list[Any]:
    """A list feature; None or NaN (no row yet) -> [] (as models.values.as_list)."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(value)


def _number(value: Any) -> float:
    """A scalar feature; None or NaN -> 0 (as models.values.as_number)."""
    number = 0.0 if value is None else float(value)
    return 0.0 if number != number else number


def _present(value: Any) -> bool:
    return value is not None and value == value and value != ""


if __name__ == "__main__":
    scorer = EdgeScorer(sys.argv[1])
    for ad_id, score in scorer.top_ads(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}):
        print(f"{ad_id}\t{score:.4f}")
