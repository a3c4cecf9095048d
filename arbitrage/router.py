"""The router: P(the target would write a better step | context, the draft's candidate step).

Inference only (training lives elsewhere). The input text follows the paper's released
format: the problem, then each earlier step prefixed "Model 0: " (draft) or "Model 1: "
(target), then the candidate as "Model 0: ", joined by blank lines. `ClassifierRouter`
runs an HF 2-label classifier over that text and returns softmax(logits)[1]; inputs
longer than `max_length` tokens are cut from the left, so the candidate and the most
recent history are kept. `build_router` also loads the probe router (`arbitrage.probe`),
which reads the draft's own step features instead of running a model.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from arbitrage.prm import left_pad, resolve_device_dtype
from arbitrage.types import AUTHOR_ID


@dataclass(frozen=True)
class RouterRequest:
    """One routing decision: the chain so far and the draft's proposed step."""

    problem: str
    history: tuple[tuple[str, str], ...]  # (author, text), author in {"draft", "target"}
    candidate: str
    features: dict[str, float] | None = None  # draft-side features (probe router)


def format_router_input(problem: str, history, candidate: str) -> str:
    """The router's input text in the paper's released format.

    Args:
        problem: the problem statement.
        history: earlier steps as (author, text), author "draft" or "target".
        candidate: the draft's proposed step.
    Returns:
        problem, "Model <0|1>: step" for each earlier step, "Model 0: candidate", joined by "\\n\\n".
    """
    parts = [problem]
    for author, text in history:
        if author not in AUTHOR_ID:
            raise ValueError(f"unknown step author {author!r}; expected 'draft' or 'target'")
        parts.append(f"Model {AUTHOR_ID[author]}: {text}")
    parts.append(f"Model {AUTHOR_ID['draft']}: {candidate}")
    return "\n\n".join(parts)


class Router(abc.ABC):
    """Predicts whether the target would write a better step. `forward_calls` counts forwards."""

    forward_calls: int = 0

    @abc.abstractmethod
    def predict(self, requests: list[RouterRequest]) -> list[float]:
        """P(target step scores higher) for each request, batched.

        Args:
            requests: one per candidate step.
        Returns:
            One probability in [0, 1] per request, in order.
        """


