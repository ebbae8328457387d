/* benchtool: the guest side of the blk and net benchmarks.
 *
 * Built static by the harness (gcc -static -O2) and added to the built-in
 * guest's initramfs as /bin/benchtool by appending a second cpio archive; the
 * same initramfs boots under pyvmm and QEMU.  Times are taken in the guest
 * (CLOCK_MONOTONIC, kvm-clock) around the I/O only.  Results are lines
 *     BENCH <name> key=value ...
 * on stdout (the serial console), parsed by benches/vmms.py:parse_results().
 *
 *   benchtool blk DEV SEQ_MIB RAND_SECONDS
 *       seqwrite: SEQ_MIB MiB in 1 MiB O_DIRECT writes from offset 0, then fsync
 *       seqread:  the same range in 1 MiB O_DIRECT reads
 *       randread: 4 KiB O_DIRECT reads at random 4 KiB-aligned offsets over the
 *                 whole device, one at a time, for RAND_SECONDS
 *       randwrite: the same with 4 KiB O_DIRECT writes, one at a time
 *       randread_qd8: randread from QD processes at once (queue depth QD=8 at the
 *                 device: the guest has no io_uring or libaio here, processes are
 *                 the portable way), for RAND_SECONDS; IOPS of all of them
 *   benchtool net IFACE GUEST_IP HOST_IP MIB SECONDS
 *       configures IFACE (address /24, up) with ioctls (no extra processes:
 *       each costs seconds of emulated ring 0 on KVM PVM), then
 *       rx: connects to HOST_IP:5201 and reads until EOF (the host sends MIB MiB)
 *       tx: connects to HOST_IP:5202 and writes MIB MiB or for SECONDS, then
 *           closes; the host times what it receives.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define MIB (1024 * 1024)
#define QD 8

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    printf("BENCHTOOL-ERROR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t xorshift(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* 4 KiB O_DIRECT reads or writes at random offsets for `seconds`; returns the count. */
static uint64_t random_4k(int fd, void *buf, uint64_t blocks, double seconds, int write)
{
    uint64_t n = 0;
    double end = now() + seconds;
    do {
        for (int k = 0; k < 16; k++, n++) {
            off_t at = (off_t)(xorshift() % blocks) * 4096;
            if ((write ? pwrite(fd, buf, 4096, at) : pread(fd, buf, 4096, at)) != 4096)
                die(write ? "pwrite 4k" : "pread 4k");
        }
    } while (now() < end);
    return n;
}

/* QD processes of random_4k reads at once; the children report their counts on a pipe. */
static void random_read_qd(const char *dev, uint64_t blocks, double seconds)
{
    int pipefd[2];
    if (pipe(pipefd) < 0)
        die("pipe");
    double t0 = now();
    for (int i = 0; i < QD; i++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            rng_state ^= (uint64_t)(i + 1) * 0x2545F4914F6CDD1Dull;
            int fd = open(dev, O_RDONLY | O_DIRECT);
            void *buf;
            if (fd < 0 || posix_memalign(&buf, 4096, 4096))
                die("child open");
            uint64_t n = random_4k(fd, buf, blocks, seconds, 0);
            if (write(pipefd[1], &n, sizeof n) != sizeof n)
                die("child write");
            _exit(0);
        }
    }
    close(pipefd[1]);
    uint64_t total = 0, n;
    while (read(pipefd[0], &n, sizeof n) == sizeof n)
        total += n;
    while (wait(NULL) > 0)
        ;
    double t = now() - t0;
    close(pipefd[0]);
    printf("BENCH randread_qd%d ops=%llu seconds=%.6f IOPS=%.1f\n", QD,
           (unsigned long long)total, t, total / t);
    fflush(stdout);
}

