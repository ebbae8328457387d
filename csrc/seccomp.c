/*
 * seccomp: the mechanism only.  pyvmm.seccomp (Python) decides which system calls each
 * thread may make and hands us a flat rule table; we build the BPF with libseccomp and
 * load it on the calling thread (no TSYNC: every pyvmm thread installs its own filter
 * when it starts, as Firecracker does).
 *
 * A call outside the filter traps (SECCOMP_RET_TRAP): our SIGSYS handler writes one line
 * naming the thread and the system call to stderr and ends the process.  Everything it
 * needs is prepared beforehand (the syscall name table, the thread's name in static TLS),
 * and it calls only write(2) and exit_group(2), which every filter allows.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <seccomp.h>
#include "pyvmm.h"

#define NAMES 1024

static const char *syscall_names[NAMES];
static int prepared;
static __thread __attribute__((tls_model("initial-exec"))) char thread_name[PV_SC_NAME_LEN];

static size_t append(char *buf, size_t at, size_t cap, const char *text)
{
    while (*text && at + 1 < cap)
        buf[at++] = *text++;
    buf[at] = 0;
    return at;
}

static size_t append_num(char *buf, size_t at, size_t cap, long value)
{
    char digits[24];
    int n = 0;
    unsigned long v = value < 0 ? -(unsigned long)value : (unsigned long)value;

    do {
        digits[n++] = '0' + v % 10;
        v /= 10;
    } while (v && n < 23);
    if (value < 0 && at + 1 < cap)
        buf[at++] = '-';
    while (n && at + 1 < cap)
        buf[at++] = digits[--n];
    buf[at] = 0;
    return at;
}

static size_t append_hex(char *buf, size_t at, size_t cap, unsigned long value)
{
    char digits[17];
    int n = 0;

    do {
        digits[n++] = "0123456789abcdef"[value & 15];
        value >>= 4;
    } while (value && n < 16);
    at = append(buf, at, cap, "0x");
    while (n && at + 1 < cap)
        buf[at++] = digits[--n];
    buf[at] = 0;
    return at;
}

static void on_sigsys(int sig, siginfo_t *info, void *context)
{
    char line[512];
    size_t at = 0;
    int nr = info->si_syscall;
    const char *name = (nr >= 0 && nr < NAMES && syscall_names[nr]) ? syscall_names[nr] : "?";
    const ucontext_t *uc = context;

    at = append(line, at, sizeof(line), "pyvmm: seccomp: thread ");
    at = append(line, at, sizeof(line), thread_name[0] ? thread_name : "?");
    at = append(line, at, sizeof(line), " made a forbidden system call ");
    at = append(line, at, sizeof(line), name);
    at = append(line, at, sizeof(line), " (");
    at = append_num(line, at, sizeof(line), nr);
    /* The argument the filter checks, where that is what made the call forbidden. */
    if (nr == __NR_ioctl) {
        at = append(line, at, sizeof(line), ", request ");
        at = append_hex(line, at, sizeof(line), (unsigned long)uc->uc_mcontext.gregs[REG_RSI]);
    } else if (nr == __NR_socket || nr == __NR_clone || nr == __NR_prctl) {
        at = append(line, at, sizeof(line), ", first argument ");
        at = append_hex(line, at, sizeof(line), (unsigned long)uc->uc_mcontext.gregs[REG_RDI]);
    } else if (nr == __NR_openat) {
        at = append(line, at, sizeof(line), ", flags ");
        at = append_hex(line, at, sizeof(line), (unsigned long)uc->uc_mcontext.gregs[REG_RDX]);
    }
    at = append(line, at, sizeof(line), "); the VMM is stopped. Run with --no-seccomp to "
                "check whether the filter is the cause (docs/seccomp.md)\n");
    for (size_t done = 0; done < at;) {
        ssize_t n = write(2, line + done, at - done);
        if (n <= 0)
            break;
        done += n;
    }
    _exit(PV_SC_EXIT_STATUS);
}

int pv_seccomp_prepare(void)
{
    struct sigaction action;

    if (prepared)
        return 0;
    /* libseccomp probes the kernel (seccomp(2) with several operations) once per process:
     * done here, on a thread with no filter yet, not later under one. */
    if (seccomp_api_get() < 1)
        return -ENOSYS;
    for (int nr = 0; nr < NAMES; nr++)
        syscall_names[nr] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigsys;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSYS, &action, NULL) < 0)
        return -errno;
    prepared = 1;
    return 0;
}

int pv_seccomp_resolve(const char *name)
{
    int nr = seccomp_syscall_resolve_name(name);

    return nr == __NR_SCMP_ERROR ? -ENOENT : nr;
}

/* name: what the SIGSYS line says; the kernel's name (top, ps, audit logs) is pv-<name>. */
int pv_set_thread_name(const char *name)
{
    char comm[16] = "pv-";

    strncpy(thread_name, name, PV_SC_NAME_LEN - 1);
    thread_name[PV_SC_NAME_LEN - 1] = 0;
    strncat(comm, name, sizeof(comm) - 4);
    return prctl(PR_SET_NAME, (unsigned long)comm, 0, 0, 0) < 0 ? -errno : 0;
}

static const enum scmp_compare OPS[] = {
    [PV_SC_EQ] = SCMP_CMP_EQ,
    [PV_SC_MASKED_EQ] = SCMP_CMP_MASKED_EQ,
};

int pv_seccomp_install(const struct pv_sc_rule *rules, int count, int log_only)
{
    scmp_filter_ctx ctx;
    int rc = pv_seccomp_prepare();

    if (rc < 0)
        return rc;
    ctx = seccomp_init(log_only ? SCMP_ACT_LOG : SCMP_ACT_TRAP);
    if (ctx == NULL)
        return -ENOMEM;
    /* A binary tree of syscall numbers rather than a list: ~log2(n) comparisons per call. */
    rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
    /* The kernel logs a trapped call too (audit type 1326, in dmesg): a second record of
     * a violation, even when stderr went nowhere. */
    if (rc == 0)
        rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_LOG, 1);
    /* The SIGSYS handler's own calls: always allowed, whatever the policy says. */
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(write), 0);
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(exit_group), 0);
    for (int i = 0; rc == 0 && i < count; i++) {
        const struct pv_sc_rule *rule = &rules[i];
        struct scmp_arg_cmp cmp[PV_SC_MAX_CMP];
        uint32_t action = rule->errno_value ? SCMP_ACT_ERRNO(rule->errno_value) : SCMP_ACT_ALLOW;

        if (rule->ncmp < 0 || rule->ncmp > PV_SC_MAX_CMP) {
            rc = -EINVAL;
            break;
        }
        for (int c = 0; c < rule->ncmp; c++) {
            if (rule->cmp[c].op < 0 || rule->cmp[c].op > PV_SC_MASKED_EQ || rule->cmp[c].arg > 5) {
                rc = -EINVAL;
                break;
            }
            cmp[c].arg = rule->cmp[c].arg;
            cmp[c].op = OPS[rule->cmp[c].op];
            cmp[c].datum_a = rule->cmp[c].a;
            cmp[c].datum_b = rule->cmp[c].b;
        }
        if (rc == 0)
            rc = seccomp_rule_add_exact_array(ctx, action, rule->nr, rule->ncmp, cmp);
    }
    if (rc == 0)
        rc = seccomp_load(ctx);
    seccomp_release(ctx);
    return rc;
}
