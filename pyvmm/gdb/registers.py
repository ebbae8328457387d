"""gdb's amd64 registers: the target description, and the `g` packet's layout.

The numbering is the order of the target description below, which follows gdb's
own features (gdb/features/i386/64bit-core.xml, 64bit-sse.xml, 64bit-segments.xml)
so that gdb recognises an i386:x86-64 target with x87 and SSE; the control
registers follow in a feature of our own, as QEMU adds its "sys" registers, so
that `info registers cr3` works in gdb.

x87 state comes from KVM_GET_FPU, which has FXSAVE's abridged tag byte; gdb wants
the full tag word (two bits per register), so it is expanded here as gdb's own
i387_supply_fxsave does (SDM vol. 1, 10.5.1.1).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyvmm.kvm import VcpuFd


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    group: str = ""


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(
    f"r{i}" for i in range(8, 16))
CORE = ([Reg(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64") for n in _GPRS]
        + [Reg("rip", 64, "code_ptr"), Reg("eflags", 32, "i386_eflags")]
        + [Reg(n, 32, "int32") for n in ("cs", "ss", "ds", "es", "fs", "gs")]
        + [Reg(f"st{i}", 80, "i387_ext") for i in range(8)]
        + [Reg(n, 32, "int", "float") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff",
                                                  "foseg", "fooff", "fop")])
SSE = [Reg(f"xmm{i}", 128, "vec128") for i in range(16)] + [Reg("mxcsr", 32, "i386_mxcsr",
                                                                 "vector")]
SEGMENTS = [Reg("fs_base", 64, "int"), Reg("gs_base", 64, "int")]
SYSTEM = [Reg(n, 64, "int64") for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
REGISTERS = CORE + SSE + SEGMENTS + SYSTEM
BY_NAME = {r.name: i for i, r in enumerate(REGISTERS)}


def _feature(name: str, regs: list[Reg], types: str = "") -> str:
    lines = [f'<feature name="{name}">', types]
    for r in regs:
        group = f' group="{r.group}"' if r.group else ""
        lines.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}"{group}/>')
    lines.append("</feature>")
    return "\n".join(lines)


_EFLAGS = """<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
<field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
<field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
<field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
<field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
<field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
<field name="ID" start="21" end="21"/></flags>"""
_VEC128 = """<vector id="v8bf16" type="bfloat16" count="8"/>
<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>
<union id="vec128"><field name="v8_bfloat16" type="v8bf16"/><field name="v4_float" type="v4f"/>
<field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>
<field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>
<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
<field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
<field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
<field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
<field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/></flags>"""

TARGET_XML = "\n".join([
    '<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
    "<architecture>i386:x86-64</architecture>",
    _feature("org.gnu.gdb.i386.core", CORE, _EFLAGS),
    _feature("org.gnu.gdb.i386.sse", SSE, _VEC128),
    _feature("org.gnu.gdb.i386.segments", SEGMENTS),
    _feature("org.pyvmm.gdb.i386.sys", SYSTEM),
    "</target>"])


def _full_tag(ftwx: int, fpr: list[bytes], top: int) -> int:
    """FXSAVE's abridged tag byte to the x87 tag word (00 valid, 01 zero, 10 special,
    11 empty), physical register i at bits 2i."""
    tag = 0
    for phys in range(8):
        if not ftwx & (1 << phys):
            value = 3
        else:
            raw = fpr[(phys - top) % 8]
            exponent = int.from_bytes(raw[8:10], "little") & 0x7FFF
            mantissa = int.from_bytes(raw[:8], "little")
            if exponent == 0x7FFF:
                value = 2
            elif exponent == 0:
                value = 1 if mantissa == 0 else 2
            else:
                value = 0 if mantissa >> 63 else 2
        tag |= value << (2 * phys)
    return tag


def _abridged_tag(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)


def read_registers(vcpu: VcpuFd) -> list[bytes]:
    """Every register of REGISTERS, little-endian, as gdb wants them."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    fpu = vcpu.get_fpu()
    values: dict[str, int | bytes] = {n: regs[n] for n in _GPRS}
    values["rip"] = regs["rip"]
    values["eflags"] = regs["rflags"] & 0xFFFFFFFF
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        values[seg] = getattr(sregs, seg).selector
    fpr = [bytes(fpu.fpr[i][0:10]) for i in range(8)]
    for i in range(8):
        values[f"st{i}"] = fpr[i]
    top = (fpu.fsw >> 11) & 7
    values.update(fctrl=fpu.fcw, fstat=fpu.fsw, ftag=_full_tag(fpu.ftwx, fpr, top),
                  fiseg=(fpu.last_ip >> 32) & 0xFFFF, fioff=fpu.last_ip & 0xFFFFFFFF,
                  foseg=(fpu.last_dp >> 32) & 0xFFFF, fooff=fpu.last_dp & 0xFFFFFFFF,
                  fop=fpu.last_opcode)
    for i in range(16):
        values[f"xmm{i}"] = bytes(fpu.xmm[i][0:16])
    values["mxcsr"] = fpu.mxcsr
    values["fs_base"], values["gs_base"] = sregs.fs.base, sregs.gs.base
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        values[name] = getattr(sregs, name)
    out = []
    for r in REGISTERS:
        v = values[r.name]
        out.append(v if isinstance(v, bytes) else (v & ((1 << r.bits) - 1)).to_bytes(
            r.bits // 8, "little"))
    return out


def write_registers(vcpu: VcpuFd, new: dict[int, bytes]) -> None:
    """Write the registers numbered in `new` (raw little-endian bytes of the right size).
    Segment selectors are not written: a selector alone would leave its cached descriptor
    stale (QEMU's KVM gdbstub does not write them either)."""
    names = {REGISTERS[i].name: data for i, data in new.items()}
    ints = {n: int.from_bytes(d, "little") for n, d in names.items()}
    gprs = {n: ints[n] for n in _GPRS + ("rip",) if n in ints}
    if "eflags" in ints:
        gprs["rflags"] = ints["eflags"]
    if gprs:
        vcpu.set_regs(**gprs)
    fpu_names = [n for n in names if n.startswith(("st", "xmm")) or n in (
        "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop", "mxcsr")]
    if fpu_names:
        fpu = vcpu.get_fpu()
        for n in fpu_names:
            if n.startswith("st"):
                fpu.fpr[int(n[2:])][0:10] = names[n]
            elif n.startswith("xmm"):
                fpu.xmm[int(n[3:])][0:16] = names[n]
        fields = {"fctrl": "fcw", "fstat": "fsw", "fop": "last_opcode", "mxcsr": "mxcsr"}
        for n, f in fields.items():
            if n in ints:
                setattr(fpu, f, ints[n])
        if "ftag" in ints:
            fpu.ftwx = _abridged_tag(ints["ftag"])
        if "fioff" in ints or "fiseg" in ints:
            fpu.last_ip = (ints.get("fiseg", fpu.last_ip >> 32) << 32) | ints.get(
                "fioff", fpu.last_ip & 0xFFFFFFFF)
        if "fooff" in ints or "foseg" in ints:
            fpu.last_dp = (ints.get("foseg", fpu.last_dp >> 32) << 32) | ints.get(
                "fooff", fpu.last_dp & 0xFFFFFFFF)
        vcpu.set_fpu(fpu)
    sys_names = [n for n in ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")
                 if n in ints]
    if sys_names:
        sregs = vcpu.get_sregs()
        for n in sys_names:
            if n.endswith("_base"):
                getattr(sregs, n[:2]).base = ints[n]
            else:
                setattr(sregs, n, ints[n])
        vcpu.set_sregs(sregs)


def sizes() -> list[int]:
    return [r.bits // 8 for r in REGISTERS]
