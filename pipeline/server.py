"""The team's tracking server: PostgreSQL and an MLflow tracking server with basic auth.

``runway server start`` runs both from ``.runway/server/`` (``RUNWAY_SERVER_DIR`` elsewhere):

- PostgreSQL (Debian's ``postgresql``): a cluster of its own in ``pg/data``, run as the
  ``postgres`` user when started by root, listening on 127.0.0.1 only, with three databases
  owned by one role: ``mlflow`` (runs and registry), ``mlflow_auth`` (MLflow's users) and
  ``optuna`` (shared studies; each tool keeps its own migration table, so they do not share);
- ``mlflow server`` on it: ``--app-name basic-auth``, artifacts proxied by the server
  (``--serve-artifacts``, stored in ``artifacts/``), a few uvicorn workers, and the Host
  header checked against ``--allowed-hosts``.

Generated secrets (the database and admin passwords, Flask's secret key) are written once to
``credentials.env`` (mode 600, under the git-ignored ``.runway/``); the admin password is
printed once. ``client.env`` (mode 600) holds only what a client sets: the URI, user name and
password. ``server.json`` records ports and process ids for ``stop`` and ``status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.io import StageError, signals_deferred, signals_held

DIR_ENV = "RUNWAY_SERVER_DIR"
DEFAULT_DIR = Path(".runway/server")
ROLE = "runway"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
ADMIN = "admin"
AUTH_CACHE_S = 60
STUDY_ENV = "OPTUNA_STORAGE"  # client.env: the study database's URL
STOP_GRACE_S = 15.0


def server_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR).resolve()


@dataclass
class State:
    """What ``start`` left running (server.json)."""

    host: str
    port: int
    pg_port: int
    mlflow_pid: int | None = None
    allowed_hosts: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{shown}:{self.port}"


def pg_bin(name: str) -> Path:
    """A PostgreSQL program: Debian keeps them in /usr/lib/postgresql/<major>/bin."""
    found = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1]
    which = shutil.which(name)
    if which:
        return Path(which)
    raise StageError(
        f"PostgreSQL's {name} is not installed: `sudo apt-get install postgresql` "
        "(`make server` installs it)"
    )


def as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: root runs it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _own(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    path.chmod(mode)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def credentials(folder: Path) -> dict[str, str]:
    """The generated secrets, made on first use (credentials.env, mode 600)."""
    path = folder / "credentials.env"
    if path.exists():
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {k.strip(): v.strip() for k, v in pairs}
    values = {
        "RUNWAY_DB_PASSWORD": secrets.token_hex(16),
        "RUNWAY_PG_SUPERUSER_PASSWORD": secrets.token_hex(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16),
    }
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def client_env(folder: Path, state: State, secret: dict[str, str]) -> Path:
    """What a client needs, and nothing of the server's own secrets: client.env (mode 600),
    for ``set -a; . .runway/server/client.env; set +a``."""
    path = folder / "client.env"
    write_private(
        path,
        f"MLFLOW_TRACKING_URI={state.uri}\n"
        f"MLFLOW_TRACKING_USERNAME={secret['MLFLOW_TRACKING_USERNAME']}\n"
        f"MLFLOW_TRACKING_PASSWORD={secret['MLFLOW_TRACKING_PASSWORD']}\n"
        # The shared Optuna study's database (params.yaml: tune.storage: OPTUNA_STORAGE).
        f"{STUDY_ENV}={db_url('optuna', state.pg_port, secret['RUNWAY_DB_PASSWORD'])}\n",
    )
    return path


def db_url(database: str, pg_port: int, password: str, user: str = ROLE) -> str:
    return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{pg_port}/{database}"


def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise StageError(f"{what} failed: {lines[-1] if lines else done.returncode}")
    return done


def start_postgres(folder: Path, pg_port: int, secret: dict[str, str]) -> None:
    """Initialise the cluster on first use, start it on 127.0.0.1:pg_port, and make the role
    and databases that are missing."""
    data, run = folder / "pg" / "data", folder / "pg" / "run"
    _own(folder / "pg", 0o755)
    _own(run, 0o755)
    if not (data / "PG_VERSION").exists():
        _own(data, 0o700)
        pwfile = run / "initdb.pw"
        pwfile.write_text(secret["RUNWAY_PG_SUPERUSER_PASSWORD"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        try:
            _run(
                [
                    *as_postgres(),
                    str(pg_bin("initdb")),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
    options = f"-c listen_addresses=127.0.0.1 -p {pg_port} -k {run}"
    if not pg_ready(pg_port):
        _run(
            [
                *as_postgres(),
                str(pg_bin("pg_ctl")),
                "-D",
                str(data),
                "-l",
                str(run / "postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ],
            f"starting PostgreSQL (log: {run / 'postgres.log'})",
        )
    create_databases(pg_port, secret)


def pg_ready(pg_port: int) -> bool:
    try:
        ready = pg_bin("pg_isready")
    except StageError:
        return False
    done = subprocess.run(
        [str(ready), "-q", "-h", "127.0.0.1", "-p", str(pg_port)], capture_output=True
    )
    return done.returncode == 0


def create_databases(pg_port: int, secret: dict[str, str]) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host="127.0.0.1",
        port=pg_port,
        user="postgres",
        password=secret["RUNWAY_PG_SUPERUSER_PASSWORD"],
        dbname="postgres",
        autocommit=True,
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(secret["RUNWAY_DB_PASSWORD"])
                )
            )
        for name in DATABASES:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(ROLE)
                    )
                )


def auth_config(folder: Path, state: State, secret: dict[str, str]) -> Path:
    """MLflow's basic-auth settings (mode 600: they hold the admin password)."""
    path = folder / "basic_auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {db_url('mlflow_auth', state.pg_port, secret['RUNWAY_DB_PASSWORD'])}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {secret['MLFLOW_TRACKING_PASSWORD']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checking a password costs ~100 ms of scrypt, on every request; a verified one is
        # remembered (as an HMAC) for a minute, so a changed password or a deleted user takes
        # up to a minute to apply in every server worker.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n"
    )
    write_private(path, text)
    return path


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> str:
    """MLflow's --allowed-hosts: the Host headers it answers (any other gets 403, against
    DNS rebinding): loopback; the address it is bound to; for 0.0.0.0, this machine's name
    and address; and the names clients use (``extra``, e.g. a DNS alias)."""
    names = ["127.0.0.1", "localhost", *extra]
    if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::"):
        names.append(host)
    if host in ("0.0.0.0", "::"):
        names.append(socket.getfqdn())
        with contextlib.suppress(OSError):
            names.append(socket.gethostbyname(socket.gethostname()))
    return ",".join(f"{name}:{port}" for name in dict.fromkeys(names))


