"""The router: P(the target would write a better step | context, the draft's candidate step).

Inference only (training lives elsewhere). The input is built as the ARBITRAGE authors
build it (SqueezeAILab/Arbitrage `prepare_input_router`, Skywork's `prepare_input` without
the BOS): the tokens of `problem + "\\n"`, then the annotated response -- each earlier
step as "Model 0: " (draft) or "Model 1: " (target) + its text, then the candidate as
"Model 0: " + its text -- cut at the step token "\\n\\n", each piece's tokens followed by
the step token's id (271 on Qwen2.5 and Llama 3), so the input ends with that id after the
candidate. The router reads its 2-label logits there, at the last step token, and returns
softmax(logits)[1]: a token classifier (`AutoModelForTokenClassification`, the authors'
Qwen2 PRM-initialised router) at that position, a decoder sequence classifier by pooling
the last token, which is the same position. Inputs longer than `max_length` drop their
oldest steps first, then are cut from the left, so the candidate is always kept.
`arbitrage.router_factory.build_router` builds a router from its config, this classifier
or the probe router (`arbitrage.probe`, which reads the draft's own step features instead of
running a model).
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from arbitrage.prm import left_pad
from arbitrage.types import AUTHOR_ID


@dataclass(frozen=True)
class RouterRequest:
    """One routing decision: the chain so far and the draft's proposed step."""

    problem: str
    history: tuple[tuple[str, str], ...]  # (author, text), author in {"draft", "target"}
    candidate: str
    features: dict[str, float] | None = None  # draft-side features (probe router)
    hidden: list[float] | None = None  # the draft's state after the step (hidden-state probe router)


ROUTER_STEP_TOKEN = "\n\n"  # the authors' step word
# Router kinds that run no model (they read what the draft step carries): served in-process.
MODEL_FREE_ROUTERS = ("probe", "hidden")
# Recorded in router.json: classifier folders trained before it (text joined by blank lines,
# read at the last text token) would read other positions, so they are refused.
ROUTER_INPUT_FORMAT = "authors-v1: problem+\\n, pieces each + step token 271, read at the last step token"


def annotated_response(history, candidate: str) -> str:
    """The authors' annotated response: "Model <0|1>: " + step + "\\n\\n" per earlier step, then
    "Model 0: " + candidate (the step token after it is added as a token id, not as text)."""
    parts = []
    for author, text in history:
        if author not in AUTHOR_ID:
            raise ValueError(f"unknown step author {author!r}; expected 'draft' or 'target'")
        parts.append(f"Model {AUTHOR_ID[author]}: {text}{ROUTER_STEP_TOKEN}")
    return "".join(parts) + f"Model {AUTHOR_ID['draft']}: {candidate}"


def format_router_input(problem: str, history, candidate: str) -> str:
    """The router's input as text (for display; the model sees `encode_router_input`'s ids).

    Args:
        problem: the problem statement.
        history: earlier steps as (author, text), author "draft" or "target".
        candidate: the draft's proposed step.
    Returns:
        problem + "\\n", then "Model <0|1>: step\\n\\n" for each earlier step and
        "Model 0: candidate\\n\\n".
    """
    return problem + "\n" + annotated_response(history, candidate) + ROUTER_STEP_TOKEN


def router_step_token_id(tokenizer) -> int:
    """The id read by the router: the last token of "\\n\\n" (271 on Qwen2.5 / Llama 3); for a
    tokenizer that drops whitespace (BERT family) its [SEP], else its EOS."""
    ids = tokenizer.encode(ROUTER_STEP_TOKEN, add_special_tokens=False)
    if ids:
        return ids[-1]
    for tid in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    raise ValueError("router tokenizer encodes '\\n\\n' to nothing and has no [SEP] or EOS token")


def encode_router_input(
    tokenizer, problem: str, history, candidate: str, step_token_id: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of one router input as the authors build them, and the step-token positions.

    `tokenizer.encode(problem + "\\n")` (with the tokenizer's own special tokens, e.g. a BOS),
    then the annotated response split at "\\n\\n", each piece encoded without special tokens
    and followed by `step_token_id`. The router reads the last position, the step token after
    the candidate.

    Returns:
        (ids, positions of every step token; the last is len(ids) - 1).
    """
    sid = router_step_token_id(tokenizer) if step_token_id is None else step_token_id
    ids = list(tokenizer.encode(problem + "\n"))
    positions = []
    for piece in annotated_response(history, candidate).split(ROUTER_STEP_TOKEN):
        ids += (tokenizer.encode(piece, add_special_tokens=False) if piece else []) + [sid]
        positions.append(len(ids) - 1)
    return ids, positions


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
    """An HF classifier with 2 labels over `encode_router_input`; class 1 = target better.

    Every input ends with the step token after the candidate and is left-padded, so the
    last position is where the authors read: token classifiers give their logits there,
    decoder sequence classifiers pool there (their last non-pad token).
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
        self.step_token_id = router_step_token_id(tokenizer)
        self.forward_calls = 0

    def encode(self, req: RouterRequest) -> list[int]:
        """Token ids of one request (`encode_router_input`), at most `max_length`.

        Too long: the oldest earlier steps are dropped first; if the problem and the candidate
        alone are too long, the ids are cut from the left (the candidate's end is kept).
        """
        history = tuple(req.history)
        while True:
            ids, _ = encode_router_input(self.tokenizer, req.problem, history, req.candidate, self.step_token_id)
            if len(ids) <= self.max_length or not history:
                return ids[-self.max_length :]
            history = history[1:]

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
        if logits.dim() == 3:  # token classifier: left padding puts the last step token at -1
            logits = logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)[:, 1].tolist()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        max_length: int = 512,
        dtype: torch.dtype | None = None,
        tokenizer: str | Path | None = None,
    ) -> "ClassifierRouter":
        """Load a router folder (or any 2-label-able checkpoint) with its tokenizer.

        Args:
            path: folder with config.json, safetensors and tokenizer files.
            device: where to run it.
            max_length: input truncation in tokens.
            dtype: weights dtype; None = float32.
            tokenizer: tokenizer source when it is not in `path`.
        """
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            AutoTokenizer,
        )

        meta = Path(path) / "router.json"
        if meta.is_file() and "input_format" not in json.loads(meta.read_text()):
            raise ValueError(
                f"router {path} was trained on the old input format (steps joined by blank "
                "lines); retrain it with `arbitrage train-router`"
            )
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
