"""Tuning workers on one shared study in real PostgreSQL, logging to a real MLflow server."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import IRIS, copy_project, edit_params, project_env, run
from tests.formats import write_iris_csv
from tests.team import client_environ, team_server

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tune-workers")]

SHARED = {"storage": "OPTUNA_STORAGE", "epochs": 3}


@pytest.fixture(scope="module")
def team():
    with team_server() as team:
        yield team


@pytest.fixture(scope="module")
def iris(tmp_path_factory, team):
    """An iris project validated against the team's server, heartbeats every second."""
    project = copy_project(tmp_path_factory.mktemp("workers") / "p")
    write_iris_csv(project / "data/external/iris.csv")
    edit_params(project, IRIS)
    env = {**team.client, "RUNWAY_TUNE_HEARTBEAT": "1"}
    run(["dvc", "repro", "validate"], project, env=env)
    return project, env


@functools.cache
def storage(url: str):
    """One Optuna storage (one engine, one connection pool) per database for these tests: the
    helpers below poll the study several times a second, and a storage made per call keeps
    its connection until it is collected (PostgreSQL ran out of connection slots)."""
    import optuna

    return optuna.storages.RDBStorage(url)


def study(env: dict, params: Path):
    """The study the tune stage runs for the project's params and prepared data."""
    import optuna

    from pipeline import tracking
    from pipeline.config import load_params
    from pipeline.stages.tune import code_hash, study_name

    project = params.parent
    data = tracking.dvc_hash(project / "data/prepared")
    name = study_name(load_params(path=params), data, code_hash(project / "dvc.yaml"))
    return optuna.load_study(study_name=name, storage=storage(env["OPTUNA_STORAGE"]))


