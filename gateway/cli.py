"""The `tagway` command. Subcommands from other packages (e.g. `tagway replay`) arrive through the `tagway.cli`
entry-point group, so the gateway never imports them. Bad input ends with one line on stderr and exit code 2."""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from importlib.metadata import entry_points
from typing import Any, Optional

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import typer  # noqa: E402

from .config import ConfigError, GatewayConfig, load_config  # noqa: E402

# Help is click's plain formatter (HELP_STYLE): rich's help panels cut long option names and long words with "…" in an
# 80-column terminal; click wraps them instead. Other packages' sub-apps use the same setting.
HELP_STYLE = {"rich_markup_mode": None}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, **HELP_STYLE,
                  help="tagway: an OpenAI-compatible LLM gateway that records who asked and why.")
keys_app = typer.Typer(no_args_is_help=True, **HELP_STYLE, help="Create, list and revoke virtual keys (stored as hashes).")
db_app = typer.Typer(no_args_is_help=True, **HELP_STYLE, help="The store: status, schema, spool, rollups.")
config_app = typer.Typer(no_args_is_help=True, **HELP_STYLE, help="Configuration.")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", envvar="TAGWAY_CONFIG", help="Path to tagway.yaml.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            typer.echo(f"tagway {version('tagway')}")
        except PackageNotFoundError:
            typer.echo("tagway (not installed: run `pip install .`)")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Say how the store was reached (directly, or "
                                       "through the running gateway); also $TAGWAY_VERBOSE=1."),
          _: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit.")) -> None:
    if verbose:
        os.environ["TAGWAY_VERBOSE"] = "1"  # read by exporters.store_access, in this process and in replay's


def fail(message: str, code: int = 2) -> "typer.Exit":
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _load(path: Optional[str], *, providers: bool = False) -> GatewayConfig:
    """The config, or its problems one line each and exit 2. `providers`: also refuse provider names nobody serves
    (serve and config check: that needs litellm's list, which the gateway imports at start anyway)."""
    try:
        cfg = load_config(path)
    except ConfigError as e:
        for line in e.problems:
            typer.echo(f"tagway: config error: {line}", err=True)
        raise typer.Exit(2) from None
    if providers:
        from .providers.names import unknown_providers  # noqa: PLC0415

        unknown = unknown_providers(m.provider for m in cfg.models)
        where = f"{path}: " if path else ""
        for i, m in enumerate(cfg.models):
            if m.provider in unknown:
                typer.echo(f"tagway: config error: {where}models[{i}] ({m.name}).provider: unknown provider "
                           f"{m.provider!r}; use openai (any OpenAI-compatible /v1 server, with base_url), anthropic, "
                           "mock, or a litellm provider name (bedrock, vertex_ai, gemini, ...)", err=True)
        if unknown:
            raise typer.Exit(2)
    return cfg


def _load_keys(cfg: GatewayConfig) -> list[Any]:
    """The keys file's keys, or its problems one line each (`error: <file>:<line>: key #<n>: <what>`) and exit 2:
    what `serve` refuses to start with, `config check` says the same way."""
    from .auth import KeysFileError, read_keys  # noqa: PLC0415

    try:
        return read_keys(cfg)
    except KeysFileError as e:
        for line in e.problems:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None