static int blk(const char *dev, long seq_mib, double rand_seconds)
{
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        die("open");
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0)
        die("BLKGETSIZE64");
    if ((uint64_t)seq_mib * MIB > size)
        seq_mib = size / MIB;
    void *buf;
    if (posix_memalign(&buf, 4096, MIB))
        die("posix_memalign");
    memset(buf, 0xa5, MIB);

    double t0 = now();
    for (long i = 0; i < seq_mib; i++)
        if (pwrite(fd, buf, MIB, (off_t)i * MIB) != MIB)
            die("pwrite");
    if (fsync(fd) < 0)
        die("fsync");
    double t = now() - t0;
    printf("BENCH seqwrite bytes=%ld seconds=%.6f MBps=%.3f\n", seq_mib * MIB, t,
           seq_mib * MIB / t / 1e6);
    fflush(stdout);

    t0 = now();
    for (long i = 0; i < seq_mib; i++)
        if (pread(fd, buf, MIB, (off_t)i * MIB) != MIB)
            die("pread");
    t = now() - t0;
    printf("BENCH seqread bytes=%ld seconds=%.6f MBps=%.3f\n", seq_mib * MIB, t,
           seq_mib * MIB / t / 1e6);
    fflush(stdout);

    uint64_t blocks = size / 4096;
    t0 = now();
    uint64_t n = random_4k(fd, buf, blocks, rand_seconds, 0);
    t = now() - t0;
    printf("BENCH randread ops=%llu seconds=%.6f IOPS=%.1f\n", (unsigned long long)n, t, n / t);
    fflush(stdout);

    t0 = now();
    n = random_4k(fd, buf, blocks, rand_seconds, 1);
    t = now() - t0;
    printf("BENCH randwrite ops=%llu seconds=%.6f IOPS=%.1f\n", (unsigned long long)n, t, n / t);
    fflush(stdout);

    random_read_qd(dev, blocks, rand_seconds);
    close(fd);
    return 0;
}

static void set_addr(int s, unsigned long req, const char *iface, const char *ip)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, iface, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, ip, &sin->sin_addr);
    if (ioctl(s, req, &ifr) < 0)
        die("SIOCSIF*");
}

static int connect_to(const char *host, int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    for (int tries = 0; tries < 200; tries++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            die("socket");
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0)
            return s;
        close(s);
        usleep(100000);
    }
    die("connect");
    return -1;
}

static int net(const char *iface, const char *guest_ip, const char *host_ip, long mib,
               double seconds)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        die("socket");
    set_addr(s, SIOCSIFADDR, iface, guest_ip);
    set_addr(s, SIOCSIFNETMASK, iface, "255.255.255.0");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, iface, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        die("SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        die("SIOCSIFFLAGS");
    close(s);
    printf("BENCHTOOL-NET-UP\n");
    fflush(stdout);

    static char buf[256 * 1024];
    /* host -> guest */
    int c = connect_to(host_ip, 5201);
    long long got = 0;
    double t0 = 0, t1 = 0;
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0)
            die("read");
        if (n == 0)
            break;
        if (!got)
            t0 = now();
        got += n;
        t1 = now();
    }
    close(c);
    printf("BENCH rx bytes=%lld seconds=%.6f MBps=%.3f\n", got, t1 - t0,
           t1 > t0 ? got / (t1 - t0) / 1e6 : 0.0);
    fflush(stdout);

    /* guest -> host */
    memset(buf, 0x5a, sizeof buf);
    c = connect_to(host_ip, 5202);
    long long sent = 0, total = (long long)mib * MIB;
    t0 = now();
    double end = t0 + seconds;
    while (sent < total && now() < end) {
        size_t want = total - sent < (long long)sizeof buf ? total - sent : sizeof buf;
        ssize_t n = write(c, buf, want);
        if (n < 0)
            die("write");
        sent += n;
    }
    shutdown(c, SHUT_WR);
    while (read(c, buf, sizeof buf) > 0)       /* the host closes when it has it all */
        ;
    t1 = now();
    close(c);
    printf("BENCH tx bytes=%lld seconds=%.6f MBps=%.3f\n", sent, t1 - t0,
           sent / (t1 - t0) / 1e6);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && !strcmp(argv[1], "blk"))
        return blk(argv[2], atol(argv[3]), atof(argv[4]));
    if (argc == 7 && !strcmp(argv[1], "net"))
        return net(argv[2], argv[3], argv[4], atol(argv[5]), atof(argv[6]));
    fprintf(stderr, "usage: benchtool blk DEV SEQ_MIB RAND_SECONDS | "
                    "net IFACE GUEST_IP HOST_IP MIB SECONDS\n");
    return 2;
}
