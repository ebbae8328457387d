"""Prints the filter tables of docs/seccomp.md from pyvmm/seccomp/default.json:

    python3 -m pyvmm.seccomp.doc      # paste over the doc's "The filters" section
"""
from __future__ import annotations

import json

from pyvmm import seccomp


def tables() -> str:
    data = json.loads(seccomp.DEFAULT_FILTER.read_text())
    policy = seccomp.load()
    groups = data["groups"]
    reasons: dict[str, str] = {}
    for group in groups.values():
        for name, why in group.get("syscalls", {}).items():
            reasons.setdefault(name, why)
    out = ["### Groups", "", "| group | what for | system calls |", "|---|---|---|"]
    for name, group in groups.items():
        calls = ", ".join(sorted(group.get("syscalls", {})))
        extra = []
        if group.get("ioctl"):
            extra.append(f"ioctl: {', '.join(sorted(group['ioctl']))}")
        if group.get("socket"):
            extra.append(f"socket: {', '.join(group['socket'])}")
        if group.get("open"):
            extra.append(f"open/openat: {group['open']}")
        included = f"(includes {', '.join(group['include'])}) " if group.get("include") else ""
        out.append(f"| `{name}` | {group.get('comment', '')} | {included}{calls}"
                   f"{'; ' if calls and extra else ''}{'; '.join(extra)} |")
    out += ["", "### Threads", ""]
    for kind in seccomp.THREAD_KINDS:
        entry, compiled = data["threads"][kind], policy.threads[kind]
        out += [f"#### {kind}", "",
                f"{entry.get('comment', '')} Includes: "
                f"{', '.join(entry.get('include', [])) or 'nothing'}; "
                f"{len(compiled.syscalls)} system calls, {len(compiled.ioctls)} ioctl requests, "
                f"socket: {', '.join(compiled.families) or 'none'}, "
                f"open: {compiled.open or 'none'}.", ""]
        own, own_ioctl = entry.get("syscalls", {}), entry.get("ioctl", {})
        if own or own_ioctl:
            out += ["| its own | why |", "|---|---|"]
            out += [f"| `{name}` | {why if why not in ('', '-') else reasons.get(name, '')} |"
                    for name, why in own.items()]
            out += [f"| `ioctl {name}` | {why} |" for name, why in own_ioctl.items()]
            out.append("")
        line = "All its system calls: " + ", ".join(f"`{s}`" for s in sorted(compiled.syscalls))
        if compiled.ioctls:
            line += ", `ioctl` (" + ", ".join(sorted(compiled.ioctls)) + ")"
        if compiled.families:
            line += ", `socket` (" + ", ".join(compiled.families) + ")"
        if compiled.open:
            line += f", `openat` ({compiled.open})"
        out += [line + ".", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables())
