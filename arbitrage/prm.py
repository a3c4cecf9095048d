"""Process reward models (PRMs): score the newest reasoning step of a chain in [0, 1].

Three kinds behind one interface (`PRM.score`, batched):

- `SkyworkPRM`: the Skywork-o1-Open-PRM format (github.com/SkyworkAI/skywork-o1-prm-inference).
  A Qwen2 backbone with a value head `v_head.summary` (Linear hidden -> 1). The input is
  Skywork's `prepare_input`: `bos + problem + "\\n"`, then the response split at the step
  token, each piece's tokens followed by the step token's id; the step reward is
  sigmoid(value) at that id. The step token is `models.prm.step_token`, by default "\\n\\n"
  (Qwen2.5 token 271), as the ARBITRAGE authors call it (SqueezeAILab/Arbitrage passes their
  step word "\\n\\n" to `prepare_input`; Skywork's own example uses "\\n").
- `QwenMathPRM`: the Qwen2.5-Math-PRM format. A chat (system, user = problem,
  assistant = steps joined and ended by `<extra_0>`); a 2-label token classifier; the
  step reward is softmax(logits)[1] at each `<extra_0>`.
- `JudgePRM`: a causal LM (the target's own weights, if wanted) rates the newest step
  0-9; the score is the expected digit under the next-token law restricted to "0".."9",
  divided by 9. Needs no extra download.

`SkyworkPRMModel` and `QwenPRMModel` are plain modules with the released checkpoints'
parameter names (`model.*` + `v_head.summary.*`, `model.*` + `score.{0,2}.*`), so real
checkpoints load without `trust_remote_code`, and tiny random ones are built from a
transformers config for tests. Their weights are read through `arbitrage.checkpoints`
(safetensors, or `pytorch_model.bin` / sharded `.bin` with `torch.load(weights_only=True)`:
Skywork ships `pytorch_model.bin` only). Only the last step of each request is scored.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_STEP_TOKEN = "<extra_0>"
SKYWORK_STEP_TOKEN = "\n\n"  # the authors' step word; Qwen2.5 token 271


@dataclass(frozen=True)
class PRMRequest:
    """One step to score: the problem and the steps so far; the last step is scored."""

    problem: str
    steps: tuple[str, ...]
    chain_id: str | None = None  # lets a judge on a StepEngine reuse the chain's cached KV
    hidden: list[float] | None = None  # the generating engine's state after the step (value-head PRMs)


class PRM(abc.ABC):
    """A process reward model. `forward_calls` counts model forward passes."""

    forward_calls: int = 0

    @abc.abstractmethod
    def score(self, requests: list[PRMRequest]) -> list[float]:
        """Score the last step of each request, batched.

        Args:
            requests: one per step to score; each needs at least one step.
        Returns:
            One score in [0, 1] per request, in order.
        """


# ---- shared helpers ------------------------------------------------------------------


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each [B, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Config strings -> (torch.device, torch.dtype), as `arbitrage.models` resolves them."""
    from arbitrage.models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def _check(requests: list[PRMRequest]) -> None:
    for r in requests:
        if not r.steps:
            raise ValueError("a PRMRequest needs at least one step (the one to score)")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    return 0


def _fit(encode, req: PRMRequest, max_length: int) -> tuple[list[int], list[int]]:
    """Encode `req`, dropping the oldest earlier steps until it fits; left-truncate as a last resort.

    `encode(req) -> (ids, step_positions)`. Returns the same, truncated to `max_length`.
    """
    ids, positions = encode(req)
    steps = req.steps
    while len(ids) > max_length and len(steps) > 1:
        steps = steps[1:]
        ids, positions = encode(PRMRequest(req.problem, steps))
    if len(ids) > max_length:
        cut = len(ids) - max_length
        ids, positions = ids[cut:], [p - cut for p in positions if p >= cut]
    return ids, positions


def _checkpoint_keys(folder: Path) -> set[str]:
    from arbitrage.checkpoints import weight_files

    return weight_files(folder).keys()


