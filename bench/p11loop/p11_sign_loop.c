/*
 * p11_sign_loop -- the "raw C PKCS#11 sign loop" ceiling.
 *
 *   p11_sign_loop MODULE TOKEN_LABEL KEY_LABEL ecdsa|rsa-sha256
 *                 --pin-env NAME [--processes P] [--sessions S]
 *                 [--seconds T | --count N] [--warmup W]
 *
 * The parent forks P children before anything touches PKCS#11.  Each child
 * dlopen()s MODULE, calls C_Initialize({flags = CKF_OS_LOCKING_OK}), finds
 * the token by label, opens S sessions (logged in once, with the PIN read
 * from the environment variable NAME: never from argv) and runs S threads,
 * one session each.  Every thread loops C_SignInit + C_Sign (one call, with
 * a buffer big enough for the signature, so no length query):
 *
 *   ecdsa       CKM_ECDSA over a fixed 32-byte digest
 *   rsa-sha256  CKM_SHA256_RSA_PKCS over fixed 100-byte data
 *
 * Phases, shared by all processes through an anonymous shared mapping:
 * warm-up (every thread signs for W seconds, default 0.2, and at least once;
 * nothing is counted), then the parent starts the clock and the measured
 * phase runs for T seconds (default 5) or until N signatures in total are
 * done (--count).  With --seconds, a signature counts if it completes before
 * the parent stops the clock; with --count the clock stops when the last
 * thread finishes.
 *
 * Prints one JSON line on stdout:
 *   {"signatures": ..., "seconds": ..., "per_second": ..., "processes": P,
 *    "sessions": S, "mechanism": "...", "warmup_seconds": W}
 * Errors go to stderr and the exit status is 1 (2 for usage errors).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define MAX_SIG 1024

enum phase { WARMUP = 0, MEASURE = 1, STOP = 2 };

struct shared {
    atomic_int phase;
    atomic_int ready;       /* threads that finished their warm-up */
    atomic_int done;        /* threads that left the measured loop */
    atomic_int failed;      /* set by any thread/process on error */
    atomic_int init_turn;   /* index of the process whose turn it is to log in */
    atomic_long issued;     /* --count: signatures handed out */
    atomic_long signatures; /* signatures counted in the measured phase */
    atomic_long end_ns;     /* --count: when the last thread finished */
};

static struct {
    const char *module, *token, *key, *mech, *pin_env;
    int processes, sessions;
    double seconds, warmup;
    long count; /* 0: run for --seconds */
} opt = {.processes = 1, .sessions = 1, .seconds = 5.0, .warmup = 0.2};

static struct shared *sh;
static CK_FUNCTION_LIST *f;
static CK_OBJECT_HANDLE key_handle;
static CK_MECHANISM mechanism;
static CK_BYTE data[100];
static CK_ULONG data_len;

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: p11_sign_loop MODULE TOKEN_LABEL KEY_LABEL ecdsa|rsa-sha256 --pin-env NAME\n"
            "       [--processes P] [--sessions S] [--seconds T | --count N] [--warmup W]\n");
    exit(2);
}

static void fail(const char *what, CK_RV rv)
{
    fprintf(stderr, "p11_sign_loop[%ld]: %s failed: rv=0x%lx\n", (long)getpid(), what,
            (unsigned long)rv);
    atomic_store(&sh->failed, 1);
}

static int sign_once(CK_SESSION_HANDLE s)
{
    CK_BYTE sig[MAX_SIG];
    CK_ULONG sig_len = sizeof(sig);
    CK_RV rv = f->C_SignInit(s, &mechanism, key_handle);
    if (rv != CKR_OK) {
        fail("C_SignInit", rv);
        return -1;
    }
    rv = f->C_Sign(s, data, data_len, sig, &sig_len);
    if (rv != CKR_OK) {
        fail("C_Sign", rv);
        return -1;
    }
    return 0;
}