# -- serve --------------------------------------------------------------------------------------------------------
@app.command()
def serve(config: Optional[str] = ConfigOpt,
          host: Optional[str] = typer.Option(None, help="Bind address (default from config: 127.0.0.1)."),
          port: Optional[int] = typer.Option(None, min=0, max=65535, help="Port (default from config: 4000)."),
          workers: int = typer.Option(1, min=1, help="Worker processes (needs a ClickHouse server DSN)."),
          log_level: str = typer.Option("warning", help="The operational log's level (tagway's and the server's "
                                                         "own lines): critical, error, warning, info, debug or trace "
                                                         "(calls go to the access log).")) -> None:
    """Run the gateway."""
    import uvicorn  # noqa: PLC0415
    from uvicorn.config import LOG_LEVELS  # noqa: PLC0415

    log_level = log_level.lower()
    if log_level not in LOG_LEVELS:  # else uvicorn's KeyError traceback, after "serving on"
        raise fail(f"--log-level {log_level!r} is not a level: use one of {', '.join(LOG_LEVELS)}")

    from exporters.store import StoreError, is_embedded  # noqa: PLC0415

    from .app import TagwayApp  # noqa: PLC0415
    from .observe import install_access_log, install_log  # noqa: PLC0415
    from .store_api import serve as serve_announced  # noqa: PLC0415

    cfg = _load(config, providers=True).states_retention()
    host, port = host or cfg.server.host, (port if port is not None else cfg.server.port)  # --port 0: any free port
    keys = _load_keys(cfg)  # a broken keys file is a start-up error of one line per problem, not a traceback
    from .auth import keys_without_tenant  # noqa: PLC0415
    from .config_check import orphan_keys  # noqa: PLC0415
    for f in orphan_keys(keys_without_tenant(cfg, keys)):  # as `config check` says them
        typer.echo(f"tagway: warning: {f.line()}", err=True)
    if workers > 1:
        if cfg.recording.enabled and is_embedded(cfg.storage.resolved_dsn()):
            raise fail("--workers > 1 needs a ClickHouse server DSN: the embedded store allows one process per "
                       "data directory")
        probe = _bind(host, port)  # a busy port fails here, in one line, before any worker starts
        port = probe.getsockname()[1]  # --port 0: the free port found now (uvicorn binds it again, in a moment)
        probe.close()
        if cfg.recording.enabled:  # and a spool the workers cannot write (each would die in a traceback)
            spool = cfg.storage.resolved_spool()
            try:
                os.makedirs(spool, exist_ok=True)
                if not os.access(spool, os.W_OK | os.X_OK):  # an existing one on a read-only mount, another owner
                    raise OSError(errno.EACCES, "cannot write there", spool)
            except OSError as e:
                raise fail(_cannot_record(e)) from None
        if config:
            os.environ["TAGWAY_CONFIG"] = os.path.abspath(config)
        os.environ[_WORKERS_ENV] = str(workers)  # each worker enforces 1/N of every rate limit
        os.environ[_LOG_LEVEL_ENV] = log_level  # each worker's operational log
        install_log(cfg, LOG_LEVELS[log_level])  # this process's: uvicorn's supervisor lines
        typer.echo(f"tagway: serving on http://{host}:{port}/v1 with {workers} workers (store: "
                   f"{_describe_store(cfg)})", err=True)
        _say_unpriced(cfg)  # once here, not once a worker
        uvicorn.run("gateway.cli:worker_app", factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", access_log=False, log_level=log_level, log_config=None,
                    timeout_graceful_shutdown=cfg.server.graceful_shutdown_seconds, **_http_protocol(cfg))
        return
    sock = _bind(host, port, cfg)  # before the store is opened and before anything says "serving"
    # once it will serve (a refusal before is one plain line), before the store is reached (the recorder's lines)
    install_log(cfg, LOG_LEVELS[log_level])
    try:
        recorder = _recorder_when_free(cfg)
    except StoreError as e:
        sock.close()
        raise fail(_held_by(cfg, e)) from None
    except OSError as e:  # a read-only or full data directory, a spool path that is a file: one line, no traceback
        sock.close()
        raise fail(_cannot_record(e)) from None
    tune_gc()
    install_access_log(cfg)
    # the app owns the recorder: its lifespan shutdown flushes it, which matters because uvicorn re-raises
    # SIGTERM once it has stopped serving, so nothing after uvicorn.run() would run
    gateway = TagwayApp(cfg, recorder=recorder, owns_recorder=True)
    typer.echo(f"tagway: serving on http://{host}:{sock.getsockname()[1]}/v1 (store: {_describe_store(cfg)})",
               err=True)
    try:
        # uvicorn turns SIGTERM/SIGINT into a graceful stop: in-flight calls finish, then we flush the recorder
        # as uvicorn.run, plus the discovery file local CLIs find the store through (gateway/store_api.py)
        serve_announced(gateway, sockets=[sock], loop="uvloop", lifespan="on",
                        access_log=False, log_level=log_level, log_config=None,
                        timeout_graceful_shutdown=cfg.server.graceful_shutdown_seconds, **_http_protocol(cfg))
    finally:
        recorder.shutdown()


def _say_unpriced(cfg: GatewayConfig) -> None:
    from .pricing import Pricing, unpriced_warning  # noqa: PLC0415

    pricing = Pricing()
    pricing.load()
    for d in pricing.unpriced(cfg.models):
        logging.getLogger("tagway").warning(unpriced_warning(d))


def _http_protocol(cfg: GatewayConfig) -> dict[str, Any]:
    """uvicorn's settings for the HTTP protocol: httptools with the request head capped (gateway/server_protocol)."""
    from .server_protocol import HeadCappedProtocol  # noqa: PLC0415

    return {"http": HeadCappedProtocol, "h11_max_incomplete_event_size": cfg.server.max_header_bytes}


# how `serve --workers N` tells its workers N and --log-level (uvicorn's factory takes no arguments); only they
# read them
_WORKERS_ENV = "TAGWAY_WORKERS"
_LOG_LEVEL_ENV = "TAGWAY_LOG_LEVEL"


def worker_app() -> Any:
    """One worker of `tagway serve --workers N` (uvicorn's factory): the app from $TAGWAY_CONFIG, access log and
    operational log on."""
    from uvicorn.config import LOG_LEVELS  # noqa: PLC0415

    from .app import create_app  # noqa: PLC0415
    from .observe import install_access_log, install_log  # noqa: PLC0415

    _quiet_driver()  # a worker is a process of uvicorn's, not started through main()
    cfg = load_config(None).states_retention()
    # a spawned process: nothing of the parent's logging set-up carried over
    install_log(cfg, LOG_LEVELS.get(os.environ.get(_LOG_LEVEL_ENV, ""), logging.WARNING))
    install_access_log(cfg)
    try:
        workers = max(1, int(os.environ.get(_WORKERS_ENV, "1")))
    except ValueError:
        workers = 1  # set by `serve --workers N` itself; anything else is not ours to trust
    return create_app(cfg, workers=workers)


