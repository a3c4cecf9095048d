"""What the `arbitrage` CLI prints: start-up phases, quiet third-party logs, errors as one line.

Levels (`--log-level`, or `ARBITRAGE_LOG_LEVEL`): `error` and `warning` print only results and
problems; `info` (the default) adds start-up phases and progress bars; `debug` also lets
Ray, its workers, transformers and DeepSpeed log as they normally do (worker output goes to
this terminal, Ray's own start-up lines included).

Below `debug` the noise of the libraries stays out of the terminal: Ray starts with
`log_to_driver=False` (worker output, including Serve's per-request lines, stays in Ray's log
folder) and its C++ core logs only fatal lines; transformers logs errors only and shows no
weight-loading bars; DeepSpeed, Serve, torch (`TORCH_LOGS=-all`) and every other Python
logger log errors only; Python warnings are off. The variables that do this reach
the Ray workers through the job's `runtime_env` (`worker_env`); what Ray prints while it
starts goes to `$ARBITRAGE_CACHE/logs/ray-init.log`.

Errors (`guarded`): a user error (a bad config, argument, dataset or model path) is one line
on stderr and exit code 2; anything else is an internal error: its traceback goes to a log
file under `$ARBITRAGE_CACHE/logs/`, stderr gets one line naming that file, and the exit
code is 1. `-v/--verbose` prints the traceback as well.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

LOG_LEVELS = ("error", "warning", "info", "debug")
DEFAULT_LEVEL = "info"

# Environment of this process and of every Ray worker below `debug`.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # no LOAD REPORT, no advisory warnings
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars read this
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_BACKEND_LOG_LEVEL": "fatal",  # core_worker.cc error lines (e.g. object-store arguments)
    "TORCH_LOGS": "-all",  # torch's own handlers (e.g. pytree deprecation warnings) at error level
    "PYTHONWARNINGS": "ignore",
}

_state = {"level": DEFAULT_LEVEL, "verbose": False}


def level() -> str:
    return _state["level"]


def verbose() -> bool:
    return _state["verbose"]


def configure(log_level: str | None = None, verbose_: bool = False) -> None:
    """Set the CLI's level and quiet the libraries of this process (and, via `worker_env`, Ray's workers)."""
    lvl = (log_level or os.environ.get("ARBITRAGE_LOG_LEVEL") or DEFAULT_LEVEL).lower()
    if lvl not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {lvl!r}")
    _state["level"], _state["verbose"] = lvl, verbose_
    logging.basicConfig(
        level=logging.DEBUG if lvl == "debug" else logging.ERROR,  # libraries: errors only
        format="%(levelname)s %(name)s: %(message)s",
    )
    if lvl == "debug":
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    # Filters, not levels: DeepSpeed ("Setting accelerator to CPU") and Serve ("Started Serve",
    # "Application ... is ready") set their loggers' levels when they start, but keep the
    # filters of the logger objects created here.
    for name in ("ray", "ray.serve", "DeepSpeed", "transformers", "torch", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).addFilter(_errors_only)
    import warnings

    warnings.filterwarnings("ignore")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def worker_env() -> dict[str, str]:
    """Environment variables for Ray workers: the quiet settings unless at `debug`."""
    return {} if level() == "debug" else dict(QUIET_ENV)


def shows(lvl: str) -> bool:
    """Whether messages at this level are printed."""
    return LOG_LEVELS.index(lvl) <= LOG_LEVELS.index(level())


def phase(msg: str) -> None:
    """A start-up phase or status line on stderr (shown at `info` and `debug`)."""
    if shows("info"):
        _write(msg)


def warn(msg: str) -> None:
    """A warning line on stderr (hidden at `error`)."""
    if shows("warning"):
        _write(f"warning: {msg}")


def _write(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # above any progress bar


def short_path(p: str | os.PathLike) -> str:
    """A path with the home folder written as ~."""
    s, home = str(p), str(Path.home())
    return "~" + s[len(home) :] if s == home or s.startswith(home + os.sep) else s


# ---- Ray, quietly -------------------------------------------------------------------------
@contextmanager
def ray_session(cfg) -> Iterator[None]:
    """Connect to `runtime.address` or start a local Ray, quietly; shut it down on exit if started here.

    `cluster.runtime.Runtime` and the Serve app reuse an initialised Ray, so starting it
    here decides its logging for the whole command.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    from cluster.runtime import PROJECT_ROOT

    rt, loud = cfg.runtime, level() == "debug"
    env = {"PYTHONPATH": str(PROJECT_ROOT), **worker_env()}  # workers import the project from its root
    common = dict(
        log_to_driver=loud, logging_level=logging.INFO if loud else logging.ERROR, runtime_env={"env_vars": env}
    )
    t0 = time.perf_counter()
    phase(f"joining Ray at {rt.address}" if rt.address is not None else f"starting Ray (local, {rt.num_cpus} CPUs)")
    with nullcontext() if loud else stderr_to(log_dir() / "ray-init.log"):  # Ray's C++ start-up lines
        if rt.address is not None:
            ray.init(address=rt.address, **common)
        else:
            ray.init(num_cpus=rt.num_cpus, include_dashboard=False, **common)
    phase(f"Ray ready in {time.perf_counter() - t0:.0f}s")
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send this process's file descriptor 2 (C/C++ output included) to `path` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("ab") as f:
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


# ---- errors -------------------------------------------------------------------------------
def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is a complete one-line answer for the user (exit code 2)."""
    from arbitrage.data import DataError
    from arbitrage.offline import ModelNotFoundError
    from configs.schema import ConfigError

    return (ConfigError, DataError, ModelNotFoundError, UserError)


class UserError(ValueError):
    """A problem with the user's input; the message is one line."""


def one_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def specific_line(msg: str) -> str:
    """The most specific line of a (possibly remote, multi-line) error: its last 'Type: message' line."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and head.replace(".", "").isidentifier() and head.split(".")[-1][:1].isupper():
            return ln
    return lines[0] if lines else ""


def error_line(msg: str) -> None:
    """Print `error: <first line of msg>` on stderr."""
    sys.stderr.write(f"error: {one_line(msg)}\n")
    sys.stderr.flush()


def log_dir() -> Path:
    from arbitrage.offline import cache_root

    return cache_root() / "logs"


def write_traceback(exc: BaseException) -> Path | None:
    """Write the traceback of `exc` to a new log file; None when no log file can be written."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        d = log_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"arbitrage-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"argv: {sys.argv}\n\n{text}")
        return path
    except OSError:
        return None


def guarded(main: Callable[[], object]) -> object:
    """Run the CLI; turn every exception into one line and an exit code (2 user, 1 internal, 130 Ctrl-C)."""
    try:
        return main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        error_line("interrupted")
        raise SystemExit(130) from None
    except BaseException as e:  # noqa: BLE001 -- the one place every error is reported
        if verbose():
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        if isinstance(e, user_error_types()):
            error_line(str(e))
            raise SystemExit(2) from None
        log = write_traceback(e)
        where = f"traceback in {short_path(log)}" if log else "no log file could be written"
        hint = "" if verbose() else "; -v shows it"
        error_line(f"internal error: {type(e).__name__}: {specific_line(str(e)) or '(no message)'} ({where}{hint})")
        raise SystemExit(1) from None
