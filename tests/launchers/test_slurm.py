"""launch/slurm_multigpu_qlora.sbatch with stub `srun`/`scontrol`: topology from SLURM's variables,
the launcher per node, and a requeue when SLURM signals a time limit (USR1) or preemption (TERM)."""
import os
import signal
import subprocess
import time

import pytest

from conftest import REPO

STUB_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "$@" >> "$STUB_LOG/scontrol.txt"
"""
STUB_SRUN = """#!/usr/bin/env bash
trap 'echo TERM > "$STUB_LOG/step_signal.txt"; exit 75' TERM   # a real step saves, then exits 75
{ echo "ARGS $*"; echo "MASTER_ADDR=$MASTER_ADDR NNODES=$NNODES NPROC=$NPROC"; } > "$STUB_LOG/srun.txt"
sleep 60 &
wait
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["time-limit", "preemption"])
def test_sbatch_template_requeues_on_signal(tmp_path, sig):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", STUB_SCONTROL), ("srun", STUB_SRUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(tmp_path), SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="qlora", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO))
    log = open(tmp_path / "job.log", "w")  # a file, not a pipe: the stub's `sleep` would hold a pipe open
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm_multigpu_qlora.sbatch"), "--max_steps", "10"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(100):
            if (tmp_path / "srun.txt").is_file() and "NPROC" in (tmp_path / "srun.txt").read_text():
                break
            time.sleep(0.1)
        srun = (tmp_path / "srun.txt").read_text()
        assert "MASTER_ADDR=node-a NNODES=2 NPROC=4" in srun
        assert "launch/multigpu_qlora.sh" in srun and "runs/qlora-4242" in srun and "--max_steps 10" in srun
        job.send_signal(sig)
        job.wait(timeout=20)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # the stub's `sleep`, if anything is left
        except ProcessLookupError:
            pass
        log.close()
    out = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, out
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out
    assert (tmp_path / "step_signal.txt").read_text().strip() == "TERM"  # the step was told to checkpoint first


@pytest.mark.parametrize("step_exit, requeued", [(75, True), (1, False), (0, False)],
                         ids=["step-saved-and-asked-for-requeue", "step-failed", "step-finished"])
def test_sbatch_requeues_only_a_step_that_exits_75(tmp_path, step_exit, requeued):
    """A step whose ranks were signalled directly (SLURM preemption sends SIGTERM to the tasks too) saves,
    exits 75 through launch/multigpu_qlora.sh, and the job is requeued; a failed or finished step is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", STUB_SCONTROL), ("srun", f"#!/usr/bin/env bash\nexit {step_exit}\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(tmp_path), SLURM_JOB_ID="77",
               SLURM_JOB_NAME="qlora", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node-a", SLURM_SUBMIT_DIR=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_multigpu_qlora.sbatch")], env=env,
                          capture_output=True, text=True, timeout=60)
    requeue_log = tmp_path / "scontrol.txt"
    if requeued:
        assert proc.returncode == 0 and requeue_log.read_text().split() == ["requeue", "77"], proc.stdout
        assert "step exited 75: requeueing job 77" in proc.stdout
    else:
        assert proc.returncode == step_exit and not requeue_log.exists(), proc.stdout
