/*
 * p11fault -- a fault-injecting PKCS#11 forwarding module (test fixture).
 *
 * Exports only C_GetFunctionList.  On the first call it dlopen()s the real
 * module named by $P11FAULT_MODULE, copies the real CK_FUNCTION_LIST into a
 * static list and replaces entries with wrappers that inject faults following
 * a schedule read once from the environment.  See README.md next to this file
 * for the full semantics; the short version:
 *
 *   P11FAULT_MODULE=/usr/lib/softhsm/libsofthsm2.so   (required)
 *   P11FAULT_SIGN_FAIL_AT=3,4,10   signature attempts #3, #4, #10 fail
 *   P11FAULT_SIGN_FAIL_FROM=N      every attempt from #N on fails
 *   P11FAULT_SIGN_RV=0x30          rv of a faulted attempt (default 0x30)
 *   P11FAULT_SIGN_FLIP_AT=3,7      signature attempts #3 and #7 succeed (CKR_OK)
 *                                  but return a corrupted signature: the
 *                                  lowest bit of its last byte is flipped
 *                                  (a faulty HSM); logged as flip#<attempt>
 *   P11FAULT_SESSION_FATAL=auto|0|1  does a faulted attempt kill the session
 *   P11FAULT_SIGN_DELAY_US=N       sleep N us at the start of every attempt
 *   P11FAULT_SIGN_SLOTS=K          at most K attempts sleep that delay at once
 *                                  (a counting semaphore: capacity K / delay)
 *   P11FAULT_SIGN_SLOTS_NAME=/n    share those K slots between processes
 *                                  (named POSIX semaphore /n)
 *   P11FAULT_LOGIN_RV=0xA0         every C_Login fails with this rv
 *   P11FAULT_TOKEN_GONE_FROM=N     the token is pulled at signature attempt #N
 *   P11FAULT_TOKEN_BACK_MS=M       ... and is back M ms later (unset: never)
 *   P11FAULT_SESSION_IDLE_MS=N     a session with no call on it for more than
 *                                  N ms is dropped, as a network HSM drops an
 *                                  idle session: the next call on it answers
 *                                  CKR_SESSION_HANDLE_INVALID and it is dead
 *                                  from then on; logged as idle#<ms idle>
 *   P11FAULT_LOG=/path             one appended line per injected fault
 *   P11FAULT_OS_LOCKING=1          turn C_Initialize(NULL) into
 *                                  C_Initialize({flags=CKF_OS_LOCKING_OK})
 *   P11FAULT_ECDSA_HASH=1          offer CKM_ECDSA_SHA256/384 (C_GetMechanismInfo,
 *                                  single-part C_Sign): the real module digests,
 *                                  then signs with CKM_ECDSA (SoftHSM2 2.6 has
 *                                  no hash-and-sign ECDSA)
 *
 * A "signature attempt" is one single-part (C_Sign) or multi-part
 * (C_SignFinal) signature operation.  The usual two-call pattern
 * (length query with a NULL buffer, then the real call; or a retry after
 * CKR_BUFFER_TOO_SMALL) is ONE attempt, counted at its first call, so
 * "FAIL_AT=3" means "the 3rd signature fails" for python-pkcs11 (which does
 * C_SignInit, C_Sign(NULL), C_Sign(buf) per key.sign()) as well as for
 * callers that pass a large enough buffer straight away.  FLIP_AT numbers
 * attempts the same way; the bit is flipped in the call of the attempt that
 * returns the signature (CKR_OK with a buffer), not in a length query.  An
 * attempt that FAIL_AT/FAIL_FROM fails or TOKEN_GONE_FROM pulls returns no
 * signature, so there is nothing to flip.
 *
 * A session killed by a fault is closed in the real module (so token login
 * state behaves like a real HSM that dropped the session) and its handle is
 * remembered as dead: every later call on it returns
 * CKR_SESSION_HANDLE_INVALID.  Should the real module hand the same handle
 * number out again before the application has closed the dead one, the shim
 * keeps that real session for itself ("plug") and opens another one, so a dead
 * handle never aliases a live session.
 *
 * SESSION_IDLE_MS kills sessions the same way.  Each live session carries the
 * CLOCK_MONOTONIC time of its last activity: C_OpenSession starts it, and
 * every wrapped call taking the session handle restarts it, both when it
 * begins and when it returns (a long call, such as a delayed signature, is
 * not idle time).  A call on a session idle for more than N ms is refused
 * before anything else (before a signature attempt is counted), the session
 * is killed and "idle#<ms>" logged.  C_OpenSession and C_Login first kill
 * every session of the process that has gone idle (a network HSM drops it
 * when its timer expires, whether or not it is used again), so that the
 * token's login state is that of an HSM that dropped them.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------------ */
/* configuration (read once, in C_GetFunctionList's first call)              */

static struct {
    unsigned long *fail_at; /* sorted signature-attempt numbers, 1-based */
    size_t n_fail_at;
    unsigned long *flip_at; /* attempts whose signature comes back corrupted */
    size_t n_flip_at;
    unsigned long fail_from; /* 0 = disabled */
    CK_RV sign_rv;
    int session_fatal; /* -1 auto, 0 never, 1 always */
    unsigned long delay_us;
    unsigned long slots; /* 0 = no limit on attempts sleeping the delay */
    char *slots_name;    /* named semaphore shared between processes */
    int login_fault;
    CK_RV login_rv;
    unsigned long gone_from; /* 0 = the token is never pulled */
    unsigned long back_ms;   /* 0 = a pulled token never comes back */
    unsigned long idle_ms;   /* 0 = sessions never time out */
    char *log_path;
    int os_locking; /* C_Initialize(NULL) -> C_Initialize(CKF_OS_LOCKING_OK) */
    int ecdsa_hash; /* CKM_ECDSA_SHA256/384: -1 as the real module, 0 refused, 1 emulated */
} cfg;

static CK_FUNCTION_LIST *real;  /* the real module's list */
static CK_FUNCTION_LIST shim;   /* what we hand out */
static CK_RV init_rv = CKR_GENERAL_ERROR;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* SIGN_SLOTS: a signature attempt holds a slot while it sleeps the delay */
static sem_t local_slots;
static sem_t *slots; /* &local_slots, a named semaphore, or NULL */

