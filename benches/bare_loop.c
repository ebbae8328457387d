/*
 * The baseline of benches/exits.py: the least a VMM can do per exit.
 *
 *   bare_loop GUEST.bin
 *
 * Creates a VM with 4 MiB of RAM and one vCPU, sets it up exactly like
 * pyvmm.testbed.TinyVm(Mode.LONG_RING0) does (GDT at 0x500, TSS at 0x600,
 * identity-mapped 2 MiB pages at 0x9000.., code at 0x10000, 64-bit ring 0),
 * and runs KVM_RUN in a loop that answers every PIO/MMIO exit inline: writes
 * are dropped, reads return 0.  No bus, no counters, no device call.  The run
 * ends at a write to the debug-exit port 0xf4 (or MMIO 0xd0fff000) or a HLT.
 *
 * Prints one JSON line: {"ns": wall time of the run, "user_ns"/"sys_ns": CPU time
 * of the run (getrusage), "io_exits": PIO+MMIO exits including the final one}.
 * The clocks span the first KVM_RUN to the last exit.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4u << 20)
#define GDT_ADDR 0x500
#define TSS_ADDR 0x600
#define TSS_LIMIT 0x67
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xA000
#define PD_ADDR 0xB000
#define LOAD_ADDR 0x10000
#define STACK_TOP 0x80000
#define RING0_STACK_TOP 0x90000
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define TSS_SEL 0x28
#define DEBUG_EXIT_PORT 0xf4
#define DEBUG_EXIT_MMIO 0xd0fff000ull

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void put64(uint8_t *mem, uint64_t addr, uint64_t value)
{
    memcpy(mem + addr, &value, sizeof(value));
}

/* The same tables as TinyVm._write_long_mode_tables(). */
static void write_long_mode_tables(uint8_t *mem)
{
    static const uint64_t gdt[] = {
        0, 0x00AF9A000000FFFFull, 0x00CF92000000FFFFull,
        0x00CFF2000000FFFFull, 0x00AFFA000000FFFFull,
    };
    const uint64_t flags = 1 | 2 | 4;       /* present, writable, user */
    uint64_t low;
    int gib, i;

    memcpy(mem + GDT_ADDR, gdt, sizeof(gdt));
    low = (TSS_LIMIT & 0xFFFF) | ((uint64_t)(TSS_ADDR & 0xFFFFFF) << 16) | (0x89ull << 40)
        | ((uint64_t)((TSS_ADDR >> 24) & 0xFF) << 56);
    put64(mem, GDT_ADDR + TSS_SEL, low);
    put64(mem, GDT_ADDR + TSS_SEL + 8, 0);
    put64(mem, TSS_ADDR + 4, RING0_STACK_TOP);
    mem[TSS_ADDR + 0x66] = TSS_LIMIT + 1;  /* I/O bitmap base: none */
    put64(mem, PML4_ADDR, PDPT_ADDR | flags);
    for (gib = 0; gib < 4; gib++) {
        uint64_t pd = PD_ADDR + gib * 0x1000;
        put64(mem, PDPT_ADDR + 8 * gib, pd | flags);
        for (i = 0; i < 512; i++)
            put64(mem, pd + 8 * i, ((uint64_t)gib << 30) + ((uint64_t)i << 21) + (flags | 0x80));
    }
}

static void set_segment(struct kvm_segment *seg, uint64_t base, uint32_t limit, uint16_t sel,
                        uint8_t type, uint8_t s, uint8_t l, uint8_t db, uint8_t g)
{
    memset(seg, 0, sizeof(*seg));
    seg->base = base;
    seg->limit = limit;
    seg->selector = sel;
    seg->type = type;
    seg->present = 1;
    seg->s = s;
    seg->l = l;
    seg->db = db;
    seg->g = g;
}

/* The same registers as TinyVm._setup_vcpu() for Mode.LONG_RING0. */
static void setup_vcpu(int vcpu)
{
    struct kvm_sregs sregs;
    struct kvm_regs regs;

    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    set_segment(&sregs.cs, 0, 0xFFFFFFFF, KERNEL_CS, 0xB, 1, 1, 0, 1);
    set_segment(&sregs.ds, 0, 0xFFFFFFFF, KERNEL_DS, 0x3, 1, 0, 1, 1);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    set_segment(&sregs.tr, TSS_ADDR, TSS_LIMIT, TSS_SEL, 0xB, 0, 0, 0, 0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = TSS_SEL + 16 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1u << 31);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    sregs.efer = (1 << 8) | (1 << 10);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
        die("KVM_GET_REGS");
    regs.rip = LOAD_ADDR;
    regs.rsp = STACK_TOP;
    regs.rflags = 2;
    regs.rdi = 0;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

static size_t load_guest(const char *path, uint8_t *mem)
{
    FILE *f = fopen(path, "rb");
    size_t n;

    if (!f)
        die(path);
    n = fread(mem + LOAD_ADDR, 1, MEM_SIZE - LOAD_ADDR, f);
    fclose(f);
    return n;
}

static uint64_t tv_ns(struct timeval tv)
{
    return (uint64_t)tv.tv_sec * 1000000000ull + (uint64_t)tv.tv_usec * 1000;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    struct kvm_userspace_memory_region region;
    struct kvm_run *run;
    struct rusage ru0, ru1;
    uint64_t start, end, io_exits = 0;
    uint8_t *mem;
    int kvm, vm, vcpu, memfd, run_size;

    if (argc != 2) {
        fprintf(stderr, "usage: %s GUEST.bin\n", argv[0]);
        return 2;
    }
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    /* Guest RAM from a memfd, like pyvmm.memory.GuestMemory. */
    memfd = memfd_create("bare-loop-guest", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, MEM_SIZE) < 0)
        die("memfd");
    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED)
        die("mmap guest RAM");
    region = (struct kvm_userspace_memory_region){
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    write_long_mode_tables(mem);
    load_guest(argv[1], mem);
    setup_vcpu(vcpu);

    getrusage(RUSAGE_SELF, &ru0);
    start = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        if (run->exit_reason == KVM_EXIT_IO) {
            io_exits++;
            if (run->io.port == DEBUG_EXIT_PORT)
                break;
            if (run->io.direction == KVM_EXIT_IO_IN)
                memset((uint8_t *)run + run->io.data_offset, 0, run->io.size * run->io.count);
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            io_exits++;
            if (run->mmio.phys_addr == DEBUG_EXIT_MMIO)
                break;
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0, sizeof(run->mmio.data));
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            break;
        } else {
            fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
            return 1;
        }
    }
    end = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    printf("{\"ns\": %llu, \"user_ns\": %llu, \"sys_ns\": %llu, \"io_exits\": %llu}\n",
           (unsigned long long)(end - start),
           (unsigned long long)(tv_ns(ru1.ru_utime) - tv_ns(ru0.ru_utime)),
           (unsigned long long)(tv_ns(ru1.ru_stime) - tv_ns(ru0.ru_stime)),
           (unsigned long long)io_exits);
    return 0;
}
