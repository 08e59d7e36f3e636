"""One serving process following the model registry: the promoted version, rollbacks and admin reloads.

Every worker and replica runs its own `ModelFollower` (a thread of `serving.runtime.Runtime`): every
`model_poll_s` it reads the registry's pointer (one small JSON file, `Registry.pointer`). A new
promoted version is loaded in that thread, beside the model serving, and only a version that loaded
in full replaces it (`Runtime` swaps the whole `ServingState`; a request in flight keeps the state it
started with). A version that fails to load changes nothing: the failure is logged with its reason,
counted (`adloop_model_load_failures_total`), kept for `/readyz` and written to the registry
(`Registry.record_failure`, shown by `adloop models list`); it is tried again only when the pointer
moves or an admin reload asks for it. An admin reload bumps the registry's reload generation, which
every process sees on its next poll. The model swapped out is kept, so a rollback to it is a swap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from serving import metrics
from serving.protocols import ModelBundle, ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadFailure:
    version: str
    reason: str
    at: float  # unix seconds


@dataclass(frozen=True)
class Pointer:
    version: str | None  # the promoted version
    promoted_at: float | None  # unix seconds, when the registry recorded it (None: unknown)
    generation: int  # the reload generation


class ModelFollower:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.failure: LoadFailure | None = None  # the latest load that failed (cleared by a good one)
        self.pointer = self.read_pointer()
        self.swapped_at: float | None = None  # when this process last changed model
        self._acted_on = self.pointer  # the pointer last acted on: a failed version is not retried per poll
        self._previous: ModelBundle | None = None  # the model swapped out (a rollback to it needs no load)

    def read_pointer(self) -> Pointer:
        read = getattr(self.registry, "pointer", None)
        if read is None:  # a registry without the pointer file (models.testing's stand-ins)
            return Pointer(self.registry.promoted(), None, 0)
        data = read()
        return Pointer(data.get("version"), data.get("promoted_at"), int(data.get("generation") or 0))

    def load_promoted(self, current: ModelBundle | None) -> ModelBundle | None:
        """The promoted version loaded in full, else `current` (a failure recorded). Reads the pointer."""
        self.pointer = self._acted_on = self.read_pointer()
        return self._load(self.pointer.version, current)

    def poll(self, current: ModelBundle | None) -> tuple[str, ModelBundle | None] | None:
        """One look at the registry. None: nothing to do; ("reload", _): an admin reload was asked for (the
        caller reloads catalog and model); ("swap", model): serve `model` (loaded in full)."""
        pointer = self.read_pointer()
        self.pointer = pointer
        if pointer.generation != self._acted_on.generation:
            self._acted_on = pointer
            return "reload", None
        if pointer == self._acted_on or pointer.version is None:
            return None
        self._acted_on = pointer
        if current is not None and pointer.version == current.version:
            self.failure = None  # rolled back to the version serving: a failure of another one is history
            return None
        model = self._load(pointer.version, current)
        return ("swap", model) if model is not current else None

    def swapped(self, old: ModelBundle | None, new: ModelBundle | None) -> None:
        """The caller now serves `new`: keep `old` for a rollback, log and time the change."""
        if new is old:
            return
        self._previous = old
        self.swapped_at = time.time()
        since = f" {self.swapped_at - self.pointer.promoted_at:.2f} s after its promotion" if (
            self.pointer.promoted_at and new is not None and new.version == self.pointer.version) else ""  # fmt: skip
        log.info("now serving model %s (was %s)%s", _name(new), _name(old), since)

    def request_reload(self) -> int | None:
        """Ask every process following the registry to reload; this one counts as having seen it."""
        bump = getattr(self.registry, "request_reload", None)
        if bump is None:
            return None
        generation = bump()
        self.pointer = self._acted_on = self.read_pointer()
        return generation

    def describe(self) -> dict[str, Any]:
        return {
            "promoted": self.pointer.version,
            "promoted_at": self.pointer.promoted_at,
            "swapped_at": self.swapped_at,
            "failed": asdict(self.failure) if self.failure else None,
        }

    def _load(self, version: str | None, current: ModelBundle | None) -> ModelBundle | None:
        if version is None:
            return current
        if current is not None and current.version == version:
            self.failure = None  # the promoted version is the one serving: an earlier failure is history
            return current
        if self._previous is not None and self._previous.version == version:
            self.failure = None
            return self._previous
        try:
            model = self.registry.load(version)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            self.failure = LoadFailure(version, reason, time.time())
            metrics.MODEL_LOAD_FAILURES.inc()
            log.error("model %s failed to load, %s keeps serving: %s", version, _name(current), reason)
            record = getattr(self.registry, "record_failure", None)
            if record is not None:
                try:
                    record(version, reason)
                except OSError as write_error:
                    log.warning("could not record the failure of %s in the registry: %s", version, write_error)
            return current
        self.failure = None
        return model


def _name(model: ModelBundle | None) -> str:
    return model.version if model is not None else "no model"