# ---- PRM modules with the released checkpoints' parameter names -----------------------


class _HeadModel(nn.Module):
    """A transformers backbone (`model.*`) plus a small head kept in float32.

    Subclasses set `head_name`, `architecture` and build the head in `_make_head`.
    """

    head_name = ""
    architecture = ""

    def __init__(self, config, backbone: nn.Module | None = None):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        self.model = backbone if backbone is not None else AutoModel.from_config(config)
        setattr(self, self.head_name, self._make_head(config.hidden_size).float())

    def _make_head(self, hidden: int) -> nn.Module:
        raise NotImplementedError

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Last hidden states [B, T, H], upcast to float32 for the head."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state.float()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Load a checkpoint folder: config.json + weights with the released key names.

        The weights may be safetensors or `pytorch_model.bin` (sharded or not), found and read
        by `arbitrage.checkpoints` (`.bin` with `torch.load(weights_only=True)`). Keys
        `model.*` and `<head>.*` must all be there; `lm_head.*` (the causal LM the PRM was
        tuned from) is ignored.

        Args:
            path: the checkpoint folder.
            dtype: backbone dtype (the head stays float32); None keeps float32.
            device: where to put the model.
        Raises:
            CheckpointError: no weights, an unsafe `.bin`, or keys that do not match.
        """
        from transformers import AutoConfig, AutoModel
        from transformers.initialization import no_init_weights

        from arbitrage.checkpoints import CheckpointError, read_weights

        folder = Path(path)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        state = read_weights(folder, keep=lambda k: not k.startswith("lm_head."))
        with no_init_weights(), torch.device(device):  # every parameter is overwritten below
            backbone = AutoModel.from_config(config, dtype=dtype or torch.float32)
            model = cls(config, backbone)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            what = [f"missing {len(missing)} keys (e.g. {missing[0]})"] if missing else []
            what += [f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"] if unexpected else []
            raise CheckpointError(f"{folder} is not a {cls.architecture} checkpoint: {'; '.join(what)}")
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors with the released key names."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [self.architecture]
        self.config.save_pretrained(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


class _ValueHead(nn.Module):
    """Skywork's ValueHead: `summary` = Linear(hidden, 1) (dropout is a no-op at inference)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.summary = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.summary(h)


class SkyworkPRMModel(_HeadModel):
    """Skywork-o1-Open-PRM: backbone + `v_head.summary`; forward returns values (pre-sigmoid) [B, T]."""

    head_name = "v_head"
    architecture = "Qwen2ForPrmModel"
    v_head: nn.Module

    def _make_head(self, hidden: int) -> nn.Module:
        return _ValueHead(hidden)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.v_head(self.hidden_states(input_ids, attention_mask, position_ids)).squeeze(-1)


class QwenPRMModel(_HeadModel):
    """Qwen2.5-Math-PRM (`Qwen2ForProcessRewardModel`): backbone + `score` MLP
    (Linear(h, h) -> ReLU -> Linear(h, 2)); forward returns logits [B, T, 2]."""

    head_name = "score"
    architecture = "Qwen2ForProcessRewardModel"
    score: nn.Module

    def _make_head(self, hidden: int) -> nn.Module:
        return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.score(self.hidden_states(input_ids, attention_mask, position_ids))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


# ---- the PRMs --------------------------------------------------------------------------


