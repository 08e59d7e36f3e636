"""Saved Globo versions: the sequence model and the two rankers as frozen at the evaluated days' start.

A version is a folder `<registry>/globo/g<N>/` (the MIND registry lists only `v<N>` folders, so the two
never mix) holding `sequence.pt`, `articles.npy` (the article id of each embedding row), `full.txt`,
`no_embedding.txt` (LightGBM models) and `manifest.json`. Scoring another log maps its articles to the
saved rows by id; an article the version never saw scores 0 in the embedding (as an unseen one does
in training).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import torch

from models.globo_ranker import GloboRanker
from models.registry import code_version
from models.sequences import SequenceConfig, SequenceModel


def save_version(root: Path, *, snapshot: dict[str, Any], config: SequenceConfig, full: GloboRanker,
                 no_embedding: GloboRanker, articles: np.ndarray, info: dict[str, Any]) -> str:  # fmt: skip
    """Write a version; `snapshot` is `SequenceModel.snapshot()` taken when the version froze."""
    base = Path(root) / "globo"
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in base.iterdir() if p.name[:1] == "g" and p.name[1:].isdigit()]
    name = f"g{max(taken, default=0) + 1}"
    folder = base / name
    folder.mkdir()
    torch.save(snapshot, folder / "sequence.pt")
    np.save(folder / "articles.npy", articles)
    assert full.booster is not None and no_embedding.booster is not None
    full.booster.save_model(str(folder / "full.txt"), num_iteration=full.booster.best_iteration)
    no_embedding.booster.save_model(str(folder / "no_embedding.txt"), num_iteration=no_embedding.booster.best_iteration)
    manifest = {"version": name, "sequence": asdict(config), "features": {"full": full.features,
                "no_embedding": no_embedding.features}, "code_version": code_version(), **info}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return name


def load_version(root: Path, name: str) -> tuple[SequenceModel, GloboRanker, GloboRanker, np.ndarray, dict[str, Any]]:
    folder = Path(root) / "globo" / name
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"no Globo version {name} in {folder.parent}")
    manifest = json.loads((folder / "manifest.json").read_text())
    articles = np.load(folder / "articles.npy")
    model = SequenceModel(len(articles), SequenceConfig(**manifest["sequence"]))
    saved = torch.load(folder / "sequence.pt", map_location=model.device)
    model.restore(saved)
    rankers = []
    for key, file in (("full", "full.txt"), ("no_embedding", "no_embedding.txt")):
        ranker = GloboRanker(manifest["features"][key])
        ranker.booster = lgb.Booster(model_file=str(folder / file))
        rankers.append(ranker)
    return model, rankers[0], rankers[1], articles, manifest
