"""slurm/*.sbatch under a real SLURM cluster: multi-node CPU training, preemption + requeue, the compare,
cv and tune arrays.

A private 2-node cluster (slurmctld, two slurmd, munged) is started on this machine for the
module by tests/slurm_cluster.py and torn down after it. Needs root; the slurm/munge packages
are installed with apt-get (.ci/install_slurm.sh) when missing. Outside CI the tests are skipped
when that is impossible (not root, no apt); with CI=true they fail instead.

About 4-8 minutes on 2 cores (7.5 measured on cores shared with other work; the cv case about 2):
run with `pytest -m slurm tests/test_slurm.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_installed  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one cluster, one worker

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
COMPARE_SBATCH = REPO / "slurm" / "compare.sbatch"
CV_SBATCH = REPO / "slurm" / "cv.sbatch"
TUNE_SBATCH = REPO / "slurm" / "tune.sbatch"
SMOKE = REPO / "configs" / "smoke.yaml"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
# Small and CPU-friendly (the tiny model of conftest.TINY_TRAIN_OVERRIDES); every run logs each optimizer step.
COMMON_OVERRIDES = ["model.name=shufflenet_v2_x0_5", "data.num_workers=0", "tracking.tracker=none",
                    "tracking.log_every_steps=1"]


def _cannot_run(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and the SLURM tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        _cannot_run("the SLURM tests start slurmd/munged and may apt-get install them: they need root")
    if shutil.which("apt-get") is None and not _installed():
        _cannot_run("slurm/munge are not installed and apt-get is not available")
    try:
        ensure_installed()
    except ClusterUnavailable as err:
        _cannot_run(str(err))
    c = SlurmCluster(nodes=2, cpus_per_node=1)
    try:
        c.start()  # any failure here is a real failure, also outside CI (it cleans up after itself)
    except ClusterUnavailable as err:
        shutil.rmtree(c.root, ignore_errors=True)
        pytest.fail(f"the local SLURM cluster did not start: {err}")
    yield c
    c.stop()
    left = c.marked_pids()
    shutil.rmtree(c.root, ignore_errors=True)
    assert not left, f"processes of the test cluster still alive after stop(): {left}"


def _installed() -> bool:
    from slurm_cluster import missing_binaries
    return not missing_binaries()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny synthetic dataset: 3 classes x 40 frames, stored at 80 px for 64 px crops."""
    root = tmp_path_factory.mktemp("slurm-data")
    env = _python_env()
    py = [sys.executable, "-m", "gastro_dist"]
    subprocess.run(py + ["synth", "--out", str(root / "raw"), "--per-class", "40", "--size-range", "160", "200",
                         "--workers", "1"], check=True, env=env, capture_output=True, cwd=root)
    subprocess.run(py + ["pack", str(root / "raw"), "--out", str(root / "shards"), "--val-fraction", "0.2",
                         "--resize-short", "80", "--input-size", "64", "--workers", "1"],
                   check=True, env=env, capture_output=True, cwd=root)
    return root / "shards"


@pytest.fixture(scope="module")
def fold_shards(shards) -> Path:
    """The same images packed with --folds 2 (and 5 test images per class)."""
    out = shards.parent / "shards-2fold"
    subprocess.run([sys.executable, "-m", "gastro_dist", "pack", str(shards.parent / "raw"), "--out", str(out),
                    "--folds", "2", "--test-per-class", "5", "--resize-short", "80", "--input-size", "64",
                    "--workers", "1"], check=True, env=_python_env(), capture_output=True, cwd=shards.parent)
    return out


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _job_env() -> dict[str, str]:
    """What a user would have in their shell at sbatch time."""
    env = dict(os.environ)
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["GASTRO_DIST_VENV"] = sys.prefix          # the documented way to pick the environment
    else:
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["WANDB_MODE"] = "disabled"
    env["CUDA_VISIBLE_DEVICES"] = ""                  # CPU processes even on a machine with GPUs
    env.pop("GASTRO_DIST_HOME", None)                 # found from the submitted script's path
    env.pop("GASTRO_DIST_PROCS_PER_NODE", None)
    return env