class SkyworkPRM(PRM):
    """Skywork-o1-Open-PRM scoring: sigmoid(value) at the step token after the last step."""

    def __init__(self, model: nn.Module, tokenizer, step_token: str = SKYWORK_STEP_TOKEN, max_length: int = 4096):
        """
        Args:
            model: a `SkyworkPRMModel` (or any module mapping ids -> values [B, T]).
            tokenizer: the PRM's tokenizer.
            step_token: the text after which a reward is read; its last token's id is appended
                after each piece ("\\n\\n" -> 271 on Qwen2.5, as the ARBITRAGE authors use it).
            max_length: longest input in tokens; older steps are dropped to fit.
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.step_token = step_token
        self.step_token_id = tokenizer.encode(step_token, add_special_tokens=False)[-1]
        self.max_length = max_length
        self.pad_id = _pad_id(tokenizer)
        self.forward_calls = 0

    def encode(self, req: PRMRequest) -> tuple[list[int], list[int]]:
        """Token ids as Skywork's `prepare_input` builds them, and the index of each step's reward.

        `prepare_input(problem, response, tokenizer, step_token)` encodes
        `bos + problem + "\\n"`, splits the response at the step token and appends the step
        token's id after every piece. The response here is the steps joined by the step
        token, so a step that itself contains the step token is scored as the pieces
        `prepare_input` would cut it into; the reward of a step is read at its last piece.
        """
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        ids = enc((self.tokenizer.bos_token or "") + req.problem + "\n")
        positions = []
        for step in req.steps:
            for piece in step.split(self.step_token):
                ids = ids + (enc(piece) if piece else []) + [self.step_token_id]
            positions.append(len(ids) - 1)
        return ids, positions

    def score(self, requests: list[PRMRequest]) -> list[float]:
        """Score the last step of each request (see `PRM.score`)."""
        if not requests:
            return []
        _check(requests)
        seqs = [_fit(self.encode, r, self.max_length)[0] for r in requests]
        ids, mask, pos = left_pad(seqs, self.pad_id, _device_of(self.model))
        with torch.inference_mode():
            self.forward_calls += 1
            values = self.model(input_ids=ids, attention_mask=mask, position_ids=pos)  # [B, T]
        # Each sequence ends with the last step's step token; left padding puts it at -1.
        return torch.sigmoid(values[:, -1].float()).tolist()


class QwenMathPRM(PRM):
    """Qwen2.5-Math-PRM scoring: softmax(logits)[1] at the `<extra_0>` after the last step."""

    def __init__(self, model: nn.Module, tokenizer, system: str = QWEN_PRM_SYSTEM, max_length: int = 4096):
        """
        Args:
            model: a `QwenPRMModel`, a transformers token classifier with 2 labels, or the
                released remote-code model; its output (or `.logits`, or `[0]`) is [B, T, 2].
            tokenizer: the PRM's tokenizer with a chat template and `<extra_0>`.
            system: the system message the PRM was trained with.
            max_length: longest input in tokens; older steps are dropped to fit.
        """
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system = system
        self.step_token_id = tokenizer.convert_tokens_to_ids(QWEN_PRM_STEP_TOKEN)
        if self.step_token_id is None or self.step_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {QWEN_PRM_STEP_TOKEN} token")
        self.max_length = max_length
        self.pad_id = _pad_id(tokenizer)
        self.forward_calls = 0

    def render(self, req: PRMRequest) -> str:
        """The chat text: system, user = problem, assistant = steps each ended by `<extra_0>`."""
        steps = [s.replace(QWEN_PRM_STEP_TOKEN, "") for s in req.steps]
        messages = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": req.problem},
            {"role": "assistant", "content": QWEN_PRM_STEP_TOKEN.join(steps) + QWEN_PRM_STEP_TOKEN},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, req: PRMRequest) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat, and the index of each `<extra_0>`."""
        ids = self.tokenizer.encode(self.render(req), add_special_tokens=False)
        return ids, [i for i, t in enumerate(ids) if t == self.step_token_id]

    def score(self, requests: list[PRMRequest]) -> list[float]:
        """Score the last step of each request (see `PRM.score`)."""
        if not requests:
            return []
        _check(requests)
        fitted = [_fit(self.encode, r, self.max_length) for r in requests]
        seqs = [ids for ids, _ in fitted]
        width = max(len(s) for s in seqs)
        # index of the last <extra_0> in the left-padded batch
        last = [width - len(ids) + positions[-1] for ids, positions in fitted]
        ids, mask, pos = left_pad(seqs, self.pad_id, _device_of(self.model))
        with torch.inference_mode():
            self.forward_calls += 1
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if logits is None:
            logits = out[0]
        rows = torch.arange(len(seqs), device=logits.device)
        picked = logits[rows, torch.tensor(last, device=logits.device)].float()  # [B, 2]
        return torch.softmax(picked, dim=-1)[:, 1].tolist()