/* ------------------------------------------------------------------------ */
/* per-process state, all guarded by lock                                    */

struct sess {
    CK_SESSION_HANDLE h;
    CK_SLOT_ID slot;
    int dead;       /* faulted: every call answers SESSION_HANDLE_INVALID */
    int plug;       /* dead, and real handle h is a shim-owned placeholder */
    int in_attempt; /* a signature attempt is in progress (length queried) */
    unsigned long attempt; /* the number of the attempt in progress */
    int flip;       /* FLIP_AT: corrupt the signature this attempt returns */
    CK_MECHANISM_TYPE hash; /* ECDSA_HASH: the operation is CKM_ECDSA over this
                               digest (CKM_SHA256/384); 0: not emulated */
    struct timespec last;   /* SESSION_IDLE_MS: last activity (CLOCK_MONOTONIC) */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sess *sessions;
static size_t n_sessions, cap_sessions;
static unsigned long sign_attempts; /* signature attempts seen so far */
static unsigned long login_calls;
static int pulled;                    /* the token has been pulled (once) */
static struct timespec pulled_at;     /* CLOCK_MONOTONIC */
static unsigned long absent_calls;    /* calls refused while it is absent */

static void p11f_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("p11fault: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* lock held */
static struct sess *find_sess(CK_SESSION_HANDLE h)
{
    for (size_t i = 0; i < n_sessions; i++)
        if (sessions[i].h == h)
            return &sessions[i];
    return NULL;
}

/* lock held; returns NULL only when out of memory */
static struct sess *get_sess(CK_SESSION_HANDLE h)
{
    struct sess *s = find_sess(h);
    if (s)
        return s;
    if (n_sessions == cap_sessions) {
        size_t ncap = cap_sessions ? cap_sessions * 2 : 16;
        struct sess *n = realloc(sessions, ncap * sizeof(*n));
        if (!n)
            return NULL;
        sessions = n;
        cap_sessions = ncap;
    }
    s = &sessions[n_sessions++];
    memset(s, 0, sizeof(*s));
    s->h = h;
    clock_gettime(CLOCK_MONOTONIC, &s->last); /* a handle first seen now is not idle */
    return s;
}

/* lock held */
static void drop_sess(CK_SESSION_HANDLE h)
{
    for (size_t i = 0; i < n_sessions; i++) {
        if (sessions[i].h == h) {
            sessions[i] = sessions[--n_sessions];
            return;
        }
    }
}

/*
 * fork: each process counts its own attempts from 1.  The session table is
 * inherited as is (the real module's in-process state is inherited too, and
 * a dead handle must stay dead); a C_Finalize in the child clears it.
 */
static void atfork_prepare(void) { pthread_mutex_lock(&lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&lock); }
static void atfork_child(void)
{
    sign_attempts = 0;
    login_calls = 0;
    absent_calls = 0;
    for (size_t i = 0; i < n_sessions; i++)
        sessions[i].in_attempt = 0;
    if (slots == &local_slots) {
        /* a process-local device: the parent's sleeping threads are not
         * in the child, so the child starts with all K slots free */
        sem_destroy(&local_slots);
        sem_init(&local_slots, 0, (unsigned int)cfg.slots);
    }
    pthread_mutex_unlock(&lock);
}

/* ------------------------------------------------------------------------ */
/* fault log                                                                 */

static void log_fault(const char *what, unsigned long n, CK_RV rv)
{
    if (!cfg.log_path)
        return;
    char line[128];
    int len = snprintf(line, sizeof(line), "%ld %s#%lu rv=0x%lx\n",
                       (long)getpid(), what, n, (unsigned long)rv);
    if (len <= 0 || (size_t)len >= sizeof(line))
        return;
    int fd = open(cfg.log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        p11f_warn("cannot open P11FAULT_LOG %s: %s", cfg.log_path, strerror(errno));
        return;
    }
    /* one write() on an O_APPEND fd: lines of concurrent processes don't mix */
    if (write(fd, line, (size_t)len) != len)
        p11f_warn("short write to P11FAULT_LOG %s", cfg.log_path);
    close(fd);
}

/* ------------------------------------------------------------------------ */
/* idle sessions (SESSION_IDLE_MS)                                          */

static double ms_between(const struct timespec *from, const struct timespec *to)
{
    return (double)(to->tv_sec - from->tv_sec) * 1e3 + (double)(to->tv_nsec - from->tv_nsec) / 1e6;
}

/* lock held: kill a session (close the real one, remember the handle as dead) */
static void kill_locked(struct sess *s)
{
    if (s->dead)
        return;
    s->dead = 1;
    s->plug = 0;
    s->in_attempt = 0;
    real->C_CloseSession(s->h);
}

/*
 * lock held: if live session s has seen no call for more than IDLE_MS at
 * now, kill it as a network HSM drops an idle session and return 1 with the
 * whole milliseconds it was idle in *idle_ms (the caller logs "idle#<ms>"
 * once the lock is released).
 */
static int expire_locked(struct sess *s, const struct timespec *now, unsigned long *idle_ms)
{
    if (!cfg.idle_ms || s->dead)
        return 0;
    double ms = ms_between(&s->last, now);
    if (ms <= (double)cfg.idle_ms)
        return 0;
    kill_locked(s);
    *idle_ms = (unsigned long)ms;
    return 1;
}

/*
 * Take the lock and find h's session (NULL: never seen), killing it first
 * if it was idle for too long (*expired 1, *idle_ms how long; the caller
 * logs "idle#<ms>" once it released the lock).  *now: the time of the call.
 */
static struct sess *lock_sess(CK_SESSION_HANDLE h, struct timespec *now, int *expired, unsigned long *idle_ms)
{
    if (cfg.idle_ms)
        clock_gettime(CLOCK_MONOTONIC, now);
    pthread_mutex_lock(&lock);
    struct sess *s = find_sess(h);
    *expired = s && expire_locked(s, now, idle_ms);
    return s;
}

/*
 * At the start of every wrapped call taking session handle h: is the handle
 * dead (killed by a fault, or idle for too long just now)?  A live session's
 * idle clock restarts.  Handles the shim has never seen pass.
 */
static int session_enter(CK_SESSION_HANDLE h)
{
    struct timespec now = {0, 0};
    unsigned long idle_ms = 0;
    int expired;
    struct sess *s = lock_sess(h, &now, &expired, &idle_ms);
    int dead = s && s->dead;
    if (s && !dead && cfg.idle_ms)
        s->last = now;
    pthread_mutex_unlock(&lock);
    if (expired)
        log_fault("idle", idle_ms, CKR_SESSION_HANDLE_INVALID);
    return dead;
}

/* When a call on h returns: the time it took was not idle time. */
static void session_leave(CK_SESSION_HANDLE h)
{
    if (!cfg.idle_ms)
        return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&lock);
    struct sess *s = find_sess(h);
    if (s && !s->dead)
        s->last = now;
    pthread_mutex_unlock(&lock);
}

/*
 * Before C_OpenSession and C_Login: kill every session idle for too long
 * (a network HSM drops it when its timer expires, used again or not), so
 * that the token's login state is that of an HSM that dropped them.
 */
static void sweep_idle(void)
{
    if (!cfg.idle_ms)
        return;
    for (;;) {
        struct timespec now;
        unsigned long idle_ms = 0;
        int expired = 0;
        clock_gettime(CLOCK_MONOTONIC, &now);
        pthread_mutex_lock(&lock);
        for (size_t i = 0; i < n_sessions && !expired; i++)
            expired = expire_locked(&sessions[i], &now, &idle_ms);
        pthread_mutex_unlock(&lock);
        if (!expired)
            return;
        log_fault("idle", idle_ms, CKR_SESSION_HANDLE_INVALID);
    }
}

/* ------------------------------------------------------------------------ */
/* signature gate                                                            */

static int rv_is_session_fatal(CK_RV rv)
{
    if (cfg.session_fatal >= 0)
        return cfg.session_fatal;
    return rv == CKR_DEVICE_ERROR || rv == CKR_DEVICE_REMOVED ||
           rv == CKR_SESSION_CLOSED || rv == CKR_SESSION_HANDLE_INVALID ||
           rv == CKR_TOKEN_NOT_PRESENT;
}

static int in_list(const unsigned long *list, size_t n_list, unsigned long n)
{
    for (size_t i = 0; i < n_list; i++)
        if (list[i] == n)
            return 1;
    return 0;
}

static int attempt_faulted(unsigned long n)
{
    if (cfg.fail_from && n >= cfg.fail_from)
        return 1;
    return in_list(cfg.fail_at, cfg.n_fail_at, n);
}

static void sleep_us(unsigned long us)
{
    struct timespec ts = {(time_t)(us / 1000000UL), (long)(us % 1000000UL) * 1000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* the delay of one signature attempt, in one of the K slots if SIGN_SLOTS */
static void attempt_delay(void)
{
    if (slots)
        while (sem_wait(slots) == -1 && errno == EINTR)
            ;
    sleep_us(cfg.delay_us);
    if (slots)
        sem_post(slots);
}

/* lock held: is the token currently pulled out (TOKEN_GONE_FROM)? */
static int token_absent_locked(void)
{
    if (!pulled)
        return 0;
    if (!cfg.back_ms)
        return 1;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double ms = (double)(now.tv_sec - pulled_at.tv_sec) * 1e3 +
                (double)(now.tv_nsec - pulled_at.tv_nsec) / 1e6;
    return ms < (double)cfg.back_ms;
}

/*
 * A call that needs the token while it is pulled: count it, log it as
 * "absent#n" and tell the caller to answer CKR_TOKEN_NOT_PRESENT.
 */
static int refuse_absent(void)
{
    pthread_mutex_lock(&lock);
    int absent = token_absent_locked();
    unsigned long n = absent ? ++absent_calls : 0;
    pthread_mutex_unlock(&lock);
    if (absent)
        log_fault("absent", n, CKR_TOKEN_NOT_PRESENT);
    return absent;
}

enum gate { GATE_DEAD, GATE_PASS, GATE_FAULT, GATE_PULL };

/*
 * Called at the start of every C_Sign / C_SignFinal.  Decides whether this
 * call starts a new signature attempt, counts it, sleeps the configured delay
 * and tells whether to inject the fault.  *attempt_no receives the number of
 * the attempt (new or continued) and *flip whether a signature this call
 * returns is to be corrupted (FLIP_AT; only ever set with GATE_PASS).
 */
static enum gate sign_gate(CK_SESSION_HANDLE h, unsigned long *attempt_no, int *flip)
{
    int new_attempt = 0, fault = 0;
    struct timespec now = {0, 0};
    unsigned long idle_ms = 0;
    *flip = 0;

    if (cfg.idle_ms)
        clock_gettime(CLOCK_MONOTONIC, &now);
    pthread_mutex_lock(&lock);
    struct sess *s = get_sess(h);
    int expired = s && expire_locked(s, &now, &idle_ms);
    if (s && s->dead) {
        pthread_mutex_unlock(&lock);
        if (expired)
            log_fault("idle", idle_ms, CKR_SESSION_HANDLE_INVALID);
        return GATE_DEAD; /* rejected before counting, like any dead handle */
    }
    if (s && cfg.idle_ms)
        s->last = now;
    int pull = 0;
    if (!s || !s->in_attempt) {
        new_attempt = 1;
        *attempt_no = ++sign_attempts;
        fault = attempt_faulted(*attempt_no);
        pull = !pulled && cfg.gone_from && *attempt_no >= cfg.gone_from;
        *flip = !fault && !pull && in_list(cfg.flip_at, cfg.n_flip_at, *attempt_no);
        if (s) {
            s->in_attempt = 1;
            s->attempt = *attempt_no;
            s->flip = *flip;
        }
    } else {
        /* the real call after a length query, or a retry after
         * CKR_BUFFER_TOO_SMALL: same attempt, same number */
        *attempt_no = s->attempt;
        *flip = s->flip;
    }
    pthread_mutex_unlock(&lock);

    if (new_attempt && cfg.delay_us) {
        attempt_delay();
        log_fault("delay", *attempt_no, CKR_OK);
    }
    return pull ? GATE_PULL : fault ? GATE_FAULT : GATE_PASS;
}

/*
 * FLIP_AT: the real call returned rv; when it returned a signature (CKR_OK
 * with a buffer), flip the lowest bit of its last byte, as a faulty HSM
 * would, and log "flip#n".  A length query or a failed call flips nothing.
 */
static void maybe_flip(int flip, unsigned long n, CK_RV rv, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
    if (!flip || rv != CKR_OK || !sig || !sig_len || *sig_len == 0)
        return;
    sig[*sig_len - 1] ^= 0x01;
    log_fault("flip", n, CKR_OK);
}

/* after the real call: does the attempt continue (length query etc.)? */
static void sign_after(CK_SESSION_HANDLE h, CK_RV rv, int had_buffer)
{
    pthread_mutex_lock(&lock);
    struct sess *s = find_sess(h);
    if (s && !s->dead)
        s->in_attempt = (rv == CKR_OK && !had_buffer) || rv == CKR_BUFFER_TOO_SMALL;
    pthread_mutex_unlock(&lock);
}

/* kill a session: close the real one, remember the handle as dead */
static void kill_session(CK_SESSION_HANDLE h)
{
    pthread_mutex_lock(&lock);
    struct sess *s = get_sess(h);
    if (s)
        kill_locked(s);
    pthread_mutex_unlock(&lock);
}

/*
 * Pull the token out during attempt n: every session of the process dies
 * (closed in the real module, handles remembered as dead), and the attempt
 * answers CKR_DEVICE_REMOVED.
 */
static CK_RV pull_token(unsigned long n)
{
    pthread_mutex_lock(&lock);
    pulled = 1;
    clock_gettime(CLOCK_MONOTONIC, &pulled_at);
    for (size_t i = 0; i < n_sessions; i++) {
        struct sess *s = &sessions[i];
        if (!s->dead || s->plug)
            real->C_CloseSession(s->h);
        s->dead = 1;
        s->plug = 0;
        s->in_attempt = 0;
    }
    pthread_mutex_unlock(&lock);
    log_fault("sign", n, CKR_DEVICE_REMOVED);
    return CKR_DEVICE_REMOVED;
}

static void end_attempt(CK_SESSION_HANDLE h)
{
    pthread_mutex_lock(&lock);
    struct sess *s = find_sess(h);
    if (s)
        s->in_attempt = 0;
    pthread_mutex_unlock(&lock);
}

/*
 * Inject the fault for attempt n.  A failed C_Sign/C_SignFinal terminates the
 * signing operation (PKCS#11 2.40 5.12), so for a non-fatal fault the real
 * operation is run to completion and its result thrown away; otherwise the
 * next C_SignInit on the still-valid session would see CKR_OPERATION_ACTIVE.
 */
static CK_RV inject_sign_fault(CK_SESSION_HANDLE h, unsigned long n,
                               CK_BYTE_PTR data, CK_ULONG data_len, int final)
{
    CK_RV rv = cfg.sign_rv;
    if (rv_is_session_fatal(rv)) {
        kill_session(h);
    } else {
        CK_ULONG len = 0;
        CK_RV r = final ? real->C_SignFinal(h, NULL, &len)
                        : real->C_Sign(h, data, data_len, NULL, &len);
        if (r == CKR_OK) {
            CK_BYTE_PTR buf = malloc(len ? len : 1);
            if (buf) {
                if (final)
                    real->C_SignFinal(h, buf, &len);
                else
                    real->C_Sign(h, data, data_len, buf, &len);
                free(buf);
            }
        }
        end_attempt(h);
    }
    log_fault("sign", n, rv);
    return rv;
}

/* ------------------------------------------------------------------------ */
/* wrappers with behaviour                                                   */

static CK_RV w_C_Initialize(void *args)
{
    if (args == NULL && cfg.os_locking) {
        /* python-pkcs11 passes NULL ("no concurrent access"), and SoftHSM2
         * then disables its internal locking; ask for OS locking instead */
        CK_C_INITIALIZE_ARGS locking;
        memset(&locking, 0, sizeof(locking));
        locking.flags = CKF_OS_LOCKING_OK;
        return real->C_Initialize(&locking);
    }
    return real->C_Initialize(args);
}

static CK_RV w_C_Finalize(void *reserved)
{
    CK_RV rv = real->C_Finalize(reserved);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&lock);
        n_sessions = 0; /* every session, dead or plug, is gone */
        pthread_mutex_unlock(&lock);
    }
    return rv;
}

static CK_RV w_C_GetSlotList(CK_BBOOL token_present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
    if (token_present && count) {
        pthread_mutex_lock(&lock);
        int absent = token_absent_locked();
        pthread_mutex_unlock(&lock);
        if (absent) {
            *count = 0;
            return CKR_OK;
        }
    }
    return real->C_GetSlotList(token_present, list, count);
}

static CK_RV w_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
    CK_RV rv = real->C_GetSlotInfo(slot, info);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&lock);
        if (token_absent_locked())
            info->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
        pthread_mutex_unlock(&lock);
    }
    return rv;
}

