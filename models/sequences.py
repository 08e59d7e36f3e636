"""A two-tower model of click sequences: the session's last clicks -> a user vector, an article -> an item
vector; their cosine similarity scores the article as the session's next click.

Trained with in-batch negatives on (session so far, next click) pairs. Batches hold pairs that are
consecutive in time (batches are shuffled, not pairs), so a batch's negatives are the articles clicked
at the same moment: popular, current articles, what the evaluation's candidates are. `refresh` goes on
training the same weights on newly revealed clicks (test-then-train). Runs on CUDA when present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.globo import Clicks
from models.probes import Probes


@dataclass
class SequenceConfig:
    dim: int = 64  # embedding size of both towers (L2-normalised outputs)
    history: int = 5  # last clicks of the session read by the user tower
    temperature: float = 0.05  # softmax temperature on cosine similarities
    batch_size: int = 512  # pairs per step; also the number of in-batch negatives
    epochs: int = 2  # passes over the initial training pairs
    refresh_epochs: int = 1  # passes over each refresh's new pairs
    lr: float = 3e-3  # Adam learning rate
    threads: int = 1  # torch CPU threads: on 2 shared cores a second thread made steps slower, not faster
    seed: int = 0


class SessionTwoTower(nn.Module):
    def __init__(self, n_items: int, config: SequenceConfig) -> None:
        super().__init__()
        self.config = c = config
        # Row 0 pads; article i is row i + 1. Separate input and output tables: "b follows a" is not symmetric.
        # Sparse gradients: a step touches a few thousand of the ~40k rows, and a dense Adam step over
        # both tables costs far more than the rest of the step on a CPU.
        self.items_in = nn.Embedding(n_items + 1, c.dim, padding_idx=0, sparse=True)
        self.items_out = nn.Embedding(n_items + 1, c.dim, sparse=True)
        self.recency = nn.Parameter(torch.zeros(c.history))  # attention logits by position, most recent first
        self.mix = nn.Sequential(nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, c.dim))
        nn.init.normal_(self.items_in.weight, std=0.05)
        nn.init.normal_(self.items_out.weight, std=0.05)

    def user_tower(self, history: Tensor) -> Tensor:
        """(B, dim) from (B, history) article indices, most recent first, -1 padded."""
        x = self.items_in(history + 1)  # (B, L, dim)
        logits = self.recency[None, :].expand_as(history).masked_fill(history < 0, -1e9)  # (B, L)
        u = (torch.softmax(logits, dim=1)[:, :, None] * x).sum(dim=1)  # (B, dim)
        return F.normalize(u + self.mix(u), dim=1)

    def item_tower(self, items: Tensor) -> Tensor:
        """(..., dim) from article indices (...)."""
        return F.normalize(self.items_out(items.clamp(min=-1) + 1), dim=-1)

    def forward(self, history: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        return self.user_tower(history), self.item_tower(items)


class SequenceModel:
    """The model, its optimisers and which articles training has seen (the unseen score 0)."""

    def __init__(self, n_items: int, config: SequenceConfig | None = None) -> None:
        self.config = config or SequenceConfig()
        torch.manual_seed(self.config.seed)
        torch.set_num_threads(self.config.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = SessionTwoTower(n_items, self.config).to(self.device)
        tables = [self.net.items_in.weight, self.net.items_out.weight]
        dense = [p for p in self.net.parameters() if all(p is not t for t in tables)]
        self.optimisers = [torch.optim.SparseAdam(tables, lr=self.config.lr),
                           torch.optim.Adam(dense, lr=self.config.lr)]  # fmt: skip
        self.seen = np.zeros(n_items, dtype=bool)
        self.rng = np.random.default_rng(self.config.seed)
        self.pairs_trained = 0
        self.seconds = 0.0

    def fit(self, clicks: Clicks, start_ms: int, end_ms: int, epochs: int | None = None) -> None:
        """Train on the next-in-session pairs whose click falls in [start_ms, end_ms)."""
        began = time.perf_counter()
        index = np.flatnonzero((clicks.position > 0) & (clicks.ts >= start_ms) & (clicks.ts < end_ms))
        if not len(index):
            return
        history = torch.from_numpy(clicks.history(index, self.config.history)).to(self.device)
        target = torch.from_numpy(clicks.item[index]).to(self.device)
        self.seen[clicks.item[index]] = True
        size = self.config.batch_size
        starts = np.arange(0, len(index), size)
        self.net.train()
        for _ in range(self.config.epochs if epochs is None else epochs):
            for lo in self.rng.permutation(starts):
                self._step(history[lo : lo + size], target[lo : lo + size])
        self.pairs_trained += len(index) * (self.config.epochs if epochs is None else epochs)
        self.seconds += time.perf_counter() - began

    def refresh(self, clicks: Clicks, start_ms: int, end_ms: int) -> None:
        self.fit(clicks, start_ms, end_ms, epochs=self.config.refresh_epochs)

    def snapshot(self) -> dict[str, Any]:
        """The weights and the seen articles as they are now (a copy: later training leaves it alone)."""
        state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {"state": state, "seen": torch.from_numpy(self.seen.copy())}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.net.load_state_dict(snapshot["state"])
        self.seen = snapshot["seen"].numpy().copy()

    @torch.no_grad()
    def score(self, probes: Probes, index_map: np.ndarray | None = None) -> np.ndarray:
        """(E, C) cosine similarities of each event's session and its candidates; 0 for unseen articles.
        `index_map` maps the probes' article indices to this model's rows (-1: not in the model)."""
        self.net.eval()
        history, cands = probes.history[:, : self.config.history], probes.candidates
        if index_map is not None:
            history = np.where(history >= 0, index_map[np.maximum(history, 0)], -1)
            cands = np.where(cands >= 0, index_map[np.maximum(cands, 0)], -1)
        users = self.net.user_tower(torch.from_numpy(history).to(self.device))  # (E, dim)
        items = self.net.item_tower(torch.from_numpy(cands).to(self.device))  # (E, C, dim)
        scores = (users[:, None, :] * items).sum(dim=-1).cpu().numpy()
        known = self.seen[np.maximum(cands, 0)] & (cands >= 0)
        return np.where(known, scores, 0.0)

    def _step(self, history: Tensor, target: Tensor) -> None:
        users, items = self.net(history, target)  # (B, dim), (B, dim)
        logits = users @ items.T / self.config.temperature  # (B, B)
        # Another pair's click of the same article is not a negative.
        same = (target[:, None] == target[None, :]) & ~torch.eye(len(target), dtype=torch.bool, device=target.device)
        loss = F.cross_entropy(logits.masked_fill(same, -1e9), torch.arange(len(target), device=target.device))
        for optimiser in self.optimisers:
            optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for optimiser in self.optimisers:
            optimiser.step()
