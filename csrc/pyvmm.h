/*
 * pyvmm native core: the vCPU run loop and the address-range I/O buses.
 *
 * The part between "cdef-begin" and "cdef-end" is read verbatim by cffi
 * (pyvmm/_build_native.py), so it must stay plain C declarations: no
 * #include, no #if, and only integer #defines.
 *
 * Life of an exit (see vcpu_loop.c):
 *   KVM_RUN returns -> count it -> PIO/MMIO: find the range on the bus and call
 *   its handler (a C device, or pv_py_io which takes the GIL and calls Python)
 *   -> re-enter KVM_RUN.  Anything else ends pv_vcpu_run() with an outcome.
 */
#ifndef PYVMM_H
#define PYVMM_H
#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
#define PV_MAX_RANGES 64          /* devices per bus; ranges are few and fixed */
#define PV_EXIT_REASONS 64        /* KVM_EXIT_* values counted one by one; larger ones land in the last slot */
#define PV_NAME_LEN 24
#define PV_DEBUGCON_BUF 65536

/* Return values of a device handler. */
#define PV_IO_OK 0
#define PV_IO_STOP 1              /* the device asks the vCPU to stop; outcome PV_OUT_DEVICE_STOP */
#define PV_IO_ERROR -1            /* the handler failed; outcome PV_OUT_HANDLER_ERROR */

/* Why pv_vcpu_run() returned. */
#define PV_OUT_HALT 1             /* HLT with no in-kernel irqchip */
#define PV_OUT_SHUTDOWN 2         /* triple fault */
#define PV_OUT_SYSTEM_EVENT 3     /* PSCI-like shutdown/reset/crash from KVM; info[0] = type */
#define PV_OUT_INTERNAL_ERROR 4   /* suberror + info[0..ndata) as KVM gave them */
#define PV_OUT_FAIL_ENTRY 5       /* info[0] = hardware_entry_failure_reason */
#define PV_OUT_STOPPED 6          /* another thread called pv_vcpu_kick() */
#define PV_OUT_DEVICE_STOP 7      /* a handler returned PV_IO_STOP; data = value written */
#define PV_OUT_HANDLER_ERROR 8    /* a handler returned PV_IO_ERROR */
#define PV_OUT_UNHANDLED_PIO 9    /* strict mode: no device at addr */
#define PV_OUT_UNHANDLED_MMIO 10  /* strict mode: no device and no RAM at addr */
#define PV_OUT_UNKNOWN_EXIT 11    /* an exit reason the loop does not handle; see exit_reason */
#define PV_OUT_RUN_ERROR 12       /* KVM_RUN failed; err = errno */
#define PV_OUT_DEBUG 13           /* KVM_EXIT_DEBUG: info[0..3] = exception, pc, dr6, dr7 */

#define PV_BUS_PIO 0
#define PV_BUS_MMIO 1

/* A device handler: offset is relative to the start of the range, data holds
 * len bytes (1, 2, 4 or 8), read into or written from. */
typedef int (*pv_io_fn)(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write);

struct pv_range {
    uint64_t base;
    uint64_t len;
    pv_io_fn fn;
    void *opaque;
    char name[24];
};

struct pv_bus {
    uint32_t n;                   /* ranges in use, sorted by base, never overlapping */
    struct pv_range ranges[64];
};

struct pv_machine {
    struct pv_bus buses[2];       /* [PV_BUS_PIO], [PV_BUS_MMIO] */
    int strict;                   /* unhandled access ends the run instead of reading as all-ones */
};

struct pv_outcome {
    int kind;                     /* PV_OUT_* */
    uint32_t exit_reason;         /* the KVM_EXIT_* that ended the run */
    int err;                      /* errno for PV_OUT_RUN_ERROR */
    int range_index;              /* device involved, or -1 */
    int bus;                      /* PV_BUS_* for I/O outcomes */
    uint64_t addr;
    uint32_t len;
    uint32_t is_write;
    uint64_t data;
    uint32_t suberror;
    uint32_t ndata;
    uint64_t info[16];
};

struct pv_vcpu {
    int fd;
    int index;
    uint64_t exits[64];           /* by KVM_EXIT_* reason */
    uint64_t dev_exits[2][64];    /* by [bus][range index] */
    uint64_t unhandled[2];        /* accesses that hit no device, by bus */
    uint64_t interrupted;         /* KVM_RUN returned EINTR without a stop or sample request */
    void *priv;                   /* struct pv_vcpu_private: kvm_run, thread, lock */
};

/* Returns 0, or -errno if the mmap of kvm_run fails.  On success the vCPU owns fd. */
int pv_vcpu_init(struct pv_vcpu *vcpu, int fd, int index, size_t run_size, struct pv_machine *machine);
/* Safe from any thread, any number of times: frees kvm_run and closes the fd, now (0)
 * or, if a thread is inside pv_vcpu_run(), kicks it and lets it free them when it
 * leaves (1).  The struct pv_vcpu itself must outlive that thread. */