static CK_RV w_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    if (refuse_absent())
        return CKR_TOKEN_NOT_PRESENT;
    return real->C_GetTokenInfo(slot, info);
}

static CK_RV w_C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app,
                             CK_NOTIFY notify, CK_SESSION_HANDLE_PTR ph)
{
    if (refuse_absent())
        return CKR_TOKEN_NOT_PRESENT;
    sweep_idle();
    if (!ph)
        return real->C_OpenSession(slot, flags, app, notify, ph);
    pthread_mutex_lock(&lock);
    CK_RV rv;
    for (;;) {
        rv = real->C_OpenSession(slot, flags, app, notify, ph);
        if (rv != CKR_OK)
            break;
        struct sess *s = find_sess(*ph);
        if (s && s->dead && !s->plug) {
            /* the real module reused a dead handle number the application
             * still holds: keep that real session as a placeholder */
            s->plug = 1;
            s->slot = slot;
            continue;
        }
        s = get_sess(*ph);
        if (!s) {
            real->C_CloseSession(*ph);
            rv = CKR_HOST_MEMORY;
            break;
        }
        memset(s, 0, sizeof(*s));
        s->h = *ph;
        s->slot = slot;
        clock_gettime(CLOCK_MONOTONIC, &s->last); /* SESSION_IDLE_MS: the idle clock starts */
        break;
    }
    pthread_mutex_unlock(&lock);
    return rv;
}

