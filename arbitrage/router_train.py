"""Router training and evaluation: fine-tune a classifier or fit a probe; Spearman and ROC-AUC.

Classifier: a 2-label head on any HF checkpoint (default the offline all-MiniLM-L6-v2
encoder; or the draft model, a local folder, a hub id, or `random:<shape>` for tests),
fine-tuned with cross-entropy on the balanced training steps of a `RouterDataset`.
Training runs the exact forward `ClassifierRouter.predict` runs (the authors' input ids
ending in the step token, left truncation and left padding), so training and inference see
the same tensors, and the loss is read where the router reads: the last step token. The
head (`TrainSettings.head`, "auto" by default): a checkpoint that already is a token
classifier (the paper's router starts from `HuggingFaceH4/Qwen2.5-Math-1.5B-Instruct-PRM-0.2`,
a `Qwen2ForTokenClassification`) keeps `AutoModelForTokenClassification`, as do encoders
(BERT family: model types with a masked-LM head; their sequence head pools position 0,
which left padding fills with [PAD]); other decoders get `AutoModelForSequenceClassification`
(pooled at the last non-pad token, the same position). "token" or "sequence" force one.

Probe: `arbitrage.probe.ProbeRouter.fit` on the same steps.

Both are saved with a `router.json` (kind, backbone, split, data stats, hyper-parameters,
seed, losses, validation metrics) that `build_router(RouterConfig(kind=..., path=...))`
and `evaluate_folder` read. Quality is threshold-free: Spearman rank correlation between
the router's probability and the advantage A, and ROC-AUC for y, beside the same two for
the ranking RSD uses (the draft's PRM score, negated: lower draft score -> escalate first).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from arbitrage.hidden_router import DEFAULT_PRIOR, HiddenRouter
from arbitrage.router import ROUTER_INPUT_FORMAT, ClassifierRouter, Router, RouterRequest
from arbitrage.router_data import RouterDataset, RouterExample

DEFAULT_LR = {"classifier": 3e-5, "probe": 0.05, "hidden": 3e-3}
KINDS = ("classifier", "probe", "hidden")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TrainSettings:
    """How a router is trained."""

    kind: str = "classifier"  # classifier | probe | hidden
    backbone: str = "all-minilm-l6-v2"  # packaged name, HF folder, or random:<shape>
    epochs: int = 3
    lr: float | None = None  # None: DEFAULT_LR[kind]
    batch_size: int = 16
    max_length: int = 384
    save_dtype: str = "float32"
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of optimiser steps with a linear warm-up
    probe_hidden: int = 0
    probe_steps: int = 500
    seed: int = 0
    head: str = "auto"  # auto | token | sequence (classifier only; see the module docstring)
    init_prm: str | None = None  # hidden: a value-PRM folder to start from (arbitrage.hidden_router)
    prior: float = DEFAULT_PRIOR  # hidden: L2 pull towards the initial head


# ---- the classifier -------------------------------------------------------------------


def backbone_folder(spec: str) -> Path:
    """An HF folder for a backbone spec: an existing folder, a packaged model name, or a hub id."""
    p = Path(spec)
    if p.is_dir():
        return p
    from arbitrage.offline import REGISTRY, materialize

    try:
        if spec in REGISTRY or "/" not in spec:
            return materialize(spec)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec))
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(
            f"backbone {spec!r} is neither a folder, a packaged model nor a reachable hub "
            f"repo ({first}); pass an HF checkpoint folder, a packaged name such as "
            "all-minilm-l6-v2, a hub id, or random:<shape>"
        ) from e


def _head_kind(head: str, config) -> str:
    """'token' or 'sequence' for a backbone config under `TrainSettings.head`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if head in ("token", "sequence"):
        return head
    if head != "auto":
        raise ValueError(f"router head must be auto, token or sequence, got {head!r}")
    token_ckpt = any("TokenClassification" in a for a in (getattr(config, "architectures", None) or []))
    return "token" if token_ckpt or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "sequence"


