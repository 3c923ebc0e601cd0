"""The deployment recipes: the Kubernetes Indexed Job and the Slurm array run command lines that
``pipeline`` accepts (its real argument parser), with retries that never repeat a config error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import Shard
from pipeline.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "deploy" / "kubernetes" / "indexed-job.yaml"
ARRAY = ROOT / "deploy" / "slurm" / "array.sh"


def job() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(JOB.read_text()) if d and d.get("kind") == "Job"]
    return doc  # type: ignore[no-any-return]


def test_the_indexed_job_runs_a_command_pipeline_accepts() -> None:
    """The container's command line parses with ``pipeline``'s own parser, and its --shard auto/N
    gives every index of the Job a shard, N being the Job's completions and P its parallelism."""
    spec = job()["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    argv = [*container["command"], *container["args"]]
    assert argv[0] == "pipeline"
    env = {e["name"] for e in container["env"]}
    # $(VAR) is Kubernetes' expansion of the container's own variables.
    for name in re.findall(r"\$\((\w+)\)", " ".join(argv)):
        assert name in env
    args = _parser().parse_args([re.sub(r"\$\((\w+)\)", "x", a) for a in argv[1:]])
    assert args.command == "run"
    assert args.parallel == spec["parallelism"]
    shards = [Shard.parse(args.shard, {"JOB_COMPLETION_INDEX": str(i)}) for i in range(spec["completions"])]
    assert shards == [Shard(i, spec["completions"]) for i in range(spec["completions"])]


def test_the_indexed_job_never_retries_a_config_error() -> None:
    """Exit 2 fails its index at once (FailIndex); other failures are retried per index; a
    disruption (preemption) is not counted; pods are not restarted in place (a policy needs it),
    and SIGTERM gets more than the default grace period of 30 s."""
    spec = job()["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["backoffLimitPerIndex"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailIndex"]
    assert fail == [
        {"action": "FailIndex", "onExitCodes": {"containerName": "pipeline", "operator": "In", "values": [2]}}
    ]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] > 30


@pytest.fixture
def slurm(tmp_path: Path) -> dict[str, Any]:
    """A PATH whose ``srun`` runs its command and whose ``pipeline`` records its argv and exits
    with the next code of ``codes``: the real array.sh, run by the real bash."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    codes = tmp_path / "codes"
    (bindir / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bindir / "pipeline").write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"codes = open({str(codes)!r}).read().split()\n"
        f"open({str(codes)!r}, 'w').write(' '.join(codes[1:]))\n"
        "sys.exit(int(codes[0]))\n"
    )
    for name in ("srun", "pipeline"):
        (bindir / name).chmod(0o755)
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_ARRAY_JOB_ID": "777",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "RETRY_DELAY": "0",
    }
    return {"env": env, "log": log, "codes": codes, "cwd": tmp_path}


def run_array(slurm: dict[str, Any], codes: list[int]) -> tuple[int, list[list[str]]]:
    slurm["codes"].write_text(" ".join(map(str, codes)))
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, str(ARRAY)], env=slurm["env"], cwd=slurm["cwd"], capture_output=True, text=True, timeout=30
    )
    calls = (
        [json.loads(line) for line in slurm["log"].read_text().splitlines()] if slurm["log"].exists() else []
    )
    return done.returncode, calls


def test_the_array_runs_a_command_pipeline_accepts(slurm: dict[str, Any]) -> None:
    """The task's command line parses with ``pipeline``'s parser; its shard is the task's, out
    of the array's size, and its --parallel is the array's %P."""
    code, calls = run_array(slurm, [0])
    assert code == 0
    (argv,) = calls
    args = _parser().parse_args(argv)
    assert (args.command, args.run_id) == ("run", "nightly-images-777")
    assert Shard.parse(args.shard, slurm["env"]) == Shard(3, 4)
    (array,) = re.findall(r"^#SBATCH --array=0-(\d+)%(\d+)$", ARRAY.read_text(), flags=re.MULTILINE)
    assert (int(array[0]) + 1, int(array[1])) == (4, args.parallel)
    assert "#SBATCH --requeue" in ARRAY.read_text()


def test_the_array_never_retries_a_config_error(slurm: dict[str, Any]) -> None:
    """Exit 2: one attempt, and the task exits 2."""
    code, calls = run_array(slurm, [2, 0])
    assert code == 2
    assert len(calls) == 1


def test_the_array_retries_a_failed_run_with_retry_failed(slurm: dict[str, Any]) -> None:
    """Exit 1, 1, then 0: three attempts, the later ones with --retry-failed, and exit 0."""
    code, calls = run_array(slurm, [1, 1, 0])
    assert code == 0
    assert ["--retry-failed" in c for c in calls] == [False, True, True]


def test_the_array_gives_up_after_max_attempts(slurm: dict[str, Any]) -> None:
    """Exit 1 every time: MAX_ATTEMPTS (3) attempts, then the task exits 1."""
    code, calls = run_array(slurm, [1, 1, 1, 0])
    assert (code, len(calls)) == (1, 3)


def test_the_array_leaves_an_interrupted_task_to_the_requeue(slurm: dict[str, Any]) -> None:
    """Exit 143 (SIGTERM drained): no retry here; the task exits 143 for Slurm's requeue."""
    code, calls = run_array(slurm, [143, 0])
    assert (code, len(calls)) == (143, 1)
