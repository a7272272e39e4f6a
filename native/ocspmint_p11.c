/*
 * ocspmint._p11native -- a small PKCS#11 signer for ocspmint's worker processes.
 *
 *   Module(path)                   dlopen() the PKCS#11 module and C_Initialize
 *                                  it with CKF_OS_LOCKING_OK (SoftHSM2 keeps its
 *                                  mutexes, so several threads may sign).
 *   Signer(module, token_label=, token_serial=, pin=, key_label=, key_id=,
 *          sessions=N)             find the token, log in once, find exactly one
 *                                  private key, open N sessions, each served by
 *                                  its own pthread.
 *   Signer.submit(items, mechanism, *, der=False) -> SignJob
 *                                  queue a batch for the sessions' threads and
 *                                  return at once; batches queued back to back
 *                                  leave no session idle between them.
 *   SignJob.wait() -> list         (GIL released) per item: bytes (the
 *                                  signature), int (the CK_RV of a failure) or
 *                                  None (not attempted: no live session took it).
 *                                  der=True (ECDSA mechanisms): the threads turn
 *                                  r||s into a DER ECDSA-Sig-Value.
 *   Signer.sign_batch(...)         submit(...).wait()
 *   Signer.supports(mechanism)     C_GetMechanismInfo on the token: CKF_SIGN?
 *   Signer.close(), Module.close() free everything; Module.close() calls
 *                                  C_Finalize (close the signers first).
 *   Error                          init/token/login/key/session failures: .rv (the
 *                                  CK_RV or None), .stage, .token (the token label
 *                                  when one was found). Never carries the PIN.
 *   ckr_name(rv)                   "CKR_PIN_INCORRECT", or None if unknown.
 *
 * See native/README.md for the threads/sessions model and the error rules.
 * The library is never dlclose()d: unloading a PKCS#11 module (and the crypto
 * libraries it pulls in) under a running process is not safe, and a re-opened
 * Module must reach the same module state (a test fault shim counts calls).
 *
 * fork(): a child inherits a Module and its Signers but not their threads, and
 * their sessions belong to the parent (PKCS#11, "Applications and processes": a
 * child calls C_Initialize itself). In a child, using them raises RuntimeError,
 * and closing them (or the child's exit) only forgets them: no thread is
 * joined, no session closed, no C_Finalize called.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define SIG_BUF_INITIAL 512 /* RSA-4096 fits; larger keys grow the buffer */
#define MAX_SESSIONS 256
/* ECDSA r||s: two halves of at most 66 octets (P-521; P-256 32, P-384 48) */
#define ECDSA_MAX_HALF 66
/* its DER ECDSA-Sig-Value: 30 81 len, then per INTEGER 02 len [00] octets */
#define ECDSA_DER_MAX (3 + 2 * (3 + ECDSA_MAX_HALF))

/* ------------------------------------------------------------------------ */
/* CK_RV names                                                               */