def start_tune(project: Path, env: dict, **popen) -> subprocess.Popen:
    """The tune stage, started as DVC would, its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.tune"],
        cwd=project,
        env={**project_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def running_trials(env: dict, params: Path, stage: subprocess.Popen) -> dict[int, tuple[int, int]]:
    """The stage's workers (0: the stage's own process, then its ``--worker I`` processes)
    that are running a trial of its study: worker index -> (pid, trial number)."""
    import psutil
    from optuna.trial import TrialState

    try:
        running = study(env, params).get_trials(states=(TrialState.RUNNING,))
    except KeyError:  # not created yet
        return {}
    pids = {stage.pid: 0}
    for child in psutil.Process(stage.pid).children():
        try:
            command = child.cmdline()
        except psutil.Error:  # ended since it was listed (e.g. a git run by MLflow)
            continue
        if "--worker" in command:
            pids[child.pid] = int(command[command.index("--worker") + 1])
    by_worker = {}
    for trial in running:
        pid = int(trial.user_attrs.get("worker", ":0").split(":")[1])
        if pid in pids:
            by_worker[pids[pid]] = (pid, trial.number)
    return by_worker


def trial_runs(env: dict, experiment: str, parent_name: str):
    import mlflow

    with client_environ(env):
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], max_results=500)
    parents = [r for r in runs if r.info.run_name == parent_name]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0].info.run_id
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]


def test_two_workers_finish_exactly_n_trials_each_a_nested_run(iris):
    from optuna.trial import TrialState

    project, env = iris
    # Trials long enough (~4 s) that the second worker joins before the first ran them all.
    tune = {**SHARED, "n_trials": 6, "workers": 2, "epochs": 150, "pruner": "none"}
    edit_params(project, {"tune": tune})
    out = run(["dvc", "repro", "tune"], project, env=env).stdout
    started = "[tune] 2 workers (this process and 1 more), 1 torch thread(s) each"
    # The second worker starts before this process loads the data and opens the study (its
    # start-up overlaps this one's), and waits for the study.
    assert out.index(started) < out.index("[tune] device ")
    assert "[tune worker 1] joined study " in out
    assert "[tune worker 0] trial " in out and "[tune worker 1] trial " in out, out
    assert "View run" not in out and "View experiment" not in out
    found = study(env, project / "params.yaml")
    states = [t.state for t in found.trials]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 6
    assert len(states) == 6  # none more: each worker stopped at the total
    assert len({t.user_attrs["worker"] for t in found.trials}) == 2
    runs = trial_runs(env, "runway-iris", f"tune · {found.study_name}")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(6))
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in found.trials}
    assert all(r.info.status == "FINISHED" for r in runs)
    best = (project / "reports/tune/best_params.json").read_text()
    assert str(found.best_trial.params["train.batch_size"]) in best


def test_a_killed_worker_trial_fails_is_retried_and_the_study_finishes(iris):
    """SIGKILL one of two workers in the middle of a trial: its heartbeat stops, the other
    worker fails the trial and runs it again with its parameters."""
    from optuna.trial import TrialState

    project, env = iris
    # Long enough trials (no pruning) to be killed in the middle of one.
    tune = {**SHARED, "n_trials": 4, "workers": 2, "epochs": 250, "pruner": "none", "seed": 7}
    edit_params(project, {"tune": tune})
    stage = start_tune(project, env)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.3)
            pid, number = running_trials(env, project / "params.yaml", stage).get(1, (0, 0))
            victim = (number, pid) if pid else None
        assert victim is not None, "worker 1 never ran a trial"
        os.kill(victim[1], signal.SIGKILL)
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, err
    assert "[tune] worker 1 ended with signal SIGKILL" in err
    assert "[tune] 1 trial run(s) of a worker that died ended as KILLED" in out
    found = study(env, project / "params.yaml")
    killed = found.trials[victim[0]]
    assert killed.state == TrialState.FAIL
    retries = [t for t in found.trials if t.system_attrs.get("failed_trial") == victim[0]]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    states = [t.state for t in found.trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1
    runs = {r.info.run_id: r for r in trial_runs(env, "runway-iris", f"tune · {found.study_name}")}
    assert len(runs) == 5
    assert runs[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    retry_run = runs[retries[0].user_attrs["mlflow_run_id"]]
    assert retry_run.data.tags["optuna.retry_of"] == str(victim[0])


def test_ctrl_c_stops_the_stage_and_its_workers_with_one_line(iris):
    """^C at a terminal goes to every process of the foreground group: the stage and its
    workers. The stage stops its workers itself, so the interruption is reported once; each
    trial it cut short is marked interrupted, for the next run to queue again."""
    import psutil
    from optuna.trial import TrialState

    from pipeline.stages.tune import INTERRUPTED

    project, env = iris
    tune = {**SHARED, "n_trials": 4, "workers": 2, "epochs": 250, "pruner": "none", "seed": 13}
    edit_params(project, {"tune": tune})
    stage = start_tune(project, env, start_new_session=True)  # its own group, as in a terminal
    try:
        running = {}
        deadline = time.monotonic() + 120
        while len(running) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
            running = running_trials(env, project / "params.yaml", stage)
        assert sorted(running) == [0, 1], "the stage and its worker never ran a trial together"
        os.killpg(stage.pid, signal.SIGINT)
        out, err = stage.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(stage.pid, signal.SIGKILL)
    assert stage.returncode == 130
    assert err.splitlines() == ["[tune] interrupted"]
    assert not psutil.pid_exists(running[1][0])  # the worker ended with its stage
    found = study(env, project / "params.yaml")
    for _, number in running.values():
        trial = found.trials[number]
        assert (trial.state, trial.user_attrs.get(INTERRUPTED)) == (TrialState.FAIL, True)


def test_a_worker_on_another_machine_joins_the_study(iris, tmp_path):
    """`runway tune-worker` in a second clone (same params and data) joins the study that
    the tune stage runs; together they finish exactly tune.n_trials."""
    from optuna.trial import TrialState

    project, env = iris
    tune = {**SHARED, "n_trials": 8, "workers": 1, "epochs": 80, "pruner": "none", "seed": 11}
    edit_params(project, {"tune": tune})
    other = tmp_path / "other"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("mlruns", ".dvc"))
    alone = run(["runway", "tune-worker"], other, env=env, check=False)
    assert alone.returncode == 1
    assert "is not in the study database yet: the tune stage starts it" in alone.stderr
    stage = start_tune(project, env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                if study(env, project / "params.yaml").user_attrs.get("mlflow_parent_run_id"):
                    break
            except KeyError:
                continue
        joined = run(["runway", "tune-worker"], other, env=env)
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, err
    assert "[tune worker] joined study " in joined.stdout
    found = study(env, project / "params.yaml")
    assert [t.state for t in found.trials] == [TrialState.COMPLETE] * 8
    by = {t.user_attrs["worker"].split(":")[1] for t in found.trials}
    assert len(by) == 2  # the stage's process and the other clone's worker
    runs = trial_runs(env, "runway-iris", f"tune · {found.study_name}")
    assert len(runs) == 8


WAITING_WORKER = """
from pipeline.config import TuneParams
from pipeline.stages.tune import PARENT_RUN, wait_for_study