def _bind(host: str, port: int, cfg: GatewayConfig | None = None) -> socket.socket:
    """The listening socket, bound now: a port in use is one clear line and exit 2, not a traceback after
    "serving on" (uvicorn would bind it only once the app had started); it names the gateway serving `cfg`'s store
    when that one has the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts do not wait TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror or e})"
        ann = _serving(cfg) if e.errno == errno.EADDRINUSE and cfg is not None else None
        if ann is not None and ann.url.rsplit(":", 1)[-1] == str(port):
            raise fail(f"{host}:{port} {why}: the gateway {ann.describe()} already serves this store there "
                       "(chDB allows one process per data directory); use that gateway") from None
        if e.errno == errno.EADDRINUSE:
            advice = "stop what listens there or pick another --port"
        elif e.errno == errno.EACCES:
            advice = "ports below 1024 need privileges: pick another --port"
        else:  # a name that does not resolve, or an address this host does not have
            advice = "--host must be an address of this host (127.0.0.1, ::1, 0.0.0.0 for all) or a name for one"
        raise fail(f"{host}:{port} {why}: {advice}") from None
    sock.set_inheritable(True)
    return sock


def _store_dir(cfg: GatewayConfig) -> str | None:
    """The embedded store's directory `cfg` records to; None for a server DSN or with recording off."""
    from exporters import discovery  # noqa: PLC0415

    return discovery.store_dir(cfg.storage.resolved_dsn()) if cfg.recording.enabled else None


def _serving(cfg: GatewayConfig) -> Any:
    """The announcement of a gateway serving `cfg`'s embedded store, if one does."""
    from exporters import discovery  # noqa: PLC0415

    directory = _store_dir(cfg)
    return discovery.serving(directory) if directory else None


def _is_gateway(command: str) -> bool:
    """A holder's command line (_store_holder) that is a gateway: it does not end on its own."""
    return "serve" in command.split()


SERVE_LOCK_WAIT_SECONDS = 30.0  # how long `tagway serve` waits for a local command that has the store open


def _recorder_when_free(cfg: GatewayConfig) -> Any:
    """default_recorder(), waiting up to SERVE_LOCK_WAIT_SECONDS while a local command (a cron's `tagway stats`, say)
    has the embedded store open directly: it lets go when it ends, where failing made a restart race it."""
    import time  # noqa: PLC0415

    from exporters import discovery  # noqa: PLC0415
    from exporters.dirlock import is_locked  # noqa: PLC0415
    from exporters.store import LOCK_FILE, StoreLockedError  # noqa: PLC0415

    from .app import default_recorder  # noqa: PLC0415

    directory = _store_dir(cfg)
    deadline = time.monotonic() + SERVE_LOCK_WAIT_SECONDS
    said = False
    while True:
        try:
            return default_recorder(cfg)
        except StoreLockedError:
            if directory is None or time.monotonic() >= deadline:
                raise
            holder = _store_holder(directory)
            if holder is None:
                if is_locked(directory, LOCK_FILE):
                    raise  # held by a process that names no command we can wait for (_held_by says what it can)
                time.sleep(0.1)  # let go just now (the command we waited for ended): try again
                continue
            if _is_gateway(holder[1]) or discovery.serving(directory):
                raise  # a gateway, starting, serving or stopping: it does not end on its own
            if not said:
                said = True
                typer.echo(f"tagway: the embedded store {directory} is open in pid {holder[0]} ({holder[1]}); "
                           f"waiting up to {SERVE_LOCK_WAIT_SECONDS:.0f} s for it to finish", err=True)
            time.sleep(0.2)


def _store_holder(directory: str) -> tuple[int, str] | None:
    """(pid, command line) of the process that holds the embedded store's lock, when it names itself and lives."""
    from exporters.dirlock import holder_pid, is_locked  # noqa: PLC0415
    from exporters.store import LOCK_FILE  # noqa: PLC0415

    pid = holder_pid(directory, LOCK_FILE)
    if pid is None or pid == os.getpid() or not is_locked(directory, LOCK_FILE):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    # `python -m gateway.cli stats ...` or `/venv/bin/tagway stats ...`: shown from the program's own name on
    start = next((i for i, a in enumerate(argv) if os.path.basename(a) in ("tagway", "gateway.cli")), None)
    return pid, " ".join(argv if start is None else ["tagway", *argv[start + 1:]])[:120]