static CK_RV w_C_CloseSession(CK_SESSION_HANDLE h)
{
    struct timespec now = {0, 0};
    unsigned long idle_ms = 0;
    int expired;
    struct sess *s = lock_sess(h, &now, &expired, &idle_ms);
    if (s && s->dead) {
        /* the application lets go of a dead handle: forget it and free the
         * placeholder, but answer like a device that lost the session */
        if (s->plug)
            real->C_CloseSession(h);
        drop_sess(h);
        pthread_mutex_unlock(&lock);
        if (expired)
            log_fault("idle", idle_ms, CKR_SESSION_HANDLE_INVALID);
        return CKR_SESSION_HANDLE_INVALID;
    }
    CK_RV rv = real->C_CloseSession(h);
    if (rv == CKR_OK || rv == CKR_SESSION_HANDLE_INVALID)
        drop_sess(h);
    pthread_mutex_unlock(&lock);
    return rv;
}

static CK_RV w_C_CloseAllSessions(CK_SLOT_ID slot)
{
    pthread_mutex_lock(&lock);
    CK_RV rv = real->C_CloseAllSessions(slot);
    if (rv == CKR_OK) {
        for (size_t i = 0; i < n_sessions;) {
            if (sessions[i].slot == slot)
                sessions[i] = sessions[--n_sessions];
            else
                i++;
        }
    }
    pthread_mutex_unlock(&lock);
    return rv;
}

