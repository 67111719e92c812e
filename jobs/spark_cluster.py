"""A Spark standalone cluster on this machine (one master, N workers) and stage submission to it.

    python -m jobs.spark_cluster up [--workers 2] [--cores 1] [--memory 1g]    (make cluster-up)
    python -m jobs.spark_cluster status
    python -m jobs.spark_cluster submit STAGE --ds YYYY-MM-DD [--master spark://127.0.0.1:7077]
    python -m jobs.spark_cluster down                                          (make cluster-down)

pyspark ships Spark's standalone master and worker (`spark-class org.apache.spark.deploy.master.Master`,
`…worker.Worker`); `up` starts them in the background, each in its own session, with pid files and logs
under .spark-cluster/, waits until every worker has registered with the master, and prints the master
UI (port 8090 by default, so it never clashes with `make airflow` on 8080). `down` stops exactly the
processes whose pid files it finds.

`submit` runs one stage the way the DAG's SparkSubmitOperator does (both build the command in
jobs.submit): `spark-submit --master spark://…` with the stage's file (jobs/<stage>.py, whose `__main__`
is jobs.runtime.cli_main), Delta's jars from the local Ivy cache manifest in `--jars`, the session
settings of jobs.spark.spark_conf as `--conf`. Under spark-submit the stage's session builder leaves the
master, name and jars to spark-submit (jobs.spark.get_spark), so nothing else must agree. Executors import the
project from PYTHONPATH (spark.executorEnv.PYTHONPATH): on one machine that is this checkout; on a real
cluster the same path is mounted into the workers (docker-compose.yml) or shipped with `--py-files`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jobs.config import PROJECT_ROOT

HOST = "127.0.0.1"
DEFAULT_DIR = PROJECT_ROOT / ".spark-cluster"
MASTER_PORT = 7077
MASTER_UI_PORT = 8090  # 8080 is Airflow's (make airflow)
WORKER_UI_PORT = 8091  # worker k listens on 8091 + k - 1 (0: any free port)


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def spark_bin(name: str) -> str:
    return str(spark_home() / "bin" / name)


def master_url(port: int = MASTER_PORT, host: str = HOST) -> str:
    return f"spark://{host}:{port}"


def cluster_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": HOST,
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p),
        "PYSPARK_PYTHON": env.get("PYSPARK_PYTHON", sys.executable),
        "PYSPARK_DRIVER_PYTHON": env.get("PYSPARK_DRIVER_PYTHON", sys.executable),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GX_ANALYTICS_ENABLED": "false",
        "NO_PROXY": "*",
    })
    return env


def _pid_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A recycled pid belongs to someone else: only ever signal Spark's own deploy daemons.
    return b"org.apache.spark.deploy" in cmdline


def master_state(ui_port: int = MASTER_UI_PORT) -> dict | None:
    import httpx

    try:
        r = httpx.get(f"http://{HOST}:{ui_port}/json/", timeout=3, trust_env=False)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def up(workers: int = 2, cores: int = 1, memory: str = "1g", port: int = MASTER_PORT,
       ui_port: int = MASTER_UI_PORT, worker_ui_port: int = WORKER_UI_PORT, folder: Path = DEFAULT_DIR,
       timeout: float = 180.0, env: dict[str, str] | None = None) -> int:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n")  # pid files, logs and worker folders are never committed
    running = [p.stem for p in folder.glob("*.pid") if _pid_alive(int(p.read_text()))]
    if running:
        print(f"a cluster is already running from {folder} ({', '.join(sorted(running))}): "
              f"`make cluster-down` first", file=sys.stderr)
        return 2
    env = cluster_env(env)
    url = master_url(port)
    cmds = {"master": [spark_bin("spark-class"), "org.apache.spark.deploy.master.Master",
                       "--host", HOST, "--port", str(port), "--webui-port", str(ui_port)]}
    for k in range(1, workers + 1):
        work = folder / f"worker-{k}"
        work.mkdir(exist_ok=True)
        cmds[f"worker-{k}"] = [spark_bin("spark-class"), "org.apache.spark.deploy.worker.Worker",
                               "--host", HOST, "--cores", str(cores), "--memory", memory,
                               "--webui-port", str(worker_ui_port and worker_ui_port + k - 1), "--work-dir", str(work), url]
    t0 = time.monotonic()
    for name, cmd in cmds.items():
        with open(folder / f"{name}.log", "ab") as log:
            # Own session: the daemons outlive `make`, and `down` signals each one's process group.
            p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=folder)
        (folder / f"{name}.pid").write_text(str(p.pid))
        if name == "master":
            while master_state(ui_port) is None:
                if p.poll() is not None or time.monotonic() - t0 > timeout:
                    print(f"the Spark master did not start; see {folder / 'master.log'}", file=sys.stderr)
                    down(folder)
                    return 1
                time.sleep(1)
    while True:
        state = master_state(ui_port) or {}
        alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
        if len(alive) >= workers:
            break
        if time.monotonic() - t0 > timeout:
            print(f"only {len(alive)} of {workers} workers registered within {timeout:.0f}s; see {folder}/worker-*.log",
                  file=sys.stderr)
            down(folder)
            return 1
        time.sleep(1)
    print(f"Spark standalone cluster up in {time.monotonic() - t0:.0f}s: master {url}, "
          f"{workers} workers x {cores} core, {memory}")
    print(f"  master UI   http://{HOST}:{ui_port}")
    print(f"  pipeline    make run SPARK_MASTER={url}   (every task spark-submits its stage to the cluster)")
    print(f"  one stage   python -m jobs.spark_cluster submit embed_items --ds YYYY-MM-DD --master {url}")
    print(f"  pids, logs  {folder}/")
    print("  stop        make cluster-down", flush=True)
    return 0


def down(folder: Path = DEFAULT_DIR, grace: float = 15.0) -> int:
    folder = Path(folder)
    pids = {}
    for f in sorted(folder.glob("*.pid")):
        try:
            pids[f] = int(f.read_text().strip())
        except ValueError:
            f.unlink()
    if not pids:
        print(f"no Spark cluster running from {folder}")
        return 0
    # Workers first, so the master sees them leave rather than time out.
    order = sorted(pids, key=lambda f: f.stem == "master")
    for f in order:
        if _pid_alive(pids[f]):
            try:
                os.killpg(pids[f], signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(pids[f]) for f in order):
        time.sleep(0.5)
    for f in order:
        if _pid_alive(pids[f]):
            try:
                os.killpg(pids[f], signal.SIGKILL)
            except ProcessLookupError:
                pass
        f.unlink(missing_ok=True)
    print(f"Spark cluster stopped ({', '.join(f.stem for f in order)})")
    return 0


def status(folder: Path = DEFAULT_DIR, ui_port: int = MASTER_UI_PORT) -> int:
    folder = Path(folder)
    procs = {f.stem: _pid_alive(int(f.read_text())) for f in sorted(folder.glob("*.pid"))}
    if not procs:
        print("no Spark cluster running (make cluster-up)")
        return 1
    for name, alive in procs.items():
        print(f"  {name:10} {'running' if alive else 'gone'}")
    state = master_state(ui_port)
    if state:
        print(f"  master {state.get('url')}: {state.get('aliveworkers')} alive workers, {state.get('cores')} cores, "
              f"{len(state.get('activeapps', []))} running apps; UI http://{HOST}:{ui_port}")
    return 0 if all(procs.values()) else 1


def submit_command(stage: str, args: list[str], master: str, driver_memory: str | None = None,
                   executor_memory: str | None = None) -> list[str]:
    """spark-submit of one stage against `master`: what the DAG's SparkSubmitOperator runs (jobs.submit)."""
    from jobs import submit as submission

    cmd = submission.command(stage, args, master, binary=spark_bin("spark-submit"), executor_memory=executor_memory)
    if driver_memory:
        i = cmd.index("--driver-memory")
        cmd[i + 1] = driver_memory
    return cmd


