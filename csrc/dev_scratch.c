/*
 * Scratch registers: a 4 KiB window that reads back what was written.  It is
 * the C-handled device of the tests and of the exit round-trip benchmark, the
 * twin of tests' Python scratch device.
 */
#include <string.h>
#include "pyvmm.h"

int pv_scratch_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write)
{
    struct pv_scratch *s = opaque;

    if (offset >= sizeof(s->bytes) || len > sizeof(s->bytes) - offset)
        return PV_IO_ERROR;
    if (is_write) {
        memcpy(&s->bytes[offset], data, len);
        s->writes++;
    } else {
        memcpy(data, &s->bytes[offset], len);
        s->reads++;
    }
    return PV_IO_OK;
}
