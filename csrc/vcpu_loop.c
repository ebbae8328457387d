/*
 * The vCPU exit loop (kvmtool's kvm-cpu.c, in miniature).
 *
 * pv_vcpu_run() is called from a Python thread through cffi, which releases
 * the GIL for the whole call.  PIO and MMIO exits are served here by looking
 * the address up on the machine's buses; the GIL is only taken again when the
 * range belongs to a Python device (pv_py_io is a cffi extern "Python").
 * Nothing is allocated per exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "pyvmm.h"

struct pv_vcpu_private {
    struct kvm_run *run;
    size_t run_size;
    struct pv_machine *machine;
    pthread_t thread;         /* valid while in_run */
    int in_run;               /* a thread is inside pv_vcpu_run() */
    int orphaned;             /* destroyed while in_run: that thread frees it on its way out */
    volatile int stop_requested;
    int sample_requested;     /* the guest profiler asked for a sample (atomics only) */
    struct pv_sample_ring *ring;  /* the profiler's, NULL unless sampling: never freed here */
    struct pv_trace_ring *trace;  /* the exit trace's, NULL unless tracing: never freed here */
};

/*
 * The life of every vcpu->priv: pv_vcpu_run() marks itself in and out under this
 * lock, and pv_vcpu_destroy() frees priv (and closes the fd) only when no thread
 * is inside; otherwise it marks priv orphaned, kicks the thread, and the thread
 * frees both when it leaves pv_vcpu_run().  Kicks take it too, so a kick never
 * races a free.  It is taken on entry to and exit from a run and per kick, never
 * per exit.
 */
static pthread_mutex_t life_lock = PTHREAD_MUTEX_INITIALIZER;

/* The kick signal only has to interrupt KVM_RUN (EINTR); immediate_exit,
 * set before the signal is sent, closes the race with entering KVM_RUN. */
static int kick_signal;
static pthread_once_t kick_once = PTHREAD_ONCE_INIT;

static void kick_handler(int sig) { (void)sig; }

static void install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;   /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    kick_signal = SIGRTMIN + 3;
    sigaction(kick_signal, &sa, NULL);
}

int pv_vcpu_init(struct pv_vcpu *vcpu, int fd, int index, size_t run_size, struct pv_machine *machine)
{
    struct pv_vcpu_private *p;
    void *run;

    pthread_once(&kick_once, install_kick_handler);
    memset(vcpu, 0, sizeof(*vcpu));
    run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED)
        return -errno;
    p = calloc(1, sizeof(*p));
    if (!p) {
        munmap(run, run_size);
        return -ENOMEM;
    }
    p->run = run;
    p->run_size = run_size;
    p->machine = machine;
    vcpu->fd = fd;
    vcpu->index = index;
    vcpu->priv = p;
    return 0;
}

static void release_private(struct pv_vcpu_private *p, int fd)
{
    munmap(p->run, p->run_size);
    free(p);
    close(fd);
}

