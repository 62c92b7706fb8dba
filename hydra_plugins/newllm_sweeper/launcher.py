"""`sweeps/on_slurm.yaml`'s launcher: hydra-submitit-launcher's SlurmLauncher, except for jobs that die.

Upstream collects a batch with `[job.results()[0] for job in jobs]`: the first job that died without
writing a result (scancel, kill -9, its time limit, out of memory, a node failure) raises there, so the
sweeper failed every trial of the batch while the other jobs went on running unwatched and their results
were lost. Here every job of the batch is waited for, and one that died is a FAILED JobReturn of its own
trial (`JobDied`), which the sweeper replaces like any failed trial. If the sweep process itself is
stopped (Ctrl-C) while it waits, the batch's jobs that are still queued or running are cancelled.

submitit learns that a job ended from `sacct` (SLURM accounting): without accounting, a dead job is
polled forever (tests/cluster/slurm-up.sh starts slurmdbd for this).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from newllm.errors import JobDied

log = logging.getLogger(__name__)
EXECUTOR_INIT_KEYS = ("max_num_timeout", "python")  # submitit.AutoExecutor(slurm_<key>=...), as upstream


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and job_overrides
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        try:
            return [_outcome(job, overrides) for job, overrides in zip(jobs, job_overrides, strict=True)]
        except BaseException:  # the sweep process is stopping: leave no job of this batch behind
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            raise

    def _executor(self) -> Any:
        """submitit's AutoExecutor with this launcher's parameters, translated as upstream does."""
        import submitit  # lazily, as upstream: plugin discovery stays fast

        init = {"folder": self.params["submitit_folder"],
                **{f"slurm_{k}": v for k, v in self.params.items() if k in EXECUTOR_INIT_KEYS}}
        executor = submitit.AutoExecutor(cluster="slurm", **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in self.params.items()
                                      if k not in {*EXECUTOR_INIT_KEYS, "submitit_folder"}})
        return executor


def _outcome(job: Any, overrides: Sequence[str]) -> JobReturn:
    """The job's JobReturn, or a FAILED one when it ended without a result. (An error raised in the job but
    outside the run, FailedJobError, still stops the sweep: it is the launcher's, and every job would meet it.)"""
    import submitit

    try:
        return job.results()[0]
    except submitit.core.utils.UncompletedJobError:
        died = JobDied(f"SLURM job {job.job_id} ended {job.state} without a result (its log: {job.paths.stderr})")
        log.warning("%s", died)
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=died)