int pv_vcpu_destroy(struct pv_vcpu *vcpu);
/* Runs the vCPU until something needs the caller; the GIL is released (cffi API mode).
 * After pv_vcpu_destroy(): PV_OUT_RUN_ERROR with err EBADF (EBUSY if another thread runs it). */
void pv_vcpu_run(struct pv_vcpu *vcpu, struct pv_outcome *out);
/* Safe from any thread, also before a run and after destroy (then a no-op): makes the
 * vCPU leave KVM_RUN and return PV_OUT_STOPPED. */
void pv_vcpu_kick(struct pv_vcpu *vcpu);
/* Drops a kick that has not been consumed yet (pause/resume races); no-op after destroy. */
void pv_vcpu_clear_kick(struct pv_vcpu *vcpu);

/*
 * Guest profiler (pyvmm.profiler).  A sampler interrupts KVM_RUN with the kick signal
 * and a sample request, never a stop request; the vCPU thread answers the EINTR by
 * reading RIP and CPL into a preallocated ring and re-enters the guest.  The layout
 * of struct pv_sample is the record of the profile file (docs/profiler.md).
 */
#define PV_SAMPLE_KIND_SAMPLE 0
#define PV_SAMPLE_KIND_DROPPED 1  /* written by Python at the end: rip = samples lost on vcpu */
struct pv_sample {
    uint64_t t_ns;                /* CLOCK_MONOTONIC when the registers were read */
    uint64_t rip;
    uint16_t vcpu;
    uint8_t cpl;                  /* 0..3, the ring the guest was in */
    uint8_t kind;                 /* PV_SAMPLE_KIND_* */
    uint32_t reserved;            /* 0 */
};
struct pv_sampler {
    uint64_t period_ns;
    uint64_t next_ns;             /* the next tick, CLOCK_MONOTONIC; 0 before the first */
    uint64_t ticks;               /* ticks done */
    uint64_t late_ticks;          /* ticks skipped because the sampler thread ran late */
    int stop;                     /* set from any thread: pv_sampler_run returns within a period */
};
/* A single-producer (the vCPU thread), single-consumer (the drain) ring of samples.
 * The caller allocates it and keeps it alive as long as the vCPU may run: it outlives
 * pv_vcpu_destroy(), so the last samples can be drained after the vCPU is gone. */
struct pv_sample_ring {
    struct pv_sample *samples;
    uint32_t capacity;
    uint32_t head;                /* written by the vCPU thread only */
    uint32_t tail;                /* written by the draining thread only */
    uint32_t reserved;
    uint64_t taken;               /* samples stored */
    uint64_t dropped;             /* samples lost because the ring was full */
};
/* Gives the vCPU its ring; 0, -EINVAL (no capacity), -EEXIST or -EBADF (destroyed). */
int pv_vcpu_sampling_enable(struct pv_vcpu *vcpu, struct pv_sample_ring *ring);
/* Makes a running vCPU take one sample soon; a no-op if it is not in pv_vcpu_run(),
 * has no ring, or is destroyed.  Never ends the run. */
void pv_vcpu_sample_kick(struct pv_vcpu *vcpu);
/* Moves up to max samples out of the ring (from one thread at a time); the number moved. */
uint32_t pv_samples_drain(struct pv_sample_ring *ring, struct pv_sample *out, uint32_t max);
/* Sleeps to each tick (absolute, CLOCK_MONOTONIC) and sample-kicks every vCPU, for
 * `ticks` ticks or until s->stop; returns the ticks done.  The GIL is released. */
uint64_t pv_sampler_run(struct pv_sampler *s, struct pv_vcpu **vcpus, uint32_t nvcpus, uint32_t ticks);
uint64_t pv_monotonic_ns(void);

/*
 * Exit trace (pyvmm.trace).  With a ring given (pv_vcpu_trace_enable), the vCPU thread
 * writes one record per KVM exit into it, after the exit is handled: no lock, no
 * allocation, no Python.  Without one the loop pays one predictable branch per exit.
 * The layout of struct pv_trace_rec is the record of the trace file (docs/trace.md).
 */
#define PV_TRACE_KIND_EXIT 0
#define PV_TRACE_KIND_DROPPED 1   /* written by Python: value = exits lost on vcpu (ring full) */
#define PV_TRACE_KIND_OVER_LIMIT 2 /* written by Python: value = exits not written (file limit) */
#define PV_TRACE_KIND_END 3       /* written by Python, last: value = exit records in the file */
#define PV_TRACE_NO_BUS 255       /* bus of an exit that is not PIO or MMIO */
struct pv_trace_rec {
    uint64_t t_ns;                /* CLOCK_MONOTONIC when KVM_RUN returned */
    uint64_t addr;                /* port or guest-physical address (I/O exits), else 0 */
    uint64_t value;               /* first element written, or read as the handler answered */
    uint32_t handler_ns;          /* from KVM_RUN's return to the end of the handling */
    uint16_t vcpu;
    uint16_t reason;              /* KVM_EXIT_* */
    int16_t range;                /* range index on the bus, -1 for none */
    uint16_t count;               /* elements of a rep ins/outs (1 otherwise, 0 if not I/O) */
    uint8_t bus;                  /* PV_BUS_*, or PV_TRACE_NO_BUS */
    uint8_t size;                 /* bytes per element: 1, 2, 4 or 8; 0 if not I/O */
    uint8_t is_write;
    uint8_t kind;                 /* PV_TRACE_KIND_* */
};
/* Single producer (the vCPU thread), single consumer (the drain thread).  Owned by the
 * caller, which keeps it alive as long as the vCPU may run (it outlives the vCPU). */