static void *worker(void *arg)
{
    CK_SESSION_HANDLE s = *(CK_SESSION_HANDLE *)arg;
    long warm_end = now_ns() + (long)(opt.warmup * 1e9);
    int counted_ready = 0;
    long total = (long)opt.processes * opt.sessions;

    /* warm-up: sign (uncounted) until our warm-up time is over, then
     * report ready and keep signing until the parent starts the clock */
    while (atomic_load(&sh->phase) == WARMUP && !atomic_load(&sh->failed)) {
        if (sign_once(s))
            goto out;
        if (!counted_ready && now_ns() >= warm_end) {
            atomic_fetch_add(&sh->ready, 1);
            counted_ready = 1;
        }
    }
    if (!counted_ready) /* the parent never starts without us; keep the count right */
        atomic_fetch_add(&sh->ready, 1);

    while (!atomic_load(&sh->failed)) {
        if (opt.count) {
            if (atomic_fetch_add(&sh->issued, 1) >= opt.count)
                break;
        } else if (atomic_load(&sh->phase) != MEASURE) {
            break;
        }
        if (sign_once(s))
            break;
        if (opt.count || atomic_load(&sh->phase) == MEASURE)
            atomic_fetch_add(&sh->signatures, 1);
    }
out:
    if (atomic_fetch_add(&sh->done, 1) == total - 1)
        atomic_store(&sh->end_ns, now_ns());
    return NULL;
}

static int pad_eq(const CK_UTF8CHAR *field, size_t n, const char *want)
{
    size_t len = strlen(want);
    if (len > n)
        return 0;
    if (memcmp(field, want, len))
        return 0;
    for (size_t i = len; i < n; i++)
        if (field[i] != ' ')
            return 0;
    return 1;
}

/*
 * Initialise the module, find the token, open the sessions, log in and find
 * the key.  0: ready; 1: failed (reported); 2: the token looked absent or
 * uninitialised, worth another try after C_Finalize.  SoftHSM2 rewrites its
 * token file on every C_Login, and a process that reads it at that moment
 * (C_Initialize) can see the token without its label or its user PIN until
 * it initialises again.
 */
static int setup(CK_SESSION_HANDLE *sess, int last_try)
{
    CK_RV rv;
    CK_C_INITIALIZE_ARGS init;
    memset(&init, 0, sizeof(init));
    init.flags = CKF_OS_LOCKING_OK;
    if ((rv = f->C_Initialize(&init)) != CKR_OK) {
        fail("C_Initialize", rv);
        return 1;
    }
    CK_SLOT_ID slots[64], slot = 0;
    CK_ULONG n_slots = 64;
    int found = 0;
    if ((rv = f->C_GetSlotList(CK_TRUE, slots, &n_slots)) != CKR_OK) {
        fail("C_GetSlotList", rv);
        return 1;
    }
    for (CK_ULONG i = 0; i < n_slots && !found; i++) {
        CK_TOKEN_INFO ti;
        if (f->C_GetTokenInfo(slots[i], &ti) == CKR_OK &&
            pad_eq(ti.label, sizeof(ti.label), opt.token)) {
            slot = slots[i];
            found = 1;
        }
    }
    if (!found) {
        if (!last_try)
            return 2;
        fprintf(stderr, "p11_sign_loop: no token labelled '%s' (%lu slots with a token)\n",
                opt.token, (unsigned long)n_slots);
        atomic_store(&sh->failed, 1);
        return 1;
    }
    for (int i = 0; i < opt.sessions; i++) {
        if ((rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &sess[i])) != CKR_OK) {
            fail("C_OpenSession", rv);
            return 1;
        }
    }
    const char *pin = getenv(opt.pin_env);
    rv = f->C_Login(sess[0], CKU_USER, (CK_UTF8CHAR_PTR)pin, (CK_ULONG)strlen(pin));
    if (rv == CKR_USER_PIN_NOT_INITIALIZED && !last_try)
        return 2;
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        fail("C_Login", rv);
        return 1;
    }
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, (void *)opt.key, (CK_ULONG)strlen(opt.key)},
    };
    CK_ULONG n_found = 0;
    if ((rv = f->C_FindObjectsInit(sess[0], tmpl, 2)) != CKR_OK ||
        (rv = f->C_FindObjects(sess[0], &key_handle, 1, &n_found)) != CKR_OK) {
        fail("C_FindObjects", rv);
        return 1;
    }
    f->C_FindObjectsFinal(sess[0]);
    if (n_found != 1) {
        fprintf(stderr, "p11_sign_loop: no private key labelled '%s'\n", opt.key);
        atomic_store(&sh->failed, 1);
        return 1;
    }
    return 0;
}