def load_backbone(spec: str, max_length: int = 384, seed: int = 0, head: str = "auto") -> tuple[ClassifierRouter, dict]:
    """A `ClassifierRouter` with a 2-label head on a backbone (a token classifier's own head is kept).

    Args:
        spec: packaged model name, HF folder, hub id, or `random:<shape>` (`arbitrage.tiny.SHAPES`).
        max_length: input truncation in tokens.
        seed: seed of a new head (and of random weights).
        head: auto | token | sequence (see the module docstring).
    Returns:
        (the router, {"folder", "head": "sequence" | "token"}).
    """
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    torch.manual_seed(seed)
    autos = {"token": AutoModelForTokenClassification, "sequence": AutoModelForSequenceClassification}
    if spec.startswith("random:"):
        from arbitrage.tiny import byte_tokenizer, shape_config

        config = shape_config(spec.removeprefix("random:"), num_labels=2)
        kind = "sequence" if head == "auto" else _head_kind(head, config)
        model = autos[kind].from_config(config)
        return ClassifierRouter(model, byte_tokenizer(config.vocab_size), max_length), {"folder": None, "head": kind}
    folder = backbone_folder(spec)
    kind = _head_kind(head, AutoConfig.from_pretrained(folder))
    model = autos[kind].from_pretrained(folder, num_labels=2, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    return ClassifierRouter(model, tok, max_length), {"folder": str(folder), "head": kind}


def classifier_logits(router: ClassifierRouter, requests: list[RouterRequest]) -> torch.Tensor:
    """The logits [B, 2] `ClassifierRouter.predict` computes, with gradients."""
    from arbitrage.prm import left_pad

    seqs = [router.encode(r) for r in requests]
    device = next(router.model.parameters()).device
    ids, mask, pos = left_pad(seqs, router.model.config.pad_token_id, device)
    logits = router.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return logits[:, -1] if logits.dim() == 3 else logits  # token classifier: the last step token


def _schedule(opt, total: int, warmup: float):
    n_warm = max(1, int(total * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else max(0.0, (total - s) / max(1, total - n_warm))
    )


def train_classifier(
    ds: RouterDataset, ts: TrainSettings, log: Callable[[str], None] = print
) -> tuple[ClassifierRouter, dict]:
    """Fine-tune a 2-label classifier with cross-entropy on the balanced training steps.

    Args:
        ds: the dataset (train balanced; validation evaluated after each epoch).
        ts: backbone and hyper-parameters.
        log: progress lines.
    Returns:
        (the router in eval mode, {"backbone": ..., "train_loss": per epoch, "epochs": per-epoch metrics}).
    """
    router, info = load_backbone(ts.backbone, ts.max_length, ts.seed, ts.head)
    model = router.model
    lr = ts.lr or DEFAULT_LR["classifier"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ts.weight_decay)
    per_epoch = math.ceil(len(ds.train) / ts.batch_size)
    sched = _schedule(opt, per_epoch * ts.epochs, ts.warmup)
    rng = random.Random(ts.seed)
    losses, history = [], []
    for epoch in range(ts.epochs):
        model.train()
        order = list(ds.train)
        rng.shuffle(order)
        total, t0 = 0.0, time.perf_counter()
        for b in range(0, len(order), ts.batch_size):
            batch = order[b : b + ts.batch_size]
            labels = torch.tensor([e.label for e in batch], device=next(model.parameters()).device)
            loss = torch.nn.functional.cross_entropy(classifier_logits(router, [e.request for e in batch]), labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
        model.eval()
        losses.append(total / len(order))
        val = evaluate(router, ds.validation) if ds.validation else None
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": losses[-1],
                "validation": val and val["rankings"]["router"],
                "seconds": time.perf_counter() - t0,
            }
        )
        log(
            f"epoch {epoch + 1}/{ts.epochs}: train loss {losses[-1]:.4f}"
            + (f", validation {_fmt_metrics(val['rankings']['router'])}" if val else "")
            + f" ({history[-1]['seconds']:.0f}s)"
        )
    return router, {"backbone": ts.backbone, **info, "lr": lr, "train_loss": losses, "epochs": history}


def fit_hidden(train: list[RouterExample], ts: TrainSettings) -> tuple[HiddenRouter, dict]:
    """A hidden-state router (`arbitrage.hidden_router`) on examples whose requests carry the
    draft's hidden state (rows scored by `arbitrage train-prm` hold it as `draft_hidden`)."""
    from arbitrage.value_prm import ValueHead

    missing = sum(1 for e in train if not e.request.hidden)
    if missing:
        raise ValueError(
            f"--kind hidden: {missing} of {len(train)} training rows carry no `draft_hidden`; "
            "train on the scored rows `arbitrage train-prm` writes (<prm folder>/scored.jsonl)"
        )
    x = torch.tensor([e.request.hidden for e in train], dtype=torch.float32)
    y = torch.tensor([e.label for e in train], dtype=torch.float32)
    init = ValueHead.load(ts.init_prm)[0] if ts.init_prm else None
    lr = ts.lr or DEFAULT_LR["hidden"]
    router, losses = HiddenRouter.fit(
        x, y, init=init, width=ts.probe_hidden, steps=ts.probe_steps, lr=lr, prior=ts.prior, seed=ts.seed
    )
    return router, {"backbone": ts.init_prm, "lr": lr, "train_loss": losses}


# ---- training entry point -------------------------------------------------------------


def train(
    ds: RouterDataset,
    out: str | Path,
    ts: TrainSettings,
    data_path: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Router, dict]:
    """Train a router of `ts.kind` on `ds` and write it, with `router.json`, to `out`.

    Args:
        ds: a `RouterDataset` (train balanced, validation natural).
        out: the router folder (created).
        ts: kind, backbone and hyper-parameters.
        data_path: the collection file, recorded in router.json.
        log: progress lines.
    Returns:
        (the trained router, as saved; the router.json dict).
    """
    if ts.kind not in KINDS:
        raise ValueError(f"router kind must be one of {', '.join(KINDS)}, got {ts.kind!r}")
    if ts.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {ts.save_dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    router: Router
    if ts.kind == "probe":
        from arbitrage.probe import ProbeRouter

        lr = ts.lr or DEFAULT_LR["probe"]
        router, losses = ProbeRouter.fit(
            [e.request for e in ds.train],
            [e.label for e in ds.train],
            hidden=ts.probe_hidden,
            steps=ts.probe_steps,
            lr=lr,
            seed=ts.seed,
        )
        extra = {"backbone": None, "lr": lr, "train_loss": losses}
        router.save_pretrained(out)
    elif ts.kind == "hidden":
        router, extra = fit_hidden(ds.train, ts)
        router.save_pretrained(out)
    else:
        router, extra = train_classifier(ds, ts, log)
    val = evaluate(router, ds.validation) if ds.validation else None
    if isinstance(router, ClassifierRouter):  # the classifier kind: saved after evaluation, in the save dtype
        router.model.to(SAVE_DTYPES[ts.save_dtype])
        router.save_pretrained(out)
        router.model.to(torch.float32)  # as `from_pretrained` loads it back
    info = {
        "kind": ts.kind,
        **extra,
        "settings": asdict(ts),
        "max_length": ts.max_length,
        "seed": ts.seed,
        "input_format": ROUTER_INPUT_FORMAT,
        "margin": ds.stats["margin"],
        "val_fraction": ds.stats["val_fraction"],
        "data": data_path,
        "data_stats": ds.stats,
        "train_seconds": time.perf_counter() - t0,
        "validation": val,
        "train_problems": ds.train_problems,
        "validation_problems": ds.validation_problems,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "router.json").write_text(json.dumps(info, indent=2) + "\n")
    return router, info


# ---- evaluation ------------------------------------------------------------------------


def predict_batched(router: Router, examples: list[RouterExample], batch_size: int = 32) -> list[float]:
    """Router probabilities for examples, in batches."""
    probs: list[float] = []
    for b in range(0, len(examples), batch_size):
        probs += router.predict([e.request for e in examples[b : b + batch_size]])
    return probs


def roc_auc(scores, labels) -> float | None:
    """ROC-AUC of `scores` for binary `labels` (Mann-Whitney U / (n1 n0), ties averaged); None if one class is empty."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(x, y) -> tuple[float | None, float | None]:
    """Spearman rank correlation and its p-value; (None, None) when undefined (constant input, n < 3)."""
    import warnings

    from scipy.stats import spearmanr

    if len(x) < 3:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    return (None, None) if math.isnan(rho) else (rho, p)


def ranking_metrics(scores: list[float], examples: list[RouterExample], bootstrap: int = 0, seed: int = 0) -> dict:
    """Spearman(score, A) and ROC-AUC(score, y) of one escalation ranking (higher = escalate).

    With `bootstrap` > 0, 95% intervals from resampling problems with replacement (steps of
    one problem are not independent), as `auc_ci` and `spearman_ci`.
    """
    rho, p = spearman(scores, [e.advantage for e in examples])
    out: dict[str, Any] = {
        "spearman": rho,
        "spearman_p": p,
        "auc": roc_auc(scores, [e.label for e in examples]),
        "steps": len(examples),
    }
    if bootstrap > 0 and examples:
        by_pid: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            by_pid.setdefault(e.problem_id, []).append(i)
        groups = list(by_pid.values())
        rng = np.random.default_rng(seed)
        s, a, y = (
            np.asarray(scores, float),
            np.asarray([e.advantage for e in examples]),
            np.asarray([e.label for e in examples]),
        )
        aucs, rhos = [], []
        for _ in range(bootstrap):
            idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
            auc = roc_auc(s[idx], y[idx])
            r, _ = spearman(s[idx], a[idx])
            if auc is not None:
                aucs.append(auc)
            if r is not None:
                rhos.append(r)
        out["auc_ci"] = [float(np.quantile(aucs, 0.025)), float(np.quantile(aucs, 0.975))] if aucs else None
        out["spearman_ci"] = [float(np.quantile(rhos, 0.025)), float(np.quantile(rhos, 0.975))] if rhos else None
    return out


def draft_confidence(e: RouterExample) -> float | None:
    """The draft's step confidence exp(mean log p) (the `confidence` policy's score), if recorded."""
    f = e.request.features
    return math.exp(f["lp_mean"]) if f and "lp_mean" in f else None


def compare_rankings(
    router_scores: list[float], examples: list[RouterExample], bootstrap: int = 1000, seed: int = 0
) -> dict:
    """The router beside the draft-PRM (RSD) and draft-confidence rankings, ties included and excluded.

    Ties are steps whose target text equals the draft's: A = 0 by construction there, so a
    ranking that only predicts agreement between the models can look good on them.
    """
    rankings = {"router": router_scores, "draft_prm": [-e.draft_score for e in examples]}
    conf = [draft_confidence(e) for e in examples]
    known = [c for c in conf if c is not None]
    if len(known) == len(conf):
        rankings["draft_confidence"] = [-c for c in known]
    keep = [i for i, e in enumerate(examples) if not e.tie]
    out = {}
    for name, sc in rankings.items():
        out[name] = {
            "all": ranking_metrics(sc, examples, bootstrap, seed),
            "no_ties": ranking_metrics([sc[i] for i in keep], [examples[i] for i in keep], bootstrap, seed),
        }
    return out


# When draft and target PRM scores rank this alike and the median |A| is this small a share of the
# scores' spread, A is mostly PRM noise (`format_table` says so).
NOISY_LABELS_SPEARMAN = 0.8
NOISY_LABELS_GAP_SHARE = 0.25


def label_quality(examples: list[RouterExample]) -> dict:
    """How far the PRM separates the two steps it compares, i.e. how much signal A can carry.

    A = PRM(target step) - PRM(draft step) on the same prefix. When the PRM mostly scores the
    prefix (draft and target scores rank alike and |A| is small against the spread of the
    scores), A is mostly PRM noise and no ranking can predict it well.

    Returns:
        {"spearman_draft_target", "abs_advantage_median", "abs_advantage_p90", "draft_score_sd", "ties"}.
    """
    draft = [e.draft_score for e in examples]
    target = [e.draft_score + e.advantage for e in examples]  # a tie (A = 0) scores as the draft
    gaps = np.abs([e.advantage for e in examples])
    rho, _ = spearman(draft, target)
    return {
        "spearman_draft_target": rho,
        "abs_advantage_median": float(np.median(gaps)),
        "abs_advantage_p90": float(np.quantile(gaps, 0.9)),
        "draft_score_sd": float(np.std(draft)),
        "ties": int(sum(e.advantage == 0 for e in examples)),
    }


def evaluate(router: Router, examples: list[RouterExample], batch_size: int = 32) -> dict:
    """The router's ranking and the draft-PRM ranking (RSD's) on the same steps.

    Args:
        router: any `Router`.
        examples: the steps (usually the held-out problems').
        batch_size: router batch size.
    Returns:
        {"steps", "problems", "positive_rate", "rankings": {"router": ..., "draft_prm": ...}}.
    """
    if not examples:
        raise ValueError("no steps to evaluate; hold out problems with val_fraction > 0 or use --split all")
    probs = predict_batched(router, examples, batch_size)
    return {
        "steps": len(examples),
        "problems": len({e.problem_id for e in examples}),
        "positive_rate": sum(e.label for e in examples) / len(examples),
        "ties": sum(e.tie for e in examples),
        "rankings": {
            "router": ranking_metrics(probs, examples),
            "draft_prm": ranking_metrics([-e.draft_score for e in examples], examples),
        },
        "compare": compare_rankings(probs, examples),
        "labels": label_quality(examples),
    }


def evaluate_folder(router_dir: str | Path, data: str | Path, split: str = "validation", batch_size: int = 32) -> dict:
    """Evaluate a trained router folder on the split its router.json describes.

    The split is rebuilt from the data with the router's seed, val_fraction and margin;
    problems the router was trained on are never evaluated as validation.

    Args:
        router_dir: a folder written by `train`.
        data: the collection JSONL.
        split: validation | train (unbalanced) | all.
        batch_size: router batch size.
    Returns:
        `evaluate`'s dict plus the router's kind, backbone, split and data path.
    """
    from arbitrage.router_factory import build_router
    from arbitrage.router_data import build_dataset, load_rows
    from configs.schema import RouterConfig

    router_dir = Path(router_dir)
    meta_path = router_dir / "router.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{router_dir} has no router.json; train it with `arbitrage train-router --out {router_dir}`"
        )
    meta = json.loads(meta_path.read_text())
    ds = build_dataset(
        load_rows(data),
        margin=meta["margin"],
        val_fraction=meta["val_fraction"],
        seed=meta["seed"],
        balance_train=False,
    )
    trained_on = set(meta.get("train_problems", []))
    examples = {
        "validation": [e for e in ds.validation if e.problem_id not in trained_on],
        "train": ds.train,
        "all": ds.train + ds.validation,
    }.get(split)
    if examples is None:
        raise ValueError(f"--split must be validation, train or all, got {split!r}")
    router = build_router(
        RouterConfig(
            kind=meta["kind"], path=str(router_dir), device="cpu", max_length=int(meta.get("max_length") or 512)
        )
    )
    report = evaluate(router, examples, batch_size)
    return {
        "router": str(router_dir),
        "kind": meta["kind"],
        "backbone": meta.get("backbone"),
        "split": split,
        "data": str(data),
        "margin": meta["margin"],
        **report,
    }


def cross_validate(
    rows: list[dict],
    ts: TrainSettings,
    folds: int = 5,
    margin: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """K-fold cross-validation by problem: every step is scored by a router trained without its problem.

    With few collected problems a single held-out split has a few dozen steps; here all
    steps are held out once. Problems are ordered as `split_problems` orders them (sha256 of
    seed and id) and dealt into `folds` folds; each fold's router is trained on the other
    folds' balanced steps with `ts`, then the out-of-fold probabilities of all steps are
    ranked together against A and y, beside the draft-PRM ranking on the same steps.

    Args:
        rows: collected rows.
        ts: kind, backbone and hyper-parameters (as `train`).
        folds: number of folds (2 .. number of problems).
        margin, seed: labels and the fold assignment / balancing / training seed.
        log: progress lines.
    Returns:
        `evaluate`'s dict over all steps, plus "folds" (per-fold step counts and router metrics).
    """
    import hashlib

    from arbitrage.router_data import RouterDataset, balance, example_from_row

    examples = [example_from_row(r, margin) for r in rows]
    ids = sorted({e.problem_id for e in examples}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    if not 2 <= folds <= len(ids):
        raise ValueError(f"--cv folds must be in [2, {len(ids)}] for {len(ids)} problems, got {folds}")
    fold_of = {p: i % folds for i, p in enumerate(ids)}
    probs: dict[int, float] = {}
    per_fold = []
    for k in range(folds):
        held = [e for e in examples if fold_of[e.problem_id] == k]
        train_set = balance([e for e in examples if fold_of[e.problem_id] != k], seed)
        t0 = time.perf_counter()
        router: Router
        if ts.kind == "probe":
            from arbitrage.probe import ProbeRouter

            router, _ = ProbeRouter.fit(
                [e.request for e in train_set],
                [e.label for e in train_set],
                hidden=ts.probe_hidden,
                steps=ts.probe_steps,
                lr=ts.lr or DEFAULT_LR["probe"],
                seed=ts.seed,
            )
        elif ts.kind == "hidden":
            router, _ = fit_hidden(train_set, ts)
        else:
            ds = RouterDataset(train_set, [], sorted({e.problem_id for e in train_set}), [], {})
            router, _ = train_classifier(ds, ts, log)
        fold_probs = predict_batched(router, held)
        for e, pr in zip(held, fold_probs):
            probs[id(e)] = pr
        m = ranking_metrics(fold_probs, held)
        per_fold.append(
            {
                "fold": k,
                "steps": len(held),
                "problems": len({e.problem_id for e in held}),
                "train_steps": len(train_set),
                "router": m,
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"fold {k + 1}/{folds}: {len(held)} held-out steps, router {_fmt_metrics(m)}")
    scores = [probs[id(e)] for e in examples]
    return {
        "steps": len(examples),
        "problems": len(ids),
        "positive_rate": sum(e.label for e in examples) / len(examples),
        "rankings": {
            "router": ranking_metrics(scores, examples),
            "draft_prm": ranking_metrics([-e.draft_score for e in examples], examples),
        },
        "labels": label_quality(examples),
        "folds": per_fold,
    }


def cross_validate_folder(
    router_dir: str | Path, data: str | Path, folds: int = 5, log: Callable[[str], None] = print
) -> dict:
    """`cross_validate` with the kind, hyper-parameters, margin and seed a router folder was trained with."""
    from arbitrage.router_data import load_rows

    router_dir = Path(router_dir)
    meta_path = router_dir / "router.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{router_dir} has no router.json; train it with `arbitrage train-router --out {router_dir}`"
        )
    meta = json.loads(meta_path.read_text())
    ts = TrainSettings(**meta["settings"])
    report = cross_validate(load_rows(data), ts, folds, margin=meta["margin"], seed=meta["seed"], log=log)
    return {
        "router": str(router_dir),
        "kind": meta["kind"],
        "backbone": meta.get("backbone"),
        "split": f"{folds}-fold cross-validation by problem",
        "data": str(data),
        "margin": meta["margin"],
        **report,
    }


def _fmt(x: float | None, spec: str = "+.3f") -> str:
    return "-" if x is None else format(x, spec)


def _fmt_metrics(m: dict) -> str:
    return f"Spearman {_fmt(m['spearman'])}, AUC {_fmt(m['auc'], '.3f')}"


def format_table(report: dict) -> str:
    """A plain-text table of an `evaluate_folder` report."""
    name = f"router ({report['kind']}" + (f": {report['backbone']})" if report.get("backbone") else ")")
    rows = [(name, report["rankings"]["router"]), ("draft PRM score, negated (RSD)", report["rankings"]["draft_prm"])]
    width = max(len(n) for n, _ in rows)
    lines = [
        f"{report['split']}: {report['steps']} steps from {report['problems']} problems, "
        f"{report['positive_rate']:.1%} with A > {report['margin']:g}",
        f"{'ranking':<{width}}  {'Spearman(.,A)':>13}  {'p-value':>8}  {'ROC-AUC(y)':>10}",
    ]
    for n, m in rows:
        lines.append(
            f"{n:<{width}}  {_fmt(m['spearman']):>13}  {_fmt(m['spearman_p'], '.3g'):>8}  {_fmt(m['auc'], '.3f'):>10}"
        )
    cmp = report.get("compare")
    if cmp:

        def ci(m, key):
            c = m.get(f"{key}_ci")
            return f"[{c[0]:.2f}, {c[1]:.2f}]" if c else "-"

        lines.append(
            f"with 95% problem-bootstrap intervals; ties = target text equals the draft's "
            f"({report.get('ties', 0)} of {report['steps']} steps)"
        )
        for name, m in cmp.items():
            for part in ("all", "no_ties"):
                x = m[part]
                lines.append(
                    f"  {name:<16} {part:<7} n={x['steps']:<4} AUC {_fmt(x['auc'], '.3f')} {ci(x, 'auc'):<14} "
                    f"Spearman {_fmt(x['spearman'])} {ci(x, 'spearman')}"
                )
    q = report.get("labels")
    if q:
        line = (
            f"labels: Spearman(draft PRM, target PRM) {_fmt(q['spearman_draft_target'], '+.2f')}; |A| median "
            f"{q['abs_advantage_median']:.3f}, p90 {q['abs_advantage_p90']:.3f} (draft score sd "
            f"{q['draft_score_sd']:.3f}); {q['ties']} ties"
        )
        if (q["spearman_draft_target"] or 0) > NOISY_LABELS_SPEARMAN and q[
            "abs_advantage_median"
        ] < NOISY_LABELS_GAP_SHARE * q["draft_score_sd"]:
            line += (
                "\n  the PRM scores both steps of a prefix alike: A is mostly PRM noise (see docs/BENCHMARKS.md s.7)"
            )
        lines.append(line)
    return "\n".join(lines)
