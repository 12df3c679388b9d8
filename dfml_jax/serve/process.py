"""Stopping a server started as a subprocess (``python -m dfml_jax.serve ...``, a KServe script).

Benchmarks and tests start teacher servers in their own processes; :func:`stop_server_process`
is their one teardown.

Example:
  >>> import subprocess, sys
  >>> proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  >>> stop_server_process(proc) != 0      # terminated by SIGTERM: a negative return code
  True
"""
from __future__ import annotations

import subprocess

__all__ = ["stop_server_process"]


def stop_server_process(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """Stops a server process: SIGTERM (uvicorn and KServe shut down cleanly on it), then SIGKILL
    if it has not exited within ``timeout`` seconds; waits for it either way (no zombie).

    Args:
      proc: the server's :class:`subprocess.Popen` (already exited is fine).
      timeout: seconds to wait after SIGTERM before SIGKILL.

    Returns:
      The process's return code (negative: killed by that signal).
    """
    proc.terminate()                     # a no-op if it has already exited
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
