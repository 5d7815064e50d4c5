"""N processes of one command on this machine's CPU, joined into one JAX system: the multi-host code path
(``jax.distributed``, host-sharded input, collective checkpoints) without a cluster.

  python launch/local_processes.py --num_processes=2 --devices_per_process=4 -- \\
      python -m midms_jax.train --config=configs/synthetic.py --workdir=runs/two_hosts

Process i runs the command given after ``--`` with ``--coordinator_address=<host>:<port> --num_processes=N
--process_id=i`` appended, ``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count=<k>`` in
``XLA_FLAGS`` (a mesh of N * k devices). The coordinator port is a free one unless ``--port`` names it. Every
output line (stdout and stderr) comes out prefixed with ``[i] ``. When a process fails, the others are killed
(they would wait for it until JAX's timeouts) and the exit status is the failed one's. SIGINT or SIGTERM to this
script sends SIGTERM to every process (training saves a checkpoint and stops); a second one kills them.
``--dry_run`` prints the N commands and starts nothing.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

import common

POLL_S = 0.1


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def process_commands(
    args: argparse.Namespace, command: Sequence[str], port: int
) -> list[common.Command]:
  """One command per process: the distributed flags appended, a CPU platform with k devices."""
  xla_flags = [
      flag
      for flag in os.environ.get("XLA_FLAGS", "").split()
      if not flag.startswith("--xla_force_host_platform_device_count")
  ]
  xla_flags.append(f"--xla_force_host_platform_device_count={args.devices_per_process}")
  env = dict(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(xla_flags), PYTHONUNBUFFERED="1")
  return [
      common.Command(
          (
              *command,
              f"--coordinator_address={args.host}:{port}",
              f"--num_processes={args.num_processes}",
              f"--process_id={i}",
          ),
          env,
      )
      for i in range(args.num_processes)
  ]


def _prefix_lines(index: int, stream: IO[str], lock: threading.Lock) -> None:
  for line in stream:
    with lock:
      sys.stdout.write(f"[{index}] {line}")
      sys.stdout.flush()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
  """``signum`` to the process and everything it started (e.g. data-loading workers)."""
  if process.poll() is None:
    try:
      os.killpg(process.pid, signum)
    except ProcessLookupError:
      pass


def run_processes(commands: Sequence[common.Command]) -> int:
  """Starts every command, streams their prefixed output and waits for all; the first failure's exit
  status."""
  lock = threading.Lock()
  processes: list[subprocess.Popen] = []
  for command in commands:
    try:  # each in its own session: signals reach it only through this script
      processes.append(
          subprocess.Popen(
              command.argv,
              env={**os.environ, **command.env},
              stdout=subprocess.PIPE,
              stderr=subprocess.STDOUT,
              text=True,
              errors="replace",
              start_new_session=True,
          )
      )
    except OSError as e:
      for process in processes:
        _signal_group(process, signal.SIGKILL)
      print(f"error: {command.argv[0]}: {e.strerror}", file=sys.stderr)
      return 127
  readers = [
      threading.Thread(target=_prefix_lines, args=(i, process.stdout, lock), daemon=True)
      for i, process in enumerate(processes)
  ]
  for reader in readers:
    reader.start()

  stops: list[int] = []

  def forward(signum: int, _) -> None:
    for process in processes:
      _signal_group(process, signal.SIGKILL if stops else signal.SIGTERM)
    stops.append(signum)

  previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
  status, running = 0, set(range(len(processes)))
  try:
    while running:
      for i in sorted(running):
        returncode = processes[i].poll()
        if returncode is None:
          continue
        running.discard(i)
        if returncode and not status:
          status = common.exit_status(returncode)
          print(
              f"error: process {i} exited with status {status}; killing the others",
              file=sys.stderr,
              flush=True,
          )
          for process in processes:
            _signal_group(process, signal.SIGKILL)
      time.sleep(POLL_S)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  for reader in readers:
    reader.join()
  return status


def make_parser() -> argparse.ArgumentParser:
  parser = common.ArgumentParser(
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      usage="%(prog)s [flags] -- command [args ...]",
  )
  parser.add_argument(
      "--num_processes", type=int, required=True, help="number of processes (simulated hosts)"
  )
  parser.add_argument(
      "--devices_per_process", type=int, default=1, help="CPU devices of each process"
  )
  parser.add_argument("--host", default="localhost", help="address of the coordinator (process 0)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument(
      "--dry_run", action="store_true", help="print the commands instead of running them"
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = make_parser()
  args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
  if not command:
    parser.error(
        "give the command to run after --, e.g. -- python -m midms_jax.train --config=... "
        "--workdir=..."
    )
  for name in ("num_processes", "devices_per_process"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be at least 1")
  if not 0 <= args.port < 65536:
    parser.error(f"--port={args.port} is not a port number")
  commands = process_commands(args, command, args.port or free_port())
  if args.dry_run:
    return common.run_commands(commands, dry_run=True)
  return run_processes(commands)


if __name__ == "__main__":
  sys.exit(main())
