"""Model registry: one folder per version, a manifest, and an atomic pointer to the promoted version.

    <root>/v0003/            two_tower.pt, two_tower.json, ad_matrix.npy, ad_ids.json, ranker.txt,
                             calibrator.json, manifest.json (metrics, features, data window, seed,
                             code version, training time, sha256 of every artifact)
    <root>/promoted.json     {"version": "v0003", "history": ["v0001", "v0002"], "promoted_at": 1764650000.1}
    <root>/reload.json       {"generation": 4}: bumped by an admin reload; every serving process reloads
    <root>/load_failures.json  {"v0004": {"reason": ..., "at": ..., "process": "host:pid"}}: loads that failed
    Redis adloop:model:promoted  the pointer mirrored (`models.pointer_mirror`, with `Registry.from_settings`)

A version folder is written under a temporary name and renamed into place, so a half-written
version is never listed. `promote` loads the version (checksums and all) before it rewrites the
pointer (temp file + os.replace), so a corrupt or incomplete version never replaces the promoted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import torch

from adloop.settings import Settings
from models.bundle import ModelBundle
from models.pointer_mirror import PointerMirror, merged
from models.ranker import PlattCalibrator, compile_booster, feature_source
from models.two_tower import TwoTower, TwoTowerConfig, default_device

log = logging.getLogger(__name__)

ARTIFACTS = ["two_tower.pt", "two_tower.json", "ad_matrix.npy", "ad_ids.json", "ranker.txt", "calibrator.json"]
POINTER = "promoted.json"
RELOAD = "reload.json"
FAILURES = "load_failures.json"
COMPILED = "ranker.compiled"  # lleaves object code, a cache built on first load (not an artifact)


class RegistryError(RuntimeError):
    """A version that is missing, incomplete or corrupt; the message names the version and the artifact."""


class Registry:
    def __init__(self, root: str | Path, *, mirror: PointerMirror | None = None) -> None:
        self.root = Path(root)
        self.mirror = mirror  # the pointer in Redis too, for replicas without this folder

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The settings' registry, its pointer mirrored in the settings' Redis unless `model_pointer_redis` is off."""
        mirror = PointerMirror(settings) if settings.model_pointer_redis else None
        return cls(settings.model_registry_path, mirror=mirror)

    def save(self, bundle: ModelBundle, *, report: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
        """Write a new version (artifacts + manifest) and return its name; does not promote it."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            torch.save(bundle.tower.state_dict(), tmp / "two_tower.pt")
            (tmp / "two_tower.json").write_text(json.dumps(asdict(bundle.tower.config), indent=2))
            np.save(tmp / "ad_matrix.npy", np.asarray(bundle.ad_matrix, dtype=np.float32))
            (tmp / "ad_ids.json").write_text(json.dumps(list(bundle.ad_ids)))
            bundle.booster.save_model(tmp / "ranker.txt")
            bundle.calibrator.save(tmp / "calibrator.json")
            version = self._next_version()
            manifest = {
                "version": version,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "code_version": code_version(),
                "seed": report.get("seed"),
                "data_window": report.get("data_window"),
                "training_seconds": report.get("training_seconds"),
                "training": report,
                "metrics": metrics or {},
                "features": [{"name": f, "source": feature_source(f)} for f in bundle.feature_names],
                "ranker_offset": bundle.offset_feature,  # margin = logit(this feature) + trees; null: trees only
                "artifacts": {name: _sha256(tmp / name) for name in ARTIFACTS},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            os.replace(tmp, self.root / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved model version %s", version)
        return version

    def list(self) -> list[dict[str, Any]]:
        """Every version, oldest first: name, created_at, promoted flag and the full model's group AUC."""
        promoted = self.promoted()
        failures = self.failures()
        rows = []
        for path in self._versions():
            try:
                manifest = json.loads((path / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = {}
            full = manifest.get("metrics", {}).get("full model", {})
            rows.append({"version": path.name, "created_at": manifest.get("created_at"),
                         "promoted": path.name == promoted, "group_auc": full.get("group_auc"),
                         "ok": bool(manifest), "load_failure": failures.get(path.name),
                         "gate": manifest.get("gate")})  # fmt: skip
        return rows

    def promoted(self) -> str | None:
        """The promoted version's name, or None before the first promotion."""
        pointer = self._read_pointer()
        return pointer.get("version")

    def promote(self, version: str) -> None:
        """Make `version` the promoted one, after loading it in full (raises RegistryError, pointer unchanged)."""
        self.load(version, compiled=False)
        pointer = self._read_pointer()
        current = pointer.get("version")
        if current == version:
            return
        history = [*pointer.get("history", []), current] if current else pointer.get("history", [])
        self._write_pointer({"version": version, "history": history, "promoted_at": time.time()})
        self._clear_failure(version)  # it loaded here: a failure recorded earlier is history
        log.info("promoted %s (was %s)", version, current)

    def rollback(self) -> str:
        """Promote the previously promoted version again (validated first); returns its name."""
        pointer = self._read_pointer()
        history = list(pointer.get("history", []))
        if not history:
            raise RegistryError("nothing to roll back to: no earlier promoted version")
        previous = history.pop()
        self.load(previous, compiled=False)
        self._write_pointer({"version": previous, "history": history, "promoted_at": time.time()})
        log.info("rolled back from %s to %s", pointer.get("version"), previous)
        return previous

    def pointer(self) -> dict[str, Any]:
        """What serving processes follow, one small read: the promoted version, when it was promoted, and
        the reload generation (`request_reload`)."""
        pointer = self._read_pointer()
        folder = {"version": pointer.get("version"), "promoted_at": pointer.get("promoted_at"),
                  "generation": _read_json(self.root / RELOAD).get("generation", 0)}  # fmt: skip
        return merged(self.mirror.read(), folder) if self.mirror is not None else folder

    def request_reload(self) -> int:
        """Bump the reload generation: every serving process that follows this registry reloads its catalog
        and model on its next poll (the admin reload reaches all workers and replicas this way)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            generation = int(_read_json(self.root / RELOAD).get("generation", 0)) + 1
            _write_json(self.root / RELOAD, {"generation": generation, "at": time.time()})
        if self.mirror is not None:
            self.mirror.bump_generation(generation)
        return generation

    def record_failure(self, version: str, reason: str) -> None:
        """Remember that `version` failed to load (shown by `list` and `adloop models list`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            failures = _read_json(self.root / FAILURES)
            failures[version] = {"reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "process": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
            _write_json(self.root / FAILURES, failures)

    def failures(self) -> dict[str, dict[str, Any]]:
        return _read_json(self.root / FAILURES)

    def record_gate(self, version: str, gate: dict[str, Any]) -> None:
        """Store the promotion gate's comparison in `version`'s manifest (written aside, then renamed)."""
        manifest = self.manifest(version)
        manifest["gate"] = gate
        _write_json(self.root / version / "manifest.json", manifest, indent=2)

    def manifest(self, version: str) -> dict[str, Any]:
        path = self.root / version / "manifest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as error:
            raise RegistryError(f"version {version}: no manifest.json in {path.parent}") from error
        except ValueError as error:
            raise RegistryError(f"version {version}: manifest.json is not valid JSON ({error})") from error

    def load(self, version: str | None = None, *, compiled: bool = True) -> ModelBundle:
        """The bundle of `version` (default: the promoted one), every artifact checked against its sha256.

        compiled: also build (or reuse the cached) lleaves predictor; it is used only if its margins
        equal LightGBM's on a probe matrix, else dropped with a warning (the bundle works without it).
        """
        version = version or self.promoted()
        if not version:
            raise RegistryError(f"no promoted version in {self.root}: train one and `adloop models promote` it")
        folder = self.root / version
        manifest = self.manifest(version)
        for name in ARTIFACTS:
            expected = manifest.get("artifacts", {}).get(name)
            if not (folder / name).is_file():
                raise RegistryError(f"version {version}: artifact {name} is missing from {folder}")
            if expected is None or _sha256(folder / name) != expected:
                raise RegistryError(f"version {version}: artifact {name} is corrupt (sha256 differs from manifest)")
        try:
            bundle = _read_bundle(folder, manifest)
        except Exception as error:  # a checksum-valid file that still fails to load: say which version
            raise RegistryError(
                f"version {version}: artifacts do not load ({type(error).__name__}: {error})"
            ) from error
        if compiled:
            bundle.compiled = _checked_compile(bundle, folder)
        return bundle

    # --- helpers --------------------------------------------------------------------------------------

    def _versions(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    def _next_version(self) -> str:
        numbers = [int(p.name[1:]) for p in self._versions()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def _read_pointer(self) -> dict[str, Any]:
        return _read_json(self.root / POINTER)

    def _write_pointer(self, pointer: dict[str, Any]) -> None:
        _write_json(self.root / POINTER, pointer)
        if self.mirror is not None:
            self.mirror.write(pointer["version"], pointer["promoted_at"])

    def _clear_failure(self, version: str) -> None:
        if version in self.failures():
            with self._locked():
                failures = _read_json(self.root / FAILURES)
                failures.pop(version, None)
                _write_json(self.root / FAILURES, failures)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Read-modify-write of the registry's small files, one process at a time (serving workers write
        failures at the same moment)."""
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # never half-written (os.replace), so only a hand edit: say so, read as empty
        log.warning("%s is not valid JSON; read as empty", path)
        return {}


def _write_json(path: Path, data: dict[str, Any], indent: int | None = None) -> None:
    """Whole or not at all: written aside, then renamed over (readers never see half a file)."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(data, indent=indent, default=str))
    os.replace(tmp, path)


def code_version() -> str | None:
    """The git sha of the code (with -dirty for uncommitted changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _read_bundle(folder: Path, manifest: dict[str, Any]) -> ModelBundle:
    device = default_device()
    config = TwoTowerConfig(**json.loads((folder / "two_tower.json").read_text()))
    tower = TwoTower(config)
    tower.load_state_dict(torch.load(folder / "two_tower.pt", map_location="cpu", weights_only=True))
    tower = tower.to(device).eval()
    ad_ids = json.loads((folder / "ad_ids.json").read_text())
    ad_matrix = np.load(folder / "ad_matrix.npy")
    if ad_matrix.shape != (len(ad_ids), config.dim):
        raise ValueError(f"ad_matrix shape {ad_matrix.shape} does not match {len(ad_ids)} ads x dim {config.dim}")
    booster = lgb.Booster(model_file=str(folder / "ranker.txt"))
    features = [f["name"] for f in manifest["features"]]
    if booster.feature_name() != features:
        raise ValueError("ranker.txt's features differ from the manifest's feature list")
    return ModelBundle(version=manifest["version"], tower=tower, booster=booster,
                       calibrator=PlattCalibrator.load(folder / "calibrator.json"), feature_names=features,
                       ad_ids=ad_ids, ad_matrix=ad_matrix, offset_feature=manifest.get("ranker_offset"),
                       manifest=manifest, device=device)  # fmt: skip


def _checked_compile(bundle: ModelBundle, folder: Path) -> Any | None:
    try:
        compiled = compile_booster(folder / "ranker.txt", folder / COMPILED)
    except Exception as error:  # the bundle stays usable on LightGBM alone
        log.warning("version %s: compiled predictor unavailable (%s)", bundle.version, error)
        return None
    if compiled is None:
        return None
    probe = np.random.default_rng(0).normal(size=(64, len(bundle.feature_names))) * 10
    probe[::7, ::3] = np.nan
    expected = bundle.booster.predict(probe, raw_score=True, num_threads=1)
    if not np.allclose(compiled.predict(probe, n_jobs=1), expected, rtol=0, atol=1e-9):
        log.warning("version %s: compiled predictor disagrees with LightGBM; using LightGBM", bundle.version)
        return None
    return compiled


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