def _held_by(cfg: GatewayConfig, e: Exception) -> str:
    """The lock error of a second gateway on the same store, naming the first one when it announced itself. A
    serving gateway writes a missing or damaged discovery file again within seconds: wait for it (as the CLI's
    store access does) rather than blame the spool directory, whose lock may be the first one hit."""
    from exporters import discovery  # noqa: PLC0415
    from exporters.store import StoreLockedError  # noqa: PLC0415
    from exporters.store_access import REANNOUNCE_WAIT_SECONDS, reannounced  # noqa: PLC0415

    directory = _store_dir(cfg)
    if not isinstance(e, StoreLockedError) or directory is None:
        return str(e)
    ann = discovery.serving(directory) or reannounced(directory, None, REANNOUNCE_WAIT_SECONDS)
    if ann is None:
        holder = _store_holder(directory)
        if holder is None:
            return str(e)
        if _is_gateway(holder[1]):
            return (f"the embedded store {directory} is in use by a gateway starting or stopping there (pid "
                    f"{holder[0]}: {holder[1]}; chDB allows one process per data directory): wait for it, or stop it")
        return (f"the embedded store {directory} is in use by pid {holder[0]} ({holder[1]}; chDB allows one process "
                f"per data directory, and serve waits up to {SERVE_LOCK_WAIT_SECONDS:.0f} s for a command to "
                "finish): let it finish or stop it, then start the gateway again")
    return (f"the embedded store {directory} is in use by another process: the gateway {ann.describe()} serves it "
            "(chDB allows one process per data directory); use that gateway, or choose another data directory")


def tune_gc() -> None:
    """A server process, not a library: freeze what start-up built (modules, config, the price map) so full
    collections stop rescanning it, and collect the young generation less often. Each request allocates a few
    hundred container objects; with the default threshold of 700 that is a collection every few requests."""
    import gc  # noqa: PLC0415

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def _describe_store(cfg: GatewayConfig) -> str:
    from exporters.store import redact_dsn  # noqa: PLC0415

    if not cfg.recording.enabled:
        return "recording off"
    return redact_dsn(cfg.storage.resolved_dsn())


# -- demo ---------------------------------------------------------------------------------------------------------
@app.command()
def demo(data_dir: str = typer.Option("./tagway-data", help="Embedded store directory."),
         port: int = typer.Option(0, help="Port for the demo gateway (0 = any free port)."),
         calls: int = typer.Option(240, min=1, max=100_000, help="How many calls to drive through it (plus 2 refused "
                                   "ones, an unknown model and a wrong key, recorded too)."),
         keep_running: Optional[bool] = typer.Option(
             None, "--keep-running/--exit", help="Keep the gateway and its dashboard up after the demo traffic until "
             "Ctrl-C, or exit right after it. Default: keep running in a terminal, exit when piped."),
         ) -> None:
    """Start the gateway on the embedded store with mock models and a few tenants, drive tagged traffic through it
    with the openai client, and show what was recorded. Needs no provider keys and no network."""
    from .demo import run_demo  # noqa: PLC0415

    code = run_demo(data_dir=data_dir, port=port, calls=calls, keep_running=keep_running, explain=_held_by)
    raise typer.Exit(code)


# -- keys ---------------------------------------------------------------------------------------------------------
def _keys_file(cfg: GatewayConfig) -> str:
    if cfg.keys_file:
        return cfg.keys_file
    raise fail("no keys file: pass --config (keys are stored beside it) or set keys_file in the config")


# a key's limits from flags, for `keys create` and `keys limits` (0 removes a limit)
RpmOpt = typer.Option(None, "--rpm", help="Requests per minute (0 removes the limit).")
TpmOpt = typer.Option(None, "--tpm", help="Tokens (input + output) per minute (0 removes the limit).")
BudgetOpt = typer.Option(None, "--budget", help="Spend per period in USD (0 removes the budget).")
BudgetPerOpt = typer.Option(None, "--budget-per", help="The budget's period: month (default) or 1h, 1d, 7d, 30d...")
BudgetSoftOpt = typer.Option(None, "--budget-soft", help="Warn past this share of the budget (default 0.8).")
ModelOpt = typer.Option(None, "--model", help="These limits hold the key's calls to this model (the name clients "
                        "ask for), beside its own.")


@keys_app.command("create")
def keys_create(customer: str = typer.Option(..., "--customer", help="Tenant the key belongs to."),
                key_id: Optional[str] = typer.Option(None, "--id", help="Key id (default: <customer>-<random>)."),
                tag: list[str] = typer.Option([], "--tag", help="Key-bound tag k=v (repeatable)."),
                rpm: Optional[int] = RpmOpt, tpm: Optional[int] = TpmOpt, budget: Optional[float] = BudgetOpt,
                budget_per: Optional[str] = BudgetPerOpt, budget_soft: Optional[float] = BudgetSoftOpt,
                model: Optional[str] = ModelOpt, config: Optional[str] = ConfigOpt) -> None:
    """Create a key: printed once, only its hash is stored. Its own limits with --rpm, --tpm, --budget (with
    --model: on that model)."""
    from .auth import add_key_to_file  # noqa: PLC0415
    from .key_limits import LimitFlags, apply_flags  # noqa: PLC0415
    from .tags import normalise  # noqa: PLC0415

    cfg = _load(config)
    if cfg.tenants and cfg.tenant(customer) is None:
        raise fail(f"no tenant {customer!r} in the config (tenants: {', '.join(t.customer for t in cfg.tenants)})")
    tags = {}
    for t in tag:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise fail(f"--tag {t!r} is not key=value")
        tags[normalise(k)] = normalise(v)
    inline = {k.id for t in cfg.tenants for k in t.keys}
    if key_id in inline:  # the gateway would refuse the file (and with it every later revocation in it)
        raise fail(f"a key with id {key_id!r} is written in the config; give the new key another --id")
    flags = LimitFlags(rpm, tpm, budget, budget_per, budget_soft, model=model)
    if model is not None and flags.empty():
        raise fail("--model names the model that --rpm, --tpm or --budget limit: give one of them too")
    try:
        limits = apply_flags(None, flags)
        kid, key = add_key_to_file(_keys_file(cfg), customer, key_id, tags, limits)
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    _warn_unserved(cfg, model)
    typer.echo(f"key id: {kid}", err=True)
    typer.echo("store this key now; tagway keeps only its hash and cannot show it again:", err=True)
    typer.echo(key)


