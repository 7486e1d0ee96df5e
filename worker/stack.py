"""Local dev/test stack: a real PostgreSQL and a real single-node Kafka, no Docker.

PostgreSQL comes from the distribution's packages (installed with apt-get when
missing); the Kafka broker (4.x, KRaft) runs from jars that Maven fetches once
with ``ops/kafka/pom.xml``. All state lives in one folder, ``.stack`` at the repo
root unless ``CONVSTATS_STACK_DIR`` says otherwise.

Standard library only: the CLI and pytest fixtures import this module before the
project's own dependencies are installed. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _find_repo_root() -> Path:
    # A checkout (or editable install) has ops/ next to worker/; a wheel
    # install does not, and is then expected to run from the checkout.
    here = Path(__file__).resolve().parents[1]
    return here if (here / "ops" / "kafka" / "pom.xml").is_file() else Path.cwd()


REPO_ROOT = _find_repo_root()
KAFKA_OPS_DIR = REPO_ROOT / "ops" / "kafka"

HOST = "127.0.0.1"
# Below Linux's ephemeral range (32768-60999): a port inside it can be taken as the
# source port of an outgoing connection (aiokafka retrying against a stopped broker
# even connects to itself), and the server then cannot bind it again on restart.
PG_PORT = 15432
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093

PG_USER = "postgres"
PG_DATABASE = "postgres"
PG_START_TIMEOUT = 60.0
KAFKA_START_TIMEOUT = 90.0
KAFKA_STOP_TIMEOUT = 30.0
MVN_TIMEOUT = 900.0
LOG_TAIL_LINES = 40
_ERROR_LINE = re.compile(r"\b(ERROR|FATAL|PANIC)\b|^Caused by: ")
# sun_path is 108 bytes with the trailing NUL; PostgreSQL refuses longer paths.
_MAX_SOCKET_PATH = 107


class StackError(Exception):
    """The local stack could not be started, stopped or inspected."""


@dataclasses.dataclass(frozen=True)
class StackEnv:
    database_url: str
    kafka_bootstrap_servers: str


@dataclasses.dataclass(frozen=True)
class _Ports:
    pg: int
    kafka: int
    controller: int


@dataclasses.dataclass(frozen=True)
class _Layout:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def pg_link(self) -> Path:
        return self.root / "postgres"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def kafka_libs(self) -> Path:
        return self.kafka / "libs"

    @property
    def kafka_data(self) -> Path:
        return self.kafka / "data"

    @property
    def kafka_properties(self) -> Path:
        return self.kafka / "server.properties"

    @property
    def kafka_log(self) -> Path:
        return self.kafka / "server.log"

    @property
    def kafka_pid(self) -> Path:
        return self.kafka / "kafka.pid"


@dataclasses.dataclass(frozen=True)
class _Pg:
    home: Path  # real path, owned by the server's user (see _pg_home)
    bindir: Path

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def log(self) -> Path:
        return self.home / "postgresql.log"

    def bin(self, name: str) -> str:
        return str(self.bindir / name)


# --------------------------------------------------------------------------- API


def up(state_dir: Path | None = None) -> StackEnv:
    """Start PostgreSQL and Kafka unless already running; return their env."""
    layout = _layout(state_dir)
    ports = _ports()
    started = time.monotonic()
    with _locked(layout):
        _pg_up(layout, ports)
        _kafka_up(layout, ports)
    logger.info(
        "stack up in %.1fs (state in %s)",
        time.monotonic() - started,
        layout.root,
        extra={"action": "stack_up"},
    )
    return env(state_dir)


def down(state_dir: Path | None = None) -> None:
    """Stop Kafka and PostgreSQL; their data stays for the next `up`."""
    layout = _layout(state_dir)
    if not layout.root.is_dir():
        return
    with _locked(layout):
        _kafka_down(layout)
        _pg_down(layout)
    logger.info("stack down", extra={"action": "stack_down"})


def status(state_dir: Path | None = None) -> dict[str, str]:
    """Describe each service, e.g. {"postgresql": "running on 127.0.0.1:15432"}."""
    layout = _layout(state_dir)
    return {"postgresql": _pg_status(layout), "kafka": _kafka_status(layout)}


def env(state_dir: Path | None = None) -> StackEnv:
    """Connection settings of the stack (computed; does not start anything)."""
    del state_dir  # ports come from the environment, not from the state dir
    ports = _ports()
    return StackEnv(
        database_url=f"postgresql://{PG_USER}@{HOST}:{ports.pg}/{PG_DATABASE}",
        kafka_bootstrap_servers=f"{HOST}:{ports.kafka}",
    )


def stop_postgresql(state_dir: Path | None = None) -> None:
    """Stop PostgreSQL alone (fast shutdown: every session is cut, as in an outage)."""
    layout = _layout(state_dir)
    with _locked(layout):
        _pg_down(layout)


def start_postgresql(state_dir: Path | None = None) -> None:
    """Start PostgreSQL alone; returns once it answers queries."""
    layout = _layout(state_dir)
    with _locked(layout):
        _pg_up(layout, _ports())


def restart_postgresql(state_dir: Path | None = None) -> None:
    stop_postgresql(state_dir)
    start_postgresql(state_dir)


def stop_kafka(state_dir: Path | None = None) -> None:
    """Stop the broker alone (controlled shutdown); its data stays."""
    layout = _layout(state_dir)
    with _locked(layout):
        _kafka_down(layout)


def start_kafka(state_dir: Path | None = None) -> None:
    """Start the broker alone; returns once it serves metadata."""
    layout = _layout(state_dir)
    with _locked(layout):
        _kafka_up(layout, _ports())


def restart_kafka(state_dir: Path | None = None) -> None:
    stop_kafka(state_dir)
    start_kafka(state_dir)


def export_lines(e: StackEnv) -> str:
    """Shell lines that point the app at the stack (for `eval "$(...)"`)."""
    return (
        f"export CONVSTATS_DATABASE_URL={shlex.quote(e.database_url)}\n"
        "export CONVSTATS_KAFKA_BOOTSTRAP_SERVERS="
        f"{shlex.quote(e.kafka_bootstrap_servers)}"
    )


# ------------------------------------------------------------------ settings


def _layout(state_dir: Path | None) -> _Layout:
    if state_dir is None:
        configured = os.environ.get("CONVSTATS_STACK_DIR")
        state_dir = Path(configured) if configured else REPO_ROOT / ".stack"
    # Absolute and canonical: the path is hashed and handed to other processes.
    return _Layout(Path(state_dir).expanduser().resolve())


def _ports() -> _Ports:
    return _Ports(
        pg=_env_port("CONVSTATS_STACK_PG_PORT", PG_PORT),
        kafka=_env_port("CONVSTATS_STACK_KAFKA_PORT", KAFKA_PORT),
        controller=_env_port(
            "CONVSTATS_STACK_KAFKA_CONTROLLER_PORT", KAFKA_CONTROLLER_PORT
        ),
    )


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StackError(f"{name}={raw!r} is not a TCP port")
    return int(raw)


@contextlib.contextmanager
def _locked(layout: _Layout) -> Iterator[None]:
    # pytest-xdist workers and a developer's shell may call up/down at once.
    layout.root.mkdir(parents=True, exist_ok=True)
    with layout.lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------- processes


def _run(
    cmd: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**_child_env(), **(extra_env or {})},
            check=False,
        )
    except FileNotFoundError as exc:
        raise StackError(f"command not found: {cmd[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from exc
    if check and done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise StackError(
            f"failed (exit {done.returncode}): {shlex.join(cmd)}\n{_tail(output)}"
        )
    return done


def _child_env() -> dict[str, str]:
    # A developer's PGPASSWORD/PGHOST/PGDATABASE would redirect psql and
    # pg_isready away from the stack's own server.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = f"--- last {LOG_TAIL_LINES} lines of {path} ---\n{_tail(text)}"
    # A failed broker logs its cause, then a long orderly shutdown that pushes
    # the cause out of the tail: show the first error lines too.
    errors = [line for line in text.splitlines() if _ERROR_LINE.search(line)]
    if not errors:
        return tail
    return f"--- first errors in {path} ---\n" + "\n".join(errors[:12]) + "\n" + tail


def _rotate_log(path: Path) -> None:
    # One run per file keeps the failure tail relevant and the disk use bounded.
    if path.exists():
        path.replace(path.with_name(path.name + ".1"))


# ---------------------------------------------------------------- postgresql


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_pg_user(cmd: Sequence[str]) -> list[str]:
    # The server refuses to run as root, so as root every server-side command
    # runs as the distribution's `postgres` user; as anyone else, as oneself.
    if not _is_root():
        return list(cmd)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", PG_USER, "--", *cmd]


def _pg_bindir(home: Path | None) -> Path:
    versions = _installed_pg_versions()
    if not versions:
        _install_postgresql()
        versions = _installed_pg_versions()
    if not versions:
        raise StackError("PostgreSQL is still missing after apt-get install")
    wanted = _data_version(home)
    if wanted is not None and wanted not in versions:
        raise StackError(
            f"the stack's PostgreSQL data is version {wanted} but only "
            f"{', '.join(map(str, versions))} is installed"
        )
    return Path(f"/usr/lib/postgresql/{wanted or versions[-1]}/bin")


def _installed_pg_versions() -> list[int]:
    found = Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
    return sorted(int(p.parts[-3]) for p in found if p.parts[-3].isdigit())


def _data_version(home: Path | None) -> int | None:
    # An existing cluster can only be run by the major version that made it.
    if home is None:
        return None
    try:
        return int((home / "data" / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return None


def _install_postgresql() -> None:
    if not _is_root() or shutil.which("apt-get") is None:
        raise StackError(
            "PostgreSQL server binaries are missing: install them, e.g. "
            "`apt-get update && apt-get install -y postgresql`"
        )
    logger.info("installing postgresql", extra={"action": "pg_install"})
    quiet = {"DEBIAN_FRONTEND": "noninteractive"}  # no debconf prompts in CI
    _run(["apt-get", "update"], timeout=600, extra_env=quiet)
    _run(["apt-get", "install", "-y", "postgresql"], timeout=900, extra_env=quiet)


def _pg_home(layout: _Layout, *, create: bool) -> Path | None:
    """Real folder of the stack's cluster, created on first use.

    Normally STATE_DIR/postgres. When the server's user cannot reach the state
    dir (a clone under /root, mode 700) or the socket path would be too long,
    the cluster lives in that user's home instead and STATE_DIR/postgres is a
    symlink to it. Postgres's home rather than /var/tmp, because tmpfiles
    cleaners may delete old files there and corrupt a stopped cluster; and
    rather than chmod-ing the clone's ancestors, because opening up /root is a
    security change outside the project's own files.
    """
    link = layout.pg_link
    if link.is_symlink():
        home = link.parent / link.readlink()  # absolute target wins the join
        if create:
            _make_pg_dir(home)
        return home
    if link.is_dir() or not create:
        return link if link.is_dir() else None
    if _pg_can_use(link):
        _make_pg_dir(link)
        return link
    home = _external_pg_home(layout)
    _make_pg_dir(home)
    link.symlink_to(home, target_is_directory=True)
    logger.info(
        "postgres cannot reach %s; cluster lives in %s",
        layout.root,
        home,
        extra={"action": "pg_external_home"},
    )
    return home


def _pg_can_use(home: Path) -> bool:
    socket_path = home / "run" / ".s.PGSQL.65535.lock"  # longest possible
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        return False
    if not _is_root():
        return True
    probe = _as_pg_user(["test", "-x", str(home.parent)])
    return _run(probe, timeout=30, check=False).returncode == 0


def _external_pg_home(layout: _Layout) -> Path:
    try:
        pg_home = Path(pwd.getpwnam(PG_USER).pw_dir)
    except KeyError as exc:
        raise StackError(f"system user {PG_USER!r} does not exist") from exc
    digest = hashlib.sha256(str(layout.root).encode()).hexdigest()[:12]
    return pg_home / "convstats" / digest


def _make_pg_dir(path: Path) -> None:
    # Made by the server's user where it may write (its home, its own folders),
    # so it owns the whole new chain; else (root's state dir) by root + chown.
    if path.is_dir():
        return
    mkdir = _as_pg_user(["mkdir", "-p", "-m", "700", str(path)])
    if _run(mkdir, timeout=30, check=False).returncode == 0:
        return
    if not _is_root():
        raise StackError(f"cannot create {path}")
    path.mkdir(parents=True, mode=0o700)
    shutil.chown(path, PG_USER, PG_USER)


def _pg_up(layout: _Layout, ports: _Ports) -> None:
    home = _pg_home(layout, create=True)
    assert home is not None  # created above
    pg = _Pg(home=home, bindir=_pg_bindir(home))
    _pg_initdb(pg)
    _make_pg_dir(pg.run)
    changed = _pg_write_conf(pg, ports.pg)
    if _pg_running(pg):
        if changed:
            _pg_stop(pg)
            _pg_start(pg)
    else:
        _pg_start(pg)
    _pg_wait_ready(pg, ports.pg)


def _pg_initdb(pg: _Pg) -> None:
    if (pg.data / "PG_VERSION").exists():
        return
    logger.info("initdb %s", pg.data, extra={"action": "pg_initdb"})
    cmd = [
        pg.bin("initdb"),
        f"--pgdata={pg.data}",
        f"--username={PG_USER}",
        "--auth=trust",  # loopback-only dev server; no secrets to manage
        "--encoding=UTF8",
        f"--locale={_pg_locale()}",
    ]
    try:
        _run(_as_pg_user(cmd), timeout=180)
    except StackError:
        # A half-made data dir would make every later initdb refuse to run.
        shutil.rmtree(pg.data, ignore_errors=True)
        raise


def _pg_locale() -> str:
    # C.UTF-8 sorts like C but knows non-ASCII case; glibc < 2.35 lacks it.
    return "C.UTF-8" if Path("/usr/lib/locale/C.utf8").is_dir() else "C"


def _pg_conf_text(pg: _Pg, port: int) -> str:
    settings = {
        "listen_addresses": f"'{HOST}'",
        "port": str(port),
        "unix_socket_directories": f"'{pg.run}'",
        "max_connections": "200",
        "shared_buffers": "256MB",
        "timezone": "'UTC'",
        "log_timezone": "'UTC'",
        "log_line_prefix": "'%m [%p] %q%u@%d '",
    }
    lines = [f"{key} = {value}" for key, value in settings.items()]
    header = "# Written by worker/stack.py on every `up`; edits are overwritten.\n"
    return header + "\n".join(lines) + "\n"


def _pg_write_conf(pg: _Pg, port: int) -> bool:
    """Write the stack's settings; True when they differ from the last run's."""
    conf = pg.data / "convstats.conf"
    main = pg.data / "postgresql.conf"
    include = "include_if_exists = 'convstats.conf'"
    if include not in main.read_text():
        with main.open("a") as handle:
            handle.write(f"\n{include}\n")
    text = _pg_conf_text(pg, port)
    old = conf.read_text() if conf.exists() else None
    if old != text:
        conf.write_text(text)
        if _is_root():
            shutil.chown(conf, PG_USER, PG_USER)
    return old is not None and old != text


def _pg_running(pg: _Pg) -> bool:
    # pg_ctl status reads postmaster.pid and checks the pid, so a stale pid
    # file left by a crash or reboot counts as stopped.
    cmd = _as_pg_user([pg.bin("pg_ctl"), "status", "-D", str(pg.data)])
    return _run(cmd, timeout=30, check=False).returncode == 0


def _pg_start(pg: _Pg) -> None:
    logger.info("starting postgresql", extra={"action": "pg_start"})
    _rotate_log(pg.log)
    cmd = [
        pg.bin("pg_ctl"),
        "start",
        "-D",
        str(pg.data),
        "-l",
        str(pg.log),
        "-w",
        "-t",
        str(int(PG_START_TIMEOUT)),
        "-s",
    ]
    try:
        _run(_as_pg_user(cmd), timeout=PG_START_TIMEOUT + 30)
    except StackError as exc:
        raise StackError(
            f"PostgreSQL did not start: {exc}\n{_log_tail(pg.log)}"
        ) from exc


def _pg_wait_ready(pg: _Pg, port: int) -> None:
    # pg_isready only proves the postmaster answers; a real query proves that
    # recovery finished and trust auth lets the app's URL in.
    deadline = time.monotonic() + PG_START_TIMEOUT
    while True:
        if _pg_accepts_query(pg, port):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"PostgreSQL on {HOST}:{port} does not answer queries\n"
                f"{_log_tail(pg.log)}"
            )
        time.sleep(0.5)


def _pg_accepts_query(pg: _Pg, port: int) -> bool:
    where = ["-h", HOST, "-p", str(port)]
    ready = [pg.bin("pg_isready"), *where, "-t", "2", "-U", PG_USER]
    if _run(ready, timeout=10, check=False).returncode != 0:
        return False
    psql = [pg.bin("psql"), *where, "-U", PG_USER, "-d", PG_DATABASE, "-XAtqw"]
    done = _run([*psql, "-c", "SELECT 1"], timeout=10, check=False)
    return done.returncode == 0 and done.stdout.strip() == "1"


def _pg_down(layout: _Layout) -> None:
    home = _pg_home(layout, create=False)
    if home is None or not (home / "data" / "PG_VERSION").exists():
        return
    pg = _Pg(home=home, bindir=_pg_bindir(home))
    if _pg_running(pg):
        _pg_stop(pg)


def _pg_stop(pg: _Pg) -> None:
    logger.info("stopping postgresql", extra={"action": "pg_stop"})
    stop = [pg.bin("pg_ctl"), "stop", "-D", str(pg.data), "-w", "-t", "60", "-s"]
    try:
        _run(_as_pg_user([*stop, "-m", "fast"]), timeout=90)
    except StackError:
        # Fast shutdown waits for a checkpoint; immediate needs crash recovery
        # on the next start but never hangs.
        logger.warning("fast stop failed", extra={"action": "pg_stop_immediate"})
        _run(_as_pg_user([*stop, "-m", "immediate"]), timeout=90)


def _pg_status(layout: _Layout) -> str:
    home = _pg_home(layout, create=False)
    if home is None or not (home / "data" / "PG_VERSION").exists():
        return "stopped (not initialized)"
    if not _installed_pg_versions():
        return "stopped (postgresql not installed)"
    pg = _Pg(home=home, bindir=_pg_bindir(home))
    if not _pg_running(pg):
        return "stopped"
    port = _pg_running_port(pg) or _ports().pg
    if not _pg_accepts_query(pg, port):
        return f"not answering on {HOST}:{port}"
    return f"running on {HOST}:{port}"


def _pg_running_port(pg: _Pg) -> int | None:
    # Line 4 of postmaster.pid is the port the running server really uses.
    try:
        return int((pg.data / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------- kafka


def _kafka_up(layout: _Layout, ports: _Ports) -> None:
    layout.kafka.mkdir(parents=True, exist_ok=True)
    props = _kafka_properties(layout, ports)
    pid = _kafka_pid(layout)
    if pid is not None and _kafka_unchanged(layout, props):
        _kafka_wait_ready(layout, pid, ports.kafka)
        return
    if pid is not None:
        logger.info(
            "kafka config changed; restarting", extra={"action": "kafka_restart"}
        )
        _kafka_stop(layout, pid)
    _kafka_fetch_libs(layout)
    layout.kafka_properties.write_text(props)
    _kafka_format(layout)
    pid = _kafka_start(layout)
    _kafka_wait_ready(layout, pid, ports.kafka)


def _kafka_properties(layout: _Layout, ports: _Ports) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Static voters, not the dynamic-quorum bootstrap: a dynamic quorum
        # stores the controller's address in its log, so a changed
        # CONVSTATS_STACK_KAFKA_CONTROLLER_PORT would strand the cluster.
        "controller.quorum.voters": f"1@{HOST}:{ports.controller}",
        "controller.listener.names": "CONTROLLER",
        "listeners": f"PLAINTEXT://{HOST}:{ports.kafka},"
        f"CONTROLLER://{HOST}:{ports.controller}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{ports.kafka}",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(layout.kafka_data),
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
    }
    header = "# Written by worker/stack.py on every `up`; edits are overwritten.\n"
    return header + "".join(f"{k}={v}\n" for k, v in settings.items())


def _kafka_unchanged(layout: _Layout, props: str) -> bool:
    # The running broker read server.properties and libs/ at its start.
    try:
        running_props = layout.kafka_properties.read_text()
    except OSError:
        return False
    return running_props == props and _kafka_libs_current(layout)


def _pom() -> Path:
    pom = KAFKA_OPS_DIR / "pom.xml"
    if not pom.is_file():
        raise StackError(f"{pom} is missing; it lists the Kafka broker jars")
    return pom


def _pom_digest() -> str:
    return hashlib.sha256(_pom().read_bytes()).hexdigest()


def _kafka_libs_current(layout: _Layout) -> bool:
    marker = layout.kafka_libs / ".pom.sha256"
    return marker.is_file() and marker.read_text().strip() == _pom_digest()


def _kafka_fetch_libs(layout: _Layout) -> None:
    if _kafka_libs_current(layout):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (`mvn`) is needed once to fetch the Kafka jars")
    # Download into a scratch folder and swap it in whole, so an interrupted
    # download never looks like a complete set of jars.
    scratch = layout.kafka / f"libs.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    logger.info("fetching kafka jars with maven", extra={"action": "kafka_fetch_libs"})
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(_pom()),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={scratch}",
        "-DincludeScope=runtime",
    ]
    try:
        _run(cmd, timeout=MVN_TIMEOUT)
    except StackError:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    (scratch / ".pom.sha256").write_text(_pom_digest() + "\n")
    shutil.rmtree(layout.kafka_libs, ignore_errors=True)
    scratch.replace(layout.kafka_libs)


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise StackError("Java 17+ is needed to run the Kafka broker")
    return java


def _kafka_java(
    layout: _Layout, main_class: str, *args: str, jvm: Sequence[str] = ()
) -> list[str]:
    return [
        _java(),
        *jvm,
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={KAFKA_OPS_DIR / 'log4j2.yaml'}",
        f"-Dkafka.logs.dir={layout.kafka}",
        "-cp",
        f"{layout.kafka_libs}/*",  # the JVM expands this wildcard itself
        main_class,
        *args,
    ]


def _kafka_format(layout: _Layout) -> None:
    # Formatting writes a new cluster id; doing it again would orphan the data.
    if (layout.kafka_data / "meta.properties").exists():
        return
    cluster_id = _new_cluster_id()
    logger.info(
        "formatting kafka storage (cluster id %s)",
        cluster_id,
        extra={"action": "kafka_format"},
    )
    args = ["format", "-t", cluster_id, "-c", str(layout.kafka_properties)]
    _run(_kafka_java(layout, "kafka.tools.StorageTool", *args), timeout=120)


def _new_cluster_id() -> str:
    # Kafka's Uuid text form: URL-safe base64 without padding; ids starting
    # with "-" are skipped, as Kafka does, because they look like options.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _kafka_start(layout: _Layout) -> int:
    logger.info("starting kafka", extra={"action": "kafka_start"})
    _rotate_log(layout.kafka_log)
    # Kafka's own start script defaults to a 1 GiB heap; starting smaller
    # keeps an idle dev broker light on a 2-core CI box.
    jvm = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    cmd = _kafka_java(layout, "kafka.Kafka", str(layout.kafka_properties), jvm=jvm)
    pid = _spawn_detached(cmd, layout.kafka_log)
    layout.kafka_pid.write_text(f"{pid}\n")
    return pid


def _spawn_detached(cmd: Sequence[str], log: Path) -> int:
    # A throwaway `sh` starts the broker in the background and exits at once:
    # the broker is then nobody's child here, so it outlives pytest without
    # becoming a zombie of (or a ResourceWarning in) the calling process.
    script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    launcher = subprocess.run(
        ["sh", "-c", script, "sh", str(log), *cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,  # no SIGINT/SIGHUP from the caller's terminal
        check=False,
    )
    try:
        return int(launcher.stdout.strip())
    except ValueError as exc:
        raise StackError(f"could not start the broker: {launcher.stderr}") from exc


def _kafka_pid(layout: _Layout, *, repair: bool = True) -> int | None:
    """Pid of this state dir's running broker, or None.

    The pid file is only a hint: a stale one (crash, reboot) is removed, and a
    lost or wrong one is recovered from /proc, so that `up` never starts a
    second broker on the same data and `down` never leaves one behind.
    """
    recorded = _read_pid(layout.kafka_pid)
    if recorded is not None and _is_our_broker(layout, recorded):
        return recorded
    found = _find_our_broker(layout)
    if repair and found != recorded:
        logger.info(
            "kafka pid file said %s, broker is %s",
            recorded,
            found,
            extra={"action": "kafka_pid_repair"},
        )
        if found is None:
            layout.kafka_pid.unlink(missing_ok=True)
        else:
            layout.kafka_pid.write_text(f"{found}\n")
    return found


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _find_our_broker(layout: _Layout) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_our_broker(layout, int(entry.name)):
            return int(entry.name)
    return None


def _is_our_broker(layout: _Layout, pid: int) -> bool:
    # After a reboot the pid may belong to an unrelated process: check that it
    # is a live broker started on this state dir's server.properties.
    proc = Path("/proc") / str(pid)
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    wanted = str(layout.kafka_properties).encode()
    return state not in ("Z", "X") and b"kafka.Kafka" in cmdline and wanted in cmdline


def _kafka_wait_ready(layout: _Layout, pid: int, port: int) -> None:
    deadline = time.monotonic() + KAFKA_START_TIMEOUT
    while True:
        if not _is_our_broker(layout, pid):
            layout.kafka_pid.unlink(missing_ok=True)
            raise StackError(
                f"Kafka broker (pid {pid}) exited during start\n"
                f"{_log_tail(layout.kafka_log)}"
            )
        brokers = _kafka_brokers(port, timeout=2.0)
        if brokers:
            logger.info(
                "kafka ready; brokers %s",
                ", ".join(brokers),
                extra={"action": "kafka_ready"},
            )
            return
        if time.monotonic() > deadline:
            # A wedged broker would make the next `up` wait all over again.
            tail = _log_tail(layout.kafka_log)
            _kafka_stop(layout, pid)
            raise StackError(
                f"Kafka broker (pid {pid}) did not serve metadata on {HOST}:{port} "
                f"within {KAFKA_START_TIMEOUT:.0f}s\n{tail}"
            )
        time.sleep(0.5)


def _kafka_down(layout: _Layout) -> None:
    pid = _kafka_pid(layout)
    if pid is not None:
        _kafka_stop(layout, pid)


def _kafka_stop(layout: _Layout, pid: int) -> None:
    # SIGTERM runs the broker's controlled shutdown (clean log close, no log
    # recovery on the next start); SIGKILL only when that hangs.
    logger.info("stopping kafka (pid %s)", pid, extra={"action": "kafka_stop"})
    for sig, wait in ((signal.SIGTERM, KAFKA_STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_gone(layout, pid, wait):
            layout.kafka_pid.unlink(missing_ok=True)
            return
        logger.warning(
            "kafka pid %s ignored %s", pid, sig.name, extra={"action": "kafka_kill"}
        )
    raise StackError(f"Kafka broker (pid {pid}) survived SIGKILL")


def _wait_gone(layout: _Layout, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_our_broker(layout, pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _kafka_running_port(layout: _Layout) -> int | None:
    # server.properties is only rewritten while the broker is stopped, so it
    # names the port the running broker really listens on.
    try:
        text = layout.kafka_properties.read_text()
    except OSError:
        return None
    found = re.search(
        r"^advertised\.listeners=PLAINTEXT://[^:]+:(\d+)", text, re.MULTILINE
    )
    return int(found.group(1)) if found else None


def _kafka_status(layout: _Layout) -> str:
    pid = _kafka_pid(layout, repair=False)  # status only looks
    if pid is None:
        return "stopped"
    port = _kafka_running_port(layout) or _ports().kafka
    if not _kafka_brokers(port, timeout=2.0):
        return f"not answering on {HOST}:{port} (pid {pid})"
    return f"running on {HOST}:{port}"


# ------------------------------------------------- kafka wire protocol (probe)

_METADATA_API_KEY = 3
# Metadata v4 is the oldest version Kafka 4.x still serves (KIP-896 dropped
# v0-v3) and the newest one without the "flexible" varint encoding.
_METADATA_VERSION = 4
_CLIENT_ID = b"convstats-stack"


def _kafka_brokers(port: int, timeout: float) -> list[str]:
    """Brokers listed by a real Metadata request; [] when not (yet) serving.

    An open port is not enough: the broker accepts connections before it has
    registered with the controller, and clients then fail in odd ways.
    """
    correlation_id = int.from_bytes(os.urandom(4), "big") >> 1
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(_metadata_request(correlation_id))
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            response = _recv_exact(sock, size)
        return _parse_metadata(response, correlation_id)
    except (OSError, struct.error, ValueError):
        return []


def _metadata_request(correlation_id: int) -> bytes:
    header = struct.pack(
        ">hhih", _METADATA_API_KEY, _METADATA_VERSION, correlation_id, len(_CLIENT_ID)
    )
    # topics: empty array (not null, which means "all"); no auto-creation.
    body = struct.pack(">ib", 0, 0)
    payload = header + _CLIENT_ID + body
    return struct.pack(">i", len(payload)) + payload


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    if not 0 <= size <= 64 * 1024 * 1024:
        raise ValueError(f"implausible Kafka frame size {size}")
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _parse_metadata(response: bytes, correlation_id: int) -> list[str]:
    # Response header v0: correlation_id; body v4: throttle_time_ms, then the
    # brokers array of (node_id, host, port, rack). The rest is not needed.
    got_id, _throttle, count = struct.unpack_from(">iii", response, 0)
    if got_id != correlation_id:
        raise ValueError("response to another request")
    offset = 12
    brokers = []
    for _ in range(count):
        _node_id, host_len = struct.unpack_from(">ih", response, offset)
        offset += 6
        host = response[offset : offset + host_len].decode()
        offset += host_len
        port, rack_len = struct.unpack_from(">ih", response, offset)
        offset += 6 + max(rack_len, 0)
        brokers.append(f"{host}:{port}")
    return brokers