static CK_RV w_C_Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin,
                       CK_ULONG pin_len)
{
    sweep_idle(); /* login state as the HSM has it: idle sessions are gone */
    if (session_enter(h))
        return CKR_SESSION_HANDLE_INVALID;
    if (cfg.login_fault) {
        pthread_mutex_lock(&lock);
        unsigned long n = ++login_calls;
        pthread_mutex_unlock(&lock);
        log_fault("login", n, cfg.login_rv);
        return cfg.login_rv;
    }
    CK_RV rv = real->C_Login(h, user, pin, pin_len);
    session_leave(h);
    return rv;
}

/* ECDSA_HASH: the digest of an emulated hash-and-sign mechanism, else 0 */
static CK_MECHANISM_TYPE emulated_hash(CK_MECHANISM_TYPE type)
{
    if (cfg.ecdsa_hash != 1)
        return 0;
    return type == CKM_ECDSA_SHA256 ? CKM_SHA256 : type == CKM_ECDSA_SHA384 ? CKM_SHA384 : 0;
}

static CK_RV w_C_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
    if (cfg.ecdsa_hash == 0 && (type == CKM_ECDSA_SHA256 || type == CKM_ECDSA_SHA384))
        return CKR_MECHANISM_INVALID;
    return real->C_GetMechanismInfo(slot, emulated_hash(type) ? CKM_ECDSA : type, info);
}

static CK_RV w_C_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key)
{
    CK_MECHANISM ecdsa = {CKM_ECDSA, NULL, 0};
    CK_MECHANISM_TYPE hash = mech ? emulated_hash(mech->mechanism) : 0;
    if (session_enter(h))
        return CKR_SESSION_HANDLE_INVALID;
    pthread_mutex_lock(&lock);
    struct sess *s = find_sess(h);
    if (s && s->dead) { /* killed by another thread meanwhile */
        pthread_mutex_unlock(&lock);
        return CKR_SESSION_HANDLE_INVALID;
    }
    if (s) {
        s->in_attempt = 0;
        s->hash = hash;
    }
    pthread_mutex_unlock(&lock);
    if (hash && !s)
        return CKR_HOST_MEMORY; /* the session table could not take it at C_OpenSession */
    CK_RV rv = real->C_SignInit(h, hash ? &ecdsa : mech, key);
    session_leave(h);
    return rv;
}

/*
 * ECDSA_HASH: for an emulated operation, point data at its digest in md. The
 * real module makes it in a session of its own: the signing session's
 * CKM_ECDSA operation is already active (C_SignInit).
 */
static CK_RV emulated_digest(CK_SESSION_HANDLE h, CK_BYTE_PTR *data, CK_ULONG *data_len,
                             CK_BYTE md[64])
{
    pthread_mutex_lock(&lock);
    struct sess *s = find_sess(h);
    CK_MECHANISM hash = {s ? s->hash : 0, NULL, 0};
    CK_SLOT_ID slot = s ? s->slot : 0;
    pthread_mutex_unlock(&lock);
    if (!hash.mechanism)
        return CKR_OK;
    CK_SESSION_HANDLE dh;
    CK_ULONG len = 64;
    CK_RV rv = real->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &dh);
    if (rv != CKR_OK)
        return rv;
    rv = real->C_DigestInit(dh, &hash);
    if (rv == CKR_OK)
        rv = real->C_Digest(dh, *data, *data_len, md, &len);
    real->C_CloseSession(dh);
    if (rv == CKR_OK) {
        *data = md;
        *data_len = len;
    }
    return rv;
}

static CK_RV sign_call(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
                       CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
    unsigned long n = 0;
    int flip;
    switch (sign_gate(h, &n, &flip)) {
    case GATE_DEAD:
        return CKR_SESSION_HANDLE_INVALID;
    case GATE_FAULT:
        return inject_sign_fault(h, n, data, data_len, 0);
    case GATE_PULL:
        return pull_token(n);
    case GATE_PASS:
        break;
    }
    CK_BYTE md[64];
    CK_RV rv = emulated_digest(h, &data, &data_len, md);
    if (rv == CKR_OK)
        rv = real->C_Sign(h, data, data_len, sig, sig_len);
    maybe_flip(flip, n, rv, sig, sig_len);
    sign_after(h, rv, sig != NULL);
    return rv;
}

static CK_RV sign_final_call(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
    unsigned long n = 0;
    int flip;
    switch (sign_gate(h, &n, &flip)) {
    case GATE_DEAD:
        return CKR_SESSION_HANDLE_INVALID;
    case GATE_FAULT:
        return inject_sign_fault(h, n, NULL, 0, 1);
    case GATE_PULL:
        return pull_token(n);
    case GATE_PASS:
        break;
    }
    CK_RV rv = real->C_SignFinal(h, sig, sig_len);
    maybe_flip(flip, n, rv, sig, sig_len);
    sign_after(h, rv, sig != NULL);
    return rv;
}

