"""Multi-process start-up: one process per host under `jax.distributed`.

On TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers by itself; elsewhere
(several CPU processes on one machine, for tests) pass the coordinator explicitly. CPU processes need the
gloo collectives, which must be chosen before the backend starts.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> None:
    """Starts `jax.distributed` when asked to by arguments or REPJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID.

    With no coordinator and no cluster environment this is a no-op: the run is single-process.
    """
    coordinator = coordinator or os.environ.get("REPJAX_COORDINATOR")
    if num_processes is None and "REPJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["REPJAX_NUM_PROCESSES"])
    if process_id is None and "REPJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["REPJAX_PROCESS_ID"])
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if coordinator is None:
        if os.environ.get("REPJAX_AUTO_DISTRIBUTED") == "1":  # TPU pod / SLURM auto-detection
            jax.distributed.initialize()
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects the CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
