/* Shared by the agent's two files: agent.c (the protocol server) and main.c (modes,
 * PID 1 duties, vsock plumbing). */
#ifndef PYVMM_AGENT_H
#define PYVMM_AGENT_H

#include <stdint.h>
#include <sys/socket.h>

/*
 * musl-gcc ships no <linux/...> headers, so the little kernel ABI we need is
 * declared here, copied from the stable UAPI headers:
 *   <linux/vm_sockets.h>: AF_VSOCK, struct sockaddr_vm, VMADDR_CID_ANY
 *   <linux/random.h>:     RNDADDENTROPY = _IOW('R', 0x03, int[2]), struct rand_pool_info
 */
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#define VMADDR_CID_ANY 0xFFFFFFFFu
struct sockaddr_vm {
    sa_family_t svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_flags;
    unsigned char svm_zero[3];
};
#define RNDADDENTROPY 0x40085203
struct rand_pool_info {
    int entropy_count; /* bits credited */
    int buf_size;      /* bytes in buf */
    uint32_t buf[];
};

#define DEFAULT_PORT 1024        /* the vsock port Kata's agent uses too */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define AGENT_CHUNK 65536        /* bytes moved per read */

__attribute__((format(printf, 1, 2))) void log_line(const char *fmt, ...);
/* Serve clients on a listening socket, for ever. */
void serve(int listen_fd);

#endif