def _submit(cluster: SlurmCluster, workdir: Path, nodes: int, run: Path, shards: Path, overrides: list[str],
            **job_env: str) -> int:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)  # for the script's default --output=logs/%x-%j.out
    return cluster.sbatch(
        f"--nodes={nodes}", "--cpus-per-task=1", "--time=10",
        str(TRAIN_SBATCH), "--config", str(SMOKE), "--shards", str(shards), "--out", str(run),
        *COMMON_OVERRIDES, *overrides,
        cwd=workdir, env={**_job_env(), **job_env},
    )


def _log(workdir: Path, job_id: int) -> str:
    path = workdir / "logs" / f"gastro-train-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"<no log at {path}>"


def _train_events(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return [e for e in events if e.get("event") == "train"]


def _describe(cluster: SlurmCluster, workdir: Path, job_id: int) -> str:
    return f"job {job_id}: {cluster.job(job_id)}\n--- job log\n{_log(workdir, job_id)[-6000:]}"


def _wait(cluster: SlurmCluster, workdir: Path, job_id: int, timeout: float) -> dict[str, str]:
    """The job's final info; a job still running after `timeout` fails the test with its own log (and is cancelled)."""
    try:
        return cluster.wait_job(job_id, timeout=timeout)
    except TimeoutError:
        description = _describe(cluster, workdir, job_id)
        subprocess.run(["scancel", str(job_id)], check=False)
        raise AssertionError(f"not done after {timeout:.0f} s: {description}") from None


# ---------------------------------------------------------------- tests
def test_two_node_cpu_training(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, 2, run, shards,
                  ["head.epochs=1", "finetune.epochs=1", "data.batch_size=8"])
    info = _wait(cluster, tmp_path, job, timeout=240)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", _describe(cluster, tmp_path, job)
    assert info["ExitCode"] == "0:0", _describe(cluster, tmp_path, job)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["num_machines"] == 2, summary
    assert summary["world_size"] == 2, summary
    assert summary["resumes"] == [], summary
    for phase in ("head", "finetune"):
        assert summary["phases"][phase]["steps"] > 0, summary["phases"]
    assert (run / "model.safetensors").is_file()

    # One task per node, each launching one CPU process; both node ranks appear in the log.
    assert "2 node(s)" in log and "1 proc/node x 2 = 2 processes (CPU" in log, log
    assert "node rank 0/2 on" in log and "node rank 1/2 on" in log, log
    assert "(n1)" in log and "(n2)" in log, log
    assert "node rank 0: exit 0" in log and "node rank 1: exit 0" in log, log


def test_a_usage_error_ends_the_job_with_one_line_and_exit_2(cluster, shards, tmp_path):
    """train --check runs before the launcher: a bad override is one line in the log, exit 2, no traceback, no
    requeue, and no run folder."""
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, 2, run, shards, ["head.lr=fast"])
    info = _wait(cluster, tmp_path, job, timeout=120)
    log = _log(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", _describe(cluster, tmp_path, job)
    assert "head.lr" in log and "the check above failed" in log and "Traceback" not in log, log
    assert info["Restarts"] == "0" and not run.exists()


def test_two_node_deepspeed_zero2(cluster, shards, tmp_path):
    """The same script with GASTRO_DIST_ACCELERATE_CONFIG=launch/deepspeed_zero2.yaml: ZeRO-2 across nodes."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, 2, run, shards, ["head.epochs=1", "finetune.epochs=1", "data.batch_size=8"],
                  GASTRO_DIST_ACCELERATE_CONFIG=str(REPO / "launch" / "deepspeed_zero2.yaml"))
    info = _wait(cluster, tmp_path, job, timeout=540)  # DeepSpeed on two loaded CPU ranks: 1 to 4 minutes
    assert info["JobState"] == "COMPLETED", _describe(cluster, tmp_path, job)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_machines"] == 2 and summary["world_size"] == 2
    assert (ckpt_dir := next((run / "checkpoints").glob("state-1-finetune-*"))) and (ckpt_dir / "pytorch_model").is_dir()
    assert "deepspeed_zero2.yaml" in _log(tmp_path, job)


def test_usr1_preemption_requeues_and_resumes(cluster, shards, tmp_path):
    run = tmp_path / "run"
    # ~48 fine-tuning steps of a few hundredths of a second on two CPU ranks, a validation and a checkpoint each
    # epoch: 3 to 5 s (15 to 20 s in the whole suite's load), long enough to preempt in the middle.
    job = _submit(cluster, tmp_path, 2, run, shards,
                  ["head.epochs=1", "finetune.epochs=4", "data.batch_size=4"])
    deadline = time.monotonic() + 180
    while not any(e.get("phase") == "finetune" for e in _train_events(run)):
        state = cluster.job(job).get("JobState", "")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), _describe(cluster, tmp_path, job)
        assert time.monotonic() < deadline, "fine-tuning never started\n" + _describe(cluster, tmp_path, job)
        time.sleep(0.5)

    # What SLURM does at --signal=B:USR1@180, by hand: signal only the batch shell.
    cluster.cmd("scancel", "--signal=USR1", "--batch", str(job))
    # Requeued, it is PENDING then RUNNING again; the first terminal state is the final one.
    info = _wait(cluster, tmp_path, job, timeout=300)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", _describe(cluster, tmp_path, job)
    assert info["Restarts"] == "1", _describe(cluster, tmp_path, job)

    # The batch shell trapped USR1, the trainer checkpointed and stopped, the job requeued itself.
    assert "SIGUSR1: asking the trainer to checkpoint and stop" in log, log
    assert "summary status 'preempted'" in log, log
    assert f"scontrol requeue {job}" in log, log
    assert "restart 0 |" in log and "restart 1 |" in log, log

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["num_machines"] == 2 and summary["world_size"] == 2, summary
    assert len(summary["resumes"]) == 1, summary["resumes"]
    resume = summary["resumes"][0]
    assert resume["phase"] == "finetune", resume

    # No optimizer step done twice and none skipped: every step is logged (log_every_steps=1),
    # (epoch, step) strictly increases within each phase and the count matches the phase's steps.
    events = _train_events(run)
    for phase in ("head", "finetune"):
        positions = [(e["epoch"], e["step"]) for e in events if e["phase"] == phase]
        assert all(a < b for a, b in zip(positions, positions[1:])), f"{phase}: {positions}"
        assert len(positions) == summary["phases"][phase]["steps"] > 0, (phase, positions, summary["phases"][phase])
    finetune = [(e["epoch"], e["step"]) for e in events if e["phase"] == "finetune"]
    # Work was done both before and after the preemption.
    before = [p for p in finetune if p <= (resume["epoch"] + 1, resume["step"])]
    assert before and len(before) < len(finetune), (resume, finetune)


def test_plain_scancel_does_not_requeue(cluster, shards, tmp_path):
    """One node, one process (plain `accelerate launch`); SIGTERM from scancel must not requeue."""
    run = tmp_path / "run"
    job = _submit(cluster, tmp_path, 1, run, shards,
                  ["head.epochs=1", "finetune.epochs=3", "data.batch_size=4"])
    deadline = time.monotonic() + 180
    while not _train_events(run):
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            _describe(cluster, tmp_path, job)
        assert time.monotonic() < deadline, "training never started\n" + _describe(cluster, tmp_path, job)
        time.sleep(0.5)
    cluster.cmd("scancel", str(job))
    info = _wait(cluster, tmp_path, job, timeout=120)
    assert info["JobState"] == "CANCELLED", _describe(cluster, tmp_path, job)
    time.sleep(3)  # a wrongly requeued job would show up as PENDING/RUNNING again by now
    info = cluster.job(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", _describe(cluster, tmp_path, job)
    assert "1 proc/node x 1 = 1 process" in log, log
    assert "will NOT requeue" in log and "scontrol requeue" not in log, log


def test_compare_array_one_config_per_task(cluster, shards, tmp_path):
    """compare.sbatch: array task i trains config i into OUT/<stem>; both tasks run side by side."""
    configs = []
    for name in ("r18a", "r18b"):
        path = tmp_path / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        shutil.copy(SMOKE, path)
        configs.append(path)
    out = tmp_path / "compare"
    (tmp_path / "logs").mkdir()
    array = cluster.sbatch(
        "--array=0-1", "--cpus-per-task=1", "--time=10",
        str(COMPARE_SBATCH), "--configs", *map(str, configs), "--shards", str(shards), "--out", str(out),
        *COMMON_OVERRIDES, "head.epochs=1", "finetune.epochs=1", "data.batch_size=16", "max_steps_per_epoch=2",
        cwd=tmp_path, env=_job_env(),
    )
    for task, name in enumerate(("r18a", "r18b")):
        info = cluster.wait_job(f"{array}_{task}", timeout=240)
        log_path = tmp_path / "logs" / f"gastro-compare-{array}_{task}.out"
        log = log_path.read_text(errors="replace") if log_path.is_file() else f"<no log at {log_path}>"
        assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
        assert f"array task {task}/2: {configs[task]} -> {out / name}" in log, log
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert summary["phases"]["head"]["steps"] == summary["phases"]["finetune"]["steps"] == 2, summary["phases"]
        assert json.loads((out / name / "summary.json").read_text())["model"] == "shufflenet_v2_x0_5"


def test_cv_array_one_fold_per_task_then_the_summary(cluster, fold_shards, tmp_path):
    """cv.sbatch: array task N trains fold N and evaluates it; the task that ends last writes cv.json.
    Submitted again, a finished fold is neither trained nor evaluated again."""
    out = tmp_path / "cv"
    (tmp_path / "logs").mkdir()
    args = ["--config", str(SMOKE), "--shards", str(fold_shards), "--out", str(out), "--bootstrap", "20",
            "--no-track", *COMMON_OVERRIDES, "head.epochs=1", "finetune.epochs=1", "data.batch_size=16",
            "max_steps_per_epoch=2"]

    def start(tasks: list[int]) -> int:
        return cluster.sbatch(f"--array={','.join(map(str, tasks))}", "--cpus-per-task=1", "--time=10",
                              str(CV_SBATCH), *args, cwd=tmp_path, env=_job_env())

    def log_of(job: int, task: int) -> str:
        path = tmp_path / "logs" / f"gastro-cv-{job}_{task}.out"
        return path.read_text(errors="replace") if path.is_file() else f"<no log at {path}>"

    def submit(tasks: list[int]) -> list[str]:
        """Submit the array tasks (folds) `tasks`, wait for them; returns their logs."""
        job = start(tasks)
        for task in tasks:
            info = cluster.wait_job(f"{job}_{task}", timeout=300)
            assert info["JobState"] == "COMPLETED", f"{info}\n{log_of(job, task)[-6000:]}"
        return [log_of(job, task) for task in tasks]

    logs = submit([0, 1])
    for fold, log in enumerate(logs):
        assert f"array task {fold}: fold {fold} of 2 -> {out / f'fold-{fold}'}" in log, log
        assert f"gastro-dist cv --folds {fold}" in log and "evaluation finished with status 0" in log, log
        summary = json.loads((out / f"fold-{fold}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["fold"] == fold, summary
        assert summary["phases"]["head"]["steps"] == summary["phases"]["finetune"]["steps"] == 2, summary["phases"]
    assert any(f"cross-validation: {out / 'cv.md'}" in log for log in logs), logs
    result = json.loads((out / "cv.json").read_text())
    assert result["num_folds"] == 2 and [row["fold"] for row in result["folds"]] == [0, 1]
    assert result["out_of_fold"]["num_samples"] == result["out_of_fold"]["num_listed"] > 0
    assert result["ensemble_test"]["num_samples"] == 15  # 5 test images per class

    events = (out / "fold-0" / "metrics.jsonl").read_text()
    (log,) = submit([0])
    assert "fold 0 is already trained" in log and "fold 0 already trained and evaluated" in log, log
    assert f"cross-validation: {out / 'cv.md'}" in log, log
    assert (out / "fold-0" / "metrics.jsonl").read_text() == events

    # SIGUSR1 while a task evaluates (what SLURM sends before the time limit): the evaluation stops, the task
    # requeues itself, and the restarted task evaluates the fold without training it.
    (out / "fold-1" / "cv-fold.json").unlink()
    job = start([1])
    deadline = time.monotonic() + 120
    while "fold 1: evaluating it" not in log_of(job, 1):
        assert cluster.job(f"{job}_1").get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log_of(job, 1)
        assert time.monotonic() < deadline, "the evaluation never started\n" + log_of(job, 1)
        time.sleep(0.2)
    cluster.cmd("scancel", "--signal=USR1", "--batch", f"{job}_1")
    info = cluster.wait_job(f"{job}_1", timeout=300)
    log = log_of(job, 1)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-6000:]}"
    assert "SIGUSR1 while evaluating: stopping it and requeueing" in log, log
    assert log.count("fold 1 is already trained") == 2 and "evaluation finished with status 0" in log, log
    assert (out / "fold-1" / "cv-fold.json").is_file()


def test_two_task_array_shares_one_study_and_survives_a_preempted_task(cluster, shards, tmp_path):
    """tune.sbatch: 2 array tasks, each a worker of 2 processes under accelerate launch (the launch a task
    with 2 GPUs gets), 3 trials. Task 0 gets SIGUSR1 while its first trial trains: the trial checkpoints, is
    queued again once, the task requeues itself, and the study ends with exactly 3 finished or pruned trials,
    no trial number twice, each trained by 2 processes."""
    from test_tune import SMALL_SPACE, load_results, write_space

    from gastro_dist.cli import main

    out = tmp_path / "study"
    (tmp_path / "logs").mkdir()
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    array = cluster.sbatch("--array=0-1", "--cpus-per-task=1", "--time=10", str(TUNE_SBATCH),
                           "--config", str(SMOKE), "--shards", str(shards), "--out", str(out),
                           "--trials", "3", "--space", str(space), "--pruner", "none",
                           *COMMON_OVERRIDES, "head.epochs=1", "finetune.epochs=3", "data.batch_size=4",
                           cwd=tmp_path, env={**_job_env(), "PYTHONUNBUFFERED": "1", "GASTRO_DIST_PROCS_PER_NODE": "2"})
    log0 = tmp_path / "logs" / f"gastro-tune-{array}_0.out"
    deadline = time.monotonic() + 240
    while "head epoch 1/1:" not in (log0.read_text(errors="replace") if log0.is_file() else ""):
        assert time.monotonic() < deadline, f"task 0 never finished its first trial's head epoch: {cluster.job(f'{array}_0')}"
        time.sleep(0.3)
    cluster.cmd("scancel", "--signal=USR1", "--batch", f"{array}_0")
    for task in (0, 1):
        info = cluster.wait_job(f"{array}_{task}", timeout=300)
        log = (tmp_path / "logs" / f"gastro-tune-{array}_{task}.out").read_text(errors="replace")
        assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    log = log0.read_text(errors="replace")
    assert "2 processes per trial (CPU" in log and "accelerate launch --multi_gpu" in log, log
    assert "a trial checkpointed after the preemption request" in log and "scontrol requeue" in log, log
    assert main(["tune", "--config", str(SMOKE), "--shards", str(shards), "--out", str(out),
                 "--trials", "3", "--space", str(space), "--pruner", "none", *COMMON_OVERRIDES,
                 "head.epochs=1", "finetune.epochs=3", "data.batch_size=4"]) == 0
    trials = load_results(out)["trials"]
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t["state"] in ("complete", "pruned") for t in trials) == 3
    retried = [t for t in trials if "retry_of" in t]
    assert len(retried) == 1 and retried[0]["state"] == "complete"
    for trial in trials:
        assert json.loads((Path(trial["run_dir"]) / "summary.json").read_text())["world_size"] == 2
