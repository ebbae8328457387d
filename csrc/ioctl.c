/*
 * ioctl with an unsigned long argument, and a memory barrier for Python.  fcntl.ioctl() passes integer
 * arguments as a C int, which cannot carry KVM_SET_TSS_ADDR's 0xfffbd000.
 */
#include <errno.h>
#include <sys/ioctl.h>
#include "pyvmm.h"

long pv_ioctl_ulong(int fd, unsigned long request, unsigned long arg)
{
    long rc = ioctl(fd, request, arg);

    return rc < 0 ? -errno : rc;
}

void pv_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