static const struct {
    CK_RV rv;
    const char *name;
} ckr_names[] = {
    {CKR_OK, "CKR_OK"},
    {CKR_CANCEL, "CKR_CANCEL"},
    {CKR_HOST_MEMORY, "CKR_HOST_MEMORY"},
    {CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID"},
    {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"},
    {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
    {CKR_NO_EVENT, "CKR_NO_EVENT"},
    {CKR_NEED_TO_CREATE_THREADS, "CKR_NEED_TO_CREATE_THREADS"},
    {CKR_CANT_LOCK, "CKR_CANT_LOCK"},
    {CKR_ATTRIBUTE_READ_ONLY, "CKR_ATTRIBUTE_READ_ONLY"},
    {CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE"},
    {CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"},
    {CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID"},
    {CKR_DATA_INVALID, "CKR_DATA_INVALID"},
    {CKR_DATA_LEN_RANGE, "CKR_DATA_LEN_RANGE"},
    {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
    {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY"},
    {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
    {CKR_FUNCTION_CANCELED, "CKR_FUNCTION_CANCELED"},
    {CKR_FUNCTION_NOT_PARALLEL, "CKR_FUNCTION_NOT_PARALLEL"},
    {CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED"},
    {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"},
    {CKR_KEY_SIZE_RANGE, "CKR_KEY_SIZE_RANGE"},
    {CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT"},
    {CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED"},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
    {CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"},
    {CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
    {CKR_OPERATION_NOT_INITIALIZED, "CKR_OPERATION_NOT_INITIALIZED"},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
    {CKR_PIN_INVALID, "CKR_PIN_INVALID"},
    {CKR_PIN_LEN_RANGE, "CKR_PIN_LEN_RANGE"},
    {CKR_PIN_EXPIRED, "CKR_PIN_EXPIRED"},
    {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
    {CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED"},
    {CKR_SESSION_COUNT, "CKR_SESSION_COUNT"},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
    {CKR_SESSION_PARALLEL_NOT_SUPPORTED, "CKR_SESSION_PARALLEL_NOT_SUPPORTED"},
    {CKR_SESSION_READ_ONLY, "CKR_SESSION_READ_ONLY"},
    {CKR_SESSION_EXISTS, "CKR_SESSION_EXISTS"},
    {CKR_SESSION_READ_ONLY_EXISTS, "CKR_SESSION_READ_ONLY_EXISTS"},
    {CKR_SESSION_READ_WRITE_SO_EXISTS, "CKR_SESSION_READ_WRITE_SO_EXISTS"},
    {CKR_SIGNATURE_INVALID, "CKR_SIGNATURE_INVALID"},
    {CKR_SIGNATURE_LEN_RANGE, "CKR_SIGNATURE_LEN_RANGE"},
    {CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE"},
    {CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT"},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
    {CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED"},
    {CKR_TOKEN_WRITE_PROTECTED, "CKR_TOKEN_WRITE_PROTECTED"},
    {CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN"},
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
    {CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED"},
    {CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID"},
    {CKR_USER_ANOTHER_ALREADY_LOGGED_IN, "CKR_USER_ANOTHER_ALREADY_LOGGED_IN"},
    {CKR_USER_TOO_MANY_TYPES, "CKR_USER_TOO_MANY_TYPES"},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
    {CKR_RANDOM_NO_RNG, "CKR_RANDOM_NO_RNG"},
    {CKR_DOMAIN_PARAMS_INVALID, "CKR_DOMAIN_PARAMS_INVALID"},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
    {CKR_CRYPTOKI_ALREADY_INITIALIZED, "CKR_CRYPTOKI_ALREADY_INITIALIZED"},
    {CKR_MUTEX_BAD, "CKR_MUTEX_BAD"},
    {CKR_MUTEX_NOT_LOCKED, "CKR_MUTEX_NOT_LOCKED"},
    {CKR_FUNCTION_REJECTED, "CKR_FUNCTION_REJECTED"},
};

static const char *ckr_lookup(CK_RV rv)
{
    for (size_t i = 0; i < sizeof(ckr_names) / sizeof(ckr_names[0]); i++)
        if (ckr_names[i].rv == rv)
            return ckr_names[i].name;
    return NULL;
}

/* "CKR_PIN_INCORRECT (0xa0)" or "CK_RV 0x80000001" */
static void ckr_format(char *out, size_t size, CK_RV rv)
{
    const char *name = ckr_lookup(rv);
    if (name)
        snprintf(out, size, "%s (0x%lx)", name, (unsigned long)rv);
    else
        snprintf(out, size, "CK_RV 0x%lx", (unsigned long)rv);
}

/* An rv after which the session cannot sign again: it must be reopened. */
static int session_fatal(CK_RV rv)
{
    switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_OPERATION_ACTIVE:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_HOST_MEMORY:
        return 1;
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------------ */
/* errors                                                                    */

static PyObject *Error; /* ocspmint._p11native.Error */

/* An error found without the GIL: filled in, raised later. */
struct err {
    int set;
    const char *stage;
    int has_rv;
    CK_RV rv;
    char msg[256];
};

static void err_set(struct err *e, const char *stage, int has_rv, CK_RV rv, const char *fmt, ...)
{
    va_list ap;
    if (e->set)
        return;
    e->set = 1;
    e->stage = stage;
    e->has_rv = has_rv;
    e->rv = rv;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    va_end(ap);
}

static void err_rv(struct err *e, const char *stage, const char *call, CK_RV rv)
{
    char text[96];
    ckr_format(text, sizeof(text), rv);
    err_set(e, stage, 1, rv, "%s: %s", call, text);
}

/* Raise Error(msg) with .rv, .stage and .token set. GIL held. */
static void raise_err(const struct err *e, const char *token)
{
    PyObject *exc = PyObject_CallFunction(Error, "s", e->msg);
    if (!exc)
        return;
    PyObject *rv = e->has_rv ? PyLong_FromUnsignedLong(e->rv) : Py_NewRef(Py_None);
    PyObject *stage = PyUnicode_FromString(e->stage ? e->stage : "");
    PyObject *tok = token ? PyUnicode_DecodeUTF8(token, strlen(token), "replace") : Py_NewRef(Py_None);
    if (rv && stage && tok && PyObject_SetAttrString(exc, "rv", rv) == 0 &&
        PyObject_SetAttrString(exc, "stage", stage) == 0 && PyObject_SetAttrString(exc, "token", tok) == 0)
        PyErr_SetObject(Error, exc);
    Py_XDECREF(rv);
    Py_XDECREF(stage);
    Py_XDECREF(tok);
    Py_DECREF(exc);
}

static void raise_simple(const char *stage, const char *msg)
{
    struct err e = {0};
    err_set(&e, stage, 0, 0, "%s", msg);
    raise_err(&e, NULL);
}

/* ------------------------------------------------------------------------ */
/* Module                                                                    */

typedef struct {
    PyObject_HEAD
    CK_FUNCTION_LIST_PTR f;
    int initialized; /* C_Initialize succeeded (or the module already was) */
    int owns_init;   /* we initialised it, so C_Finalize is ours to call */
    int open_signers;
    pid_t pid; /* the process that opened it; a forked child must not use it */
    PyObject *path;
} ModuleObject;

/* Raise RuntimeError when the object was opened in another process (this one
 * is a fork() child of it); 0 when it is this process's own. */
static int refuse_inherited(const char *what, pid_t pid)
{
    if (pid == getpid())
        return 0;
    PyErr_Format(PyExc_RuntimeError,
                 "this %s was opened in process %ld and inherited across fork() by process %ld: PKCS#11 sessions "
                 "and signer threads do not survive fork(); open a new Module and Signer in this process "
                 "(a spawned process, as the signer pool uses, never inherits them)",
                 what, (long)pid, (long)getpid());
    return -1;
}

static PyTypeObject ModuleType;

static int Module_init(ModuleObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", NULL};
    PyObject *path_obj = NULL;
    struct err e = {0};

    if (self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "Module already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&", kwlist, PyUnicode_FSConverter, &path_obj))
        return -1;
    const char *path = PyBytes_AS_STRING(path_obj);
    CK_FUNCTION_LIST_PTR f = NULL;
    CK_RV rv = CKR_OK;
    char dlmsg[200] = "";

    Py_BEGIN_ALLOW_THREADS
    void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        const char *m = dlerror();
        snprintf(dlmsg, sizeof(dlmsg), "%s", m ? m : "dlopen failed");
    } else {
        CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
        if (!get) {
            snprintf(dlmsg, sizeof(dlmsg), "no C_GetFunctionList in %s", path);
        } else if ((rv = get(&f)) != CKR_OK || !f) {
            err_rv(&e, "load", "C_GetFunctionList", rv ? rv : CKR_GENERAL_ERROR);
        } else {
            CK_C_INITIALIZE_ARGS init;
            memset(&init, 0, sizeof(init));
            init.flags = CKF_OS_LOCKING_OK;
            rv = f->C_Initialize(&init);
            if (rv == CKR_OK) {
                self->owns_init = 1;
            } else if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
                self->owns_init = 0; /* someone else in this process did: not ours to finalise */
            } else if (rv == CKR_CANT_LOCK) {
                err_set(&e, "init", 1, rv, "C_Initialize: CKR_CANT_LOCK (0x%lx): the module cannot use OS locking "
                        "for threads; use the python signing backend", (unsigned long)rv);
            } else {
                err_rv(&e, "init", "C_Initialize", rv);
            }
        }
        /* never dlclose(): see the file comment */
    }
    Py_END_ALLOW_THREADS

    if (dlmsg[0])
        err_set(&e, "load", 0, 0, "cannot load PKCS#11 module %s: %s", path, dlmsg);
    if (e.set) {
        Py_DECREF(path_obj);
        raise_err(&e, NULL);
        return -1;
    }
    self->f = f;
    self->initialized = 1;
    self->pid = getpid();
    Py_XSETREF(self->path, PyUnicode_DecodeFSDefault(path));
    Py_DECREF(path_obj);
    return self->path ? 0 : -1;
}

static int module_finalize(ModuleObject *self)
{
    if (self->initialized && self->owns_init && self->pid == getpid()) { /* a fork child's is the parent's */
        CK_FUNCTION_LIST_PTR f = self->f;
        Py_BEGIN_ALLOW_THREADS
        f->C_Finalize(NULL);
        Py_END_ALLOW_THREADS
    }
    self->initialized = 0;
    self->owns_init = 0;
    return 0;
}

static PyObject *Module_close(ModuleObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->open_signers > 0) {
        PyErr_Format(PyExc_RuntimeError, "Module.close(): %d signer(s) still open; close them first",
                     self->open_signers);
        return NULL;
    }
    module_finalize(self);
    Py_RETURN_NONE;
}

static void Module_dealloc(ModuleObject *self)
{
    /* signers hold a reference: none is open any more */
    module_finalize(self);
    Py_XDECREF(self->path);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Module_get_closed(ModuleObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(!self->initialized);
}

static PyObject *Module_get_path(ModuleObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->path ? self->path : Py_None);
}

static PyObject *Module_enter(ModuleObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef((PyObject *)self);
}

static PyObject *Module_exit(ModuleObject *self, PyObject *Py_UNUSED(args))
{
    return Module_close(self, NULL);
}

static PyMethodDef Module_methods[] = {
    {"close", (PyCFunction)Module_close, METH_NOARGS, "C_Finalize (when this object initialised the module)."},
    {"__enter__", (PyCFunction)Module_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Module_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Module_getset[] = {
    {"closed", (getter)Module_get_closed, NULL, "True after close()", NULL},
    {"path", (getter)Module_get_path, NULL, "the module's file path", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModuleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ocspmint._p11native.Module",
    .tp_basicsize = sizeof(ModuleObject),
    .tp_dealloc = (destructor)Module_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Module(path): a dlopen()ed PKCS#11 module, C_Initialize'd with CKF_OS_LOCKING_OK.",
    .tp_methods = Module_methods,
    .tp_getset = Module_getset,
    .tp_init = (initproc)Module_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------ */
/* Signer                                                                    */

enum { ITEM_PENDING = 0, ITEM_SIGNED = 1, ITEM_FAILED = 2 };

struct item {
    const unsigned char *data;
    CK_ULONG len;
    unsigned char *sig; /* malloc'd by the worker thread */
    CK_ULONG sig_len;
    CK_RV rv;
    int state;
};

struct SignerObject;
struct SignJobObject;

struct worker {
    struct SignerObject *owner;
    pthread_t thread;
    int started;
    CK_SESSION_HANDLE session;
    int session_open;
    int dead; /* a session-fatal rv: takes no item until the signer is reopened */
    unsigned long left_id; /* the last job this thread is done with (ids grow from 1) */
    unsigned char *buf;
    CK_ULONG buf_len;
};

typedef struct SignerObject {
    PyObject_HEAD
    ModuleObject *module;
    CK_FUNCTION_LIST_PTR f;
    CK_SLOT_ID slot;
    CK_OBJECT_HANDLE key;
    char token[33];
    int open; /* counted in module->open_signers */
    pid_t pid;  /* the process whose threads and sessions these are */
    int n_workers;
    struct worker *workers;
    int sync_ready;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    /* the queue of jobs, oldest first; all under mu */
    int stopping;
    struct SignJobObject *head, *tail;
    unsigned long last_id;
    int queued; /* jobs some thread is not done with yet */
} SignerObject;

/* One submitted batch: queued on its signer until every thread is done with it. */
typedef struct SignJobObject {
    PyObject_HEAD
    SignerObject *signer; /* strong reference */
    PyObject *tuple;      /* holds the items' bytes while the threads read them */
    struct item *items;
    Py_ssize_t n;
    /* under signer->mu while queued */
    size_t next;          /* the next item no thread has taken */
    CK_MECHANISM_TYPE mechanism;
    int der;              /* ECDSA r||s -> DER ECDSA-Sig-Value */
    unsigned long id;
    int left;             /* threads done with this job */
    int queued;
    struct SignJobObject *next_job;
    PyObject *results;    /* the list wait() returned */
} SignJobObject;

static PyTypeObject SignerType;
static PyTypeObject SignJobType;

static int ecdsa_mechanism(CK_MECHANISM_TYPE type)
{
    switch (type) {
    case CKM_ECDSA:
    case CKM_ECDSA_SHA1:
    case CKM_ECDSA_SHA224:
    case CKM_ECDSA_SHA256:
    case CKM_ECDSA_SHA384:
    case CKM_ECDSA_SHA512:
        return 1;
    default:
        return 0;
    }
}

/* DER INTEGER of the unsigned big-endian n octets at p (1 <= n <= ECDSA_MAX_HALF)
 * at out (room for n + 3): leading zero octets dropped, a 00 put first when the
 * high bit is set, 0 as 02 01 00. Returns its length. */
static size_t der_uint(unsigned char *out, const unsigned char *p, size_t n)
{
    while (n > 1 && p[0] == 0) {
        p++;
        n--;
    }
    size_t pad = p[0] & 0x80 ? 1 : 0;
    out[0] = 0x02;
    out[1] = (unsigned char)(pad + n);
    out[2] = 0x00;
    memcpy(out + 2 + pad, p, n);
    return 2 + pad + n;
}

/* r||s (CKM_ECDSA*: two equal halves) -> DER ECDSA-Sig-Value in it->sig. A
 * length that is not two halves of 1..ECDSA_MAX_HALF octets is the item's
 * CKR_SIGNATURE_LEN_RANGE. */
static CK_RV ecdsa_der(const unsigned char *raw, CK_ULONG len, struct item *it)
{
    unsigned char body[ECDSA_DER_MAX - 3];
    if (len == 0 || len % 2 != 0 || len > 2 * ECDSA_MAX_HALF)
        return CKR_SIGNATURE_LEN_RANGE;
    size_t half = len / 2;
    size_t n = der_uint(body, raw, half);
    n += der_uint(body + n, raw + half, half);
    size_t head = n < 0x80 ? 2 : 3; /* n <= 138: one length octet after 81 */
    it->sig = malloc(head + n);
    if (!it->sig)
        return CKR_HOST_MEMORY;
    it->sig[0] = 0x30;
    it->sig[1] = 0x81;
    it->sig[head - 1] = (unsigned char)n;
    memcpy(it->sig + head, body, n);
    it->sig_len = head + n;
    return CKR_OK;
}

/* One signature on the worker's session; no lock held. */
static CK_RV sign_item(SignerObject *s, struct worker *w, CK_MECHANISM_TYPE type, int der, struct item *it)
{
    CK_FUNCTION_LIST_PTR f = s->f;
    CK_MECHANISM mech = {type, NULL, 0};
    CK_RV rv = f->C_SignInit(w->session, &mech, s->key);
    if (rv != CKR_OK)
        return rv;
    CK_ULONG len = w->buf_len;
    rv = f->C_Sign(w->session, (CK_BYTE_PTR)it->data, it->len, w->buf, &len);
    if (rv == CKR_BUFFER_TOO_SMALL) {
        /* the operation stays active: call again with a big enough buffer */
        unsigned char *bigger = realloc(w->buf, len);
        if (!bigger)
            return CKR_HOST_MEMORY; /* session-fatal: the operation is left active */
        w->buf = bigger;
        w->buf_len = len;
        rv = f->C_Sign(w->session, (CK_BYTE_PTR)it->data, it->len, w->buf, &len);
    }
    if (rv != CKR_OK)
        return rv;
    if (der)
        return ecdsa_der(w->buf, len, it);
    it->sig = malloc(len ? len : 1);
    if (!it->sig)
        return CKR_HOST_MEMORY;
    memcpy(it->sig, w->buf, len);
    it->sig_len = len;
    return CKR_OK;
}

/* Take a finished job off its signer's queue; mu held. */
static void job_unlink(SignerObject *s, SignJobObject *j)
{
    SignJobObject **at = &s->head, *prev = NULL;
    while (*at && *at != j) {
        prev = *at;
        at = &(*at)->next_job;
    }
    if (*at)
        *at = j->next_job;
    if (s->tail == j)
        s->tail = prev;
    j->next_job = NULL;
    j->queued = 0;
    s->queued--;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    SignerObject *s = w->owner;

    pthread_mutex_lock(&s->mu);
    for (;;) {
        SignJobObject *j = NULL;
        while (!s->stopping) {
            for (j = s->head; j && j->id <= w->left_id; j = j->next_job)
                ;
            if (j)
                break;
            pthread_cond_wait(&s->work_cv, &s->mu);
        }
        if (s->stopping)
            break;
        /* take items until none is left; stop at this session's first failure */
        int failed = 0;
        while (!w->dead && !failed && j->next < (size_t)j->n) {
            struct item *it = &j->items[j->next++];
            CK_MECHANISM_TYPE mech = j->mechanism;
            int der = j->der;
            pthread_mutex_unlock(&s->mu);
            CK_RV rv = sign_item(s, w, mech, der, it);
            pthread_mutex_lock(&s->mu);
            it->rv = rv;
            it->state = rv == CKR_OK ? ITEM_SIGNED : ITEM_FAILED;
            if (rv != CKR_OK) {
                failed = 1;
                if (session_fatal(rv))
                    w->dead = 1;
            }
        }
        /* on to the next job: a thread never waits for the others at a job's end */
        w->left_id = j->id;
        if (++j->left == s->n_workers) {
            job_unlink(s, j);
            pthread_cond_broadcast(&s->done_cv);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Stop and join the threads, close the sessions, free the buffers. No GIL. */
static void signer_teardown(SignerObject *s, int close_sessions)
{
    if (s->sync_ready) {
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_cond_broadcast(&s->work_cv);
        pthread_mutex_unlock(&s->mu);
    }
    for (int i = 0; i < s->n_workers; i++) {
        struct worker *w = &s->workers[i];
        if (w->started)
            pthread_join(w->thread, NULL);
        w->started = 0;
        if (w->session_open && close_sessions)
            s->f->C_CloseSession(w->session); /* a dead session answers an error: nothing to do */
        w->session_open = 0;
        free(w->buf);
        w->buf = NULL;
    }
    free(s->workers);
    s->workers = NULL;
    s->n_workers = 0;
    if (s->sync_ready) {
        pthread_cond_destroy(&s->work_cv);
        pthread_cond_destroy(&s->done_cv);
        pthread_mutex_destroy(&s->mu);
        s->sync_ready = 0;
    }
}

static int padded_equal(const unsigned char *field, size_t size, const char *want, size_t want_len)
{
    if (want_len > size || memcmp(field, want, want_len) != 0)
        return 0;
    for (size_t i = want_len; i < size; i++)
        if (field[i] != ' ' && field[i] != '\0')
            return 0;
    return 1;
}

static void copy_label(char *out, const unsigned char *label)
{
    size_t n = 32;
    memcpy(out, label, 32);
    while (n > 0 && (out[n - 1] == ' ' || out[n - 1] == '\0'))
        n--;
    out[n] = '\0';
}

struct open_args {
    const char *token_label;
    Py_ssize_t token_label_len;
    const char *token_serial;
    Py_ssize_t token_serial_len;
    const char *pin;
    Py_ssize_t pin_len;
    const char *key_label;
    Py_ssize_t key_label_len;
    const char *key_id;
    Py_ssize_t key_id_len;
    int sessions;
};

/* Find the token, log in, find the key, open the sessions, start the threads. No GIL. */
static void signer_open(SignerObject *s, const struct open_args *a, struct err *e)
{
    CK_FUNCTION_LIST_PTR f = s->f;
    CK_ULONG n = 0;
    CK_SLOT_ID *slots = NULL;
    CK_RV rv;

    /* token: every slot, then C_GetTokenInfo (a slot without a token answers an error) */
    for (;;) {
        rv = f->C_GetSlotList(CK_FALSE, NULL, &n);
        if (rv != CKR_OK) {
            err_rv(e, "token", "C_GetSlotList", rv);
            return;
        }
        free(slots);
        slots = calloc(n ? n : 1, sizeof(*slots));
        if (!slots) {
            err_rv(e, "token", "C_GetSlotList", CKR_HOST_MEMORY);
            return;
        }
        rv = f->C_GetSlotList(CK_FALSE, slots, &n);
        if (rv == CKR_BUFFER_TOO_SMALL)
            continue; /* a slot appeared in between */
        if (rv != CKR_OK) {
            free(slots);
            err_rv(e, "token", "C_GetSlotList", rv);
            return;
        }
        break;
    }
    int matches = 0;
    CK_RV info_rv = CKR_OK; /* the last C_GetTokenInfo error other than "no token" */
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        rv = f->C_GetTokenInfo(slots[i], &info);
        if (rv != CKR_OK) {
            if (rv != CKR_TOKEN_NOT_PRESENT && rv != CKR_TOKEN_NOT_RECOGNIZED && rv != CKR_SLOT_ID_INVALID)
                info_rv = rv;
            continue;
        }
        if (a->token_label && !padded_equal(info.label, sizeof(info.label), a->token_label, a->token_label_len))
            continue;
        if (a->token_serial &&
            !padded_equal(info.serialNumber, sizeof(info.serialNumber), a->token_serial, a->token_serial_len))
            continue;
        if (matches++ == 0) {
            s->slot = slots[i];
            copy_label(s->token, info.label);
        }
    }
    free(slots);
    if (matches != 1) {
        s->token[0] = '\0';
        if (matches == 0) {
            char seen[128] = "";
            if (info_rv != CKR_OK) {
                char text[96];
                ckr_format(text, sizeof(text), info_rv);
                snprintf(seen, sizeof(seen), "; C_GetTokenInfo: %s", text);
            }
            err_set(e, "token", 0, 0, "NoSuchToken (no present token matches%s%.*s%s%s%.*s%s%s)",
                    a->token_label ? " label '" : "", (int)(a->token_label ? a->token_label_len : 0),
                    a->token_label ? a->token_label : "", a->token_label ? "'" : "",
                    a->token_serial ? " serial '" : "", (int)(a->token_serial ? a->token_serial_len : 0),
                    a->token_serial ? a->token_serial : "", a->token_serial ? "'" : "", seen);
        }
        else
            err_set(e, "token", 0, 0, "MultipleTokensReturned (%d present tokens match; name one by token= or serial=)",
                    matches);
        return;
    }

    /* sessions: the first one logs in and finds the key */
    s->workers = calloc((size_t)a->sessions, sizeof(*s->workers));
    if (!s->workers) {
        err_rv(e, "session", "calloc", CKR_HOST_MEMORY);
        return;
    }
    s->n_workers = a->sessions;
    for (int i = 0; i < s->n_workers; i++) {
        struct worker *w = &s->workers[i];
        w->owner = s;
        rv = f->C_OpenSession(s->slot, CKF_SERIAL_SESSION, NULL, NULL, &w->session);
        if (rv != CKR_OK) {
            err_rv(e, "session", "C_OpenSession", rv);
            return;
        }
        w->session_open = 1;
        w->buf = malloc(SIG_BUF_INITIAL);
        if (!w->buf) {
            err_rv(e, "session", "malloc", CKR_HOST_MEMORY);
            return;
        }
        w->buf_len = SIG_BUF_INITIAL;
        if (i > 0)
            continue;
        if (a->pin) {
            rv = f->C_Login(w->session, CKU_USER, (CK_UTF8CHAR_PTR)a->pin, (CK_ULONG)a->pin_len);
            if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
                err_rv(e, "login", "C_Login", rv);
                return;
            }
        }
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        CK_ATTRIBUTE tmpl[3];
        CK_ULONG nt = 0;
        tmpl[nt].type = CKA_CLASS;
        tmpl[nt].pValue = &cls;
        tmpl[nt++].ulValueLen = sizeof(cls);
        if (a->key_label) {
            tmpl[nt].type = CKA_LABEL;
            tmpl[nt].pValue = (void *)a->key_label;
            tmpl[nt++].ulValueLen = (CK_ULONG)a->key_label_len;
        }
        if (a->key_id) {
            tmpl[nt].type = CKA_ID;
            tmpl[nt].pValue = (void *)a->key_id;
            tmpl[nt++].ulValueLen = (CK_ULONG)a->key_id_len;
        }
        rv = f->C_FindObjectsInit(w->session, tmpl, nt);
        if (rv != CKR_OK) {
            err_rv(e, "key", "C_FindObjectsInit", rv);
            return;
        }
        CK_OBJECT_HANDLE found[2];
        CK_ULONG count = 0;
        rv = f->C_FindObjects(w->session, found, 2, &count);
        f->C_FindObjectsFinal(w->session);
        if (rv != CKR_OK) {
            err_rv(e, "key", "C_FindObjects", rv);
            return;
        }
        if (count != 1) {
            err_set(e, "key", 0, 0, "%s (no single private key on the token matches the URI)",
                    count == 0 ? "NoSuchKey" : "MultipleObjectsReturned");
            return;
        }
        s->key = found[0];
    }

    /* one thread per session */
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        err_set(e, "session", 0, 0, "pthread_mutex_init failed");
        return;
    }
    pthread_cond_init(&s->work_cv, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    s->sync_ready = 1;
    for (int i = 0; i < s->n_workers; i++) {
        struct worker *w = &s->workers[i];
        int err = pthread_create(&w->thread, NULL, worker_main, w);
        if (err != 0) {
            err_set(e, "session", 0, 0, "pthread_create failed: %s", strerror(err));
            return;
        }
        w->started = 1;
    }
}

static int Signer_init(SignerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"module", "token_label", "token_serial", "pin", "key_label", "key_id", "sessions", NULL};
    PyObject *module = NULL;
    struct open_args a;
    struct err e = {0};

    memset(&a, 0, sizeof(a));
    a.sessions = 1;
    if (self->module) {
        PyErr_SetString(PyExc_RuntimeError, "Signer already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|$z#z#z#z#z#i", kwlist, &ModuleType, &module,
                                     &a.token_label, &a.token_label_len, &a.token_serial, &a.token_serial_len,
                                     &a.pin, &a.pin_len, &a.key_label, &a.key_label_len, &a.key_id, &a.key_id_len,
                                     &a.sessions))
        return -1;
    if (a.sessions < 1 || a.sessions > MAX_SESSIONS) {
        PyErr_Format(PyExc_ValueError, "sessions must lie in [1, %d]", MAX_SESSIONS);
        return -1;
    }
    if (!a.key_label && !a.key_id) {
        PyErr_SetString(PyExc_ValueError, "name the key by key_label and/or key_id");
        return -1;
    }
    ModuleObject *m = (ModuleObject *)module;
    if (!m->initialized) {
        raise_simple("init", "the PKCS#11 module is closed");
        return -1;
    }
    if (refuse_inherited("Module", m->pid) < 0)
        return -1;
    self->module = (ModuleObject *)Py_NewRef(module);
    self->f = m->f;
    m->open_signers++;
    self->open = 1;
    self->pid = m->pid;

    Py_BEGIN_ALLOW_THREADS
    signer_open(self, &a, &e);
    if (e.set)
        signer_teardown(self, 1);
    Py_END_ALLOW_THREADS

    if (e.set) {
        raise_err(&e, self->token[0] ? self->token : NULL);
        m->open_signers--;
        self->open = 0;
        return -1;
    }
    return 0;
}

static PyObject *Signer_submit(SignerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"items", "mechanism", "der", NULL};
    PyObject *seq;
    unsigned long mechanism;
    int der = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ok|$p", kwlist, &seq, &mechanism, &der))
        return NULL;
    if (der && !ecdsa_mechanism(mechanism)) {
        PyErr_Format(PyExc_ValueError, "sign_batch: der=True needs an ECDSA mechanism (CKM_ECDSA, CKM_ECDSA_SHA*), "
                     "not mechanism %lu", mechanism);
        return NULL;
    }
    if (!self->open || !self->module || !self->module->initialized) {
        raise_simple("session", "the signer is closed");
        return NULL;
    }
    if (refuse_inherited("Signer", self->pid) < 0)
        return NULL;
    PyObject *tuple = PySequence_Tuple(seq); /* holds every item while the threads read them */
    if (!tuple)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    struct item *items = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*items));
    if (!items) {
        Py_DECREF(tuple);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyTuple_GET_ITEM(tuple, i);
        if (!PyBytes_Check(o)) {
            PyErr_Format(PyExc_TypeError, "sign_batch: item %zd is %.50s, not bytes", i, Py_TYPE(o)->tp_name);
            PyMem_Free(items);
            Py_DECREF(tuple);
            return NULL;
        }
        items[i].data = (const unsigned char *)PyBytes_AS_STRING(o);
        items[i].len = (CK_ULONG)PyBytes_GET_SIZE(o);
    }
    SignJobObject *job = PyObject_New(SignJobObject, &SignJobType);
    if (!job) {
        PyMem_Free(items);
        Py_DECREF(tuple);
        return NULL;
    }
    job->signer = (SignerObject *)Py_NewRef(self);
    job->tuple = tuple;
    job->items = items;
    job->n = n;
    job->next = 0;
    job->mechanism = (CK_MECHANISM_TYPE)mechanism;
    job->der = der;
    job->left = 0;
    job->queued = 0;
    job->next_job = NULL;
    job->results = NULL;
    if (n > 0) {
        /* mu is only ever held for a few instructions, and no thread holding it wants the GIL */
        pthread_mutex_lock(&self->mu);
        job->id = ++self->last_id;
        job->queued = 1;
        self->queued++;
        if (self->tail)
            self->tail->next_job = job;
        else
            self->head = job;
        self->tail = job;
        pthread_cond_broadcast(&self->work_cv);
        pthread_mutex_unlock(&self->mu);
    }
    return (PyObject *)job;
}

/* Block (GIL released) until every thread is done with the job. */
static void job_wait(SignJobObject *j)
{
    SignerObject *s = j->signer;
    /* never queued; a closed signer (it refuses to close while a job is queued, and its mutex is gone);
       or a fork child (the threads are the parent's) */
    if (j->n == 0 || !s->open || !s->sync_ready || s->pid != getpid())
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->mu);
    while (j->queued)
        pthread_cond_wait(&s->done_cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    Py_END_ALLOW_THREADS
}

static PyObject *SignJob_wait(SignJobObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->results)
        return Py_NewRef(self->results);
    if (refuse_inherited("SignJob", self->signer->pid) < 0)
        return NULL;
    job_wait(self);
    PyObject *out = PyList_New(self->n);
    for (Py_ssize_t i = 0; out && i < self->n; i++) {
        struct item *it = &self->items[i];
        PyObject *r;
        if (it->state == ITEM_SIGNED)
            r = PyBytes_FromStringAndSize((const char *)it->sig, (Py_ssize_t)it->sig_len);
        else if (it->state == ITEM_FAILED)
            r = PyLong_FromUnsignedLong(it->rv);
        else
            r = Py_NewRef(Py_None);
        if (!r)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, r);
    }
    self->results = out;
    return out ? Py_NewRef(out) : NULL;
}

static PyObject *SignJob_get_done(SignJobObject *self, void *Py_UNUSED(closure))
{
    int queued = 0;
    SignerObject *s = self->signer;
    if (self->n > 0 && s->open && s->sync_ready && s->pid == getpid()) {
        pthread_mutex_lock(&s->mu);
        queued = self->queued;
        pthread_mutex_unlock(&s->mu);
    }
    return PyBool_FromLong(!queued);
}

static void SignJob_dealloc(SignJobObject *self)
{
    job_wait(self); /* the threads may still be writing into the items */
    for (Py_ssize_t i = 0; i < self->n; i++)
        free(self->items[i].sig);
    PyMem_Free(self->items);
    Py_XDECREF(self->results);
    Py_DECREF(self->tuple);
    Py_DECREF(self->signer);
    PyObject_Free(self);
}

static PyObject *Signer_sign_batch(SignerObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *job = Signer_submit(self, args, kwds);
    if (!job)
        return NULL;
    PyObject *out = SignJob_wait((SignJobObject *)job, NULL);
    Py_DECREF(job);
    return out;
}

static PyObject *Signer_supports(SignerObject *self, PyObject *arg)
{
    unsigned long mechanism = PyLong_AsUnsignedLong(arg);
    if (mechanism == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (!self->open || !self->module || !self->module->initialized) {
        raise_simple("session", "the signer is closed");
        return NULL;
    }
    if (refuse_inherited("Signer", self->pid) < 0)
        return NULL;
    CK_FUNCTION_LIST_PTR f = self->f;
    CK_SLOT_ID slot = self->slot;
    CK_MECHANISM_INFO info;
    CK_RV rv;
    Py_BEGIN_ALLOW_THREADS
    rv = f->C_GetMechanismInfo(slot, (CK_MECHANISM_TYPE)mechanism, &info);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rv == CKR_OK && (info.flags & CKF_SIGN));
}

static void signer_close(SignerObject *self)
{
    if (!self->open)
        return;
    if (self->pid == getpid()) {
        int close_sessions = self->module && self->module->initialized;
        Py_BEGIN_ALLOW_THREADS
        signer_teardown(self, close_sessions);
        Py_END_ALLOW_THREADS
    } /* else a fork child: the threads are not here and the sessions are the parent's; forget them */
    self->open = 0;
    if (self->module)
        self->module->open_signers--;
}

static PyObject *Signer_close(SignerObject *self, PyObject *Py_UNUSED(ignored))
{
    int queued = 0;
    if (self->open && self->sync_ready && self->pid == getpid()) {
        pthread_mutex_lock(&self->mu);
        queued = self->queued;
        pthread_mutex_unlock(&self->mu);
    }
    if (queued) {
        PyErr_Format(PyExc_RuntimeError, "Signer.close() while %d submitted batch(es) are being signed", queued);
        return NULL;
    }
    signer_close(self);
    Py_RETURN_NONE;
}

static void Signer_dealloc(SignerObject *self)
{
    signer_close(self); /* a queued job holds a reference: none is queued here */
    Py_XDECREF(self->module);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Signer_get_sessions(SignerObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->n_workers);
}

static PyObject *Signer_get_live_sessions(SignerObject *self, void *Py_UNUSED(closure))
{
    long live = 0;
    if (self->open && self->sync_ready && self->pid == getpid()) { /* a fork child may find mu held */
        pthread_mutex_lock(&self->mu);
        for (int i = 0; i < self->n_workers; i++)
            live += !self->workers[i].dead;
        pthread_mutex_unlock(&self->mu);
    }
    return PyLong_FromLong(live);
}

static PyObject *Signer_get_token(SignerObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_DecodeUTF8(self->token, strlen(self->token), "replace");
}

static PyObject *Signer_get_closed(SignerObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(!self->open);
}

static PyObject *Signer_enter(SignerObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef((PyObject *)self);
}

static PyObject *Signer_exit(SignerObject *self, PyObject *Py_UNUSED(args))
{
    return Signer_close(self, NULL);
}

static PyMethodDef Signer_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Signer_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(items: list[bytes], mechanism: int, *, der: bool = False) -> SignJob\n\n"
     "Queue the items for the sessions' threads and return at once; SignJob.wait() gives what "
     "sign_batch would. Batches submitted one after another are signed without a gap: a thread "
     "done with one batch takes the next batch's items while others finish their last ones."},
    {"sign_batch", (PyCFunction)(void (*)(void))Signer_sign_batch, METH_VARARGS | METH_KEYWORDS,
     "sign_batch(items: list[bytes], mechanism: int, *, der: bool = False) -> list[bytes | int | None]\n\n"
     "Sign every item with the key (GIL released), spread over the sessions' threads: submit(...).wait(). "
     "Per item: the signature bytes, the CK_RV (int) of a failure, or None when no live session took the "
     "item (every session failed). Never raises for a signing error.\n\n"
     "der=True, for an ECDSA mechanism only (CKM_ECDSA: the items are digests; CKM_ECDSA_SHA256/384: the "
     "data): the signing threads turn the token's r||s into a DER ECDSA-Sig-Value (SEQUENCE of two "
     "minimal INTEGERs), the form X.509 and OCSP carry. An r||s that is not two halves of 1 to 66 octets "
     "(P-521) comes back as CKR_SIGNATURE_LEN_RANGE. ValueError for der=True with another mechanism."},
    {"supports", (PyCFunction)Signer_supports, METH_O,
     "supports(mechanism: int) -> bool\n\n"
     "Whether the token lists the mechanism with CKF_SIGN (C_GetMechanismInfo on its slot); False when "
     "that call fails. Says nothing of the key's CKA_ALLOWED_MECHANISMS."},
    {"close", (PyCFunction)Signer_close, METH_NOARGS,
     "Stop the threads and close the sessions; RuntimeError while a submitted batch is being signed."},
    {"__enter__", (PyCFunction)Signer_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Signer_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Signer_getset[] = {
    {"sessions", (getter)Signer_get_sessions, NULL, "number of sessions (and threads)", NULL},
    {"live_sessions", (getter)Signer_get_live_sessions, NULL, "sessions not killed by a session-fatal CK_RV", NULL},
    {"token", (getter)Signer_get_token, NULL, "label of the token in use", NULL},
    {"closed", (getter)Signer_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SignerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ocspmint._p11native.Signer",
    .tp_basicsize = sizeof(SignerObject),
    .tp_dealloc = (destructor)Signer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Signer(module, *, token_label=None, token_serial=None, pin=None, key_label=None, key_id=None, "
              "sessions=1)\n\nLog in once to the one present token matching the label/serial, find exactly one "
              "private key by CKA_LABEL/CKA_ID and open `sessions` sessions, each with its own thread. "
              "Raises Error (.rv, .stage in load/init/token/login/key/session, .token).",
    .tp_methods = Signer_methods,
    .tp_getset = Signer_getset,
    .tp_init = (initproc)Signer_init,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef SignJob_methods[] = {
    {"wait", (PyCFunction)SignJob_wait, METH_NOARGS,
     "wait() -> list[bytes | int | None]\n\n"
     "Block (GIL released) until every session's thread is done with the batch; per item what "
     "Signer.sign_batch returns. Later calls return the same list."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SignJob_getset[] = {
    {"done", (getter)SignJob_get_done, NULL, "True once every thread is done with the batch", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SignJobType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ocspmint._p11native.SignJob",
    .tp_basicsize = sizeof(SignJobObject),
    .tp_dealloc = (destructor)SignJob_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A batch queued by Signer.submit(); wait() for its results. Dropping it waits for the threads.",
    .tp_methods = SignJob_methods,
    .tp_getset = SignJob_getset,
};

/* ------------------------------------------------------------------------ */
/* module                                                                    */

static PyObject *py_ckr_name(PyObject *Py_UNUSED(mod), PyObject *arg)
{
    unsigned long rv = PyLong_AsUnsignedLong(arg);
    if (rv == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    const char *name = ckr_lookup(rv);
    if (!name)
        Py_RETURN_NONE;
    return PyUnicode_FromString(name);
}

static PyObject *py_session_fatal(PyObject *Py_UNUSED(mod), PyObject *arg)
{
    unsigned long rv = PyLong_AsUnsignedLong(arg);
    if (rv == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(session_fatal(rv));
}

static PyMethodDef module_methods[] = {
    {"ckr_name", py_ckr_name, METH_O, "ckr_name(rv: int) -> str | None: the CKR_ name of a CK_RV."},
    {"session_fatal", py_session_fatal, METH_O,
     "session_fatal(rv: int) -> bool: whether a session that returned rv can no longer sign."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ocspmint._p11native",
    .m_doc = "Native PKCS#11 signing for ocspmint: multi-session, GIL-free batch signing (native/README.md).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__p11native(void)
{
    if (PyType_Ready(&ModuleType) < 0 || PyType_Ready(&SignerType) < 0 || PyType_Ready(&SignJobType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Error = PyErr_NewExceptionWithDoc("ocspmint._p11native.Error",
                                      "A PKCS#11 failure outside signing: .rv (CK_RV or None), .stage, .token.",
                                      NULL, NULL);
    if (!Error || PyModule_AddObjectRef(m, "Error", Error) < 0 ||
        PyModule_AddObjectRef(m, "Module", (PyObject *)&ModuleType) < 0 ||
        PyModule_AddObjectRef(m, "Signer", (PyObject *)&SignerType) < 0 ||
        PyModule_AddObjectRef(m, "SignJob", (PyObject *)&SignJobType) < 0 ||
        PyModule_AddIntConstant(m, "CKM_ECDSA", CKM_ECDSA) < 0 ||
        PyModule_AddIntConstant(m, "CKM_ECDSA_SHA256", CKM_ECDSA_SHA256) < 0 ||
        PyModule_AddIntConstant(m, "CKM_ECDSA_SHA384", CKM_ECDSA_SHA384) < 0 ||
        PyModule_AddIntConstant(m, "CKM_SHA256_RSA_PKCS", CKM_SHA256_RSA_PKCS) < 0 ||
        PyModule_AddIntConstant(m, "CKM_SHA384_RSA_PKCS", CKM_SHA384_RSA_PKCS) < 0 ||
        PyModule_AddIntConstant(m, "CKM_RSA_PKCS", CKM_RSA_PKCS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SESSIONS", MAX_SESSIONS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
