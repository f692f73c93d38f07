"""Logging set-up for BMI's servers: one writer per log file, plus stderr.

Several processes must never rotate the same file (records get lost or garbled at
rollover), so every file has exactly ONE writing process:

* Einstein's supervisor owns ``<[logs] path>/ims.log``.  Its workers do not open it: each
  worker sends every formatted record as one datagram on a private Unix socket
  (:class:`LogReceiver`, a directory of mode 0700), and the supervisor writes it.  A
  datagram is sent whole or not at all, and no lock is shared between processes, so a
  worker killed mid-record cannot garble the file or wedge the others.
* Picasso writes ``<[logs] path>/picasso.log`` itself.

``[logs] format``: ``text`` (the default, :data:`FORMAT`) or ``json``: one JSON object per
line (``time`` (UTC, ISO 8601), ``component``, ``level``, ``logger``, ``message``, ``pid``, and
``exception`` with the traceback when there is one), for log shippers.  Workers format their
records themselves, so the supervisor's single file holds whole JSON lines in either format.

``[logs] max_bytes`` / ``backup_count`` set the rotation.  ``[logs] debug`` turns on DEBUG;
``[logs] verbose`` keeps DEBUG records on stderr too (otherwise stderr gets INFO and
above).  Records never carry credentials: operations log user names and BMI names only.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import socket
import sys
import tempfile
import threading
from datetime import UTC, datetime
from typing import Any

FORMAT = "%(asctime)s {component} %(levelname)s %(name)s: %(message)s"
EINSTEIN_LOG = "ims.log"
PICASSO_LOG = "picasso.log"
# A record longer than this is cut (a datagram has a size limit; tracebacks fit easily).
MAX_RECORD_BYTES = 60_000
# A worker waits at most this long for the supervisor to take a record (then drops it).
SEND_TIMEOUT_SECONDS = 5.0


class _Preformatted(logging.Formatter):
    """Writes records that arrived already formatted (from a worker) as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = getattr(record, "bmi_line", None)
        return text if isinstance(text, str) else super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside the message are escaped)."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        text = getattr(record, "bmi_line", None)
        if isinstance(text, str):
            return text  # a worker's record, formatted (as JSON) by the worker
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "component": self.component, "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(cfg: Any | None, component: str) -> logging.Formatter:
    """The formatter ``[logs] format`` asks for (text before the config is read)."""
    if cfg is not None and cfg.logs.format == "json":
        return JsonFormatter(component)
    return _Preformatted(FORMAT.format(component=component))


class DatagramLineHandler(logging.Handler):
    """Sends each formatted record as one datagram to the :class:`LogReceiver` at ``address``."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(SEND_TIMEOUT_SECONDS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.format(record).encode("utf-8", "replace")[:MAX_RECORD_BYTES]
            self.sock.sendto(data, self.address)
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        # The supervisor is gone (e.g. the worker drains after it died): the record still
        # went to stderr through the console handler, so do not add a traceback there.
        pass

    def close(self) -> None:
        self.sock.close()
        super().close()


class LogReceiver:
    """The single writer: receives worker records on a Unix datagram socket and hands them to ``handler``."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self._dir = tempfile.mkdtemp(prefix="bmi-log-")  # mode 0700: only this user can send
        self.address = os.path.join(self._dir, "sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._thread = threading.Thread(target=self._run, name="log-receiver", daemon=True)
        self._stopping = False

    def start(self) -> LogReceiver:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_RECORD_BYTES + 1024)
            except OSError:
                return
            if not data and self._stopping:
                return
            line = data.decode("utf-8", "replace")
            record = logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO",
                                            "name": "worker", "bmi_line": line})
            self.handler.handle(record)

    def stop(self) -> None:
        """Write what is queued, then close (call after the workers have exited)."""
        self._stopping = True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as wake:
                wake.sendto(b"", self.address)  # the empty datagram ends the loop after the backlog
        except OSError:
            pass
        self._thread.join(10)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def file_handler(cfg: Any, name: str, fmt: logging.Formatter) -> logging.Handler | None:
    """A rotating handler on ``<[logs] path>/<name>`` (None, with a warning, if it cannot be opened)."""
    try:
        os.makedirs(cfg.logs.path, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(os.path.join(cfg.logs.path, name),
                                                       maxBytes=cfg.logs.max_bytes,
                                                       backupCount=cfg.logs.backup_count, encoding="utf-8")
    except OSError as exc:
        logging.getLogger(__name__).warning("cannot write logs to %s: %s", cfg.logs.path, exc.strerror)
        return None
    handler.setFormatter(fmt)
    return handler


def setup(cfg: Any | None, component: str, file_name: str | None = EINSTEIN_LOG,
          forward_to: str | None = None) -> logging.Handler | None:
    """Configure the root logger for ``component`` (einstein, einstein.N, picasso).

    ``forward_to``: send records to that :class:`LogReceiver` address instead of opening a
    file (Einstein workers).  Otherwise ``file_name`` is opened in ``[logs] path`` (None: no
    file).  Returns the file handler, if one was opened.
    """
    fmt = formatter(cfg, component)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    debug = bool(cfg and cfg.logs.debug)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.DEBUG if cfg and cfg.logs.verbose else logging.INFO)
    root.addHandler(console)
    opened: logging.Handler | None = None
    if forward_to:
        forward = DatagramLineHandler(forward_to)
        forward.setFormatter(fmt)
        root.addHandler(forward)
    elif cfg is not None and file_name:
        opened = file_handler(cfg, file_name, fmt)
        if opened is not None:
            root.addHandler(opened)
    # Third-party chatter stays at WARNING even in debug mode.
    for noisy in ("Pyro4", "Pyro4.core", "urllib3", "waitress"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return opened