@keys_app.command("limits")
def keys_limits(key_id: str, rpm: Optional[int] = RpmOpt, tpm: Optional[int] = TpmOpt,
                budget: Optional[float] = BudgetOpt, budget_per: Optional[str] = BudgetPerOpt,
                budget_soft: Optional[float] = BudgetSoftOpt,
                clear: bool = typer.Option(False, "--clear", help="Remove every limit first (with --model: that "
                                           "model's)."),
                model: Optional[str] = ModelOpt, config: Optional[str] = ConfigOpt) -> None:
    """Show or change a key's own limits, or with --model its limits on one model (a running gateway applies them
    within a second). Flags not given are kept; 0 removes a limit. Without flags, prints the key's limits."""
    from .auth import read_keys_file, set_key_limits_in_file  # noqa: PLC0415
    from .key_limits import LimitFlags, apply_flags, describe  # noqa: PLC0415

    cfg = _load(config)
    inline = _written_in_config(cfg, key_id)
    if inline:  # as for revoke: only an edit of the config changes it
        raise fail(f"key {key_id!r} is written in the config ({inline}), not in the keys file: set its `limits:` "
                   "there (a running gateway reads the config only at start)")
    flags = LimitFlags(rpm, tpm, budget, budget_per, budget_soft, clear, model)
    try:
        if flags.empty():
            entry = next((i for i in read_keys_file(_keys_file(cfg)) if i.get("id") == key_id), None)
            if entry is None:
                raise ValueError(f"no key with id {key_id!r} in {_keys_file(cfg)}")
            typer.echo(f"{key_id}\t{describe(entry.get('limits'))}")
            return
        limits = set_key_limits_in_file(_keys_file(cfg), key_id, lambda current: apply_flags(current, flags))
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    if flags.rpm or flags.tpm or flags.budget:  # a limit set (not one removed) on a model nobody serves
        _warn_unserved(cfg, model)
    typer.echo(f"{key_id}\t{describe(limits)}")


def _written_in_config(cfg: GatewayConfig, key_id: str) -> str:
    """Where the config itself writes a key (`tenants[0].keys[1]`), or "": only an edit of the config changes it."""
    return next((f"tenants[{i}].keys[{j}]" for i, t in enumerate(cfg.tenants) for j, k in enumerate(t.keys)
                 if k.id == key_id), "")


def _warn_unserved(cfg: GatewayConfig, model: Optional[str]) -> None:
    """The limit is written all the same (the model may be added to the config next), but would hold nothing now."""
    from .config_check import unserved_model  # noqa: PLC0415
    from .model_routes import ModelRoutes  # noqa: PLC0415

    if model is not None and ModelRoutes(cfg).entry_for(model) is None:
        typer.echo(f"warning: {unserved_model(model)}", err=True)


@keys_app.command("admin")
def keys_admin(config: Optional[str] = ConfigOpt) -> None:
    """Make a new admin key: printed once, with the two ways to give it to the gateway."""
    from .auth import hash_key, new_key  # noqa: PLC0415

    cfg = _load(config) if config or os.environ.get("TAGWAY_CONFIG") else GatewayConfig()
    key = new_key()
    typer.echo("store this admin key now; give it to the gateway in one of two ways:", err=True)
    typer.echo(f"  - in its environment: export {cfg.admin_key_env}=<the key>", err=True)
    typer.echo(f"  - or its hash in the config: admin_key_hash: {hash_key(key)}", err=True)
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: Optional[str] = ConfigOpt) -> None:
    """Revoke a key (takes effect within a second on a running gateway)."""
    from .auth import revoke_key_in_file  # noqa: PLC0415

    cfg = _load(config)
    inline = _written_in_config(cfg, key_id)
    if inline:  # not in the keys file: the config itself names it, and only an edit of it revokes it
        raise fail(f"key {key_id!r} is written in the config ({inline}), not in the keys file: set `revoked: true` "
                   "there (a running gateway reads the config only at start)")
    try:
        revoke_key_in_file(_keys_file(cfg), key_id)
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    typer.echo(f"revoked {key_id}")


