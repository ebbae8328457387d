/*
 * Debug exit (QEMU's isa-debug-exit): a write ends the vCPU's run with
 * PV_OUT_DEVICE_STOP carrying the value, so a test guest can finish and say
 * how it went.  Reads return 0.
 */
#include <string.h>
#include "pyvmm.h"

int pv_debugexit_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write)
{
    struct pv_debugexit *d = opaque;
    uint64_t value = 0;

    (void)offset;
    if (!is_write) {
        memset(data, 0, len);
        return PV_IO_OK;
    }
    memcpy(&value, data, len < 8 ? len : 8);
    d->last_value = value;
    return PV_IO_STOP;
}
