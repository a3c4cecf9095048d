"""The tensor-parallel target group: N rank actors that hold one sharded target model.

Layout. `TargetGroup.create(cfg)` reserves ONE placement group packed on one node
(`STRICT_PACK`; bundle i = {"CPU": num_cpus, "GPU": num_gpus}, and bundle 0 also carries the
config's custom resources, e.g. `tp_gpu_node`, which pin the group to a node type). It starts
one `TPRankActor` per bundle. Rank 0 picks a free port on its node; every rank then joins
`torch.distributed` (NCCL when its device is CUDA, else gloo) and uses the GPU Ray assigned
to it (local index from `ray.get_gpu_ids()` within `CUDA_VISIBLE_DEVICES`).

Sharding (Ray-free, `arbitrage.sharding`): each rank builds only its own AutoTP shard,
on its own device, from random weights or its slices of a safetensors checkpoint.

Serving. Each rank wraps its shard in the engine its config names
(`arbitrage.models.wrap_engine`, the factory every path uses): `engine: fast` runs the
shard's layout in lockstep, one batch at a time, `hf` AutoTP's own layers (eager). All ranks run the same batch: rank 0 hosts a `DynamicBatcher`; for each batch it
sends the same requests to ranks 1..N-1 (`run_local.remote`), runs its own share, waits for
theirs and returns its own result. A lock makes every collective call (a batch, a logits
probe) start on all ranks in one order, and rank 0 waits for all ranks before the next, so
the ranks' all-reduces always pair up. Sampling is seeded per (seed, prompt) and the logits
after the all-reduce are identical on every rank, so every rank decodes the same tokens; each
rank's per-chain KV cache (StepEngine's prefix cache, its own heads only) sees the same
batches in the same order, so every rank reuses the same prefixes.

Failure: a dead or unresponsive rank makes `health()` report unhealthy, and rank 0 marks the
group broken (`TargetGroupBroken`) when a peer fails during a batch. A torch.distributed world
cannot re-admit a rank, so the group restarts whole: the `TargetGroup` whose call found rank 0
dead or the group broken kills every rank, removes the placement group, reserves a new one and
starts and loads all ranks again (once per failure, however many calls saw it: `epoch`), then
raises `TargetGroupBroken` (`retryable`) so the caller -- `actors.backend.RayBackend` -- sends
the step again to the new group. One process owns a group's restarts: `TargetGroupHost`, a
restartable Ray actor (`make_target_group_actor`) that the Runtime hands to its coordinators
(the Serve replica `cluster.serve_models.TargetGroupServer` holds one in-process); its watchdog
also restarts a group whose rank died while idle. If that owner dies, its ranks and
placement group die with it (Ray fate-sharing) and its restart builds a new group.

Imports: torch and the light `arbitrage.service` only at module level; Ray, DeepSpeed,
transformers and the config schema are imported where used.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from arbitrage.service import PartialService, service_stats

if TYPE_CHECKING:
    from arbitrage.types import StepOutput, StepRequest
    from configs.schema import ActorConfig, ArbitrageConfig, BatchingConfig, ModelConfig

__all__ = [
    "TPRankActor",
    "TargetGroup",
    "TargetGroupBroken",
    "TargetGroupHost",
    "local_cuda_index",
    "make_target_group_actor",
]


class TargetGroupBroken(RuntimeError):
    """The ranks of a tensor-parallel group are out of step or dead; the group must restart.

    `retryable`: the request itself was fine, and sending it again after the restart can succeed.
    """

    retryable = True


DIST_TIMEOUT = timedelta(minutes=10)  # a collective waiting on a dead peer fails after this


def local_cuda_index(gpu_ids: list, visible: str | None) -> int:
    """The CUDA ordinal, inside this process, of the first GPU Ray assigned to it."""
    if not gpu_ids:
        raise ValueError(
            "the target device is CUDA but Ray assigned this rank no GPU; set runtime.target.num_gpus >= 1"
        )
    gid = str(gpu_ids[0])
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return ids.index(gid) if gid in ids else int(gid)


# ---- Ray actors -----------------------------------------------------------------------
class TPRankActor:
    """One tensor-parallel rank: a shard of the target model behind a step engine."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        rank: int,
        world_size: int,
        num_threads: int = 1,
        batching: BatchingConfig | None = None,
    ):
        self.model_cfg = model_cfg
        self.rank = rank
        self.world_size = world_size
        self.num_threads = max(1, num_threads)
        self.batching = batching
        self.device: torch.device | None = None
        self.engine = None
        self.info: dict[str, Any] = {"rank": rank}
        self._peers: list = []
        self._batcher = None
        self._lock = threading.Lock()  # rank 0: one collective call at a time, in order
        self._broken: str | None = None

    # ---- lifecycle: master_address -> init_distributed -> prepare_source -> load_model -> set_peers
    async def master_address(self) -> tuple[str, int]:
        """This node's IP and a free port for the torch.distributed rendezvous (rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    async def init_distributed(self, addr: str, port: int) -> str:
        """Pick this rank's device and join the group's torch.distributed world."""
        self.device = self._init_device()
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            os.environ.update(
                MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank), WORLD_SIZE=str(self.world_size)
            )
            await asyncio.to_thread(
                torch.distributed.init_process_group,
                backend,
                init_method=f"tcp://{addr}:{port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=DIST_TIMEOUT,
            )
        return str(self.device)

    def _init_device(self) -> torch.device:
        from arbitrage.models import resolve_device

        device = resolve_device(self.model_cfg.device) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            import ray

            index = local_cuda_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            torch.cuda.set_device(index)
            os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed selects its device from LOCAL_RANK
            return torch.device("cuda", index)
        torch.set_num_threads(self.num_threads)
        os.environ["LOCAL_RANK"] = str(self.rank)
        return device

    async def prepare_source(self) -> None:
        """Rank 0, before the others load: download (hub) or convert (gguf, packaged) once."""
        if self.model_cfg.source.kind != "random":
            from arbitrage.models import model_folder
            from arbitrage.sharding import TP_PATTERNS

            await asyncio.to_thread(model_folder, self.model_cfg.source, TP_PATTERNS)

    async def load_model(self) -> dict[str, Any]:
        """Build this rank's shard and its step engine; returns what the rank holds."""
        from arbitrage.models import wrap_engine
        from arbitrage.sharding import load_tp_causal_lm

        t0 = time.perf_counter()
        model, tokenizer = await asyncio.to_thread(load_tp_causal_lm, self.model_cfg, self.world_size, self.device)
        self.engine = await asyncio.to_thread(wrap_engine, self.model_cfg, model, tokenizer, self.world_size)
        params = list({id(p): p for p in model.parameters()}.values())
        self.info.update(
            device=str(self.device),
            params=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            load_s=round(time.perf_counter() - t0, 3),
        )
        return dict(self.info)

    async def set_peers(self, peers: list) -> None:
        """Rank 0: the handles of ranks 1..N-1, and the dynamic batcher."""
        from arbitrage.batching import DynamicBatcher

        self._peers = list(peers)
        b = self.batching
        kwargs = {"max_batch_size": b.max_batch_size, "max_wait_ms": b.max_wait_ms} if b else {}
        self._batcher = DynamicBatcher(lambda reqs: self._collective("steps", reqs), **kwargs)

    # ---- rank 0: the group's entry points -------------------------------------------------
    async def generate_step(self, req: StepRequest) -> StepOutput:
        """One step for one chain, batched with concurrent callers."""
        return await self._batcher.submit(req)

    async def generate_steps(self, reqs: list[StepRequest]) -> list[StepOutput]:
        """One step for each request, as one batch."""
        return await asyncio.to_thread(self._collective, "steps", list(reqs))

    async def logits(self, prompts: list[str]) -> torch.Tensor:
        """Next-token logits after each raw prompt: [B, V] float32."""
        return await asyncio.to_thread(self._collective, "logits", list(prompts))

    def _collective(self, method: str, payload: list) -> Any:
        """Run one call on every rank in the same order; return rank 0's result.

        A request error raised on every rank (e.g. a prompt over max_context) is re-raised
        and the group stays usable; a dead peer, or an error on some ranks only, leaves the
        ranks out of step, so the group is marked broken.
        """
        with self._lock:
            if self._broken:
                raise TargetGroupBroken(f"target group is broken ({self._broken}); restart it")
            # futures, not ray.get: this runs in a worker thread, never on the actor's event loop
            peers = [p.run_local.remote(method, payload).future() for p in self._peers]
            own, own_error = None, None
            try:
                own = self._run(method, payload)
            except Exception as e:
                own_error = e
            peer_errors = _errors_of(peers)
            self._check_in_step(method, own_error, peer_errors)
            if own_error is not None:
                raise own_error
            return own

    def _check_in_step(self, method: str, own_error, peer_errors: list[Exception]) -> None:
        from ray.exceptions import RayActorError

        dead = [e for e in peer_errors if isinstance(e, RayActorError)]
        same = (own_error is None and not peer_errors) or (
            own_error is not None and len(peer_errors) == len(self._peers)
        )
        if dead or not same:
            first = (dead or peer_errors or [own_error])[0]
            self._broken = f"rank failure during {method!r}: {type(first).__name__}: {first}".splitlines()[0]
            raise TargetGroupBroken(f"target group is broken ({self._broken}); restart it") from first

    # ---- every rank -----------------------------------------------------------------------
    async def run_local(self, method: str, payload: list) -> None:
        """Ranks 1..N-1: run this rank's share of one collective call (the result stays here)."""
        await asyncio.to_thread(self._run, method, payload)

    def _run(self, method: str, payload: list) -> Any:
        if method == "steps":
            return self.engine.generate_steps(payload)
        if method == "logits":
            return self._logits(payload)
        raise ValueError(f"unknown collective method {method!r}; known: steps, logits")

    def _logits(self, prompts: list[str]) -> torch.Tensor:
        tok, model = self.engine.tokenizer, self.engine.model
        rows = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=self.device)
                rows.append(model(input_ids=ids).logits[0, -1].float().cpu())  # [V]
        return torch.stack(rows)  # [B, V]

    async def ping(self) -> dict[str, Any]:
        """Liveness and what this rank holds."""
        return {**self.info, "loaded": self.engine is not None, "broken": self._broken}

    async def stats(self) -> dict[str, Any]:
        """The service stats of this rank (rank 0: the group's batches), plus this rank's info."""
        e = self.engine
        engine = {"prefill_tokens": e.prefill_tokens, "reused_tokens": e.reused_tokens} if e else {}
        methods = {"generate_step": self._batcher.stats()} if self._batcher is not None else {}
        return service_stats(
            "target", methods, forward_calls=e.forward_calls if e else 0, engine=engine, rank=dict(self.info)
        )