/* Call with life_lock held. */
static void kick_locked(struct pv_vcpu_private *p)
{
    p->stop_requested = 1;
    __atomic_store_n(&p->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (p->in_run)
        pthread_kill(p->thread, kick_signal);
}

int pv_vcpu_destroy(struct pv_vcpu *vcpu)
{
    struct pv_vcpu_private *p;

    pthread_mutex_lock(&life_lock);
    p = vcpu->priv;
    if (p && p->in_run) {
        p->orphaned = 1;
        kick_locked(p);
        pthread_mutex_unlock(&life_lock);
        return 1;
    }
    vcpu->priv = NULL;
    pthread_mutex_unlock(&life_lock);
    if (!p)
        return 0;
    release_private(p, vcpu->fd);
    return 0;
}

void pv_vcpu_kick(struct pv_vcpu *vcpu)
{
    pthread_mutex_lock(&life_lock);
    if (vcpu->priv)
        kick_locked(vcpu->priv);
    pthread_mutex_unlock(&life_lock);
}

void pv_vcpu_clear_kick(struct pv_vcpu *vcpu)
{
    struct pv_vcpu_private *p;

    pthread_mutex_lock(&life_lock);
    p = vcpu->priv;
    if (p && !p->orphaned) {
        p->stop_requested = 0;
        __atomic_store_n(&p->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&life_lock);
}

/* -- the guest profiler's samples -----------------------------------------------
 *
 * A sample kick is a stop kick without the stop: it sets sample_requested and
 * immediate_exit (so that a kick landing just before KVM_RUN is not lost) and sends
 * the kick signal.  The vCPU thread answers the EINTR with take_sample() and clears
 * immediate_exit again, under life_lock and only if no stop kick came meanwhile, so
 * a stop is never swallowed.  Samples go to a single-producer, single-consumer ring
 * the caller owns: no lock and no allocation on the vCPU thread.
 */
uint64_t pv_monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int pv_vcpu_sampling_enable(struct pv_vcpu *vcpu, struct pv_sample_ring *ring)
{
    struct pv_vcpu_private *p;
    int rc = 0;

    if (!ring->samples || ring->capacity == 0)
        return -EINVAL;
    pthread_mutex_lock(&life_lock);
    p = vcpu->priv;
    if (!p || p->orphaned)
        rc = -EBADF;
    else if (p->ring)
        rc = -EEXIST;
    else
        __atomic_store_n(&p->ring, ring, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&life_lock);
    return rc;
}

void pv_vcpu_sample_kick(struct pv_vcpu *vcpu)
{
    struct pv_vcpu_private *p;

    pthread_mutex_lock(&life_lock);
    p = vcpu->priv;
    if (p && p->ring && p->in_run && !p->orphaned) {
        __atomic_store_n(&p->sample_requested, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&p->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        pthread_kill(p->thread, kick_signal);
    }
    pthread_mutex_unlock(&life_lock);
}

/* The vCPU is out of the guest: its registers are where the sample was asked for. */
static void take_sample(struct pv_vcpu *vcpu, struct pv_vcpu_private *p)
{
    struct pv_sample_ring *r = p->ring;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct pv_sample *s;
    uint32_t head, tail;

    if (!r)
        return;
    head = r->head;
    tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    if (head - tail >= r->capacity) {
        r->dropped++;
        return;
    }
    if (ioctl(vcpu->fd, KVM_GET_REGS, &regs) < 0 || ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
        return;
    s = &r->samples[head % r->capacity];
    s->t_ns = pv_monotonic_ns();
    s->rip = regs.rip;
    s->vcpu = (uint16_t)vcpu->index;
    /* CPL is CS.RPL in protected mode; real mode is ring 0 whatever CS holds. */
    s->cpl = (sregs.cr0 & 1) ? (sregs.cs.selector & 3) : 0;
    s->kind = PV_SAMPLE_KIND_SAMPLE;
    s->reserved = 0;
    __atomic_store_n(&r->head, head + 1, __ATOMIC_RELEASE);
    r->taken++;
}

/* Back into the guest: drop the immediate_exit of the sample kick, unless a stop kick
 * (which needs it) or another sample kick came in since. */
static void end_sample_kick(struct pv_vcpu_private *p)
{
    pthread_mutex_lock(&life_lock);
    if (!p->stop_requested && !p->orphaned &&
        !__atomic_load_n(&p->sample_requested, __ATOMIC_ACQUIRE))
        __atomic_store_n(&p->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&life_lock);
}

uint32_t pv_samples_drain(struct pv_sample_ring *r, struct pv_sample *out, uint32_t max)
{
    uint32_t n = 0;
    uint32_t tail = r->tail;
    uint32_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);

    for (; tail != head && n < max; tail++, n++)
        out[n] = r->samples[tail % r->capacity];
    __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
    return n;
}

uint64_t pv_sampler_run(struct pv_sampler *s, struct pv_vcpu **vcpus, uint32_t nvcpus, uint32_t ticks)
{
    struct timespec ts;
    uint64_t done = 0, now;
    uint32_t i;

    if (s->period_ns == 0)
        return 0;
    if (s->next_ns == 0)
        s->next_ns = pv_monotonic_ns();
    while (done < ticks && !__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
        s->next_ns += s->period_ns;
        now = pv_monotonic_ns();
        if (now > s->next_ns + s->period_ns) {   /* late by more than a period: skip, no burst */
            s->late_ticks += (now - s->next_ns) / s->period_ns;
            s->next_ns = now;
        }
        ts.tv_sec = s->next_ns / 1000000000ull;
        ts.tv_nsec = s->next_ns % 1000000000ull;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
        for (i = 0; i < nvcpus; i++)
            pv_vcpu_sample_kick(vcpus[i]);
        s->ticks++;
        done++;
    }
    return done;
}

/* Serve one access of len bytes at addr; returns PV_IO_* or 2 for "no device". */
static int dispatch(struct pv_vcpu *vcpu, int bus_id, uint64_t addr, uint8_t *data,
                    uint32_t len, int is_write, int *range_out)
{
    struct pv_vcpu_private *p = vcpu->priv;
    const struct pv_bus *bus = &p->machine->buses[bus_id];
    int i = pv_bus_find(bus, addr);
    const struct pv_range *r;

    *range_out = i;
    if (i < 0 || addr + len > bus->ranges[i].base + bus->ranges[i].len) {
        vcpu->unhandled[bus_id]++;
        if (!is_write)
            memset(data, 0xff, len);    /* an empty bus floats high */
        return 2;
    }
    r = &bus->ranges[i];
    vcpu->dev_exits[bus_id][i]++;
    return r->fn(r->opaque, addr - r->base, data, len, is_write);
}

static void io_outcome(struct pv_outcome *out, int kind, int bus, int range, uint64_t addr,
                       const uint8_t *data, uint32_t len, int is_write)
{
    out->kind = kind;
    out->bus = bus;
    out->range_index = range;
    out->addr = addr;
    out->len = len;
    out->is_write = is_write;
    out->data = 0;
    memcpy(&out->data, data, len < 8 ? len : 8);
}

/* Returns 1 when the exit ended the run (out filled), 0 to keep running. */
static int handle_pio(struct pv_vcpu *vcpu, struct kvm_run *run, struct pv_outcome *out)
{
    struct pv_vcpu_private *p = vcpu->priv;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    int is_write = run->io.direction == KVM_EXIT_IO_OUT;
    uint32_t size = run->io.size, i;
    int range, rc;

    /* data_offset and count*size come from the kernel and stay inside the page,
     * but check anyway: a broken host module must not make us scribble. */
    if (run->io.data_offset + (uint64_t)size * run->io.count > p->run_size || size > 8) {
        out->kind = PV_OUT_UNKNOWN_EXIT;
        return 1;
    }
    for (i = 0; i < run->io.count; i++, data += size) {   /* count > 1 for rep ins/outs */
        rc = dispatch(vcpu, PV_BUS_PIO, run->io.port, data, size, is_write, &range);
        if (rc == PV_IO_OK)
            continue;
        if (rc == 2 && !p->machine->strict)
            continue;
        io_outcome(out, rc == PV_IO_STOP ? PV_OUT_DEVICE_STOP :
                        rc == PV_IO_ERROR ? PV_OUT_HANDLER_ERROR : PV_OUT_UNHANDLED_PIO,
                   PV_BUS_PIO, range, run->io.port, data, size, is_write);
        return 1;
    }
    return 0;
}

static int handle_mmio(struct pv_vcpu *vcpu, struct kvm_run *run, struct pv_outcome *out)
{
    struct pv_vcpu_private *p = vcpu->priv;
    uint32_t len = run->mmio.len;
    int range, rc;

    if (len > sizeof(run->mmio.data)) {
        out->kind = PV_OUT_UNKNOWN_EXIT;
        return 1;
    }
    rc = dispatch(vcpu, PV_BUS_MMIO, run->mmio.phys_addr, run->mmio.data, len,
                  run->mmio.is_write, &range);
    if (rc == PV_IO_OK || (rc == 2 && !p->machine->strict))
        return 0;
    io_outcome(out, rc == PV_IO_STOP ? PV_OUT_DEVICE_STOP :
                    rc == PV_IO_ERROR ? PV_OUT_HANDLER_ERROR : PV_OUT_UNHANDLED_MMIO,
               PV_BUS_MMIO, range, run->mmio.phys_addr, run->mmio.data, len, run->mmio.is_write);
    return 1;
}

/* -- the exit trace ---------------------------------------------------------------
 *
 * pv_vcpu_run() checks p->trace once per exit (one well-predicted branch when it is
 * NULL); with a ring it goes through traced_exit(), which times handle_exit() and
 * appends one record.  A full ring drops the record and counts it: the vCPU never
 * waits for the drain.
 */
int pv_vcpu_trace_enable(struct pv_vcpu *vcpu, struct pv_trace_ring *ring)
{
    struct pv_vcpu_private *p;
    int rc = 0;

    if (!ring->recs || ring->capacity == 0)
        return -EINVAL;
    pthread_mutex_lock(&life_lock);
    p = vcpu->priv;
    if (!p || p->orphaned)
        rc = -EBADF;
    else if (p->trace)
        rc = -EEXIST;
    else
        __atomic_store_n(&p->trace, ring, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&life_lock);
    return rc;
}

uint32_t pv_trace_drain(struct pv_trace_ring *r, struct pv_trace_rec *out, uint32_t max)
{
    uint32_t n = 0;
    uint32_t tail = r->tail;
    uint32_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);

    for (; tail != head && n < max; tail++, n++)
        out[n] = r->recs[tail % r->capacity];
    __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
    return n;
}

/* What the exit was, read from kvm_run after it was handled (KVM rewrites it only at
 * the next KVM_RUN), so a read's value is what the device answered. */
static void describe_exit(struct pv_vcpu_private *p, struct kvm_run *run, struct pv_trace_rec *rec)
{
    const struct pv_bus *bus;
    uint32_t len;
    int i;

    rec->reason = (uint16_t)run->exit_reason;
    rec->addr = 0;
    rec->value = 0;
    rec->range = -1;
    rec->count = 0;
    rec->bus = PV_TRACE_NO_BUS;
    rec->size = 0;
    rec->is_write = 0;
    if (run->exit_reason == KVM_EXIT_IO) {
        len = run->io.size <= 8 ? run->io.size : 8;
        rec->bus = PV_BUS_PIO;
        rec->addr = run->io.port;
        rec->size = (uint8_t)len;
        rec->is_write = run->io.direction == KVM_EXIT_IO_OUT;
        rec->count = run->io.count <= 0xffff ? (uint16_t)run->io.count : 0xffff;
        if (run->io.data_offset + len <= p->run_size)
            memcpy(&rec->value, (uint8_t *)run + run->io.data_offset, len);
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        len = run->mmio.len <= 8 ? run->mmio.len : 8;
        rec->bus = PV_BUS_MMIO;
        rec->count = 1;
        rec->addr = run->mmio.phys_addr;
        rec->size = (uint8_t)len;
        rec->is_write = run->mmio.is_write;
        memcpy(&rec->value, run->mmio.data, len);
    } else {
        return;
    }
    /* The range dispatch() chose: the same lookup again, paid only when tracing. */
    bus = &p->machine->buses[rec->bus];
    i = pv_bus_find(bus, rec->addr);
    if (i >= 0 && rec->addr + rec->size <= bus->ranges[i].base + bus->ranges[i].len)
        rec->range = (int16_t)i;
}

/* Inlined at both of its call sites, so that the untraced loop stays as it was before
 * the trace: one branch more per exit, no call. */
#define PV_ALWAYS_INLINE inline __attribute__((always_inline))
static PV_ALWAYS_INLINE int handle_exit(struct pv_vcpu *vcpu, struct kvm_run *run,
                                        struct pv_outcome *out);

/* Out of line: the untraced loop keeps its size in the instruction cache. */
static __attribute__((noinline)) int traced_exit(struct pv_vcpu *vcpu, struct pv_vcpu_private *p,
                                                 struct pv_trace_ring *r, struct kvm_run *run,
                                                 struct pv_outcome *out, uint64_t t0)
{
    int done = handle_exit(vcpu, run, out);
    uint64_t spent = pv_monotonic_ns() - t0;
    uint32_t head = r->head;
    struct pv_trace_rec *rec;

    if (head - __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) >= r->capacity) {
        r->dropped++;
        return done;
    }
    rec = &r->recs[head % r->capacity];
    describe_exit(p, run, rec);
    rec->t_ns = t0;
    rec->handler_ns = spent <= 0xffffffffu ? (uint32_t)spent : 0xffffffffu;
    rec->vcpu = (uint16_t)vcpu->index;
    rec->kind = PV_TRACE_KIND_EXIT;
    __atomic_store_n(&r->head, head + 1, __ATOMIC_RELEASE);
    r->recorded++;
    return done;
}

static void copy_internal_error(struct kvm_run *run, struct pv_outcome *out)
{
    uint32_t n = run->internal.ndata;

    if (n > 16)
        n = 16;
    out->suberror = run->internal.suberror;
    out->ndata = n;
    memcpy(out->info, run->internal.data, n * sizeof(uint64_t));
}

static void copy_system_event(struct kvm_run *run, struct pv_outcome *out)
{
    out->info[0] = run->system_event.type;
#ifdef KVM_SYSTEM_EVENT_NDATA_VALID
    out->ndata = run->system_event.ndata < 15 ? run->system_event.ndata : 15;
    memcpy(&out->info[1], run->system_event.data, out->ndata * sizeof(uint64_t));
#endif
}

/* Returns 1 when the exit ended the run. */
static PV_ALWAYS_INLINE int handle_exit(struct pv_vcpu *vcpu, struct kvm_run *run,
                                        struct pv_outcome *out)
{
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        return handle_pio(vcpu, run, out);
    case KVM_EXIT_MMIO:
        return handle_mmio(vcpu, run, out);
    case KVM_EXIT_HLT:
        out->kind = PV_OUT_HALT;
        return 1;
    case KVM_EXIT_SHUTDOWN:
        out->kind = PV_OUT_SHUTDOWN;
        return 1;
    case KVM_EXIT_SYSTEM_EVENT:
        out->kind = PV_OUT_SYSTEM_EVENT;
        copy_system_event(run, out);
        return 1;
    case KVM_EXIT_INTERNAL_ERROR:
        out->kind = PV_OUT_INTERNAL_ERROR;
        copy_internal_error(run, out);
        return 1;
    case KVM_EXIT_FAIL_ENTRY:
        out->kind = PV_OUT_FAIL_ENTRY;
        out->info[0] = run->fail_entry.hardware_entry_failure_reason;
        out->ndata = 1;
        return 1;
    case KVM_EXIT_DEBUG:
        /* A guest-debug event (KVM_SET_GUEST_DEBUG): single-step, a debug-register or
         * int3 hit.  x86's struct kvm_debug_exit_arch; the stub (pyvmm.gdb) decides. */
        out->kind = PV_OUT_DEBUG;
        out->info[0] = run->debug.arch.exception;
        out->info[1] = run->debug.arch.pc;
        out->info[2] = run->debug.arch.dr6;
        out->info[3] = run->debug.arch.dr7;
        out->ndata = 4;
        return 1;
    case KVM_EXIT_IRQ_WINDOW_OPEN:
    case KVM_EXIT_INTR:
        return 0;
    default:
        out->kind = PV_OUT_UNKNOWN_EXIT;
        return 1;
    }
}