JUDGE_PROMPT = (
    "You are grading one step of a step-by-step solution to a math problem.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution so far:\n{steps}\n\n"
    "Rate step {k}, the newest step, for correctness and usefulness on a scale from 0 (wrong "
    "or useless) to 9 (correct and useful). Answer with a single digit."
)
JUDGE_ANSWER_PREFIX = "Rating: "


class JudgePRM(PRM):
    """An LLM judge: the expected 0-9 rating of the newest step, over the digit tokens, / 9."""

    def __init__(self, model: nn.Module | None, tokenizer, max_length: int = 4096, use_chat_template: bool = True):
        """
        Args:
            model: a causal LM (may be shared with a `StepEngine`).
            tokenizer: its tokenizer; each digit "0".."9" must end in a distinct token.
            max_length: longest prompt in tokens; older steps are dropped to fit.
            use_chat_template: render with the tokenizer's chat template when it has one.
        """
        self.model = model.eval() if model is not None else None  # None: scored through `engine`
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.digit_ids = [tokenizer.encode(str(d), add_special_tokens=False)[-1] for d in range(10)]
        if len(set(self.digit_ids)) != 10:
            raise ValueError("judge tokenizer does not have ten distinct digit tokens")
        self.pad_id = _pad_id(tokenizer)
        self.forward_calls = 0
        params = inspect.signature(type(model).forward).parameters if model is not None else {}
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    engine = None  # a StepEngine sharing this model: its per-chain KV cache is reused

    @classmethod
    def from_engine(cls, engine, **kwargs) -> "JudgePRM":
        """A judge on a `StepEngine`'s model and tokenizer (no second copy of the weights).

        Scoring then goes through the engine (its lock and its per-chain prefix cache), so
        successive steps of one chain prefill only the newest step and the question.
        """
        kwargs.setdefault("max_length", engine.max_context)
        judge = cls(getattr(engine, "model", None), engine.tokenizer, **kwargs)
        judge.engine = engine
        return judge

    def render(self, req: PRMRequest) -> str:
        """The judge prompt for the newest step, ending where the digit is expected."""
        # Steps in order, the question last: successive calls on one chain share a prefix,
        # so a judge on a StepEngine prefills only the newest step and the question.
        steps = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(req.steps))
        text = JUDGE_PROMPT.format(problem=req.problem, steps=steps, k=len(req.steps))
        if self.use_chat_template:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        else:
            head = text + "\n\n"
        return head + JUDGE_ANSWER_PREFIX

    def encode(self, req: PRMRequest) -> tuple[list[int], list[int]]:
        """Prompt token ids (with the tokenizer's BOS when it adds one); no step positions."""
        add = not self.use_chat_template  # chat templates already carry their BOS
        ids = self.tokenizer.encode(self.render(req), add_special_tokens=add)
        return ids, [len(ids) - 1]

    def digit_logits(self, requests: list[PRMRequest]) -> torch.Tensor:
        """Next-token logits of the ten digit tokens after each prompt, [B, 10] float32."""
        seqs = [_fit(self.encode, r, self.max_length)[0] for r in requests]
        if self.engine is not None:
            keys = [f"judge|{r.chain_id}" if r.chain_id else None for r in requests]
            self.forward_calls += 1
            last = self.engine.next_token_logits(seqs, keys)  # [B, V]
            return last[:, torch.tensor(self.digit_ids, device=last.device)]
        if self.model is None:
            raise ValueError("a judge PRM needs a model or an engine (JudgePRM.from_engine)")
        ids, mask, pos = left_pad(seqs, self.pad_id, _device_of(self.model))
        with torch.inference_mode():
            self.forward_calls += 1
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **self._keep_kw)
        last = out.logits[:, -1, :].float()  # [B, V]
        return last[:, torch.tensor(self.digit_ids, device=last.device)]

    def score(self, requests: list[PRMRequest]) -> list[float]:
        """Score the last step of each request (see `PRM.score`)."""
        if not requests:
            return []
        _check(requests)
        probs = torch.softmax(self.digit_logits(requests), dim=-1)  # [B, 10]
        digits = torch.arange(10, dtype=probs.dtype, device=probs.device)
        return ((probs * digits).sum(-1) / 9.0).tolist()


