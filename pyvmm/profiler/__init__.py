"""The guest profiler: sample every vCPU's RIP and ring from the host while the
guest runs (GuestProfiler, `pyvmm run --profile-guest FILE`), then say where the
guest kernel spent its time (report(), `pyvmm profile FILE --symbols System.map`).
docs/profiler.md has the file format and the design.

    from pyvmm.profiler import Symbols, format_report, load_profile, report
    print(format_report(report(load_profile("boot.prof"),
                               Symbols.from_system_map("System.map"))))
"""
from __future__ import annotations

from pyvmm.profiler.fileformat import (Profile, ProfileError, ProfileHeader, Sample,
                                       load_profile, parse_profile)
from pyvmm.profiler.report import Phase, Report, folded, format_report, report
from pyvmm.profiler.symbols import Symbols

__all__ = ["Phase", "Profile", "ProfileError", "ProfileHeader", "Report", "Sample", "Symbols",
           "folded", "format_report", "load_profile", "parse_profile", "report"]
