"""Checks a config's models before anything starts: files, packages and devices.

A Ray actor that cannot load its model fails after Ray and Serve are up, and Serve retries
it with a traceback each time. `check_models(cfg)` finds the same mistakes in this process
first, in a second or two, and raises one-line errors naming the field:

- a device that is not one (`device: banana`), or CUDA asked for on a machine without it
  (checked only for a local run: a cluster's GPUs are not visible from here);
- a missing model folder, .gguf file or model package, an unknown random shape;
- a missing router folder.

Resolving a packaged model converts it to safetensors once (for the hf and fast engines),
as `arbitrage setup-models` does; later runs find it in the cache.
"""

from __future__ import annotations

from pathlib import Path

from arbitrage.offline import ModelNotFoundError
from configs.schema import ConfigError


def check_models(cfg, roles: tuple[str, ...] | None = None, local: bool = True) -> dict[str, str]:
    """Resolve every configured model of `roles` (default: all configured roles).

    Args:
        cfg: an ArbitrageConfig.
        roles: the roles that will load (draft, target, prm, router).
        local: the models load on this machine (no `runtime.address`), so CUDA must be here too.
    Returns:
        role -> what it loads, for start-up messages ("qwen2.5-coder-0.5b-instruct from ~/.cache/...",
        "judge, served by the target", "probe from routers/local-probe", "random weights (tiny-llama)").
    Raises:
        ConfigError: a device that is not one, or CUDA that is not here.
        ModelNotFoundError: a model's files, package or shape cannot be found.
    """
    m = cfg.models
    roles = roles or tuple(r for r in ("draft", "target", "prm", "router") if getattr(m, r) is not None)
    out: dict[str, str] = {}
    for role in roles:
        mc = getattr(m, role)
        if mc is None:
            continue
        _check_device(f"models.{role}.device", mc.device, local)
        if role == "router":
            out[role] = _router(mc, cfg.name)
        elif role == "prm" and getattr(mc, "reuse_target", False):
            out[role] = f"{mc.kind}, served by the target"
        else:
            out[role] = _model(f"models.{role}", mc)
    from arbitrage.memory_plan import check as check_memory_plan

    check_memory_plan(cfg)  # weights + KV + headroom of every GPU role against its GPU (one line)
    return out


def _check_device(field: str, device: str, local: bool) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{field}: {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if local and dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {device!r} asked for, but this machine has no CUDA; use cpu or auto")


def _model(field: str, mc) -> str:
    from cluster.console import short_path

    src = mc.source
    if src.kind == "random":
        from arbitrage.tiny import SHAPES

        if src.name not in SHAPES:
            raise ModelNotFoundError(
                f"{field}.source.name: unknown random shape {src.name!r}; known: {', '.join(SHAPES)}"
            )
        return f"random weights ({src.name})"
    if src.kind == "hub":  # unreachable here; the actor reports it
        return f"{src.name} (hub)"
    try:
        if getattr(mc, "engine", "hf") == "llamacpp":  # runs the GGUF as shipped
            from arbitrage.models import gguf_location

            where = gguf_location(src)
        else:
            from arbitrage.models import model_location

            where = model_location(src)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{field}.source: {e}") from None
    return f"{src.name if src.kind == 'packaged' else Path(src.name).name} from {short_path(where)}"


def _router(rc, config: str | None = None) -> str:
    from arbitrage.router_factory import missing_router_message
    from cluster.console import short_path

    if rc.path is not None:
        if not Path(rc.path).is_dir():  # the preset routers are trained, not shipped: say how
            raise ModelNotFoundError(f"models.router.path: {missing_router_message(rc.path, rc.backbone, config)}")
        return f"{rc.kind} from {short_path(rc.path)}"
    return _model("models.router", rc)
