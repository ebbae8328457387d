/*
 * io_uring for virtio-blk's io_engine "Async" (Firecracker's Async engine): the
 * mechanism only.  pyvmm/devices/uring.py owns the policy: which request a tag
 * names, how many are in flight, when to submit, how long to wait when draining.
 *
 * Why liburing: it is the kernel developers' own library for io_uring (Debian packages
 * it, liburing-dev), it gets the ring's memory barriers and mmap offsets right, and it
 * is a thin layer of inline functions over three system calls, so nothing hides
 * behind it.  Hand-rolled ring code would repeat it with fewer eyes on it; Python's
 * standard library has no io_uring at all.
 *
 * No allocation per request: the ring (SQEs, CQEs) is allocated once when the drive
 * is opened, the iovecs live in an array the caller allocated once, and completions
 * are copied out into the caller's arrays.  An SQE's iovecs need only stay valid until
 * it is submitted (IORING_FEAT_SUBMIT_STABLE, required below), so the caller reuses
 * its array after each pv_uring_submit().
 *
 * The iovecs point into guest RAM: the caller takes the addresses from memoryviews of
 * guest memory that the virtqueue code checked (never a raw guest address).
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <liburing.h>

#include "pyvmm.h"

_Static_assert(sizeof(struct pv_iovec) == sizeof(struct iovec) &&
               offsetof(struct pv_iovec, base) == offsetof(struct iovec, iov_base) &&
               offsetof(struct pv_iovec, len) == offsetof(struct iovec, iov_len),
               "struct pv_iovec must have struct iovec's layout");

#define SUBMIT_TRIES 8            /* EINTR/EAGAIN/EBUSY are transient; give up after this */

struct pv_uring {
    struct io_uring ring;
};

/* A ring of `entries` SQEs (the CQ ring is twice that: a full SQ's completions always
 * fit), its completions signalled on `eventfd`.  NULL and *error set if the host has
 * no io_uring (ENOSYS), refuses it (EPERM: kernel.io_uring_disabled, a seccomp
 * filter), or lacks SUBMIT_STABLE (kernels before 5.5). */
struct pv_uring *pv_uring_open(unsigned entries, int eventfd, int *error)
{
    struct pv_uring *u = calloc(1, sizeof(*u));       /* once per drive */
    struct io_uring_params params = {0};
    int ret;

    if (!u) {
        *error = ENOMEM;
        return NULL;
    }
    /* SUBMIT_ALL (5.18): one bad SQE does not hold back the ones after it. */
    params.flags = IORING_SETUP_SUBMIT_ALL;
    ret = io_uring_queue_init_params(entries, &u->ring, &params);
    if (ret == -EINVAL) {
        struct io_uring_params plain = {0};
        ret = io_uring_queue_init_params(entries, &u->ring, &plain);
        params = plain;
    }
    if (ret < 0) {
        free(u);
        *error = -ret;
        return NULL;
    }
    if (!(params.features & IORING_FEAT_SUBMIT_STABLE)) {
        ret = -ENOSYS;
    } else {
        ret = io_uring_register_eventfd(&u->ring, eventfd);
    }
    if (ret < 0) {
        io_uring_queue_exit(&u->ring);
        free(u);
        *error = -ret;
        return NULL;
    }
    return u;
}

static struct io_uring_sqe *next_sqe(struct pv_uring *u, uint64_t tag)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (sqe)
        io_uring_sqe_set_data64(sqe, tag);
    return sqe;
}

/* Queue a readv (submitted by pv_uring_submit); -EBUSY if the SQ ring is full, which
 * the caller's budget (no more requests in flight than entries) rules out. */
int pv_uring_readv(struct pv_uring *u, int fd, const struct pv_iovec *iov, unsigned count,
                   uint64_t offset, uint64_t tag)
{
    struct io_uring_sqe *sqe = next_sqe(u, tag);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_readv(sqe, fd, (const struct iovec *)iov, count, offset);
    return 0;
}

int pv_uring_writev(struct pv_uring *u, int fd, const struct pv_iovec *iov, unsigned count,
                    uint64_t offset, uint64_t tag)
{
    struct io_uring_sqe *sqe = next_sqe(u, tag);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_writev(sqe, fd, (const struct iovec *)iov, count, offset);
    return 0;
}

/* fdatasync, as the Sync engine's flush. */
int pv_uring_fdatasync(struct pv_uring *u, int fd, uint64_t tag)
{
    struct io_uring_sqe *sqe = next_sqe(u, tag);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    return 0;
}

/* Submit every queued SQE (one io_uring_enter, more only if the kernel took part of
 * them); 0, or -errno with pv_uring_unsubmitted() SQEs still queued. */
int pv_uring_submit(struct pv_uring *u)
{
    int ret = 0;
    for (int tries = 0; tries < SUBMIT_TRIES && io_uring_sq_ready(&u->ring); tries++) {
        ret = io_uring_submit(&u->ring);
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
            return ret;
    }
    if (io_uring_sq_ready(&u->ring))
        return ret < 0 ? ret : -EAGAIN;
    return 0;
}

unsigned pv_uring_unsubmitted(struct pv_uring *u)
{
    return io_uring_sq_ready(&u->ring);
}

/* Copy out up to `max` completions (tag, res) without a system call: the CQ ring is
 * shared memory.  Returns how many. */
unsigned pv_uring_reap(struct pv_uring *u, uint64_t *tags, int32_t *results, unsigned max)
{
    struct io_uring_cqe *cqe;
    unsigned head, count = 0;

    io_uring_for_each_cqe(&u->ring, head, cqe) {
        if (count == max)
            break;
        tags[count] = cqe->user_data;
        results[count] = cqe->res;
        count++;
    }
    io_uring_cq_advance(&u->ring, count);
    return count;
}

/* Unmap the ring and close its fd.  The caller drains first: the kernel finishes (or
 * cancels) what is still in flight on its own, but guest RAM must outlive it. */
void pv_uring_close(struct pv_uring *u)
{
    if (!u)
        return;
    io_uring_queue_exit(&u->ring);
    free(u);
}