def start_mlflow(folder: Path, state: State, secret: dict[str, str], workers: int) -> int:
    """Start ``mlflow server`` in its own process group; return its pid once it answers."""
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(folder, state, secret)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # In the environment, not the command line: any local user can read a command line.
        "MLFLOW_BACKEND_STORE_URI": db_url("mlflow", state.pg_port, secret["RUNWAY_DB_PASSWORD"]),
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--serve-artifacts",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        state.host,
        "--port",
        str(state.port),
        "--workers",
        str(workers),
        "--app-name",
        "basic-auth",
        "--allowed-hosts",
        allowed_hosts(state.host, state.port, tuple(state.allowed_hosts)),
    ]
    server = None
    try:
        # A stop signal while it starts is acted on once its pid is known, for the cleanup
        # below. The server writes its log after we exit: our copy of the file is closed at once.
        with open(folder / "mlflow.log", "ab") as log, signals_deferred():
            server = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                tail = (folder / "mlflow.log").read_text(errors="replace").strip().splitlines()
                raise StageError(
                    f"the MLflow server exited with status {server.returncode}: "
                    f"{tail[-1] if tail else 'no output'} (log: {folder / 'mlflow.log'})"
                )
            if healthy(state):
                return server.pid
            time.sleep(0.5)
        raise StageError(
            f"the MLflow server did not answer in 120 s (log: {folder / 'mlflow.log'})"
        )
    except BaseException:  # also ^C: its pid is not recorded yet, so stop would not find it
        if server is None:  # it could not be started
            raise
        with signals_held():  # a second ^C must not leave it running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=STOP_GRACE_S)  # reaped: a zombie leader keeps its group alive
            stop_group(server.pid)  # what is left of its group
        raise


def healthy(state: State) -> bool:
    try:
        with urllib.request.urlopen(f"{state.uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(group: int) -> None:
    """SIGTERM the process group, SIGKILL what is left after STOP_GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def read_state(folder: Path) -> State | None:
    try:
        return State(**json.loads((folder / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_state(folder: Path, state: State) -> None:
    (folder / "server.json").write_text(json.dumps(asdict(state), indent=2) + "\n")


def start(
    host: str = "127.0.0.1", port: int = 5000, workers: int = 2, extra_hosts: tuple[str, ...] = ()
) -> tuple[State, bool]:
    """Start what is not running; return the state and whether the credentials are new."""
    folder = server_dir()
    new = not (folder / "credentials.env").exists()
    secret = credentials(folder)
    state = read_state(folder)
    if state is not None and state.mlflow_pid and group_alive(state.mlflow_pid):
        if healthy(state):
            client_env(folder, state, secret)
            return state, new
        stop_group(state.mlflow_pid)
    pg_port = state.pg_port if state is not None else free_port()
    state = State(host=host, port=port, pg_port=pg_port, allowed_hosts=list(extra_hosts))
    write_state(folder, state)  # first: stop finds a PostgreSQL whose start was interrupted
    start_postgres(folder, pg_port, secret)
    state.mlflow_pid = start_mlflow(folder, state, secret, workers)
    write_state(folder, state)
    client_env(folder, state, secret)
    return state, new


def stop() -> list[str]:
    """Stop the MLflow server and PostgreSQL; say what was stopped."""
    folder = server_dir()
    state = read_state(folder)
    done = []
    if state is not None and state.mlflow_pid and group_alive(state.mlflow_pid):
        stop_group(state.mlflow_pid)
        done.append(f"MLflow server (pid {state.mlflow_pid})")
    data = folder / "pg" / "data"
    if state is not None and pg_ready(state.pg_port):
        _run(
            [*as_postgres(), str(pg_bin("pg_ctl")), "-D", str(data), "-m", "fast", "-w", "stop"],
            "stopping PostgreSQL",
        )
        done.append(f"PostgreSQL (port {state.pg_port})")
    if state is not None:
        state.mlflow_pid = None
        write_state(folder, state)
    return done


def status() -> dict:
    folder = server_dir()
    state = read_state(folder)
    if state is None:
        return {"folder": str(folder), "started": False}
    return {
        "folder": str(folder),
        "started": True,
        "uri": state.uri,
        "mlflow": bool(state.mlflow_pid and group_alive(state.mlflow_pid) and healthy(state)),
        "postgres": pg_ready(state.pg_port),
        "pg_port": state.pg_port,
        "client_env": str(folder / "client.env"),
    }
