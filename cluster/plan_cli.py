"""`arbitrage config plan`: the memory plan of a config, role by role, against the GPUs it is placed on.

    arbitrage config plan --config llama-8b-70b
    arbitrage config plan -c qwen-math-7b-q3 --set runtime.draft.num_gpus=0.5
    arbitrage config plan -c my.yaml --cluster my_cluster.yaml   # node types of another launcher file

Prints `arbitrage.memory_plan.format_plan`'s table; a role that does not fit ends the command
with one line naming the role and the numbers (exit code 2), as start-up does. The command is
registered on `cluster.config_cli.config_app` (imported at the end of that module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cluster.config_cli import SET_HELP, config_app, config_option, load_with_sets


@config_app.command("plan")
def plan(
    config: str = config_option(),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    cluster: Optional[Path] = typer.Option(
        None,
        "--cluster",
        help="Cluster-launcher YAML whose node types place the roles (default: the project's ray_cluster.yaml).",
    ),
) -> None:
    """Weights + KV cache + activations + headroom per role against the GPU memory it gets; fails if one does not fit."""
    from arbitrage.memory_plan import failure_message, format_plan, load_node_types
    from arbitrage.memory_plan import plan as make_plan

    cfg = load_with_sets(config, set_)
    from cluster.console import UserError

    if cluster is not None and not cluster.is_file():
        raise UserError(f"--cluster: no such file {cluster}")
    p = make_plan(cfg, load_node_types(cluster))
    typer.echo(format_plan(p))
    bad = p.failures()
    if bad:
        raise UserError(failure_message(bad[0]))