def _errors_of(futures: list) -> list[Exception]:
    """Wait for every future; return the exceptions they raised."""
    errors = []
    for f in futures:
        try:
            f.result()
        except Exception as e:
            errors.append(e)
    return errors


class TargetGroup(PartialService):
    """Handle to a tensor-parallel target: N rank actors in one placement group, restarted whole.

    Not meant to be copied between processes: the process that holds it owns the restarts
    (see the module docstring, "Failure").
    """

    role = "target"

    def __init__(self, model_cfg: ModelConfig, actor_cfg: ActorConfig, ready_timeout_s: float = 600.0):
        self.model_cfg = model_cfg
        self.actor_cfg = actor_cfg
        self.ready_timeout_s = ready_timeout_s
        self.tp_size = actor_cfg.tensor_parallel
        self.ranks: list = []
        self.placement_group = None
        self.rank_info: list[dict] = []
        self.epoch = 0  # bumped by every restart
        self.restarts: list[dict[str, Any]] = []  # {"epoch", "reason", "seconds"} per restart
        self._restart_lock = threading.Lock()

    @classmethod
    def create(cls, cfg: ArbitrageConfig, ready_timeout_s: float = 600.0) -> TargetGroup:
        """Start the target group of a config (`models.target`, `runtime.target`)."""
        return cls.from_configs(cfg.models.target, cfg.runtime.target, ready_timeout_s)

    @classmethod
    def from_configs(
        cls, model_cfg: ModelConfig, actor_cfg: ActorConfig, ready_timeout_s: float = 600.0
    ) -> TargetGroup:
        """Reserve the placement group, start the ranks, join them and load the shards."""
        group = cls(model_cfg, actor_cfg, ready_timeout_s)
        group.ranks, group.placement_group, group.rank_info = group._start()
        return group

    def _start(self) -> tuple[list, Any, list[dict]]:
        """Bring up a fresh group: placement group, N ranks, rendezvous, shards, peers (blocking).

        Returns (ranks, placement group, rank info); only a fully started group is published.
        """
        import ray

        n = self.tp_size
        pg = _reserve_placement_group(self.actor_cfg, self.ready_timeout_s)
        ranks = [
            _rank_actor(self.actor_cfg, pg, i).remote(
                self.model_cfg, i, n, max(1, int(self.actor_cfg.num_cpus)), self.actor_cfg.batching
            )
            for i in range(n)
        ]
        try:
            addr, port = ray.get(ranks[0].master_address.remote())
            ray.get([r.init_distributed.remote(addr, port) for r in ranks])
            ray.get(ranks[0].prepare_source.remote())
            info = ray.get([r.load_model.remote() for r in ranks])
            ray.get(ranks[0].set_peers.remote(ranks[1:]))
        except BaseException:
            _release(ranks, pg)
            raise
        return ranks, pg, info

    def restart(self, seen_epoch: int | None = None, reason: str = "requested") -> int:
        """Replace the whole group (new placement group, all ranks); returns the new epoch.

        Blocking. `seen_epoch`: the epoch whose failure the caller saw; when the group has
        restarted since, nothing is done (many calls fail together, one restart serves them).
        """
        with self._restart_lock:
            if seen_epoch is not None and seen_epoch != self.epoch:
                return self.epoch
            t0 = time.perf_counter()
            self.shutdown()  # callers meanwhile find no ranks, wait on this lock, then retry
            ranks, pg, info = self._start()
            self.ranks, self.placement_group, self.rank_info = ranks, pg, info
            self.epoch += 1
            self.restarts.append(
                {"epoch": self.epoch, "reason": reason[:300], "seconds": round(time.perf_counter() - t0, 3)}
            )
            return self.epoch

    async def _lead(self, method: str, *args):
        """Call rank 0; on a dead rank 0 or a broken group, restart the group and raise TargetGroupBroken."""
        from ray.exceptions import RayActorError

        epoch, ranks = self.epoch, self.ranks
        try:
            if not ranks:
                raise TargetGroupBroken("target group has no ranks (its last start failed)")
            return await getattr(ranks[0], method).remote(*args)
        except (RayActorError, TargetGroupBroken) as e:
            cause = getattr(e, "cause", None)  # a RayTaskError carries the remote exception
            cause = cause if isinstance(cause, BaseException) else e
            reason = f"{type(cause).__name__}: {cause}".splitlines()[0]
            await asyncio.to_thread(self.restart, epoch, reason)
            raise TargetGroupBroken(
                f"target group restarted after a rank failure ({reason}); send the call again"
            ) from e

    async def generate_step(self, req: StepRequest) -> StepOutput:
        """One step for one chain (dynamically batched with concurrent callers)."""
        return await self._lead("generate_step", req)

    async def generate_steps(self, reqs: list[StepRequest]) -> list[StepOutput]:
        """One step for each request, as one explicit batch."""
        return await self._lead("generate_steps", list(reqs))

    async def logits(self, prompts: list[str]) -> torch.Tensor:
        """Next-token logits after each raw prompt, [B, V] float32 (tests, diagnostics)."""
        return await self._lead("logits", list(prompts))

    def health(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """{"healthy": bool, "ranks": [per-rank status]}; any dead, silent or broken rank -> unhealthy."""
        import ray

        refs = [r.ping.remote() for r in self.ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ranks = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                ranks.append({"rank": i, "status": "unresponsive"})
                continue
            try:
                info = ray.get(ref)
                status = "broken" if info.get("broken") else "ok" if info.get("loaded") else "loading"
                ranks.append({**info, "rank": i, "status": status})
            except Exception as e:  # RayActorError: the rank's process is gone
                ranks.append({"rank": i, "status": "dead", "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return {
            "healthy": bool(ranks) and all(r["status"] == "ok" for r in ranks),
            "tp_size": self.tp_size,
            "ranks": ranks,
            "epoch": self.epoch,
            "restarts": list(self.restarts),
        }

    def stats(self) -> dict[str, Any]:
        """Rank 0's service stats (the group's batches), what each rank holds, the epoch."""
        import ray

        out = ray.get(self.ranks[0].stats.remote(), timeout=30)
        out.pop("rank", None)
        return {**out, "ranks": self.rank_info, "epoch": self.epoch}

    def shutdown(self) -> None:
        """Kill the ranks and remove the placement group (idempotent)."""
        ranks, pg = self.ranks, self.placement_group
        self.ranks, self.placement_group = [], None
        _release(ranks, pg)


def _release(ranks: list, pg) -> None:
    """Kill rank actors and remove their placement group, ignoring what is already gone."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for r in ranks:
        try:
            ray.kill(r)
        except Exception:  # already gone
            pass
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:  # already removed
            pass


WATCHDOG_INTERVAL_S = 5.0  # how often TargetGroupHost pings the ranks


class TargetGroupHost(PartialService):
    """A `TargetGroup` inside its own (restartable) Ray actor: the one owner of its restarts.

    Coordinators share this actor's handle like a ModelActor's; a call costs one extra hop
    to rank 0. Created by `make_target_group_actor` (and held by the Serve replica
    `TargetGroupServer`). A watchdog pings the ranks every WATCHDOG_INTERVAL_S and restarts
    the group when one is dead, so an idle group heals before the next call, and a call
    stuck in a collective with a dead peer (NCCL may wait for its timeout) is freed: the
    restart kills its rank 0, the call fails and is re-sent.
    """

    role = "target"

    def __init__(self, cfg: ArbitrageConfig | dict, ready_timeout_s: float = 600.0):
        from actors.model_actor import as_config

        self.group = TargetGroup.create(as_config(cfg), ready_timeout_s)
        self._watchdog: asyncio.Task | None = None

    def _watch(self) -> None:
        """Start the watchdog on the actor's event loop (on the first call)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            epoch = self.group.epoch
            try:
                h = await asyncio.to_thread(self.group.health)
                dead = [r["rank"] for r in h["ranks"] if r["status"] == "dead"]
                if dead:
                    await asyncio.to_thread(self.group.restart, epoch, f"watchdog: rank(s) {dead} dead")
            except Exception as e:  # a failed restart: the next round or the next call tries again
                print(f"target group watchdog: {type(e).__name__}: {e}".splitlines()[0])

    async def generate_step(self, req: StepRequest) -> StepOutput:
        """One step for one chain, batched on rank 0 with concurrent callers."""
        self._watch()
        return await self.group.generate_step(req)

    async def generate_steps(self, reqs: list[StepRequest]) -> list[StepOutput]:
        """One step for each request, as one batch."""
        self._watch()
        return await self.group.generate_steps(reqs)

    async def logits(self, prompts: list[str]) -> torch.Tensor:
        """Next-token logits after each raw prompt (tests, diagnostics)."""
        self._watch()
        return await self.group.logits(prompts)

    async def health(self) -> dict[str, Any]:
        """The group's health (per-rank status, epoch, restarts); `ready` when every rank is ok."""
        self._watch()
        h = await asyncio.to_thread(self.group.health)
        return {"role": "target", "ready": h["healthy"], **h}

    async def stats(self) -> dict[str, Any]:
        """Rank 0's batch statistics and what each rank holds."""
        return await asyncio.to_thread(self.group.stats)

    def rank_handles(self) -> list:
        """The current ranks' actor handles (fault-injection tests)."""
        return list(self.group.ranks)

    async def restart(self) -> int:
        """Restart the whole group now; returns the new epoch."""
        return await asyncio.to_thread(self.group.restart, None, "requested")

    def shutdown(self) -> None:
        """Kill the ranks and remove the placement group."""
        self.group.shutdown()


def make_target_group_actor(cfg: ArbitrageConfig, ready_timeout_s: float = 600.0):
    """A `TargetGroupHost` actor (no resources of its own: the ranks hold them), restarted by
    Ray per `runtime.target.max_restarts`. Its constructor builds the group; wait on `health`."""
    import ray

    return (
        ray.remote(TargetGroupHost)
        .options(num_cpus=0, max_restarts=cfg.runtime.target.max_restarts, max_task_retries=0, max_concurrency=1000)
        .remote(cfg.model_dump(), ready_timeout_s)
    )


def _bundles(actor_cfg: ActorConfig) -> list[dict[str, float]]:
    """One bundle per rank; the custom resources (node pinning) only on bundle 0."""
    base = {"CPU": actor_cfg.num_cpus, "GPU": actor_cfg.num_gpus}
    first = {**base, **actor_cfg.resources}
    return [
        {k: v for k, v in b.items() if v > 0} or {"CPU": 0.001}
        for b in [first] + [base] * (actor_cfg.tensor_parallel - 1)
    ]


def _reserve_placement_group(actor_cfg: ActorConfig, ready_timeout_s: float):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = _bundles(actor_cfg)
    labels = [dict(actor_cfg.label_selector)] * len(bundles) if actor_cfg.label_selector else None
    pg = placement_group(bundles, strategy="STRICT_PACK", bundle_label_selector=labels)
    try:
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        remove_placement_group(pg)
        raise RuntimeError(
            f"no node could host the TP={actor_cfg.tensor_parallel} target group {bundles} within "
            f"{ready_timeout_s:.0f}s (STRICT_PACK: all on one node); lower runtime.target."
            "tensor_parallel / num_gpus / num_cpus, or add a node with these resources"
        ) from e
    return pg


def _rank_actor(actor_cfg: ActorConfig, pg, rank: int):
    """TPRankActor as a Ray actor class placed in bundle `rank` of the group's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = _bundles(actor_cfg)[rank]
    return ray.remote(TPRankActor).options(
        num_cpus=bundle.get("CPU", 0),
        num_gpus=bundle.get("GPU", 0),
        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank),
    )
