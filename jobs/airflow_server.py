"""The private Airflow every command uses (its environment, binary and migrated SQLite DB: `airflow_env`,
`ensure_airflow_db`, used by `run` and `backfill` too), and real Airflow for people: API server (UI + REST),
scheduler and DAG processor on SQLite, in the foreground.

    python -m jobs.cli airflow [--host 127.0.0.1] [--port 8080]      (make airflow [AIRFLOW_PORT=8080])

The three components run as child processes of this one, with the project's DAGs (dags/) and the private
AIRFLOW_HOME that `make run` uses (.airflow/, SQLite), the LocalExecutor, and Airflow's simple auth manager
with one user `admin` whose password Airflow generates once into
$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated; it is printed when the server is healthy.
Each component writes its output to $AIRFLOW_HOME/logs/<component>.log. Ctrl-C (or SIGTERM) stops every
process started here, the tasks' processes included. Tasks see this process's environment, so
REASEQ__… settings given here reach the pipeline's stages.

Unlike `airflow standalone`, no triggerer is started (no DAG here defers), the API server runs one worker
(the machines this runs on have 2 cores) and the host, port and login are known in advance.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jobs.config import PROJECT_ROOT

COMPONENTS = ("api-server", "scheduler", "dag-processor")
USER = "admin"


# ---------------------------------------------------------------- the private Airflow every command uses


def airflow_env(home: Path | None = None) -> dict[str, str]:
    home = home or Path(os.environ.get("AIRFLOW_HOME", PROJECT_ROOT / ".airflow"))
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "NO_PROXY": "*",
        # A person at the terminal wants a failure now, not after Airflow's retry delays.
        "REASEQ__AIRFLOW__TASK_RETRIES": os.environ.get("REASEQ__AIRFLOW__TASK_RETRIES", "0"),
    })
    home.mkdir(parents=True, exist_ok=True)
    return env


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def ensure_airflow_db(env: dict[str, str], *, pools: bool = True) -> None:
    """Migrate the metadata DB once (stamped); with `pools`, (re)declare the `llm` pool reason_items runs in.

    `run` and `backfill` pass pools=False: `airflow dags test` runs the tasks itself, one after the other,
    and never consults a pool (checked: reason_items ran on a DB without the pool), while each `airflow
    pools set` is a CLI start of its own, 6.6 s measured. The scheduler (`serve`) does consult it."""
    home = Path(env["AIRFLOW_HOME"])
    stamp = home / ".migrated"
    if not stamp.exists():
        _check([airflow_bin(), "db", "migrate"], env, "airflow db migrate")
        stamp.write_text(dt.datetime.now(dt.UTC).isoformat())
    if pools:
        _check([airflow_bin(), "pools", "set", "llm", "4", "bounds concurrent LLM fan-out tasks"], env, "pool llm")


def _check(cmd: list[str], env: dict[str, str], what: str) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{what} failed (exit {p.returncode}):\n{tail}")


# ---------------------------------------------------------------- the long-running server


def server_env(base: dict[str, str], host: str, port: int) -> dict[str, str]:
    url = f"http://{host}:{port}"
    env = dict(base)
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "4"),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        # The DAG processor looks for new or changed files every 30 s instead of 5 minutes.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": env.get("AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "30"),
    })
    # A scheduler retries as the settings say (airflow.task_retries), unlike `make run`, where a person
    # waits and airflow_env() sets 0; a value the operator gave is kept.
    if "REASEQ__AIRFLOW__TASK_RETRIES" not in os.environ:
        env.pop("REASEQ__AIRFLOW__TASK_RETRIES", None)
    return env


def password_file(env: dict[str, str]) -> Path:
    configured = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"


def read_password(env: dict[str, str]) -> str | None:
    try:
        return json.loads(password_file(env).read_text()).get(USER)
    except (OSError, ValueError):
        return None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def healthy(url: str) -> dict | None:
    import httpx

    try:
        r = httpx.get(f"{url}/api/v2/monitor/health", timeout=5, trust_env=False)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _stop_all(procs: dict[str, subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM every component and every process below it (executor workers, task runners), then SIGKILL."""
    import psutil

    tree: list[psutil.Process] = []
    for p in procs.values():
        try:
            parent = psutil.Process(p.pid)
            tree += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in tree:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for p in procs.values():
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def serve(host: str, port: int, startup_timeout: float = 300.0) -> int:
    if port_in_use(host, port):
        print(f"{host}:{port} is already in use: stop what listens there or pick another port "
              f"(make airflow AIRFLOW_PORT=…)", file=sys.stderr)
        return 2
    env = server_env(airflow_env(), host, port)
    ensure_airflow_db(env)
    logs = Path(env["AIRFLOW_HOME"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    commands = {
        "api-server": [airflow_bin(), "api-server", "--host", host, "--port", str(port), "--workers", "1"],
        "scheduler": [airflow_bin(), "scheduler"],
        "dag-processor": [airflow_bin(), "dag-processor"],
    }
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def _on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"starting Airflow ({', '.join(COMPONENTS)}) with AIRFLOW_HOME={env['AIRFLOW_HOME']}; "
          f"logs in {logs}/<component>.log", flush=True)
    rc = 0
    try:
        for name, cmd in commands.items():
            with open(logs / f"{name}.log", "ab") as out:
                procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT)
        t0 = time.monotonic()
        health = None
        while not stopping and health is None:
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if dead:
                name, code = next(iter(dead.items()))
                print(f"airflow {name} exited {code} while starting; see {logs / (name + '.log')}", file=sys.stderr)
                return 1
            if time.monotonic() - t0 > startup_timeout:
                print(f"the API server did not answer {url}/api/v2/monitor/health within {startup_timeout:.0f}s; "
                      f"see {logs / 'api-server.log'}", file=sys.stderr)
                return 1
            time.sleep(2)
            health = healthy(url)
        if stopping:
            return 0
        password = read_password(env)
        login = (f"{USER} / {password}" if password else
                 f"{USER} / (password not found in {password_file(env)})")
        print(f"\nAirflow is up at {url} ({time.monotonic() - t0:.0f}s)", flush=True)
        print(f"  log in as   {login}   (simple auth manager; passwords in {password_file(env)})")
        print(f"  DAGs from   {env['AIRFLOW__CORE__DAGS_FOLDER']} (new DAGs start paused: unpause in the UI, "
              "or trigger a run with a config)")
        print(f"  REST token  curl -s -X POST {url}/auth/token -H 'Content-Type: application/json' "
              f"-d '{{\"username\":\"{USER}\",\"password\":\"{password or '…'}\"}}'")
        print(f"  backfill    in the UI, or: airflow backfill create --dag-id reaseq_nightly --from-date D1 --to-date D2 "
              f"(AIRFLOW_HOME={env['AIRFLOW_HOME']})")
        print("  stop        Ctrl-C (stops every process started here)", flush=True)
        while not stopping:
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if dead:
                name, code = next(iter(dead.items()))
                print(f"airflow {name} exited {code}; stopping the others; see {logs / (name + '.log')}",
                      file=sys.stderr)
                rc = 1
                break
            time.sleep(1)
    finally:
        print("stopping Airflow …", flush=True)
        _stop_all(procs)
        print("Airflow stopped", flush=True)
    return rc
