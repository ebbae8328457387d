/* blk-model's baseline: the bare pread/pwrite loop the virtio-blk queue code is
 * compared with.  usage: blk_bare FILE read|write SIZE COUNT
 * SIZE-byte requests at consecutive offsets (wrapping at the file's end) into
 * one page-aligned buffer; prints {"ns": total} for COUNT requests. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: blk_bare FILE read|write SIZE COUNT\n");
        return 2;
    }
    int writing = !strcmp(argv[2], "write");
    long size = atol(argv[3]), count = atol(argv[4]);
    int fd = open(argv[1], writing ? O_RDWR : O_RDONLY);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    struct stat st;
    fstat(fd, &st);
    long slots = st.st_size / size;
    void *buf;
    if (posix_memalign(&buf, 4096, size))
        return 1;
    memset(buf, 0x5a, size);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < count; i++) {
        off_t off = (off_t)(i % slots) * size;
        ssize_t n = writing ? pwrite(fd, buf, size, off) : pread(fd, buf, size, off);
        if (n != size) {
            perror("io");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("{\"ns\": %lld}\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
