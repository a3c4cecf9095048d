"""The hidden-state router: P(target step better) from the draft's own state after its step.

The ARBITRAGE authors initialise their router from a PRM and fine-tune it on advantage
labels. Here the PRM is a value head on the draft's last hidden state (`arbitrage.value_prm`),
so the router is the same head shape over the same vector: it starts from the trained PRM's
head with its output negated (P(escalate) = 1 - V(draft step) before any training: a low
value means the target is likely to do better) and is fitted to y = 1[A > margin] with
binary cross-entropy, pulled towards that start (L2 to the initial weights) so a few
hundred labelled steps refine the PRM rather than replace it.

At inference it reads `RouterRequest.hidden`, which the loop fills from the draft's
`StepOutput.hidden` (`models.draft.hidden_states: true`): no model forward pass, so like the
probe it runs inside the coordinator (`InProcessRouter`). Saved as a folder:
`hidden_router.safetensors` (standardisation and head) and `router.json` (`kind: hidden`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from arbitrage.router import Router, RouterRequest
from arbitrage.value_prm import ValueHead

WEIGHTS_FILE = "hidden_router.safetensors"
DEFAULT_PRIOR = 10.0  # L2 pull to the initial head; weaker pulls memorise the training steps


class HiddenRouter(Router):
    """A `ValueHead`-shaped head over the draft's hidden state -> P(target better)."""

    def __init__(self, head: ValueHead):
        self.head = head.eval()
        self.dim = int(head.mean.numel())
        self.forward_calls = 0  # no model forward passes, ever
        self.head_calls = 0

    def predict(self, requests: list[RouterRequest]) -> list[float]:
        if not requests:
            return []
        for r in requests:
            if r.hidden is None or len(r.hidden) != self.dim:
                got = "none" if r.hidden is None else f"{len(r.hidden)} values"
                raise ValueError(
                    f"hidden router needs the draft's {self.dim}-dim hidden state in "
                    f"RouterRequest.hidden (set models.draft.hidden_states: true); got {got}"
                )
        x = torch.tensor([r.hidden for r in requests], dtype=torch.float32)
        with torch.inference_mode():
            self.head_calls += 1
            return torch.sigmoid(self.head(x)).tolist()

    @classmethod
    def initial(cls, prm_head: ValueHead) -> "HiddenRouter":
        """The PRM's head with its logit negated: P(escalate) = 1 - V(draft step)."""
        head = copy.deepcopy(prm_head)
        last = head.net if isinstance(head.net, nn.Linear) else head.net[-1]
        if not isinstance(last, nn.Linear):
            raise ValueError(f"the PRM head ends in a {type(last).__name__}, not the nn.Linear that writes its logit")
        with torch.no_grad():
            last.weight.neg_()
            last.bias.neg_()
        return cls(head)

    @classmethod
    def fit(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        init: ValueHead | None = None,
        width: int = 0,
        steps: int = 300,
        lr: float = 3e-3,
        prior: float = DEFAULT_PRIOR,
        seed: int = 0,
    ) -> tuple["HiddenRouter", list[float]]:
        """Fit on hidden states x [N, H] and labels y [N] in {0, 1}.

        Args:
            init: a trained PRM head to start from (negated, see `initial`); None starts from
                a fresh head standardised on x.
            width: the fresh head's MLP width (ignored with `init`: its shape is kept).
            steps, lr: full-batch Adam steps and rate.
            prior: weight of the L2 pull towards the initial weights.
        Returns:
            (router, the loss every 50 steps and at the end).
        """
        if x.shape[0] != y.shape[0] or not x.shape[0]:
            raise ValueError(f"need as many labels as states (> 0); got {x.shape[0]} and {y.shape[0]}")
        torch.manual_seed(seed)
        if init is not None:
            if int(init.mean.numel()) != x.shape[1]:
                raise ValueError(f"the PRM head reads {init.mean.numel()}-dim states, the data has {x.shape[1]}")
            head = cls.initial(init).head
        else:
            head = ValueHead(x.shape[1], width)
            head.mean.copy_(x.mean(0))
            head.std.copy_(x.std(0).clamp_min(1e-4))
        start = [p.detach().clone() for p in head.net.parameters()]
        opt = torch.optim.Adam(head.net.parameters(), lr=lr)
        bce = nn.BCEWithLogitsLoss()
        losses = []
        head.train()
        for i in range(steps):
            loss = bce(head(x), y.float())
            reg = sum(((p - p0) ** 2).sum() for p, p0 in zip(head.net.parameters(), start))
            opt.zero_grad()
            (loss + prior * reg).backward()
            opt.step()
            if i % 50 == 0 or i == steps - 1:
                losses.append(float(loss.detach()))
        return cls(head.eval()), losses

    def save_pretrained(self, path: str | Path, meta: dict | None = None) -> None:
        """Write the head and `router.json` (kind hidden, plus `meta`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(path / WEIGHTS_FILE))
        info = {**(meta or {}), "kind": "hidden", "dim": self.dim, "width": self.head.width}
        (path / "router.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "HiddenRouter":
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path / "router.json"
        if not meta_path.is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a hidden router folder (needs router.json and {WEIGHTS_FILE}); "
                "write one with `arbitrage train-router --kind hidden`"
            )
        if json.loads(meta_path.read_text()).get("kind") != "hidden":
            raise ValueError(f"{path}/router.json is not a hidden router's (kind hidden)")
        tensors = load_file(str(path / WEIGHTS_FILE))
        width = 0 if "net.weight" in tensors else int(tensors["net.0.weight"].shape[0])  # the shape says it
        head = ValueHead(int(tensors["mean"].numel()), width)
        head.load_state_dict(tensors)
        return cls(head)
