/*
 * Address-range buses (Firecracker's vmm/src/devices/bus.rs): a sorted array
 * of non-overlapping [base, base+len) ranges, searched by bisection on every
 * PIO/MMIO exit.  Ranges are registered before the vCPUs run and never
 * change while they do, so lookups take no lock.
 */
#include <errno.h>
#include <string.h>
#include "pyvmm.h"

void pv_machine_init(struct pv_machine *m)
{
    memset(m, 0, sizeof(*m));
}

int pv_bus_find(const struct pv_bus *bus, uint64_t addr)
{
    uint32_t lo = 0, hi = bus->n;

    while (lo < hi) {                       /* first range with base > addr */
        uint32_t mid = lo + (hi - lo) / 2;
        if (bus->ranges[mid].base <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    lo--;
    if (addr - bus->ranges[lo].base < bus->ranges[lo].len)
        return (int)lo;
    return -1;
}

int pv_bus_add(struct pv_bus *bus, uint64_t base, uint64_t len, pv_io_fn fn, void *opaque, const char *name)
{
    uint32_t i;

    if (len == 0 || base + len < base || !fn)
        return -EINVAL;
    if (bus->n >= PV_MAX_RANGES)
        return -ENOSPC;
    for (i = 0; i < bus->n; i++) {
        const struct pv_range *r = &bus->ranges[i];
        if (base < r->base + r->len && r->base < base + len)
            return -EEXIST;
    }
    i = bus->n;
    while (i > 0 && bus->ranges[i - 1].base > base) {
        bus->ranges[i] = bus->ranges[i - 1];
        i--;
    }
    bus->ranges[i].base = base;
    bus->ranges[i].len = len;
    bus->ranges[i].fn = fn;
    bus->ranges[i].opaque = opaque;
    memset(bus->ranges[i].name, 0, PV_NAME_LEN);
    if (name)
        strncpy(bus->ranges[i].name, name, PV_NAME_LEN - 1);
    bus->n++;
    return 0;
}