def submit(stage: str, args: list[str], master: str, env: dict[str, str] | None = None,
           timeout: float | None = None) -> subprocess.CompletedProcess:
    env = cluster_env(env)
    return subprocess.run(submit_command(stage, args, master), env=env, cwd=PROJECT_ROOT, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.spark_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="pid files and logs (default .spark-cluster/)")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a master and workers in the background")
    u.add_argument("--workers", type=int, default=2)
    u.add_argument("--cores", type=int, default=1, help="cores per worker")
    u.add_argument("--memory", default="1g", help="memory per worker for executors")
    u.add_argument("--port", type=int, default=MASTER_PORT)
    u.add_argument("--ui-port", type=int, default=MASTER_UI_PORT)
    sub.add_parser("down", help="stop the processes `up` started")
    sub.add_parser("status", help="show the cluster's processes and workers")
    s = sub.add_parser("submit", help="spark-submit one stage to the cluster (arguments after STAGE go to the stage)")
    s.add_argument("stage")
    s.add_argument("--master", default=os.environ.get("REASEQ__SPARK__MASTER") or master_url())
    args, rest = p.parse_known_args(argv)
    if args.cmd == "up":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return up(args.workers, args.cores, args.memory, args.port, args.ui_port, folder=args.dir)
    if args.cmd == "down":
        return down(args.dir)
    if args.cmd == "status":
        return status(args.dir)
    return submit(args.stage, rest, args.master).returncode


if __name__ == "__main__":
    sys.exit(main())