/* the delay of an attempt and the real call are not idle time */
static CK_RV w_C_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
                      CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
    CK_RV rv = sign_call(h, data, data_len, sig, sig_len);
    session_leave(h);
    return rv;
}

static CK_RV w_C_SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
    CK_RV rv = sign_final_call(h, sig, sig_len);
    session_leave(h);
    return rv;
}

/* ------------------------------------------------------------------------ */
/* plain guards: a dead (or too long idle) handle answers                   */
/* CKR_SESSION_HANDLE_INVALID; a live one's idle clock restarts             */

#define GUARD(fn, params, args)                                   \
    static CK_RV w_##fn params                                    \
    {                                                             \
        if (session_enter(session))                               \
            return CKR_SESSION_HANDLE_INVALID;                    \
        CK_RV rv = real->fn args;                                 \
        session_leave(session);                                   \
        return rv;                                                \
    }

typedef CK_SESSION_HANDLE SH;
typedef CK_OBJECT_HANDLE OH;
typedef CK_BYTE_PTR BP;
typedef CK_ULONG UL;
typedef CK_ULONG_PTR ULP;
typedef CK_ATTRIBUTE_PTR AP;
typedef CK_MECHANISM_PTR MP;

GUARD(C_InitPIN, (SH session, CK_UTF8CHAR_PTR pin, UL len), (session, pin, len))
GUARD(C_SetPIN, (SH session, CK_UTF8CHAR_PTR o, UL ol, CK_UTF8CHAR_PTR n, UL nl),
      (session, o, ol, n, nl))
GUARD(C_GetSessionInfo, (SH session, CK_SESSION_INFO_PTR info), (session, info))
GUARD(C_GetOperationState, (SH session, BP st, ULP len), (session, st, len))
GUARD(C_SetOperationState, (SH session, BP st, UL len, OH ek, OH ak),
      (session, st, len, ek, ak))
GUARD(C_Logout, (SH session), (session))
GUARD(C_CreateObject, (SH session, AP t, UL n, CK_OBJECT_HANDLE_PTR o), (session, t, n, o))
GUARD(C_CopyObject, (SH session, OH o, AP t, UL n, CK_OBJECT_HANDLE_PTR no),
      (session, o, t, n, no))
GUARD(C_DestroyObject, (SH session, OH o), (session, o))
GUARD(C_GetObjectSize, (SH session, OH o, ULP sz), (session, o, sz))
GUARD(C_GetAttributeValue, (SH session, OH o, AP t, UL n), (session, o, t, n))
GUARD(C_SetAttributeValue, (SH session, OH o, AP t, UL n), (session, o, t, n))
GUARD(C_FindObjectsInit, (SH session, AP t, UL n), (session, t, n))
GUARD(C_FindObjects, (SH session, CK_OBJECT_HANDLE_PTR o, UL max, ULP n),
      (session, o, max, n))
GUARD(C_FindObjectsFinal, (SH session), (session))
GUARD(C_EncryptInit, (SH session, MP m, OH k), (session, m, k))
GUARD(C_Encrypt, (SH session, BP d, UL dl, BP e, ULP el), (session, d, dl, e, el))
GUARD(C_EncryptUpdate, (SH session, BP d, UL dl, BP e, ULP el), (session, d, dl, e, el))
GUARD(C_EncryptFinal, (SH session, BP e, ULP el), (session, e, el))
GUARD(C_DecryptInit, (SH session, MP m, OH k), (session, m, k))
GUARD(C_Decrypt, (SH session, BP e, UL el, BP d, ULP dl), (session, e, el, d, dl))
GUARD(C_DecryptUpdate, (SH session, BP e, UL el, BP d, ULP dl), (session, e, el, d, dl))
GUARD(C_DecryptFinal, (SH session, BP d, ULP dl), (session, d, dl))
GUARD(C_DigestInit, (SH session, MP m), (session, m))
GUARD(C_Digest, (SH session, BP d, UL dl, BP o, ULP ol), (session, d, dl, o, ol))
GUARD(C_DigestUpdate, (SH session, BP d, UL dl), (session, d, dl))
GUARD(C_DigestKey, (SH session, OH k), (session, k))
GUARD(C_DigestFinal, (SH session, BP o, ULP ol), (session, o, ol))
GUARD(C_SignUpdate, (SH session, BP d, UL dl), (session, d, dl))
GUARD(C_SignRecoverInit, (SH session, MP m, OH k), (session, m, k))
GUARD(C_SignRecover, (SH session, BP d, UL dl, BP s, ULP sl), (session, d, dl, s, sl))
GUARD(C_VerifyInit, (SH session, MP m, OH k), (session, m, k))
GUARD(C_Verify, (SH session, BP d, UL dl, BP s, UL sl), (session, d, dl, s, sl))
GUARD(C_VerifyUpdate, (SH session, BP d, UL dl), (session, d, dl))
GUARD(C_VerifyFinal, (SH session, BP s, UL sl), (session, s, sl))
GUARD(C_VerifyRecoverInit, (SH session, MP m, OH k), (session, m, k))
GUARD(C_VerifyRecover, (SH session, BP s, UL sl, BP d, ULP dl), (session, s, sl, d, dl))
GUARD(C_DigestEncryptUpdate, (SH session, BP d, UL dl, BP e, ULP el), (session, d, dl, e, el))
GUARD(C_DecryptDigestUpdate, (SH session, BP e, UL el, BP d, ULP dl), (session, e, el, d, dl))
GUARD(C_SignEncryptUpdate, (SH session, BP d, UL dl, BP e, ULP el), (session, d, dl, e, el))
GUARD(C_DecryptVerifyUpdate, (SH session, BP e, UL el, BP d, ULP dl), (session, e, el, d, dl))
GUARD(C_GenerateKey, (SH session, MP m, AP t, UL n, CK_OBJECT_HANDLE_PTR k),
      (session, m, t, n, k))