@keys_app.command("list")
def keys_list(config: Optional[str] = ConfigOpt) -> None:
    """List key ids, customers, states, where each is written, and its own limits (never the keys)."""
    from .auth import read_keys_file  # noqa: PLC0415
    from .key_limits import describe  # noqa: PLC0415

    cfg = _load(config)
    rows = [(k.id, t.customer, "revoked" if k.revoked else "active", "config",
             describe(k.limits.model_dump(exclude_none=True) if k.limits else None))
            for t in cfg.tenants for k in t.keys]
    try:
        rows += [(_text(i.get("id")), _text(i.get("customer")), "revoked" if i.get("revoked") else "active",
                  "keys file", describe(i.get("limits"))) for i in read_keys_file(_keys_file(cfg))]
    except ValueError as e:
        raise fail(str(e)) from None
    for r in rows:
        typer.echo("\t".join(r))


def _text(value: Any) -> str:
    return "" if value is None else str(value)  # a hand-edited entry may hold a number where a name belongs


# -- db -----------------------------------------------------------------------------------------------------------
@db_app.command("spool")
def db_spool(action: str = typer.Argument("list", help="list | retry | purge"),
             files: Optional[list[str]] = typer.Argument(None, help="Quarantined files (paths or names) to act on."),
             all_: bool = typer.Option(False, "--all", help="Every quarantined file."),
             config: Optional[str] = ConfigOpt,
             as_json: bool = typer.Option(False, "--json", help="Machine-readable list.")) -> None:
    """Batches set aside by the recorder: `*.poison` (ClickHouse refused their rows) and `*.corrupt` (unreadable).
    `list` shows them with the reason; `retry` puts them back in line (a running gateway sends them within
    seconds); `purge` deletes them for good. Works whether or not the gateway runs."""
    import json  # noqa: PLC0415
    import time as _time  # noqa: PLC0415

    from exporters.spool import purge, quarantined, requeue  # noqa: PLC0415

    if action not in ("list", "retry", "purge"):
        raise fail(f"unknown action {action!r}: use list, retry or purge")
    cfg = _load(config)
    found = quarantined(cfg.storage.resolved_spool())
    if action == "list":
        if as_json:
            typer.echo(json.dumps([{"path": q.path, "kind": q.kind, "rows": q.rows, "bytes": q.bytes,
                                    "reason": q.reason, "time": q.mtime} for q in found], indent=2))
            return
        if not found:
            typer.echo("no quarantined batches")
        for q in found:
            when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(q.mtime))
            typer.echo(f"{q.kind:7} {q.rows if q.rows is not None else '?':>6} rows  {when}  {q.path}\n"
                       f"        {q.reason or '(no reason recorded)'}")
        return
    if all_ == bool(files):
        raise fail(f"{action}: name the files, or give --all")
    wanted = found if all_ else [q for q in found if q.path in set(files or ()) or
                                 os.path.basename(q.path) in set(files or ())]
    missing = set(files or ()) - {q.path for q in wanted} - {os.path.basename(q.path) for q in wanted}
    if missing:
        raise fail(f"not a quarantined batch: {', '.join(sorted(missing))} (see `tagway db spool list`)")
    for q in wanted:
        try:
            if action == "retry":
                typer.echo(f"re-queued {requeue(q)}")
            else:
                purge(q)
                typer.echo(f"purged {q.path} ({q.rows if q.rows is not None else '?'} rows deleted)")
        except OSError as e:
            raise fail(f"cannot {action} {q.path}: {e.strerror or e}") from None


