/*
 * pyvmm-agent's entry: the modes (serve on vsock or a Unix socket, --init as PID 1 of
 * the sandbox, vsock-connect / vsock-listen as a tiny socat for tests).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

/* ---- listening sockets ---- */

static int listen_vsock(unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 64) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static int listen_unix(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 64) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* ---- vsock-connect / vsock-listen: stdin/stdout <-> one vsock connection ---- */

static int relay(int sock)
{
    static char buf[AGENT_CHUNK];
    int stdin_open = 1;
    for (;;) {
        struct pollfd p[2] = {{.fd = sock, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
        if (poll(p, stdin_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (p[0].revents) {
            ssize_t r = read(sock, buf, sizeof buf);
            if (r <= 0)
                return r < 0;
            for (ssize_t off = 0; off < r;) {
                ssize_t w = write(1, buf + off, (size_t)(r - off));
                if (w < 0)
                    return 1;
                off += w;
            }
        }
        if (stdin_open && p[1].revents) {
            ssize_t r = read(0, buf, sizeof buf);
            if (r <= 0) {
                shutdown(sock, SHUT_WR);
                stdin_open = 0;
                continue;
            }
            if (send(sock, buf, (size_t)r, MSG_NOSIGNAL) != r)
                return 1;
        }
    }
}

static int vsock_connect(unsigned cid, unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = cid};
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        log_line("cannot connect to vsock %u:%u: %s", cid, port, strerror(errno));
        return 1;
    }
    return relay(fd);
}

static int vsock_listen_once(unsigned port)
{
    int fd = listen_vsock(port);
    if (fd < 0) {
        log_line("cannot listen on vsock port %u: %s", port, strerror(errno));
        return 1;
    }
    fprintf(stderr, "PYVMM-AGENT-LISTENING port=%u\n", port);
    int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) {
        log_line("accept: %s", strerror(errno));
        return 1;
    }
    close(fd);
    return relay(conn);
}

/* ---- --init: PID 1 of the sandbox ---- */

__attribute__((noreturn)) static void hang_forever(const char *what)
{
    /* PID 1 must not exit (the kernel would panic): say why once, then only reap */
    log_line("fatal: %s: %s", what, strerror(errno));
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        sleep(1);
    }
}

static int is_mountpoint(const char *path)
{
    char parent[PATH_MAX];
    struct stat a, b;
    snprintf(parent, sizeof parent, "%s/..", path);
    return stat(path, &a) == 0 && stat(parent, &b) == 0 && a.st_dev != b.st_dev;
}

static void mount_once(const char *type, const char *path, unsigned long flags, const char *opts)
{
    mkdir(path, 0755);
    if (!is_mountpoint(path) && mount(type, path, type, flags, opts) != 0)
        log_line("cannot mount %s on %s: %s", type, path, strerror(errno));
}

static void loopback_up(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (fd >= 0 && ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    if (fd >= 0)
        close(fd);
}

static void init_system(void)
{
    mount_once("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_once("sysfs", "/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_once("devtmpfs", "/dev", MS_NOSUID, "mode=0755");
    mount_once("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666");
    mount_once("tmpfs", "/dev/shm", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_once("tmpfs", "/tmp", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_once("tmpfs", "/run", MS_NOSUID | MS_NODEV, "mode=0755");
    symlink("/proc/self/fd", "/dev/fd");
    symlink("/proc/self/fd/0", "/dev/stdin");
    symlink("/proc/self/fd/1", "/dev/stdout");
    symlink("/proc/self/fd/2", "/dev/stderr");
    int console = open("/dev/console", O_RDWR);
    if (console >= 0) {
        dup2(console, 0);
        dup2(console, 1);
        dup2(console, 2);
        if (console > 2)
            close(console);
    }
    sethostname("sandbox", 7);
    setenv("PATH", DEFAULT_PATH, 1);
    setenv("HOME", "/root", 1);
    loopback_up();
}

/* ---- main ---- */

static int usage(void)
{
    fputs("usage: pyvmm-agent [--init] [--port N | --unix PATH]\n"
          "       pyvmm-agent vsock-connect CID PORT\n"
          "       pyvmm-agent vsock-listen PORT\n", stderr);
    return 2;
}

static int parse_uint(const char *s, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *s == 0 || *end != 0 || v > 0xffffffffUL)
        return 0;
    *out = (unsigned)v;
    return 1;
}

int main(int argc, char **argv)
{
    unsigned port = DEFAULT_PORT, cid;
    const char *unix_path = NULL;
    int init = 0;
    /* fds 0-2 must be taken, or a pipe could land there and be lost at dup2() */
    int spare;
    while ((spare = open("/dev/null", O_RDWR)) >= 0 && spare <= 2) {
    }
    if (spare > 2)
        close(spare);
    signal(SIGPIPE, SIG_IGN);
    if (argc == 4 && strcmp(argv[1], "vsock-connect") == 0)
        return parse_uint(argv[2], &cid) && parse_uint(argv[3], &port) ? vsock_connect(cid, port) : usage();
    if (argc == 3 && strcmp(argv[1], "vsock-listen") == 0)
        return parse_uint(argv[2], &port) ? vsock_listen_once(port) : usage();
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--init") == 0)
            init = 1;
        else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc && parse_uint(argv[i + 1], &port))
            i++;
        else if (strcmp(argv[i], "--unix") == 0 && i + 1 < argc)
            unix_path = argv[++i];
        else
            return usage();
    }
    if (init)
        init_system();
    else
        prctl(PR_SET_CHILD_SUBREAPER, 1); /* orphaned grandchildren are ours to reap */

    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);

    int fd = -1;
    for (int tries = 0; fd < 0; tries++) {
        fd = unix_path ? listen_unix(unix_path) : listen_vsock(port);
        if (fd >= 0)
            break;
        if (!init && unix_path) {
            log_line("cannot listen on the unix socket %s: %s", unix_path, strerror(errno));
            return 1;
        }
        if (!init) {
            log_line("cannot listen on vsock port %u: %s", port, strerror(errno));
            return 1;
        }
        if (tries == 100)
            hang_forever("cannot listen on the vsock port");
        usleep(100000); /* the vsock transport may still be probing */
    }
    if (unix_path)
        printf("PYVMM-AGENT-READY unix=%s\n", unix_path);
    else
        printf("PYVMM-AGENT-READY port=%u\n", port);
    fflush(stdout);
    serve(fd);
    hang_forever("the event loop ended");
}