static int child(int index)
{
    void *h = dlopen(opt.module, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "p11_sign_loop: dlopen(%s): %s\n", opt.module, dlerror());
        atomic_store(&sh->failed, 1);
        return 1;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    CK_RV rv;
    if (!get) {
        fprintf(stderr, "p11_sign_loop: %s has no C_GetFunctionList\n", opt.module);
        atomic_store(&sh->failed, 1);
        return 1;
    }
    if ((rv = get(&f)) != CKR_OK) {
        fail("C_GetFunctionList", rv);
        return 1;
    }
    CK_SESSION_HANDLE *sess = calloc((size_t)opt.sessions, sizeof(*sess));
    pthread_t *threads = calloc((size_t)opt.sessions, sizeof(*threads));
    if (!sess || !threads) {
        fail("calloc", CKR_HOST_MEMORY);
        return 1;
    }

    /* one process at a time initialises and logs in (see setup()) */
    struct timespec tick = {0, 1000000};
    while (atomic_load(&sh->init_turn) != index && !atomic_load(&sh->failed))
        nanosleep(&tick, NULL);
    if (atomic_load(&sh->failed))
        return 1;
    int r = 2;
    for (int attempt = 0; attempt < 20 && r == 2; attempt++) {
        if (attempt) {
            f->C_Finalize(NULL);
            struct timespec pause = {0, 50000000}; /* 50 ms */
            nanosleep(&pause, NULL);
        }
        r = setup(sess, attempt == 19);
    }
    atomic_fetch_add(&sh->init_turn, 1);
    if (r)
        return 1;

    for (int i = 0; i < opt.sessions; i++) {
        if (pthread_create(&threads[i], NULL, worker, &sess[i]) != 0) {
            fprintf(stderr, "p11_sign_loop: pthread_create failed\n");
            atomic_store(&sh->failed, 1);
            /* the threads already started see "failed" and stop */
            for (int j = 0; j < i; j++)
                pthread_join(threads[j], NULL);
            return 1;
        }
    }
    for (int i = 0; i < opt.sessions; i++)
        pthread_join(threads[i], NULL);
    f->C_Logout(sess[0]);
    for (int i = 0; i < opt.sessions; i++)
        f->C_CloseSession(sess[i]);
    f->C_Finalize(NULL);
    return atomic_load(&sh->failed) ? 1 : 0;
}

static double parse_double(const char *flag, const char *v, double min)
{
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (errno || *end || d < min) {
        fprintf(stderr, "p11_sign_loop: bad value for %s: '%s'\n", flag, v);
        exit(2);
    }
    return d;
}

static long parse_long(const char *flag, const char *v, long min)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || n < min) {
        fprintf(stderr, "p11_sign_loop: bad value for %s: '%s'\n", flag, v);
        exit(2);
    }
    return n;
}