GUARD(C_GenerateKeyPair,
      (SH session, MP m, AP pt, UL pn, AP st, UL sn, CK_OBJECT_HANDLE_PTR pk,
       CK_OBJECT_HANDLE_PTR sk),
      (session, m, pt, pn, st, sn, pk, sk))
GUARD(C_WrapKey, (SH session, MP m, OH wk, OH k, BP w, ULP wl), (session, m, wk, k, w, wl))
GUARD(C_UnwrapKey, (SH session, MP m, OH uk, BP w, UL wl, AP t, UL n, CK_OBJECT_HANDLE_PTR k),
      (session, m, uk, w, wl, t, n, k))
GUARD(C_DeriveKey, (SH session, MP m, OH bk, AP t, UL n, CK_OBJECT_HANDLE_PTR k),
      (session, m, bk, t, n, k))
GUARD(C_SeedRandom, (SH session, BP s, UL sl), (session, s, sl))
GUARD(C_GenerateRandom, (SH session, BP r, UL rl), (session, r, rl))
GUARD(C_GetFunctionStatus, (SH session), (session))
GUARD(C_CancelFunction, (SH session), (session))

/* ------------------------------------------------------------------------ */
/* environment parsing                                                       */

static int parse_ulong(const char *name, const char *s, unsigned long *out, int base)
{
    char *end;
    errno = 0;
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '-' || *s == '\0') {
        p11f_warn("%s: invalid number '%s'", name, s);
        return -1;
    }
    unsigned long v = strtoul(s, &end, base);
    while (*end == ' ' || *end == '\t')
        end++;
    if (errno || *end != '\0') {
        p11f_warn("%s: invalid number '%s'", name, s);
        return -1;
    }
    *out = v;
    return 0;
}

static const char *env(const char *name)
{
    const char *v = getenv(name);
    return (v && *v) ? v : NULL;
}

/* A 0/1 variable into *out (left as it is when unset); -1 (warned) otherwise. */
static int env_switch(const char *name, int *out)
{
    const char *v = env(name);
    if (!v)
        return 0;
    if (strcmp(v, "0") && strcmp(v, "1")) {
        p11f_warn("%s: expected 0 or 1, got '%s'", name, v);
        return -1;
    }
    *out = v[0] == '1';
    return 0;
}

/* A 1-based count into *out (left as it is when unset); -1 (warned) otherwise. */
static int env_count(const char *name, unsigned long *out)
{
    const char *v = env(name);
    unsigned long n;
    if (!v)
        return 0;
    if (parse_ulong(name, v, &n, 10))
        return -1;
    if (n == 0) {
        p11f_warn("%s: numbers are 1-based, got 0", name);
        return -1;
    }
    *out = n;
    return 0;
}

static int cmp_ulong(const void *a, const void *b)
{
    unsigned long x = *(const unsigned long *)a, y = *(const unsigned long *)b;
    return (x > y) - (x < y);
}

/* A list of 1-based attempt numbers ("3,4, 10") into *list, sorted. */
static int parse_attempt_list(const char *name, const char *v, unsigned long **list, size_t *n_list)
{
    char *copy = strdup(v);
    if (!copy)
        return -1;
    size_t cap = 1;
    for (const char *p = v; *p; p++)
        cap += (*p == ',');
    *list = calloc(cap, sizeof(unsigned long));
    if (!*list) {
        free(copy);
        return -1;
    }
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        unsigned long n = 0;
        if (parse_ulong(name, tok, &n, 10)) {
            free(copy);
            return -1;
        }
        if (n == 0) {
            p11f_warn("%s: numbers are 1-based, got '%s'", name, tok);
            free(copy);
            return -1;
        }
        (*list)[(*n_list)++] = n;
    }
    free(copy);
    if (*n_list == 0) {
        p11f_warn("%s: empty list '%s'", name, v);
        return -1;
    }
    qsort(*list, *n_list, sizeof(unsigned long), cmp_ulong);
    return 0;
}