void pv_vcpu_run(struct pv_vcpu *vcpu, struct pv_outcome *out)
{
    struct pv_vcpu_private *p;
    struct pv_trace_ring *trace;
    struct kvm_run *run;
    int done;

    memset(out, 0, sizeof(*out));
    out->range_index = -1;
    pthread_mutex_lock(&life_lock);
    p = vcpu->priv;
    if (!p || p->in_run) {        /* destroyed, or another thread runs it */
        pthread_mutex_unlock(&life_lock);
        out->kind = PV_OUT_RUN_ERROR;
        out->err = p ? EBUSY : EBADF;
        return;
    }
    p->thread = pthread_self();
    p->in_run = 1;
    pthread_mutex_unlock(&life_lock);
    run = p->run;

    for (;;) {
        if (ioctl(vcpu->fd, KVM_RUN, 0) < 0) {
            int err = errno;

            if (err == EINTR || err == EAGAIN) {
                if (p->stop_requested || __atomic_load_n(&p->orphaned, __ATOMIC_RELAXED)) {
                    pv_vcpu_clear_kick(vcpu);
                    out->kind = PV_OUT_STOPPED;
                    out->exit_reason = KVM_EXIT_INTR;
                    break;
                }
                if (__atomic_exchange_n(&p->sample_requested, 0, __ATOMIC_ACQ_REL)) {
                    take_sample(vcpu, p);
                    end_sample_kick(p);
                    continue;
                }
                vcpu->interrupted++;
                continue;
            }
            out->kind = PV_OUT_RUN_ERROR;
            out->err = err;
            break;
        }
        vcpu->exits[run->exit_reason < PV_EXIT_REASONS ? run->exit_reason : PV_EXIT_REASONS - 1]++;
        trace = __atomic_load_n(&p->trace, __ATOMIC_ACQUIRE);   /* a plain load on x86 */
        if (__builtin_expect(trace != NULL, 0))
            done = traced_exit(vcpu, p, trace, run, out, pv_monotonic_ns());
        else
            done = handle_exit(vcpu, run, out);
        if (done) {
            out->exit_reason = run->exit_reason;
            break;
        }
    }

    pthread_mutex_lock(&life_lock);
    p->in_run = 0;
    if (p->orphaned)
        vcpu->priv = NULL;        /* destroyed meanwhile: ours to free */
    else
        p = NULL;
    pthread_mutex_unlock(&life_lock);
    if (p)
        release_private(p, vcpu->fd);
}