# ---- building from config --------------------------------------------------------------


def build_prm(cfg, target_engine=None, prompt=None) -> PRM:
    """Build the PRM a `PRMConfig` describes.

    Args:
        cfg: `configs.schema.PRMConfig`. Source kind random builds a tiny random model
            (shape name from `arbitrage.tiny.SHAPES`) with the byte tokenizer.
        target_engine: the target's `StepEngine`; a judge with `reuse_target` uses its
            model and tokenizer.
        prompt: the run's `PromptConfig`: a value PRM renders steps as the draft saw them.
    Returns:
        A `SkyworkPRM`, `QwenMathPRM` or `JudgePRM`.
    """
    if cfg.kind == "value":
        from arbitrage.value_prm import build_value_prm

        return build_value_prm(cfg, prompt)
    if cfg.kind == "judge":
        if cfg.reuse_target:
            if target_engine is None:
                raise ValueError("judge PRM with reuse_target=True needs the target engine")
            return JudgePRM.from_engine(target_engine, max_length=cfg.max_context)
        from arbitrage.models import load_causal_lm

        model, tokenizer = load_causal_lm(cfg)
        return JudgePRM(model, tokenizer, max_length=cfg.max_context)

    from arbitrage.models import load_tokenizer, model_folder

    cls = {"skywork": SkyworkPRMModel, "qwen_prm": QwenPRMModel}[cfg.kind]
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    if cfg.source.kind == "random":
        from arbitrage.tiny import shape_config

        torch.manual_seed(cfg.seed)
        model = cls(shape_config(cfg.source.name)).to(device=device).eval()
        model.model.to(dtype)
    else:
        model = load_prm_model(cfg.kind, model_folder(cfg.source), dtype=dtype, device=device)
    if cfg.quantization != "none":  # the backbone's linears (arbitrage.quant); the small heads stay float32
        from arbitrage.quant import quantize_weights

        quantize_weights(getattr(model, "model", model), cfg.quantization, device)
    tokenizer = load_tokenizer(cfg.source)
    if cfg.kind == "skywork":
        return SkyworkPRM(model, tokenizer, step_token=cfg.step_token, max_length=cfg.max_context)
    return QwenMathPRM(model, tokenizer, max_length=cfg.max_context)


def load_prm_model(
    kind: str, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a PRM checkpoint folder.

    skywork: `SkyworkPRMModel` (keys `model.*`, `v_head.summary.*`; `lm_head.*` ignored).
    qwen_prm: `QwenPRMModel` when the checkpoint has the released `score.0.*`/`score.2.*`
    MLP head (Qwen/Qwen2.5-Math-PRM-7B/72B); a plain `score.weight` head loads as
    `AutoModelForTokenClassification` (num_labels=2). Other custom heads can be loaded
    with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and passed to
    `QwenMathPRM` directly.
    """
    folder = Path(folder)
    if kind == "skywork":
        return SkyworkPRMModel.from_pretrained(folder, dtype=dtype, device=device)
    if kind != "qwen_prm":
        raise ValueError(f"unknown PRM kind {kind!r}")
    if "score.0.weight" in _checkpoint_keys(folder):
        return QwenPRMModel.from_pretrained(folder, dtype=dtype, device=device)
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(folder, num_labels=2, dtype=dtype)
    return model.to(device).eval()