class ClassifierRouter(Router):
    """An HF classifier with 2 labels over `format_router_input`; class 1 = target better.

    Works with sequence classifiers (pooled at the last non-pad token) and token
    classifiers (the logits of the last token are used).
    """

    def __init__(self, model, tokenizer, max_length: int = 512):
        """
        Args:
            model: a transformers model whose logits are [B, 2] or [B, T, 2].
            tokenizer: its tokenizer; left truncation and padding are set on it.
            max_length: longest input in tokens (special tokens included).
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        tokenizer.truncation_side = "left"
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.forward_calls = 0

    def encode(self, req: RouterRequest) -> list[int]:
        """Token ids of one request, left-truncated to `max_length`."""
        text = format_router_input(req.problem, req.history, req.candidate)
        return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def predict(self, requests: list[RouterRequest]) -> list[float]:
        """P(target step scores higher) for each request (see `Router.predict`)."""
        if not requests:
            return []
        seqs = [self.encode(r) for r in requests]
        device = next(self.model.parameters()).device
        ids, mask, pos = left_pad(seqs, self.model.config.pad_token_id, device)
        with torch.inference_mode():
            self.forward_calls += 1
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        if logits.dim() == 3:  # token classifier: left padding puts the last token at -1
            logits = logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)[:, 1].tolist()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        max_length: int = 512, dtype: torch.dtype | None = None,
                        tokenizer: str | Path | None = None) -> "ClassifierRouter":
        """Load a router folder (or any 2-label-able checkpoint) with its tokenizer.

        Args:
            path: folder with config.json, safetensors and tokenizer files.
            device: where to run it.
            max_length: input truncation in tokens.
            dtype: weights dtype; None = float32.
            tokenizer: tokenizer source when it is not in `path`.
        """
        from transformers import (AutoConfig, AutoModelForSequenceClassification,
                                  AutoModelForTokenClassification, AutoTokenizer)

        config = AutoConfig.from_pretrained(path)
        token_level = any("TokenClassification" in a for a in (config.architectures or []))
        auto = AutoModelForTokenClassification if token_level else AutoModelForSequenceClassification
        model = auto.from_pretrained(path, num_labels=2, dtype=dtype or torch.float32)
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
        return cls(model.to(device), tok, max_length=max_length)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the model (safetensors + config) and the tokenizer to a folder."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def build_router(cfg) -> Router:
    """Build the router a `RouterConfig` describes.

    Args:
        cfg: `configs.schema.RouterConfig`. classifier: `path` (a trained router folder) or
            `source` (random: a tiny random classifier at a shape of `arbitrage.tiny.SHAPES`
            with the byte tokenizer; local / hub: a checkpoint loaded as a 2-label classifier).
            probe: `path` (a folder written by `arbitrage train-router --kind probe`).
    Returns:
        A `ClassifierRouter`, or an `arbitrage.probe.ProbeRouter` (no model; CPU).
    """
    saved = _saved_kind(cfg.path) if cfg.path is not None else None
    if saved is not None and saved != cfg.kind:
        raise ValueError(f"router folder {cfg.path} holds a {saved} router but models.router.kind is "
                         f"{cfg.kind!r}; set kind: {saved}")
    if cfg.kind == "probe":
        if cfg.path is None:
            raise ValueError("router kind 'probe' needs `path` (a folder written by "
                             "`arbitrage train-router --kind probe`), not `source`")
        from arbitrage.probe import ProbeRouter

        return ProbeRouter.from_pretrained(cfg.path)
    device, _ = resolve_device_dtype(cfg.device, "float32")
    if cfg.path is not None:
        return ClassifierRouter.from_pretrained(cfg.path, device=device, max_length=cfg.max_length)
    if cfg.source.kind == "random":
        from transformers import AutoModelForSequenceClassification

        from arbitrage.tiny import byte_tokenizer, shape_config

        config = shape_config(cfg.source.name, num_labels=2)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        return ClassifierRouter(model.to(device), byte_tokenizer(config.vocab_size), cfg.max_length)
    from arbitrage.models import model_location

    return ClassifierRouter.from_pretrained(model_location(cfg.source), device=device,
                                            max_length=cfg.max_length, tokenizer=cfg.source.tokenizer)


def _saved_kind(path: str | Path) -> str | None:
    """The router kind recorded in a folder's router.json / probe.json, if any."""
    import json

    for name in ("router.json", "probe.json"):
        f = Path(path) / name
        if f.exists():
            return json.loads(f.read_text()).get("kind")
    return None


class InProcessRouter:
    """A model-free router (kind `probe`) served inside the caller's process: no actor, no RPC.

    It has a router actor's interface (async `predict`, `health`, `stats`), so the runtime
    hands it to each coordinator as the router "handle" and `RayBackend` awaits it like an
    actor. The probe reads only features the draft step already carries, so asking it costs
    microseconds, where a router actor costs a round trip per step. It pickles as its config
    and builds the router on first use, in the process that uses it.
    """

    def __init__(self, cfg):
        if cfg.kind != "probe":
            raise ValueError(f"only the model-free probe router runs in-process, not kind {cfg.kind!r}")
        self.cfg = cfg
        self._router: Router | None = None
        self.calls = 0
        self.busy_s = 0.0

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    async def predict(self, req: RouterRequest) -> float:
        t0 = time.perf_counter()
        if self._router is None:
            self._router = build_router(self.cfg)
        out = self._router.predict([req])[0]
        self.calls += 1
        self.busy_s += time.perf_counter() - t0
        return out

    def health(self) -> dict:
        return {"role": "router", "ready": True, "in_process": True, "methods": ["predict"]}

    def stats(self) -> dict:
        """This copy's calls (each coordinator holds its own copy)."""
        return {"role": "router", "in_process": True, "forward_calls": 0,
                "methods": {"predict": {"batch_sizes": {1: self.calls} if self.calls else {}, "busy_s": self.busy_s}}}
