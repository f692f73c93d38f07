"""The one way BMI runs an external command: an argument list, never a shell.

Modelled on oslo.concurrency's ``processutils.execute``: argv tuple, exit-code
contract, a timeout that kills and reaps the child, and masked logging.
"""
from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Iterable, Sequence

from ims.common.errors import CommandFailed

LOG = logging.getLogger(__name__)

_SECRET_RE = re.compile(r"(?i)(password|passwd|secret|key|token|chap[a-z]*)(=|\s+)(\S+)")


def mask(text: str) -> str:
    """Hide values that follow secret-looking keys."""
    return _SECRET_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


def execute(*cmd: str, timeout: float = 60.0, check_exit_code: int | Iterable[int] = 0,
            input_data: str | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None) -> tuple[str, str]:
    """Run ``cmd`` (an argument list) and return ``(stdout, stderr)``.

    :raises CommandFailed: on an unexpected exit code, a missing binary or a timeout.
    """
    argv: Sequence[str] = tuple(str(c) for c in cmd)
    allowed = {check_exit_code} if isinstance(check_exit_code, int) else set(check_exit_code)
    shown = mask(" ".join(argv))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
                                env=env, cwd=cwd, text=True)
    except OSError as exc:
        raise CommandFailed(f"cannot run {argv[0]}: {exc.strerror}", cmd=tuple(argv)) from exc
    try:
        out, err = proc.communicate(input=input_data, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise CommandFailed(f"{argv[0]} timed out after {timeout:.0f}s", cmd=tuple(argv)) from exc
    LOG.debug('CMD "%s" returned %s in %0.3fs', shown, proc.returncode, time.monotonic() - start)
    if proc.returncode not in allowed:
        raise CommandFailed(f"{argv[0]} failed (exit {proc.returncode}): {mask(err.strip() or out.strip())}",
                            cmd=tuple(argv), exit_code=proc.returncode, stdout=out, stderr=err)
    return out, err
