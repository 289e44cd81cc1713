/*
 * LD_PRELOAD shim that lets User-Mode Linux 6.1 run on hosts with a large XSAVE area.
 *
 * UML saves and restores each guest process's FPU state with
 * ptrace(PTRACE_GETREGSET / PTRACE_SETREGSET, NT_X86_XSTATE) through a buffer the size of
 * its own `struct _xstate` (832 bytes: legacy area, header, AVX). Reading with a short
 * buffer is fine (the kernel truncates), but the host kernel rejects a write that is not
 * the full XSAVE size (arch/x86/kernel/fpu/regset.c: xstateregs_set, -EFAULT). On CPUs with
 * AVX-512 and AMX that size is ~11 KiB, so every guest boot dies with
 * "ptrace set fp regs failed, errno = 14" / "Attempted to kill init".
 *
 * The shim keeps a full-size shadow of each of UML's buffers (keyed by its address: one
 * per guest task): a GETREGSET fills the shadow and copies UML's part out; a SETREGSET
 * copies UML's part into the shadow and writes the whole, so the state UML does not know
 * about (upper ZMM, AMX) round-trips unchanged too. Any other ptrace call passes through.
 *
 * UML calls ptrace on its small kernel stacks, early, with its own allocator: no large
 * stack buffers and no malloc here, only static storage and mmap.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef long (*ptrace_fn)(enum __ptrace_request, pid_t, void *, void *);

#define SLOTS 8192 /* guest tasks alive at once, at most */

struct slot {
    void *key;           /* UML's buffer */
    unsigned char *full; /* its full-size shadow */
};

static struct slot table[SLOTS];
static size_t full_size;
static unsigned char probe[65536];

static ptrace_fn real(void) {
    static ptrace_fn fn;
    if (!fn)
        fn = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return fn;
}

static struct slot *lookup(void *key, int create) {
    size_t h = ((uintptr_t)key >> 4) % SLOTS;
    for (size_t i = 0; i < SLOTS; i++) {
        struct slot *s = &table[(h + i) % SLOTS];
        if (s->key == key)
            return s;
        if (s->key == NULL) {
            if (!create)
                return NULL;
            void *m = mmap(NULL, full_size, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED)
                return NULL;
            s->key = key;
            s->full = m;
            return s;
        }
    }
    return NULL;
}

long ptrace(enum __ptrace_request req, ...) {
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);

    if ((req != PTRACE_GETREGSET && req != PTRACE_SETREGSET) ||
        (uintptr_t)addr != NT_X86_XSTATE)
        return real()(req, pid, addr, data);

    struct iovec *iov = data;
    if (full_size == 0) { /* the kernel reports the full size on a large read */
        struct iovec p = {probe, sizeof probe};
        long r = real()(PTRACE_GETREGSET, pid, addr, &p);
        if (r < 0)
            return r;
        full_size = p.iov_len;
    }
    if (iov->iov_len >= full_size)
        return real()(req, pid, addr, data);

    int fresh = lookup(iov->iov_base, 0) == NULL;
    struct slot *s = lookup(iov->iov_base, 1);
    if (!s)
        return real()(req, pid, addr, data);
    struct iovec f = {s->full, full_size};
    if (req == PTRACE_GETREGSET) {
        long r = real()(req, pid, addr, &f);
        if (r < 0)
            return r;
        memcpy(iov->iov_base, s->full, iov->iov_len);
        return r;
    }
    if (fresh) { /* never read for this task: start from the tracee's current state */
        long r = real()(PTRACE_GETREGSET, pid, addr, &f);
        if (r < 0)
            return r;
    }
    memcpy(s->full, iov->iov_base, iov->iov_len);
    return real()(req, pid, addr, &f);
}