@db_app.command("status")
def db_status(config: Optional[str] = ConfigOpt,
              dsn: Optional[str] = typer.Option(None, envvar="TAGWAY_DSN", help="Overrides the config's store."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """What the store holds (schema, calls, spans) and what waits in the spool; through a running gateway when
    one serves the store."""
    import orjson  # noqa: PLC0415

    from exporters.discovery import DiscoveryError  # noqa: PLC0415
    from exporters.remote_store import StoreGoneError  # noqa: PLC0415
    from exporters.store import StoreError  # noqa: PLC0415
    from exporters.store_access import open_store  # noqa: PLC0415

    from .db_status import gather, render, spool_line, spool_status  # noqa: PLC0415

    cfg = _load(config)
    target = dsn or cfg.storage.resolved_dsn()
    try:  # a store that is not there: open_store's one line (MissingStoreError), exit 2 as any StoreError here
        store = open_store(target)
        try:
            status = gather(store, target, cfg.schema_settings(), _spool_of(cfg, dsn))
        finally:
            store.close()
    except DiscoveryError as e:
        raise fail(str(e)) from None
    except StoreGoneError as e:
        raise fail(str(e), 3) from None
    except StoreError as e:
        # ClickHouse down is when what waits in the spool matters most: said before the error (still exit 2)
        spool = spool_status(_spool_of(cfg, dsn))
        typer.echo(orjson.dumps({"error": str(e), "spool": spool}, option=orjson.OPT_INDENT_2).decode()
                   if as_json else spool_line(spool))
        raise fail(str(e)) from None
    if as_json:
        typer.echo(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in render(status):
            typer.echo(line)


def _spool_of(cfg: GatewayConfig, dsn: Optional[str]) -> str:
    """The spool directory beside the store a command reads: the config's, or for `--dsn chdb://DIR/clickhouse`
    the gateway's default beside it (DIR/spool)."""
    from exporters.discovery import store_dir  # noqa: PLC0415
    from exporters.store_access import spool_beside  # noqa: PLC0415

    directory = store_dir(dsn) if dsn else None
    return spool_beside(directory) if directory is not None else cfg.storage.resolved_spool()


@db_app.command("migrate")
def db_migrate(config: Optional[str] = ConfigOpt,
               dsn: Optional[str] = typer.Option(None, envvar="TAGWAY_DSN", help="Overrides the config's store."),
               print_only: bool = typer.Option(False, "--print", help="Print the SQL script instead of running it "
                                               "(every migration, and the rows that mark them applied)."),
               pending: bool = typer.Option(False, "--pending", help="With --print: only the migrations this store "
                                            "has not applied (reads the store, changes nothing).")) -> None:
    """Create or upgrade the ClickHouse schema (also done at gateway start-up)."""
    from exporters.schema import connect_creating_database, migrate, migration_script, pending_versions  # noqa: PLC0415
    from exporters.store import StoreError  # noqa: PLC0415

    cfg = _load(config).states_retention()
    s = cfg.storage
    settings = cfg.schema_settings()
    if pending and not print_only:
        raise fail("--pending goes with --print (a plain `db migrate` applies what is pending)")
    if print_only and not pending:
        _print_script(migration_script(settings))
        return
    from exporters.discovery import DiscoveryError  # noqa: PLC0415
    from exporters.remote_store import GatewayStuckError, StoreGoneError  # noqa: PLC0415
    from exporters.store_access import open_store  # noqa: PLC0415

    if print_only:  # --pending: what this store lacks, asked without DDL (its user may have none)
        try:
            store = open_store(dsn or s.resolved_dsn())
            try:
                todo = pending_versions(store, settings)
            finally:
                store.close()
        except (DiscoveryError, StoreError, GatewayStuckError, StoreGoneError) as e:
            raise fail(str(e)) from None
        _print_script(migration_script(settings, todo) if todo else [])
        return
    try:
        try:
            # through a running gateway when one holds it; a server DSN's database is created when missing
            store = connect_creating_database(dsn or s.resolved_dsn(), settings,
                                              lambda target: open_store(target, create=True))
        except GatewayStuckError as e:  # before anything ran
            raise fail(str(e), 3) from None
        try:
            applied = migrate(store, settings)
        finally:
            store.close()
    except DiscoveryError as e:
        raise fail(str(e)) from None
    except StoreGoneError as e:
        raise fail(f"{e}; the migration may be partly applied: run it again", 3) from None
    except StoreError as e:
        raise fail(str(e)) from None
    typer.echo(f"applied migrations: {', '.join(map(str, applied))}" if applied else "schema is up to date")


def _print_script(statements: list[str]) -> None:
    typer.echo("\n".join(f"{sql};\n" for sql in statements) if statements else "-- schema is up to date")


@db_app.command("backfill-rollups")
def db_backfill_rollups(config: Optional[str] = ConfigOpt,
                        dsn: Optional[str] = typer.Option(None, envvar="TAGWAY_DSN",
                                                          help="Overrides the config's store."),
                        redo: bool = typer.Option(False, "--redo", help="Roll the backfilled days before the rollups' "
                                                  "first live day up again (e.g. after old calls arrived late from a "
                                                  "spool)."),
                        settle: float = typer.Option(60.0, min=0, help="Seconds after the rollups went live before "
                                                     "the backfill starts (calls in flight by then have landed)."),
                        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                                                help="Progress bar on stderr (default: when it is "
                                                                "a terminal)."),
                        as_json: bool = typer.Option(False, "--json", help="Print the coverage as JSON.")) -> None:
    """Roll up the calls stored before the rollups existed (migration 10), newest day first, with a progress bar.
    Resumable: run it again after an interruption; a day cut short is redone. Stats read the rollups only for the
    range they cover, and llm_calls for the rest, so answers are right before, during and after."""
    import json  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    from exporters.discovery import DiscoveryError  # noqa: PLC0415
    from exporters.remote_store import StoreGoneError  # noqa: PLC0415
    from exporters.rollups import RollupError, backfill  # noqa: PLC0415
    from exporters.store import StoreError  # noqa: PLC0415
    from exporters.store_access import open_store  # noqa: PLC0415

    cfg = _load(config)
    prog = Progress(TextColumn("backfill"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TextColumn("{task.fields[at]}"), TimeElapsedColumn(),
                    disable=not (sys.stderr.isatty() if progress is None else progress), console=Console(stderr=True))
    task = prog.add_task("backfill", total=1.0, at="")

    def step(s: Any) -> None:
        prog.update(task, total=max(s.total_seconds, 1.0), completed=s.done_seconds,
                    at=f"covered from {s.covered_from:%Y-%m-%d %H:%M}Z")

    try:
        store = open_store(dsn or cfg.storage.resolved_dsn())
        try:
            with prog:
                state = backfill(store, cfg.schema_settings(), settle_seconds=settle, redo=redo, progress=step)
        finally:
            store.close()
    except StoreGoneError as e:
        raise fail(f"{e}; run the backfill again to resume", 3) from None
    except (RollupError, DiscoveryError, StoreError) as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail("interrupted: run `tagway db backfill-rollups` again to resume", 130) from None
    cover = {"covered_from": state.covered_from.isoformat(), "live_from": state.live_from.isoformat(),
             "tag_keys": {k: v.isoformat() for k, v in sorted(state.tag_keys.items())}}
    if as_json:
        typer.echo(json.dumps(cover, indent=2))
    else:
        typer.echo(f"rollups cover calls from {cover['covered_from']}")


@db_app.command("rollup-tags")
def db_rollup_tags(config: Optional[str] = ConfigOpt,
                   dsn: Optional[str] = typer.Option(None, envvar="TAGWAY_DSN", help="Overrides the config's store."),
                   remove: Optional[list[str]] = typer.Option(None, "--remove", help="Stop rolling up this tag key "
                                                              "(repeatable); its questions read llm_calls from now on.")
                   ) -> None:
    """The tag keys the tag rollup holds and where each one's coverage starts. Keys come from the config
    (storage.rollup_tag_keys, or the taxonomy keys that list their values) and are only ever added by it."""
    from exporters.discovery import DiscoveryError  # noqa: PLC0415
    from exporters.rollups import read_state, remove_tag_keys  # noqa: PLC0415
    from exporters.store import StoreError  # noqa: PLC0415
    from exporters.store_access import open_store  # noqa: PLC0415

    cfg = _load(config)
    try:
        store = open_store(dsn or cfg.storage.resolved_dsn())
        try:
            settings = cfg.schema_settings()
            state = read_state(store, settings)
            if state is None:
                raise fail("the store has no rollups: run `tagway db migrate` first")
            unknown = sorted(set(remove or ()) - set(state.tag_keys))
            if unknown:
                raise fail(f"not a rolled-up tag key: {', '.join(unknown)}")
            if remove:
                remove_tag_keys(store, settings, remove)
                state = read_state(store, settings)
        finally:
            store.close()
    except (DiscoveryError, StoreError) as e:
        raise fail(str(e)) from None
    for key, since in sorted(state.tag_keys.items()):
        typer.echo(f"{key}\tcovered from {since.isoformat()}")
    if not state.tag_keys:
        typer.echo("no tag keys are rolled up")


@config_app.command("check")
def config_check(config: Optional[str] = ConfigOpt,
                 strict: bool = typer.Option(False, "--strict", help="Exit 1 when there is any warning.")) -> None:
    """Validate the configuration and its keys file, then warn about what would fail at run time: unset key
    variables, no admin key, keys of no tenant, an unreachable ClickHouse, no config at all."""
    from .auth import keys_without_tenant  # noqa: PLC0415
    from .config_check import findings, probe_spool, probe_store  # noqa: PLC0415

    path = config or os.environ.get("TAGWAY_CONFIG")
    cfg = _load(path, providers=True)
    keys = _load_keys(cfg)  # the keys file serve would refuse: the same lines, exit 2
    found = findings(cfg, path, os.environ, probe_store(cfg), keys_without_tenant(cfg, keys), probe_spool(cfg),
                     file_keys=keys)
    for f in found:
        typer.echo(f"warning: {f.line()}", err=True)
    typer.echo(f"{'ok' if not found else f'{len(found)} warning(s)'}: {len(cfg.models)} models, "
               f"{len(cfg.tenants)} tenants, store {_describe_store(cfg)}")
    if found and strict:
        raise typer.Exit(1)


_plugins_registered = False


def _register_plugins() -> None:
    global _plugins_registered
    if _plugins_registered:
        return
    _plugins_registered = True
    from . import stats_cli, tags_cli  # noqa: PLC0415

    stats_cli.register(app)
    tags_cli.register(app)
    for ep in entry_points(group="tagway.cli"):
        try:
            ep.load()(app)
        except ImportError as e:  # a plugin that cannot load must not take the whole CLI down
            typer.echo(f"tagway: warning: plugin {ep.name!r} unavailable: {e}", err=True)


def command() -> Any:
    """The `tagway` click command, every plugin registered. Each subcommand's summary in the command lists is its
    whole first paragraph: click would otherwise cut it at ~45 characters with "..."."""
    _register_plugins()
    root = typer.main.get_command(app)

    def summaries(cmd: Any) -> None:
        for sub in getattr(cmd, "commands", {}).values():
            if not sub.short_help and sub.help:
                sub.short_help = " ".join(sub.help.split("\n\n")[0].split())
            summaries(sub)

    summaries(root)
    return root


def _cannot_record(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return (f"cannot start recording: {e.strerror or e}{where} (the spool and the embedded store live under "
            "storage.data_dir, the spool under storage.spool_dir when set)")


def _quiet_driver() -> None:
    # clickhouse-connect logs every failed request as a bare "Unexpected Http Driver Exception" warning before it
    # raises; tagway says what failed in its own line (a command's error, the recorder's outage and recovery lines)
    logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)


def main() -> None:
    _quiet_driver()
    try:
        command()(prog_name="tagway")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