_, found = wait_for_study(TuneParams(storage="OPTUNA_STORAGE"), "waited-for")
print(found.study_name, found.user_attrs[PARENT_RUN])
"""


def test_a_worker_the_stage_started_waits_for_the_study(tmp_path, monkeypatch):
    """A worker the tune stage starts is usually ready before the stage has opened the study:
    it waits for it (and for the study's MLflow run) while the stage runs."""
    import optuna

    from pipeline.config import TuneParams
    from pipeline.stages.tune import PARENT_RUN, make_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", url)
    storage = make_storage(TuneParams(storage="OPTUNA_STORAGE"))  # as the stage, first
    worker = subprocess.Popen(
        [sys.executable, "-c", WAITING_WORKER],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        assert worker.poll() is None  # no study yet
        study = optuna.create_study(study_name="waited-for", storage=storage)
        time.sleep(1)
        assert worker.poll() is None  # the study has no MLflow run yet
        study.set_user_attr(PARENT_RUN, "run-of-the-stage")
        out, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err
    assert out == "waited-for run-of-the-stage\n"


def test_workers_start_first_and_open_the_study_database_once_it_is_made(tmp_path, monkeypatch):
    """The stage starts its workers before anything else, so that their start-up overlaps its
    own. Optuna's storage writes its schema version rows wherever they are missing: a worker
    opening the database while the stage makes it would write them too, and one of the two
    writes fails. So the workers are told to go once the database is made (tables and
    version), and open it without making anything."""
    import contextlib

    import optuna

    from pipeline.config import Params
    from pipeline.stages import tune as stage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", url)
    base = Params()
    tune = base.tune.model_copy(update={"storage": "OPTUNA_STORAGE", "workers": 2})
    params = base.model_copy(update={"tune": tune})
    events, found = [], {}

    def go():
        events.append("go")
        opened = optuna.storages.RDBStorage(url, skip_table_creation=True)
        found["version"] = opened.get_current_version()
        found["head"] = opened.get_head_version()

    @contextlib.contextmanager
    def workers_starting(workers: int):
        events.append(f"{workers} workers started")
        yield go

    def storage_made(cfg, create=True):
        made = make_storage(cfg, create)
        events.append("database made")
        return made

    make_storage = stage.make_storage
    monkeypatch.setattr(stage, "more_workers", workers_starting)
    monkeypatch.setattr(stage, "make_storage", storage_made)
    monkeypatch.setattr(stage, "run_study", lambda params, out_dir, workers, storage: {})
    assert stage.tune(params, tmp_path) == {}
    assert events == ["2 workers started", "database made", "go"]
    assert found["version"] == found["head"]


def test_a_worker_the_stage_never_told_to_go_opens_nothing(iris, tmp_path, monkeypatch, capfd):
    """Workers load their data while the stage makes the study database. If the stage fails
    before that (a device this machine lacks, a database it cannot reach), its workers end
    without a word and without touching the database: one killed while it waits for the
    word, one whose stage ended (its standard input closed) before saying it."""
    import psutil

    from pipeline.stages import tune as stage

    project, env = iris
    edit_params(project, {"tune": {**SHARED, "n_trials": 2, "workers": 2}})
    database = tmp_path / "optuna.db"
    monkeypatch.chdir(project)
    for key, value in {**project_env(), **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{database}")

    def waiting_for_go() -> int:
        """The pid of this process's worker, once it waits for the word on its stdin (the
        kernel's wait channel names a pipe read: pipe_read, pipe_wait, anon_pipe_read)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for child in psutil.Process().children():
                try:
                    if "pipe" in Path(f"/proc/{child.pid}/wchan").read_text():
                        return child.pid
                except FileNotFoundError:  # a child that just ended
                    pass
            time.sleep(0.2)
        raise AssertionError("the worker never waited for the word")

    with pytest.raises(RuntimeError, match="the stage failed"), stage.more_workers(2):
        pid = waiting_for_go()
        raise RuntimeError("the stage failed before the database was made")
    assert not Path(f"/proc/{pid}").exists()  # waited for
    worker = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.tune", "--worker", "1"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (worker.returncode, worker.stdout, worker.stderr) == (0, "", "")
    out, err = capfd.readouterr()
    assert out == ""  # the stage's line about its workers comes with the word
    assert err == ""  # the killed worker said nothing ("[tune] terminated" on SIGTERM)
    assert not database.exists()


# A worker that runs a trial once told to go, takes argv[2] seconds to end it after ^C, and
# logs how it ended.
SLOW_TO_STOP_WORKER = """
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])

def ended(how, code):
    with log.open("a") as out:
        out.write(how + "\\n")
    sys.exit(code)

signal.signal(signal.SIGTERM, lambda signum, frame: ended("terminated", 143))
sys.stdin.read()  # the word, then EOF
log.write_text("running\\n")
try:
    while True:
        time.sleep(0.1)
except KeyboardInterrupt:
    time.sleep(float(sys.argv[2]))  # failing its trial
    ended("ended its trial", 130)
"""


def slow_to_stop_workers(monkeypatch, log: Path, seconds: float, grace: float) -> None:
    """The tune stage's workers are SLOW_TO_STOP_WORKER, logging to ``log``; the stage gives
    them ``grace`` seconds after ^C."""
    from pipeline.stages import tune as stage

    monkeypatch.setattr(
        stage,
        "worker_command",
        lambda worker, threads: [sys.executable, "-c", SLOW_TO_STOP_WORKER, str(log), str(seconds)],
    )
    monkeypatch.setattr(stage, "INTERRUPT_GRACE", grace)


def started(log: Path) -> None:
    """Wait until SLOW_TO_STOP_WORKER runs its trial."""
    deadline = time.monotonic() + 60
    while not log.exists() or log.read_text() != "running\n":
        assert time.monotonic() < deadline, "the worker never started its trial"
        time.sleep(0.1)


# A worker that ends its trial within the stage's grace after ^C, and one that takes longer
GRACE_CASES = pytest.mark.parametrize(
    ("seconds", "grace", "log"),
    [(2, 10, "running\nended its trial\n"), (60, 1, "running\nterminated\n")],
    ids=["ends-its-trial-in-the-grace", "stopped-after-the-grace"],
)


@GRACE_CASES
def test_after_ctrl_c_the_stage_gives_its_workers_time_to_end_their_trials(
    seconds, grace, log, tmp_path, monkeypatch, capfd
):
    """^C reaches the stage and its workers. The stage waits up to INTERRUPT_GRACE seconds for
    each worker to fail its own trial (marked interrupted, requeued by the next run), and
    stops one that takes longer with SIGTERM."""
    import psutil

    from pipeline.stages import tune as stage

    path = tmp_path / "worker.log"
    slow_to_stop_workers(monkeypatch, path, seconds, grace)
    with pytest.raises(KeyboardInterrupt), stage.more_workers(2) as go:
        go()
        started(path)
        (worker,) = [c for c in psutil.Process().children() if str(path) in c.cmdline()]
        worker.send_signal(signal.SIGINT)
        raise KeyboardInterrupt
    assert path.read_text() == log
    out, err = capfd.readouterr()
    assert err == ""  # the stage says why it stopped; nothing about its workers


@GRACE_CASES
def test_ctrl_c_while_the_stage_waits_for_its_workers_last_trials_stops_them_the_same_way(
    seconds, grace, log, tmp_path, monkeypatch, capfd
):
    """The stage's own trials are done and it waits for its workers' last ones when ^C comes
    (to it and to them, as a terminal sends it): the same grace, then SIGTERM, and the stage
    ends only once its workers have."""
    import threading

    import psutil

    from pipeline.stages import tune as stage

    path = tmp_path / "worker.log"
    slow_to_stop_workers(monkeypatch, path, seconds, grace)

    def ctrl_c() -> None:  # once the stage waits: to the worker, then to the stage's thread
        try:
            (worker,) = [c for c in psutil.Process().children() if str(path) in c.cmdline()]
            time.sleep(1)
            worker.send_signal(signal.SIGINT)
        finally:  # the stage's wait always ends, and the test with it
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), stage.more_workers(2) as go:
        go()
        started(path)
        threading.Thread(target=ctrl_c).start()
    assert path.read_text() == log
    assert psutil.Process().children() == []
    out, err = capfd.readouterr()
    assert err == ""


def test_a_second_ctrl_c_in_the_grace_stops_the_workers_at_once(tmp_path, monkeypatch, capfd):
    """^C while the stage waits for its workers' last trials, then ^C again during their grace
    (30 s here): the workers get SIGTERM at once and the stage still waits for them."""
    import threading

    import psutil

    from pipeline.stages import tune as stage

    path = tmp_path / "worker.log"
    slow_to_stop_workers(monkeypatch, path, 60, 30)
    main = threading.main_thread().ident

    def ctrl_c_twice() -> None:
        try:
            (worker,) = [c for c in psutil.Process().children() if str(path) in c.cmdline()]
            time.sleep(1)
            worker.send_signal(signal.SIGINT)
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(1)
        finally:
            signal.pthread_kill(main, signal.SIGINT)

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), stage.more_workers(2) as go:
        go()
        started(path)
        threading.Thread(target=ctrl_c_twice).start()
    assert path.read_text() == "running\nterminated\n"
    assert time.monotonic() - start < 20  # not the 30 s grace
    assert psutil.Process().children() == []
    assert capfd.readouterr().err == ""


# A stage that starts a worker, tells it to go once it waits for the word (its wait channel
# names a pipe read), and ends before opening any study.
ORPHANED_WORKER = """
import pathlib, subprocess, sys, time
worker = subprocess.Popen(
    [sys.executable, "-m", "pipeline.stages.tune", "--worker", "1"],
    stdin=subprocess.PIPE, stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT, text=True,
)
print(worker.pid, flush=True)
deadline = time.monotonic() + 120
while "pipe" not in pathlib.Path(f"/proc/{worker.pid}/wchan").read_text():
    if worker.poll() is not None or time.monotonic() > deadline:
        sys.exit("the worker never waited for the word")
    time.sleep(0.1)
worker.stdin.write("go\\n")
worker.stdin.close()
"""


def test_a_worker_whose_stage_ended_before_opening_the_study_ends_without_a_word(
    iris, tmp_path, monkeypatch
):
    """Told to go, a worker waits for the stage to open the study. If the stage ends first
    (stopped between the two), the worker ends too, leaving the stage's line the only one."""
    import psutil

    from pipeline.config import TuneParams
    from pipeline.stages.tune import make_storage

    project, env = iris
    edit_params(project, {"tune": {**SHARED, "n_trials": 2, "workers": 2}})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", url)
    make_storage(TuneParams(storage="OPTUNA_STORAGE"))  # the database, and no study in it
    log = tmp_path / "worker.log"
    stage = subprocess.run(
        [sys.executable, "-c", ORPHANED_WORKER, str(log)],
        cwd=project,
        env={**project_env(), **env, "OPTUNA_STORAGE": url},
        capture_output=True,
        text=True,
        timeout=180,
    )
    pid = int(stage.stdout)
    try:
        assert stage.returncode == 0, stage.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # ended (reaped by init, or a zombie)
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    time.sleep(0.2)
                    continue
            break
        else:
            raise AssertionError("the worker went on waiting after its stage ended")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert log.read_text() == ""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_workers_whose_trials_end_together_start_one_more_trial_not_two(
    database, tmp_path, request, monkeypatch
):
    """Two workers (threads here) whose trials end at the same moment, one trial short of
    n_trials: each counts the study's trials and may start one. Each count is followed by half
    a second before the next trial is created, so without the workers' shared lock both counts
    see 2 of 3 and the study ends with 4 trials; with it, the second count sees the third trial
    and stops."""
    import threading
    import uuid

    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    from sqlalchemy import text

    from pipeline.stages.tune import TrialLock, run_until_done

    if database == "sqlite":
        url = f"sqlite:///{tmp_path}/optuna.db"
    else:
        url = request.getfixturevalue("team").client["OPTUNA_STORAGE"]
    name = f"race-{uuid.uuid4().hex}"
    count = MaxTrialsCallback.__call__

    def slow_count(self, study, trial):
        count(self, study, trial)
        time.sleep(0.5)

    monkeypatch.setattr(MaxTrialsCallback, "__call__", slow_count)
    optuna.create_study(study_name=name, storage=url)
    together = threading.Barrier(2, timeout=30)

    def objective(trial):
        if trial.number < 2:  # each worker's first trial: both end at once
            together.wait()
        return float(trial.number)

    errors, keepalives = [], []

    def worker():
        try:
            found = optuna.load_study(study_name=name, storage=url)
            with TrialLock(url, name) as lock:
                if database == "postgresql":
                    lock.acquire()
                    shown = lock.connection.execute(text("SHOW tcp_keepalives_idle")).scalar()
                    keepalives.append(shown)
                    lock.release()
                run_until_done(found, objective, 3, lock)
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert [(t.number, t.state, t.value) for t in trials] == [
        (n, TrialState.COMPLETE, float(n)) for n in range(3)
    ]
    if database == "sqlite":
        assert (tmp_path / "optuna.db.lock").exists()
    else:  # the server ends a dead worker's session, and its lock, within about 25 s
        assert keepalives == ["10", "10"]


def test_a_worker_stopped_while_it_waits_for_the_lock_leaves_it_free(team):
    """SIGTERM (or ^C) while a worker waits for the PostgreSQL lock: its session must not go on
    waiting, and take the lock once the holder lets go, for as long as the process lives."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from pipeline.io import Terminated
    from pipeline.stages.tune import TrialLock

    url, name = team.client["OPTUNA_STORAGE"], f"stop-{uuid.uuid4().hex}"

    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGALRM, terminated)
    try:
        with TrialLock(url, name) as holder, TrialLock(url, name) as waiter:
            holder.acquire()
            signal.setitimer(signal.ITIMER_REAL, 0.5)  # while waiter waits for holder
            with pytest.raises(Terminated) as stopped:
                waiter.acquire()
            assert not waiter.held and waiter.connection is None
            holder.release()
            other = create_engine(url, poolclass=NullPool)
            with other.connect() as connection:
                free = text("SELECT pg_try_advisory_lock(:key)")
                assert connection.execute(free, {"key": holder.key}).scalar() is True
            other.dispose()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert stopped.type is Terminated
