"""The probe router: a tiny head over what the draft already computed; no model forward pass.

Its input is a handful of numbers per request, all available when the draft's step ends:
the draft's own token statistics (`StepOutput.features`: mean / min / last log-probability,
mean / max entropy, step length) and the chain's state from `RouterRequest.history` (step
index, share of earlier steps written by the target, whether the previous step was the
target's) plus whether the candidate states a final answer. The features are standardised
with the training mean and std, then a logistic regression (or a one-hidden-layer tanh MLP)
gives P(target better). Saved as `probe.safetensors` (mean, std, head weights) and
`probe.json` (feature names, hidden size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from arbitrage.router import Router, RouterRequest

PROBE_FEATURES: tuple[str, ...] = (
    "lp_mean",
    "lp_min",
    "lp_last",
    "ent_mean",
    "ent_max",
    "log_num_tokens",
    "step_index",
    "target_share",
    "prev_target",
    "has_answer",
)
WEIGHTS_FILE = "probe.safetensors"
CONFIG_FILE = "probe.json"


def probe_features(req: RouterRequest) -> list[float]:
    """The probe's feature vector for one request, in `PROBE_FEATURES` order.

    Raises:
        ValueError: the request carries no draft features (the loop passes them; build
            requests with `features=StepOutput.features`).
    """
    f = req.features
    if not f:
        raise ValueError("probe router needs RouterRequest.features (the draft StepOutput.features); got none")
    authors = [a for a, _ in req.history]
    n = len(authors)
    return [
        f["lp_mean"],
        f["lp_min"],
        f["lp_last"],
        f["ent_mean"],
        f["ent_max"],
        math.log1p(f["num_tokens"]),
        float(n),
        authors.count("target") / n if n else 0.0,
        float(n > 0 and authors[-1] == "target"),
        float("\\boxed" in req.candidate),
    ]


def _head(dim: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(dim, 1)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class ProbeRouter(Router):
    """Standardised draft-side features -> logistic regression or tiny MLP -> P(target better).

    Has no language model: `predict` reads `RouterRequest.features` and `history` only.
    `forward_calls` (model forwards) stays 0; `head_calls` counts batched head evaluations.
    """

    def __init__(
        self,
        head: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        hidden: int = 0,
        feature_names: tuple[str, ...] = PROBE_FEATURES,
    ):
        """
        Args:
            head: maps standardised features [B, F] to logits [B, 1].
            mean, std: [F] training statistics.
            hidden: MLP hidden units (0: logistic regression), recorded for saving.
            feature_names: must equal `PROBE_FEATURES` (checked on load).
        """
        self.head = head.eval()
        self.mean, self.std = mean.float(), std.float()
        self.hidden = hidden
        self.feature_names = tuple(feature_names)
        self.forward_calls = 0
        self.head_calls = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B] for raw features x [B, F]."""
        return self.head((x - self.mean) / self.std).squeeze(-1)

    def predict(self, requests: list[RouterRequest]) -> list[float]:
        """P(target step scores higher) for each request (see `Router.predict`)."""
        if not requests:
            return []
        x = torch.tensor([probe_features(r) for r in requests], dtype=torch.float32)  # [B, F]
        with torch.inference_mode():
            self.head_calls += 1
            return torch.sigmoid(self.logits(x)).tolist()

    @classmethod
    def fit(
        cls,
        requests: list[RouterRequest],
        labels: list[int],
        hidden: int = 0,
        steps: int = 500,
        lr: float = 0.05,
        weight_decay: float = 1e-3,
        seed: int = 0,
    ) -> tuple["ProbeRouter", list[float]]:
        """Fit on labelled requests with full-batch Adam and binary cross-entropy.

        Args:
            requests: training requests (with draft features).
            labels: y in {0, 1}, one per request.
            hidden: MLP hidden units (0: logistic regression).
            steps: optimisation steps over the whole batch.
            lr, weight_decay: Adam settings (weight decay acts as L2 on the head).
            seed: initialisation seed.
        Returns:
            (the probe, the loss after every 50 steps and at the end).
        """
        if len(requests) != len(labels) or not requests:
            raise ValueError(f"need as many labels as requests (> 0); got {len(requests)} and {len(labels)}")
        x = torch.tensor([probe_features(r) for r in requests], dtype=torch.float32)  # [N, F]
        y = torch.tensor(labels, dtype=torch.float32)  # [N]
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
        torch.manual_seed(seed)
        probe = cls(_head(x.shape[1], hidden), mean, std, hidden)
        probe.head.train()
        opt = torch.optim.Adam(probe.head.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        for i in range(steps):
            loss = nn.functional.binary_cross_entropy_with_logits(probe.logits(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % 50 == 0 or i == steps - 1:
                losses.append(float(loss.detach()))
        probe.head.eval()
        return probe, losses

    def save_pretrained(self, path: str | Path) -> None:
        """Write `probe.safetensors` (mean, std, head.*) and `probe.json` to a folder."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean,
            "std": self.std,
            **{f"head.{k}": v.detach().contiguous() for k, v in self.head.state_dict().items()},
        }
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(
            json.dumps({"kind": "probe", "features": list(self.feature_names), "hidden": self.hidden}, indent=2) + "\n"
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ProbeRouter":
        """Load a folder written by `save_pretrained`.

        Raises:
            FileNotFoundError: the folder lacks probe.json / probe.safetensors.
            ValueError: the saved feature list differs from this version's `PROBE_FEATURES`.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(
                f"{path} is not a probe router folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                "write one with `arbitrage train-router --kind probe`"
            )
        meta = json.loads((path / CONFIG_FILE).read_text())
        if tuple(meta["features"]) != PROBE_FEATURES:
            raise ValueError(
                f"{path}: probe features {meta['features']} differ from {list(PROBE_FEATURES)}; "
                "retrain the probe with this version"
            )
        tensors = load_file(str(path / WEIGHTS_FILE))
        head = _head(len(PROBE_FEATURES), int(meta["hidden"]))
        head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        return cls(head, tensors["mean"], tensors["std"], int(meta["hidden"]))
