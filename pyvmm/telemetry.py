"""Metrics and logs: how the VMM reports on itself (Firecracker's /metrics and /logger).

Metrics are newline-delimited JSON to a file or FIFO, one line per flush with
the counters of the period since the previous line; logs are Python logging
records, formatted as Firecracker's, to a file or FIFO.  Nothing is logged
anywhere until a logger is configured, as in Firecracker.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

from pyvmm import seccomp
from pyvmm.config import Logger
from pyvmm.host_files import open_output

METRICS_PERIOD = 60.0                     # seconds, as in Firecracker


def _write_line(fd: int, line: str) -> bool:
    try:
        os.write(fd, line.encode() + b"\n")
        return True
    except OSError:
        return False            # a full FIFO nobody reads, a full disk...: drop the line


def _delta(now: Any, before: Any) -> Any:
    """Counters since the last flush (Firecracker's metrics are per-period deltas)."""
    if isinstance(now, dict):
        before = before if isinstance(before, dict) else {}
        return {k: _delta(v, before.get(k)) for k, v in now.items()}
    if isinstance(now, list):
        before = before if isinstance(before, list) else []
        return [_delta(v, before[i] if i < len(before) else None) for i, v in enumerate(now)]
    if isinstance(now, (int, float)) and not isinstance(now, bool) and \
            isinstance(before, (int, float)):
        return now - before
    return now


def metrics_from_stats(stats: dict, api_counters: dict[str, int]) -> dict:
    """The VM's counters (LinuxVm.stats()) in the shape of a metrics line."""
    per_vcpu = stats.get("vcpus", [])
    devices = {name: {"requests": count} for name, count in stats.get("devices", {}).items()}
    if "serial" in devices:
        devices["serial"]["tx_bytes"] = stats.get("serial_tx_bytes", 0)
    for name, counters in stats.get("virtio", {}).items():      # bytes, requests...
        devices.setdefault(name[:23], {}).update(counters)
    extra = {k: v for k, v in stats.items()
             if k not in ("vcpus", "devices", "serial_tx_bytes", "virtio")}
    return {"vcpus": [{"exits": counts} for counts in per_vcpu], "devices": devices,
            **extra, "api_server": dict(api_counters)}


class MetricsWriter:
    """Newline-delimited JSON to a file or FIFO: one line per flush, with the counters
    of the period since the previous line.  counters() gives the current totals,
    header() the fields every line starts with (the VM's id and state)."""

    def __init__(self, path: str, counters: Callable[[], dict],
                 header: Callable[[], dict]) -> None:
        self.fd = open_output(path, "metrics file")
        self.counters = counters
        self.header = header
        self.last: dict = {}
        self.lock = threading.Lock()
        self.lines = self.dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seccomp: seccomp.Policy | None = None     # the thread's "metrics" filter

    def flush(self) -> None:
        with self.lock:
            if self.fd < 0:
                return
            now = self.counters()
            line = {"utc_timestamp_ms": int(time.time() * 1000), **self.header(),
                    **_delta(now, self.last)}
            self.last = now
            if _write_line(self.fd, json.dumps(line, separators=(",", ":"))):
                self.lines += 1
            else:
                self.dropped += 1

    def start_periodic(self, period: float = METRICS_PERIOD) -> None:
        def loop() -> None:
            seccomp.enter_thread("metrics", self.seccomp)
            while not self._stop.wait(period):
                self.flush()
        self._thread = threading.Thread(target=loop, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


LEVELS = {"Error": logging.ERROR, "Warning": logging.WARNING, "Info": logging.INFO,
          "Debug": logging.DEBUG, "Trace": 5, "Off": logging.CRITICAL + 10}


class _FdHandler(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.fd, self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the VMM
            pass

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def log_handler(config: Logger, vm_id: str) -> logging.Handler | None:
    """A handler for the "pyvmm" logger as the logger section says (None: no log_path)."""
    if config.log_path is None:
        return None
    handler = _FdHandler(open_output(config.log_path, "log file"))
    parts = f"{vm_id}:%(threadName)s" + (":%(levelname)s" if config.show_level else "") + \
        (":%(pathname)s:%(lineno)d" if config.show_log_origin else "")
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{parts}] %(message)s"))
    handler.setLevel(LEVELS[config.level])
    if config.module:
        handler.addFilter(logging.Filter(config.module))
    return handler