static int read_config(void)
{
    const char *v;
    unsigned long n;

    cfg.sign_rv = CKR_DEVICE_ERROR;
    cfg.session_fatal = -1;
    cfg.ecdsa_hash = -1;

    if ((v = env("P11FAULT_SIGN_FAIL_AT")) &&
        parse_attempt_list("P11FAULT_SIGN_FAIL_AT", v, &cfg.fail_at, &cfg.n_fail_at))
        return -1;
    if ((v = env("P11FAULT_SIGN_FLIP_AT")) &&
        parse_attempt_list("P11FAULT_SIGN_FLIP_AT", v, &cfg.flip_at, &cfg.n_flip_at))
        return -1;
    if (env_count("P11FAULT_SIGN_FAIL_FROM", &cfg.fail_from))
        return -1;
    if ((v = env("P11FAULT_SIGN_RV"))) {
        if (parse_ulong("P11FAULT_SIGN_RV", v, &n, 0))
            return -1;
        if (n == CKR_OK) {
            p11f_warn("P11FAULT_SIGN_RV: must not be CKR_OK");
            return -1;
        }
        cfg.sign_rv = n;
    }
    if ((v = env("P11FAULT_SESSION_FATAL"))) {
        if (!strcmp(v, "auto"))
            cfg.session_fatal = -1;
        else if (!strcmp(v, "0"))
            cfg.session_fatal = 0;
        else if (!strcmp(v, "1"))
            cfg.session_fatal = 1;
        else {
            p11f_warn("P11FAULT_SESSION_FATAL: expected auto, 0 or 1, got '%s'", v);
            return -1;
        }
    }
    if (env_switch("P11FAULT_OS_LOCKING", &cfg.os_locking) || env_switch("P11FAULT_ECDSA_HASH", &cfg.ecdsa_hash))
        return -1;
    if ((v = env("P11FAULT_SIGN_DELAY_US"))) {
        if (parse_ulong("P11FAULT_SIGN_DELAY_US", v, &n, 10))
            return -1;
        cfg.delay_us = n;
    }
    if ((v = env("P11FAULT_SIGN_SLOTS"))) {
        if (parse_ulong("P11FAULT_SIGN_SLOTS", v, &n, 10))
            return -1;
        if (n == 0 || n > (unsigned long)SEM_VALUE_MAX) {
            p11f_warn("P11FAULT_SIGN_SLOTS: expected 1..%d, got '%s'", SEM_VALUE_MAX, v);
            return -1;
        }
        if (!cfg.delay_us) {
            p11f_warn("P11FAULT_SIGN_SLOTS needs P11FAULT_SIGN_DELAY_US");
            return -1;
        }
        cfg.slots = n;
    }
    if ((v = env("P11FAULT_SIGN_SLOTS_NAME"))) {
        if (!cfg.slots) {
            p11f_warn("P11FAULT_SIGN_SLOTS_NAME needs P11FAULT_SIGN_SLOTS");
            return -1;
        }
        if (v[0] != '/' || !v[1] || strchr(v + 1, '/') || strlen(v) > 200) {
            p11f_warn("P11FAULT_SIGN_SLOTS_NAME: expected '/name' (no other '/'), got '%s'", v);
            return -1;
        }
        if (!(cfg.slots_name = strdup(v)))
            return -1;
    }
    if ((v = env("P11FAULT_LOGIN_RV"))) {
        if (parse_ulong("P11FAULT_LOGIN_RV", v, &n, 0))
            return -1;
        if (n == CKR_OK) {
            p11f_warn("P11FAULT_LOGIN_RV: must not be CKR_OK");
            return -1;
        }
        cfg.login_fault = 1;
        cfg.login_rv = n;
    }
    if (env_count("P11FAULT_TOKEN_GONE_FROM", &cfg.gone_from))
        return -1;
    if ((v = env("P11FAULT_TOKEN_BACK_MS"))) {
        if (parse_ulong("P11FAULT_TOKEN_BACK_MS", v, &n, 10))
            return -1;
        if (!cfg.gone_from) {
            p11f_warn("P11FAULT_TOKEN_BACK_MS needs P11FAULT_TOKEN_GONE_FROM");
            return -1;
        }
        cfg.back_ms = n;
    }
    if ((v = env("P11FAULT_SESSION_IDLE_MS"))) {
        if (parse_ulong("P11FAULT_SESSION_IDLE_MS", v, &n, 10))
            return -1;
        if (n == 0) {
            p11f_warn("P11FAULT_SESSION_IDLE_MS: must be at least 1, got '%s'", v);
            return -1;
        }
        cfg.idle_ms = n;
    }
    if ((v = env("P11FAULT_LOG")) && !(cfg.log_path = strdup(v)))
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* entry point                                                               */

static void do_init(void)
{
    const char *path = env("P11FAULT_MODULE");
    if (!path) {
        p11f_warn("P11FAULT_MODULE is not set");
        return;
    }
    if (read_config())
        return;
    if (cfg.slots_name) {
        /* created with K free slots by the first process; later processes
         * share it as it is (whoever made the name unlinks it) */
        sem_t *sem = sem_open(cfg.slots_name, O_CREAT, 0600, (unsigned int)cfg.slots);
        if (sem == SEM_FAILED) {
            p11f_warn("sem_open(%s): %s", cfg.slots_name, strerror(errno));
            return;
        }
        slots = sem;
    } else if (cfg.slots) {
        if (sem_init(&local_slots, 0, (unsigned int)cfg.slots) != 0) {
            p11f_warn("sem_init: %s", strerror(errno));
            return;
        }
        slots = &local_slots;
    }

    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        p11f_warn("dlopen(%s): %s", path, dlerror());
        return;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    if (!get) {
        p11f_warn("%s has no C_GetFunctionList", path);
        return;
    }
    CK_RV rv = get(&real);
    if (rv != CKR_OK || !real) {
        p11f_warn("%s: C_GetFunctionList failed (rv=0x%lx)", path, (unsigned long)rv);
        init_rv = rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
        return;
    }

    shim = *real;
#define W(fn) shim.fn = w_##fn
    W(C_Initialize);
    W(C_Finalize);
    W(C_GetSlotList);
    W(C_GetSlotInfo);
    W(C_GetTokenInfo);
    W(C_GetMechanismInfo);
    W(C_InitPIN);
    W(C_SetPIN);
    W(C_OpenSession);
    W(C_CloseSession);
    W(C_CloseAllSessions);
    W(C_GetSessionInfo);
    W(C_GetOperationState);
    W(C_SetOperationState);
    W(C_Login);
    W(C_Logout);
    W(C_CreateObject);
    W(C_CopyObject);
    W(C_DestroyObject);
    W(C_GetObjectSize);
    W(C_GetAttributeValue);
    W(C_SetAttributeValue);
    W(C_FindObjectsInit);
    W(C_FindObjects);
    W(C_FindObjectsFinal);
    W(C_EncryptInit);
    W(C_Encrypt);
    W(C_EncryptUpdate);
    W(C_EncryptFinal);
    W(C_DecryptInit);
    W(C_Decrypt);
    W(C_DecryptUpdate);
    W(C_DecryptFinal);
    W(C_DigestInit);
    W(C_Digest);
    W(C_DigestUpdate);
    W(C_DigestKey);
    W(C_DigestFinal);
    W(C_SignInit);
    W(C_Sign);
    W(C_SignUpdate);
    W(C_SignFinal);
    W(C_SignRecoverInit);
    W(C_SignRecover);
    W(C_VerifyInit);
    W(C_Verify);
    W(C_VerifyUpdate);
    W(C_VerifyFinal);
    W(C_VerifyRecoverInit);
    W(C_VerifyRecover);
    W(C_DigestEncryptUpdate);
    W(C_DecryptDigestUpdate);
    W(C_SignEncryptUpdate);
    W(C_DecryptVerifyUpdate);
    W(C_GenerateKey);
    W(C_GenerateKeyPair);
    W(C_WrapKey);
    W(C_UnwrapKey);
    W(C_DeriveKey);
    W(C_SeedRandom);
    W(C_GenerateRandom);
    W(C_GetFunctionStatus);
    W(C_CancelFunction);
#undef W
    shim.C_GetFunctionList = C_GetFunctionList;

    if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0) {
        p11f_warn("pthread_atfork failed");
        return;
    }
    init_rv = CKR_OK;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    pthread_once(&init_once, do_init);
    if (init_rv != CKR_OK)
        return init_rv;
    if (!list)
        return CKR_ARGUMENTS_BAD;
    *list = &shim;
    return CKR_OK;
}