struct pv_trace_ring {
    struct pv_trace_rec *recs;
    uint32_t capacity;
    uint32_t head;                /* written by the vCPU thread only */
    uint32_t tail;                /* written by the draining thread only */
    uint32_t reserved;
    uint64_t recorded;            /* records stored */
    uint64_t dropped;             /* exits not recorded because the ring was full */
};
/* Gives the vCPU its trace ring; 0, -EINVAL (no capacity), -EEXIST or -EBADF (destroyed). */
int pv_vcpu_trace_enable(struct pv_vcpu *vcpu, struct pv_trace_ring *ring);
/* Moves up to max records out of the ring (one thread at a time); the number moved. */
uint32_t pv_trace_drain(struct pv_trace_ring *ring, struct pv_trace_rec *out, uint32_t max);

void pv_machine_init(struct pv_machine *m);
/* 0, or -EINVAL (empty/wrapping range), -EEXIST (overlap), -ENOSPC (bus full). */
int pv_bus_add(struct pv_bus *bus, uint64_t base, uint64_t len, pv_io_fn fn, void *opaque, const char *name);
/* Index of the range holding addr, or -1. */
int pv_bus_find(const struct pv_bus *bus, uint64_t addr);

/* A full memory barrier (mfence): virtqueue code needs store->load ordering
 * between publishing used->idx and reading the driver's event index. */
void pv_mb(void);

/* ioctl(fd, request, arg) with an unsigned long argument: result, or -errno. */
long pv_ioctl_ulong(int fd, unsigned long request, unsigned long arg);

/* C devices (one file each in csrc/). */
struct pv_debugcon {              /* like QEMU's isa-debugcon: bytes written are buffered */
    uint32_t head;
    uint32_t tail;
    uint64_t dropped;             /* bytes lost because Python did not drain in time */
    void *lock;                   /* pthread_mutex_t: several vCPUs may write at once */
    uint8_t buf[65536];
};
int pv_debugcon_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write);
int pv_debugcon_init(struct pv_debugcon *d);
void pv_debugcon_destroy(struct pv_debugcon *d);
size_t pv_debugcon_drain(struct pv_debugcon *d, uint8_t *out, size_t max);

struct pv_debugexit {             /* like QEMU's isa-debug-exit: a write stops the vCPU */
    uint64_t last_value;
};
int pv_debugexit_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write);

struct pv_scratch {               /* a register file that reads back what was written */
    uint64_t reads;
    uint64_t writes;
    uint8_t bytes[4096];
};
int pv_scratch_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len, int is_write);
/* seccomp (seccomp.c): pyvmm.seccomp builds the rule table, we load it on this thread. */
#define PV_SC_NAME_LEN 16
#define PV_SC_MAX_CMP 3
#define PV_SC_EQ 0
#define PV_SC_MASKED_EQ 1
#define PV_SC_EXIT_STATUS 159     /* 128 + SIGSYS, as if SIGSYS had killed us */
struct pv_sc_cmp { unsigned int arg; int op; uint64_t a; uint64_t b; };
struct pv_sc_rule { int nr; int errno_value; int ncmp; struct pv_sc_cmp cmp[3]; };
int pv_seccomp_prepare(void);
int pv_seccomp_resolve(const char *name);
int pv_set_thread_name(const char *name);
int pv_seccomp_install(const struct pv_sc_rule *rules, int count, int log_only);
/* io_uring (uring.c): the mechanism of virtio-blk's io_engine "Async"; its policy (tags,
 * budgets, draining) is pyvmm/devices/uring.py.  pv_iovec has struct iovec's layout
 * (checked in uring.c): <sys/uio.h> cannot be included in this cdef part. */
struct pv_uring;
struct pv_iovec { void *base; size_t len; };
struct pv_uring *pv_uring_open(unsigned entries, int eventfd, int *error);
int pv_uring_readv(struct pv_uring *u, int fd, const struct pv_iovec *iov, unsigned count,
                   uint64_t offset, uint64_t tag);
int pv_uring_writev(struct pv_uring *u, int fd, const struct pv_iovec *iov, unsigned count,
                    uint64_t offset, uint64_t tag);
int pv_uring_fdatasync(struct pv_uring *u, int fd, uint64_t tag);
int pv_uring_submit(struct pv_uring *u);
unsigned pv_uring_unsubmitted(struct pv_uring *u);
unsigned pv_uring_reap(struct pv_uring *u, uint64_t *tags, int32_t *results, unsigned max);
void pv_uring_close(struct pv_uring *u);
/* cdef-end */

#endif
