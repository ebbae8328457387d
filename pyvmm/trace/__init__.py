"""The exit trace: every KVM exit of every vCPU recorded from the C loop into a file
(TraceRecorder, `pyvmm run --trace FILE`), then summarised (`pyvmm trace FILE`):
exits by reason and over time, the busiest ports and addresses, handler latency per
device, and a plot.  docs/trace.md has the file format and the design.

    from pyvmm.trace import format_summary, iter_exits, load_summary
    print(format_summary(load_summary("boot.trace")))
    writes = [e for e in iter_exits("boot.trace") if e.device == "serial" and e.is_write]
"""
from __future__ import annotations

from pyvmm.trace.fileformat import (ExitRecord, TraceError, TraceFooter, TraceHeader,
                                    iter_exits)
from pyvmm.trace.summary import (LatencyHistogram, TraceSummary, format_summary, load_summary,
                                 summarize_bytes)

__all__ = ["ExitRecord", "LatencyHistogram", "TraceError", "TraceFooter", "TraceHeader",
           "TraceSummary", "format_summary", "iter_exits", "load_summary", "summarize_bytes"]
