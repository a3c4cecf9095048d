"""A PRM trained offline from Monte-Carlo step values: a value head on a causal LM's hidden state.

The scorer reads one vector per step -- the final hidden state of a backbone LM after the
step's last token (the chat prompt, the earlier steps, the step itself) -- and maps it to
V in [0, 1] with a small head trained on the soft labels of `arbitrage.label`
(binary cross-entropy against V; `train_value_head`).

With the draft as backbone the vector is free at inference: the draft's llama.cpp engine
returns it with each step (`StepOutput.hidden`, `models.draft.hidden_states: true`) and
the loop passes it in `PRMRequest.hidden`; only steps the draft did not write (target
steps, for the oracle and escalation scoring) are read through the PRM's own engine.

A trained head is a folder: `value_head.safetensors` (the standardisation, the weights)
and `value_head.json` (backbone, hidden size, training summary). `models.prm.kind: value`
with `head: <folder>` loads it (`build_value_prm`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from arbitrage.engine_common import render_prompt
from arbitrage.prm import PRM, PRMRequest
from arbitrage.types import StepRequest

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_META = "value_head.json"


class ValueHead(nn.Module):
    """Standardise, then a one-hidden-layer MLP (or linear when `width` is 0) to one logit."""

    mean: torch.Tensor  # [dim] buffers: the standardisation
    std: torch.Tensor
    net: nn.Linear | nn.Sequential

    def __init__(self, dim: int, width: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.width = width
        self.net = (
            nn.Linear(dim, 1) if width == 0 else nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, 1))
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net((h - self.mean) / self.std).squeeze(-1)

    def save(self, folder: str | Path, meta: dict) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_META).write_text(
            json.dumps({**meta, "dim": int(self.mean.numel()), "width": self.width}, indent=2)
        )

    @classmethod
    def load(cls, folder: str | Path) -> tuple["ValueHead", dict]:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / HEAD_META).is_file():
            raise FileNotFoundError(
                f"no value head in {folder} (expected {HEAD_META}); train one with `arbitrage train-prm`"
            )
        meta = json.loads((folder / HEAD_META).read_text())
        head = cls(meta["dim"], meta.get("width", 0))
        head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
        return head.eval(), meta


def step_prompt_ids(tokenizer, req: PRMRequest, system: str | None = None, chat: bool = True) -> list[int]:
    """Token ids of the chat prompt, the earlier steps and the scored step (no trailing separator).

    The draft's own state after generating a step has read exactly these tokens (up to the
    tokenisation of the step's last characters), so both paths give the same vector.
    """
    head = render_prompt(
        tokenizer, StepRequest(problem=req.problem, steps=tuple(req.steps[:-1]), system=system, chat=chat)
    )
    return tokenizer(head + req.steps[-1], add_special_tokens=False)["input_ids"]


class ValuePRM(PRM):
    """V(prefix + step) from a value head over a backbone engine's hidden state."""

    def __init__(self, engine, head: ValueHead, system: str | None = None, chat: bool = True):
        """Args:
        engine: an engine with `hidden_states(token_ids, keys)` (llama.cpp with embeddings).
        head: the trained head.
        system, chat: how prompts are rendered (as the loop renders them for the draft).
        """
        self.engine, self.head = engine, head
        self.system, self.chat = system, chat
        self.dim = int(head.mean.numel())
        self.free_reads = 0  # steps scored from the vector the draft returned (no forward)

    def features(self, requests: list[PRMRequest]) -> torch.Tensor:
        """One hidden vector per request: the one it carries, else read through the engine; [B, H]."""
        out: list[torch.Tensor | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            if r.hidden is not None and len(r.hidden) == self.dim:
                out[i] = torch.tensor(r.hidden, dtype=torch.float32)
                self.free_reads += 1
            else:
                todo.append(i)
        if todo:
            ids = [step_prompt_ids(self.engine.tokenizer, requests[i], self.system, self.chat) for i in todo]
            keys = [f"value|{requests[i].chain_id}" if requests[i].chain_id else None for i in todo]
            self.forward_calls += 1
            for i, h in zip(todo, self.engine.hidden_states(ids, keys)):
                out[i] = h.float()
        feats = [h for h in out if h is not None]
        if len(feats) < len(out):
            missing = len(out) - len(feats)
            raise ValueError(f"the PRM's engine returned no hidden state for {missing} of {len(todo)} steps")
        return torch.stack(feats)

    def score(self, requests: list[PRMRequest]) -> list[float]:
        if not requests:
            return []
        with torch.inference_mode():
            return torch.sigmoid(self.head(self.features(requests))).tolist()


def build_value_prm(cfg, prompt=None) -> ValuePRM:
    """A `ValuePRM` from a PRMConfig of kind value: its backbone engine (embeddings on) and head.

    Args:
        cfg: the PRMConfig.
        prompt: the run's PromptConfig (system prompt, chat template), as the draft renders it.
    """
    from arbitrage.models import load_engine

    if not cfg.head:
        raise ValueError(
            "models.prm.head: a value PRM needs the folder of a trained head (arbitrage train-prm --out FOLDER)"
        )
    head, meta = ValueHead.load(cfg.head)
    engine = load_engine(cfg.model_copy(update={"hidden_states": True}))
    n_embd = getattr(engine, "n_embd", head.mean.numel())  # llama.cpp engines know their hidden size
    if n_embd != head.mean.numel():
        raise ValueError(
            f"models.prm.head: the head reads {head.mean.numel()}-dim states, the backbone "
            f"has {n_embd}; train it on this backbone"
        )
    system = prompt.system_prompt if prompt is not None else None
    chat = prompt.use_chat_template if prompt is not None else True
    return ValuePRM(engine, head, system=system, chat=chat)


# ---- training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTraining:
    """How a value head is fitted."""

    width: int = 0  # 0: logistic regression on standardised states
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


def train_value_head(
    x: torch.Tensor,
    v: torch.Tensor,
    ts: HeadTraining = HeadTraining(),
    x_val: torch.Tensor | None = None,
    v_val: torch.Tensor | None = None,
) -> tuple[ValueHead, dict]:
    """Fit a head to soft labels: full-batch AdamW on BCE(sigmoid(head(x)), v).

    Args:
        x: [N, H] hidden states; v: [N] values in [0, 1].
        x_val, v_val: held-out states and values; when given, the epoch with the lowest
            held-out loss is kept.
    Returns:
        (head, {"train_loss", "val_loss", "best_epoch"})
    """
    torch.manual_seed(ts.seed)
    head = ValueHead(x.shape[1], ts.width)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp_min(1e-4))
    opt = torch.optim.AdamW(head.parameters(), lr=ts.lr, weight_decay=ts.weight_decay)
    bce = nn.BCEWithLogitsLoss()
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (math.inf, -1, None)  # (val loss, epoch, weights)
    train_loss = math.nan
    for epoch in range(ts.epochs):
        head.train()
        opt.zero_grad()
        loss = bce(head(x), v)
        loss.backward()
        opt.step()
        train_loss = float(loss.detach())
        if x_val is not None:
            head.eval()
            with torch.no_grad():
                val = float(bce(head(x_val), v_val))
            if val < best[0]:
                best = (val, epoch, {k: t.clone() for k, t in head.state_dict().items()})
    if best[2] is not None:
        head.load_state_dict(best[2])
    head.eval()
    return head, {
        "train_loss": train_loss,
        "val_loss": None if best[2] is None else best[0],
        "best_epoch": best[1] if best[2] is not None else ts.epochs - 1,
    }
