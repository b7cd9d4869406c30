"""Multi-process start-up: one process per host under `jax.distributed`.

On TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers by itself; elsewhere
(several CPU processes on one machine, for tests) pass the coordinator explicitly. CPU processes need the
gloo collectives, which must be chosen before the backend starts.

Start-up has a time limit (`--init_timeout`, seconds). With an explicit coordinator, the processes first meet
in a small TCP rendezvous on the coordinator's address (`rendezvous`): when peers are missing after the
limit, process 0 says which ones and every process exits with a one-line `StartupError`, instead of JAX's
coordination client aborting with a C++ stack. The port is then released and JAX's own service takes it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import jax

DEFAULT_TIMEOUT = 300  # seconds, as jax.distributed.initialize


class StartupError(RuntimeError):
    """The processes of a multi-process run did not all arrive in time."""


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(f"--coordinator must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def rendezvous(coordinator: str, num_processes: int, process_id: int, timeout: float) -> None:
    """All `num_processes` processes meet at `coordinator` (host:port) or raise StartupError within `timeout`.

    Process 0 listens on the port and collects each peer's id; once all are there it answers "go". If the
    limit passes first, it names the missing process ids (and tells the waiting peers so). A peer that cannot
    reach process 0, or gets no answer, says so.
    """
    if not 0 <= process_id < num_processes:
        raise StartupError(f"--process_id {process_id} is not in [0, {num_processes})")
    host, port = _split(coordinator)
    deadline = time.monotonic() + timeout
    if process_id == 0:
        _gather(port, num_processes, deadline, timeout)
    else:
        _join(host, port, process_id, deadline, timeout)


def _gather(port: int, num_processes: int, deadline: float, timeout: float) -> None:
    peers: dict[int, socket.socket] = {}
    with socket.create_server(("", port), reuse_port=False) as server:
        try:
            while len(peers) < num_processes - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, num_processes)) - set(peers))
                    message = (f"processes {missing} of {num_processes} did not arrive within {timeout:g} s "
                               f"(arrived: {[0, *sorted(peers)]}); check their hosts, --coordinator, "
                               "--num_processes, --process_id, or raise --init_timeout")
                    for conn in peers.values():
                        _send(conn, f"abort {message}")
                    raise StartupError(message)
                server.settimeout(min(left, 1.0))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    peer = int(conn.makefile().readline().strip())
                except (OSError, ValueError):
                    conn.close()
                    continue
                if peer in peers or not 0 < peer < num_processes:
                    _send(conn, f"abort process id {peer} is taken or not in [1, {num_processes})")
                    conn.close()
                    continue
                peers[peer] = conn
            for conn in peers.values():
                _send(conn, "go")
            for conn in peers.values():  # peers close first: no TIME_WAIT on this port for JAX's service
                conn.settimeout(5.0)
                with contextlib.suppress(OSError):
                    conn.recv(1)
        finally:
            for conn in peers.values():
                conn.close()


def _join(host: str, port: int, process_id: int, deadline: float, timeout: float) -> None:
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.1))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise StartupError(f"process {process_id}: process 0 at {host}:{port} did not answer within "
                                   f"{timeout:g} s; is it running, and is --coordinator its address?") from None
            time.sleep(0.2)
    with conn:
        conn.sendall(f"{process_id}\n".encode())
        conn.settimeout(max(deadline - time.monotonic(), 0.0) + 5.0)  # process 0 answers at its deadline
        try:
            reply = conn.makefile().readline().strip()
        except OSError:
            reply = ""
    if reply != "go":
        raise StartupError(f"process {process_id}: start-up failed: "
                           + (reply.removeprefix("abort ") or f"no answer from process 0 within {timeout:g} s"))


def _send(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((line + "\n").encode())


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> None:
    """Starts `jax.distributed` when asked to by arguments or REPJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID.

    With no coordinator and no cluster environment this is a no-op: the run is single-process. `timeout`
    bounds the start-up (see the module docstring); StartupError names the processes that are missing.
    """
    if timeout <= 0:
        raise StartupError(f"--init_timeout must be > 0 seconds, got {timeout}")
    coordinator = coordinator or os.environ.get("REPJAX_COORDINATOR")
    if num_processes is None and "REPJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["REPJAX_NUM_PROCESSES"])
    if process_id is None and "REPJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["REPJAX_PROCESS_ID"])
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if coordinator is None:
        if os.environ.get("REPJAX_AUTO_DISTRIBUTED") == "1":  # TPU pod / SLURM auto-detection
            jax.distributed.initialize(initialization_timeout=int(timeout))
        return
    if num_processes is None or process_id is None:
        raise StartupError("--coordinator needs --num_processes and --process_id")
    if num_processes > 1:
        rendezvous(coordinator, num_processes, process_id, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects the CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout))
