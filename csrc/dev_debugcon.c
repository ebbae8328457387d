/*
 * Debug console (QEMU's isa-debugcon): every byte written to the port is
 * appended to a ring buffer that Python drains.  Tiny guests use it to print
 * without a UART model; it costs one exit per byte and no GIL.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include "pyvmm.h"

int pv_debugcon_init(struct pv_debugcon *d)
{
    pthread_mutex_t *lock = malloc(sizeof(*lock));

    if (!lock)
        return -ENOMEM;
    pthread_mutex_init(lock, NULL);
    d->head = d->tail = 0;
    d->dropped = 0;
    d->lock = lock;
    return 0;
}

void pv_debugcon_destroy(struct pv_debugcon *d)
{
    if (!d->lock)
        return;
    pthread_mutex_destroy(d->lock);
    free(d->lock);
    d->lock = NULL;
}

int pv_debugcon_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write)
{
    struct pv_debugcon *d = opaque;
    uint32_t i;

    (void)offset;
    if (!is_write) {
        data[0] = 0xe9;             /* QEMU answers reads with the port number: guests probe for it */
        for (i = 1; i < len; i++)
            data[i] = 0;
        return PV_IO_OK;
    }
    pthread_mutex_lock(d->lock);
    for (i = 0; i < len; i++) {
        uint32_t next = (d->head + 1) % PV_DEBUGCON_BUF;
        if (next == d->tail) {
            d->dropped++;
            continue;
        }
        d->buf[d->head] = data[i];
        d->head = next;
    }
    pthread_mutex_unlock(d->lock);
    return PV_IO_OK;
}

size_t pv_debugcon_drain(struct pv_debugcon *d, uint8_t *out, size_t max)
{
    size_t n = 0;

    pthread_mutex_lock(d->lock);
    while (n < max && d->tail != d->head) {
        out[n++] = d->buf[d->tail];
        d->tail = (d->tail + 1) % PV_DEBUGCON_BUF;
    }
    pthread_mutex_unlock(d->lock);
    return n;
}
