"""Export a model version for the edge: the user tower as ONNX, the ad vectors as .npy (`adloop models export`).

The exported graph takes padded inputs (ids and a 0/1 mask per list feature) instead of the flat ids and
offsets of `nn.EmbeddingBag`: a plain Gather / ReduceSum graph that every ONNX runtime runs, equal to the
bag mean (an empty bag's mean is 0 in both). `models/edge.py` (copied in as `score_user.py`) hashes a
user's features and runs it with onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.bundle import ModelBundle
from models.two_tower import USER_ACTIVITY, TwoTower

OPSET = 17
FILES = ("user_tower.onnx", "ad_vectors.npy", "ad_ids.json", "manifest.json", "score_user.py")


class PaddedUserTower(nn.Module):
    """`TwoTower.user_tower` on padded bags: mean of the rows where the mask is 1 (weights shared, not copied)."""

    def __init__(self, tower: TwoTower):
        super().__init__()
        self.tower = tower

    def forward(self, items, items_mask, categories, categories_mask, activity):
        t = self.tower
        bags = [_masked_mean(t.user_items.weight, items, items_mask),
                _masked_mean(t.user_categories.weight, categories, categories_mask)]  # fmt: skip
        x = torch.cat([*bags, t.user_activity(activity)], dim=1)
        return F.normalize(t.user_mlp(x), dim=1)


def _masked_mean(table: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = F.embedding(ids, table) * mask.unsqueeze(-1)  # (B, L, dim)
    return rows.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def export_onnx(bundle: ModelBundle, out: Path) -> dict:
    """Write FILES into `out` (created; must be empty or absent) and return the manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config = bundle.tower.config
    module = PaddedUserTower(bundle.tower.to("cpu").eval()).eval()
    example = (torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.int64),
               torch.ones(1, 2), torch.zeros(1, len(USER_ACTIVITY)))  # fmt: skip
    names = ["items", "items_mask", "categories", "categories_mask", "activity"]
    axes = {"items": {0: "users", 1: "items"}, "items_mask": {0: "users", 1: "items"},
            "categories": {0: "users", 1: "categories"}, "categories_mask": {0: "users", 1: "categories"},
            "activity": {0: "users"}, "user_vector": {0: "users"}}  # fmt: skip
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(module, example, str(out / "user_tower.onnx"), input_names=names,
                          output_names=["user_vector"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)  # fmt: skip
    np.save(out / "ad_vectors.npy", np.ascontiguousarray(bundle.ad_matrix, dtype=np.float32))
    (out / "ad_ids.json").write_text(json.dumps(list(bundle.ad_ids)))
    shutil.copyfile(Path(__file__).with_name("edge.py"), out / "score_user.py")
    manifest = {
        "version": bundle.version,
        "format": "onnx",
        "opset": OPSET,
        "dim": config.dim,
        "item_buckets": config.item_buckets,
        "category_buckets": config.category_buckets,
        "activity": USER_ACTIVITY,  # log1p of each, in this order
        "ads": len(bundle.ad_ids),
        "sha256": {name: _sha256(out / name) for name in FILES if name != "manifest.json"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