static void parse_args(int argc, char **argv)
{
    const char *pos[4];
    int n_pos = 0, seconds_given = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == '-' && a[1] == '-') {
            if (i + 1 >= argc)
                usage();
            const char *v = argv[++i];
            if (!strcmp(a, "--pin-env"))
                opt.pin_env = v;
            else if (!strcmp(a, "--processes"))
                opt.processes = (int)parse_long(a, v, 1);
            else if (!strcmp(a, "--sessions"))
                opt.sessions = (int)parse_long(a, v, 1);
            else if (!strcmp(a, "--seconds")) {
                opt.seconds = parse_double(a, v, 0.001);
                seconds_given = 1;
            } else if (!strcmp(a, "--count"))
                opt.count = parse_long(a, v, 1);
            else if (!strcmp(a, "--warmup"))
                opt.warmup = parse_double(a, v, 0.0);
            else
                usage();
        } else if (n_pos < 4) {
            pos[n_pos++] = a;
        } else {
            usage();
        }
    }
    if (n_pos != 4 || !opt.pin_env || (seconds_given && opt.count))
        usage();
    if (opt.processes > 1024 || opt.sessions > 4096)
        usage();
    opt.module = pos[0];
    opt.token = pos[1];
    opt.key = pos[2];
    opt.mech = pos[3];

    memset(&mechanism, 0, sizeof(mechanism));
    if (!strcmp(opt.mech, "ecdsa")) {
        mechanism.mechanism = CKM_ECDSA;
        data_len = 32;
    } else if (!strcmp(opt.mech, "rsa-sha256")) {
        mechanism.mechanism = CKM_SHA256_RSA_PKCS;
        data_len = 100;
    } else {
        usage();
    }
    for (CK_ULONG i = 0; i < sizeof(data); i++)
        data[i] = (CK_BYTE)(0xA5 ^ (i * 7));
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    if (!getenv(opt.pin_env)) {
        fprintf(stderr, "p11_sign_loop: PIN variable %s is not set\n", opt.pin_env);
        return 1;
    }
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("p11_sign_loop: mmap");
        return 1;
    }
    memset(sh, 0, sizeof(*sh));
    fflush(NULL);

    pid_t *pids = calloc((size_t)opt.processes, sizeof(pid_t));
    if (!pids)
        return 1;
    for (int i = 0; i < opt.processes; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("p11_sign_loop: fork");
            atomic_store(&sh->failed, 1);
            break;
        }
        if (pid == 0)
            _exit(child(i));
        pids[i] = pid;
    }

    long total = (long)opt.processes * opt.sessions;
    struct timespec tick = {0, 1000000}; /* 1 ms */
    int status;
    while (atomic_load(&sh->ready) < total && !atomic_load(&sh->failed)) {
        pid_t gone = waitpid(-1, &status, WNOHANG);
        if (gone > 0) { /* a child died before the clock started */
            fprintf(stderr, "p11_sign_loop: child %ld exited early\n", (long)gone);
            atomic_store(&sh->failed, 1);
        }
        nanosleep(&tick, NULL);
    }
    long t0 = now_ns();
    atomic_store(&sh->phase, MEASURE);
    long t1 = 0;
    if (!opt.count && !atomic_load(&sh->failed)) {
        long until = t0 + (long)(opt.seconds * 1e9);
        while (now_ns() < until && !atomic_load(&sh->failed))
            nanosleep(&tick, NULL);
        t1 = now_ns();
        atomic_store(&sh->phase, STOP);
    }

    int bad = 0;
    for (int i = 0; i < opt.processes; i++) {
        if (!pids[i])
            continue;
        if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            if (!bad && WIFSIGNALED(status))
                fprintf(stderr, "p11_sign_loop: child %ld killed by signal %d\n", (long)pids[i],
                        WTERMSIG(status));
            bad = 1;
        }
    }
    if (bad || atomic_load(&sh->failed))
        return 1;
    if (opt.count)
        t1 = atomic_load(&sh->end_ns);
    double secs = (double)(t1 - t0) / 1e9;
    long sigs = atomic_load(&sh->signatures);
    printf("{\"signatures\": %ld, \"seconds\": %.6f, \"per_second\": %.1f, \"processes\": %d, "
           "\"sessions\": %d, \"mechanism\": \"%s\", \"warmup_seconds\": %g}\n",
           sigs, secs, secs > 0 ? (double)sigs / secs : 0.0, opt.processes, opt.sessions, opt.mech,
           opt.warmup);
    return 0;
}
