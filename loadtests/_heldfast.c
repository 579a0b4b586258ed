/* The held polls' common case, compiled: read an answer, hand its run of ids to its
 * listener, send the next poll. loadtests/longpoll.py (HeldPolls) is the driver and the
 * reference; this only takes the answers it has seen before, whole, in one read.
 *
 * Why C: during a fan-out the load generator spent about half its CPU in the Python of
 * that loop (perf: 51 % in libpython, 44 % in the kernel), 13 us per answer, which kept
 * `make load`'s load generator above half the server's CPU. What is left here per answer
 * is the two system calls, a dict lookup and one Python call (the listener's ledger).
 *
 * drain(epoll_fd, max_events, held, known, stamp_shift) -> (records, slow, answers, body_bytes, failure)
 *
 *   held   dict fd -> HeldPoll. A HeldPoll with `fast` false is not read here: it goes to
 *          `slow` as (fd, None, None, 0) for the driver's own path (a connect finishing,
 *          the first poll, a parser holding part of an answer).
 *   known  dict answer bytes -> (index, first_id, last_id, body_length): answers the
 *          driver framed itself, whole in one read, status 200, keep-alive, a run of ids
 *          (last_id = first_id - 1: none, a poll's timeout); or -> None: bytes it framed
 *          and does not take this way.
 *
 *   For each readable fast HeldPoll: recvmsg with its SO_TIMESTAMPNS stamp. If the answer
 *   is known and the HeldPoll's `ledger` (instruments.measures.DeliveryLedger) is at its first
 *   id, the ledger moves on as DeliveryLedger.record_run does in that case (received +=
 *   the run's length, next_expected = last_id + 1), `fast_answers` counts it, and the next
 *   poll asks since last_id. Other answer bytes, or a ledger elsewhere (a gap, a
 *   duplicate), go to `slow` as (fd, data, arrived or None, 0) for the driver to frame and
 *   hand over the long way. Bytes not in `known` at all end the call: the driver learns
 *   them, and the fan-out's other answers, still ready (epoll is level-triggered), come
 *   back at the next call. The next poll (request_head + cursor + request_tail) goes out
 *   at once and `sent_at` is set; a send that does not go out whole goes to `slow` as
 *   (fd, None, None, -1). A read error is (fd, None, None, errno), the server's close
 *   (fd, b"", None, 0).
 *
 *   records: 6 doubles per answer taken here: index, arrived (kernel stamp + stamp_shift,
 *   else the read time), read time, stamped (1.0/0.0), the HeldPoll's clock_offset and
 *   clock_bound; the driver turns them into deliveries (instruments/measures.py's definitions).
 *
 *   failure: None, or (fd, exception) when a Python call failed while handling that held
 *   poll (one of its attributes, a list append, memory). The call stops there and still
 *   returns what it did before: ledgers already moved have their records, polls already
 *   sent are in `records` or `slow`, so no delivery leaves the histograms. The driver then
 *   drops that one held poll (its listener polls again from its cursor) and raises nothing.
 *   Only a failure before any answer was read (epoll_wait, the result's allocation) raises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#define RECEIVE_SIZE 65536
#define MAX_EVENTS 4096
#define REQUEST_SPACE 4096
#define FIELDS 6

static PyObject *s_fast, *s_ledger, *s_next_expected, *s_received, *s_fast_answers, *s_request_head, *s_request_tail, *s_sent_at, *s_clock_offset, *s_clock_bound;

static double
wall_clock(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static double
attribute_double(PyObject *object, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(object, name);
    double result;
    if (value == NULL)
        return -1.0;
    result = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return result;
}

/* Appends (fd, data, arrived, problem) to slow; data and arrived may be NULL (None). */
static int
slow_entry(PyObject *slow, int fd, PyObject *data, PyObject *arrived, int problem)
{
    PyObject *entry = Py_BuildValue("(iOOi)", fd, data ? data : Py_None, arrived ? arrived : Py_None, problem);
    int failed;
    if (entry == NULL)
        return -1;
    failed = PyList_Append(slow, entry);
    Py_DECREF(entry);
    return failed;
}

/* DeliveryLedger.record_run's usual case, on `held`'s ledger: 1 when the ledger was at
 * `first` and moved past `last` (the cursor is then `last`), 0 when not, -1 on an error
 * with the ledger untouched, 2 when the ledger moved and only its count in `fast_answers`
 * failed (an error is set; the answer is taken all the same). Every value is read before
 * anything is written, so an error leaves the ledger as it was or wholly moved on.
 * The attribute calls cost a tenth of the Python call they replace (per answer). */
static int
take_run(PyObject *held, long long first, long long last)
{
    PyObject *ledger, *value = NULL, *received_before = NULL;
    long long next_expected, received, fast_answers;
    int result = -1;

    ledger = PyObject_GetAttr(held, s_ledger);
    if (ledger == NULL)
        return -1;
    if (ledger == Py_None) {
        result = 0;
        goto done;
    }
    if ((value = PyObject_GetAttr(ledger, s_next_expected)) == NULL)
        goto done;
    next_expected = PyLong_AsLongLong(value);
    Py_CLEAR(value);
    if (next_expected == -1 && PyErr_Occurred())
        goto done;
    if (next_expected != first) {
        result = 0;
        goto done;
    }
    if ((received_before = PyObject_GetAttr(ledger, s_received)) == NULL)
        goto done;
    received = PyLong_AsLongLong(received_before);
    if (received == -1 && PyErr_Occurred())
        goto done;
    if ((value = PyObject_GetAttr(held, s_fast_answers)) == NULL)
        goto done;
    fast_answers = PyLong_AsLongLong(value);
    Py_CLEAR(value);
    if (fast_answers == -1 && PyErr_Occurred())
        goto done;

    if (!(value = PyLong_FromLongLong(received + last - first + 1)) || PyObject_SetAttr(ledger, s_received, value) < 0)
        goto done;
    Py_CLEAR(value);
    if (!(value = PyLong_FromLongLong(last + 1)) || PyObject_SetAttr(ledger, s_next_expected, value) < 0) {
        /* put `received` back: the ledger must not be half moved */
        PyObject *type, *error, *traceback;
        PyErr_Fetch(&type, &error, &traceback);
        if (PyObject_SetAttr(ledger, s_received, received_before) < 0)
            PyErr_Clear();
        PyErr_Restore(type, error, traceback);
        goto done;
    }
    Py_CLEAR(value);
    result = 1;
    if (!(value = PyLong_FromLongLong(fast_answers + 1)) || PyObject_SetAttr(held, s_fast_answers, value) < 0)
        result = 2;
done:
    Py_XDECREF(value);
    Py_XDECREF(received_before);
    Py_DECREF(ledger);
    return result;
}

/* A known answer's four fields (index, first id, last id, body length) as numbers; -1 on
 * an error. */
static int
known_fields(PyObject *entry, long long fields[4])
{
    int index;
    for (index = 0; index < 4; index++) {
        fields[index] = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, index));
        if (fields[index] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* The next poll for `cursor`: request_head + cursor + request_tail, sent at once.
 * 1 when it went out whole, 0 when not, -1 on a Python error. */
static int
send_next_poll(PyObject *held, int fd, long long cursor)
{
    char request[REQUEST_SPACE];
    PyObject *head = NULL, *tail = NULL, *sent_at = NULL;
    Py_ssize_t head_length, tail_length;
    int digits, result = -1;
    ssize_t sent;

    head = PyObject_GetAttr(held, s_request_head);
    tail = head ? PyObject_GetAttr(held, s_request_tail) : NULL;
    if (tail == NULL)
        goto done;
    if (!PyBytes_Check(head) || !PyBytes_Check(tail)) {
        PyErr_SetString(PyExc_TypeError, "request_head and request_tail must be bytes");
        goto done;
    }
    head_length = PyBytes_GET_SIZE(head);
    tail_length = PyBytes_GET_SIZE(tail);
    if (head_length + tail_length + 24 > REQUEST_SPACE) {
        result = 0;  /* a request this long is not a poll this loop sends */
        goto done;
    }
    memcpy(request, PyBytes_AS_STRING(head), head_length);
    digits = snprintf(request + head_length, 24, "%lld", cursor);
    memcpy(request + head_length + digits, PyBytes_AS_STRING(tail), tail_length);
    sent_at = PyFloat_FromDouble(wall_clock());
    if (sent_at == NULL || PyObject_SetAttr(held, s_sent_at, sent_at) < 0)
        goto done;
    sent = send(fd, request, head_length + digits + tail_length, MSG_DONTWAIT | MSG_NOSIGNAL);
    result = sent == head_length + digits + tail_length;
done:
    Py_XDECREF(head);
    Py_XDECREF(tail);
    Py_XDECREF(sent_at);
    return result;
}

static PyObject *
drain(PyObject *module, PyObject *args)
{
    int epoll_fd, max_events, ready, index, failed_fd = -1;
    PyObject *held_by_fd, *known;
    double stamp_shift;
    struct epoll_event events[MAX_EVENTS];
    static char buffer[RECEIVE_SIZE];
    char control[CMSG_SPACE(sizeof(struct timespec))];
    PyObject *records = NULL, *slow = NULL, *failure = NULL, *result = NULL;
    double *record;
    Py_ssize_t taken = 0;
    long long answers = 0, body_bytes = 0;

    (void)module;
    if (!PyArg_ParseTuple(args, "iiO!O!d", &epoll_fd, &max_events, &PyDict_Type, &held_by_fd, &PyDict_Type, &known,
                          &stamp_shift))
        return NULL;
    if (max_events < 1 || max_events > MAX_EVENTS)
        max_events = MAX_EVENTS;
    ready = epoll_wait(epoll_fd, events, max_events, 0);
    if (ready < 0) {
        if (errno == EINTR)
            ready = 0;
        else
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    records = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)ready * FIELDS * sizeof(double));
    slow = PyList_New(0);
    if (records == NULL || slow == NULL) {
        Py_XDECREF(records);
        Py_XDECREF(slow);
        return NULL;
    }
    record = (double *)PyBytes_AS_STRING(records);

    /* Every path through one held poll ends at `next` (done with it) or at `failed` (a
     * Python error, set, about this fd); the references it holds are released at either. */
    for (index = 0; index < ready; index++) {
        int fd = events[index].data.fd;
        PyObject *fd_object, *held = NULL, *fast, *data = NULL, *arrived = NULL, *entry = NULL;
        struct iovec vector = {buffer, RECEIVE_SIZE};
        struct msghdr message;
        struct cmsghdr *header;
        ssize_t length;
        double arrived_at = 0.0, read_at, clock_offset, clock_bound;
        long long fields[4];
        int stamped = 0, is_fast, sent, moved = 0, stop = 0;

        fd_object = PyLong_FromLong(fd);
        if (fd_object == NULL)
            goto failed;
        held = PyDict_GetItemWithError(held_by_fd, fd_object);
        Py_DECREF(fd_object);
        if (held == NULL) {
            if (PyErr_Occurred())
                goto failed;
            continue;  /* released meanwhile */
        }
        Py_INCREF(held);
        fast = PyObject_GetAttr(held, s_fast);
        is_fast = fast ? PyObject_IsTrue(fast) : -1;
        Py_XDECREF(fast);
        if (is_fast < 0)
            goto failed;
        if (is_fast == 0) {
            if (slow_entry(slow, fd, NULL, NULL, 0) < 0)
                goto failed;
            goto next;
        }

        memset(&message, 0, sizeof(message));
        message.msg_iov = &vector;
        message.msg_iovlen = 1;
        message.msg_control = control;
        message.msg_controllen = sizeof(control);
        length = recvmsg(fd, &message, MSG_DONTWAIT);
        read_at = wall_clock();
        if (length < 0) {
            if (!(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) && slow_entry(slow, fd, NULL, NULL, errno) < 0)
                goto failed;
            goto next;
        }
        for (header = CMSG_FIRSTHDR(&message); header != NULL; header = CMSG_NXTHDR(&message, header)) {
            if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec stamp;
                memcpy(&stamp, CMSG_DATA(header), sizeof(stamp));
                arrived_at = (double)stamp.tv_sec + (double)stamp.tv_nsec * 1e-9 + stamp_shift;
                stamped = 1;
            }
        }
        data = PyBytes_FromStringAndSize(buffer, length);
        if (data == NULL)
            goto failed;
        if (length) {
            /* a strong reference: the attribute calls below may run code that changes `known` */
            entry = PyDict_GetItemWithError(known, data);
            if (entry == NULL && PyErr_Occurred())
                goto failed;
            Py_XINCREF(entry);
        }
        if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 4) {
            /* everything the record needs, read before the ledger moves: once it has,
             * nothing may stop the record from being written */
            if (known_fields(entry, fields) < 0)
                goto failed;
            clock_offset = attribute_double(held, s_clock_offset);
            clock_bound = clock_offset == -1.0 && PyErr_Occurred() ? -1.0 : attribute_double(held, s_clock_bound);
            if (PyErr_Occurred())
                goto failed;
            moved = take_run(held, fields[1], fields[2]);
            if (moved < 0)
                goto failed;
        }
        if (!moved) {
            /* not one this loop takes: the driver frames and hands it over */
            arrived = stamped ? PyFloat_FromDouble(arrived_at) : NULL;
            if ((stamped && arrived == NULL) || slow_entry(slow, fd, data, arrived, 0) < 0)
                goto failed;
            /* A new answer ends the call: the driver learns it, and the rest of a fan-out,
             * still ready, comes back at the next call, known. */
            stop = entry == NULL && length > 0;
            goto next;
        }
        record[0] = (double)fields[0];
        record[1] = stamped ? arrived_at : read_at;
        record[2] = read_at;
        record[3] = stamped ? 1.0 : 0.0;
        record[4] = clock_offset;
        record[5] = clock_bound;
        record += FIELDS;
        taken++;
        answers++;
        body_bytes += fields[3];
        if (moved == 2)
            goto failed;  /* taken and recorded; its fast_answers could not be counted */
        sent = send_next_poll(held, fd, fields[2]);
        if (sent < 0 || (sent == 0 && slow_entry(slow, fd, NULL, NULL, -1) < 0))
            goto failed;
    next:
        Py_XDECREF(entry);
        Py_XDECREF(arrived);
        Py_XDECREF(data);
        Py_XDECREF(held);
        if (stop)
            break;
        continue;
    failed:
        Py_XDECREF(entry);
        Py_XDECREF(arrived);
        Py_XDECREF(data);
        Py_XDECREF(held);
        failed_fd = fd;
        break;
    }
    if (failed_fd >= 0) {
        PyObject *type, *error, *traceback;
        PyErr_Fetch(&type, &error, &traceback);
        PyErr_NormalizeException(&type, &error, &traceback);
        if (error != NULL && traceback != NULL)
            PyException_SetTraceback(error, traceback);
        failure = Py_BuildValue("(iO)", failed_fd, error ? error : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(error);
        Py_XDECREF(traceback);
        if (failure == NULL)
            goto fail;
    } else {
        failure = Py_NewRef(Py_None);
    }
    if (_PyBytes_Resize(&records, taken * FIELDS * sizeof(double)) < 0)
        goto fail;  /* records is NULL now; shrinking cannot fail in practice */
    result = Py_BuildValue("(NNLLN)", records, slow, answers, body_bytes, failure);
    return result;
fail:
    Py_XDECREF(records);
    Py_XDECREF(slow);
    Py_XDECREF(failure);
    return NULL;
}

static PyMethodDef methods[] = {
    {"drain", drain, METH_VARARGS, "Read the ready held polls' known answers and send their next polls."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_heldfast", "The held polls' common case, compiled (see loadtests/longpoll.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__heldfast(void)
{
    PyObject *module;
    if (!(s_fast = PyUnicode_InternFromString("fast")) || !(s_ledger = PyUnicode_InternFromString("ledger")) ||
        !(s_next_expected = PyUnicode_InternFromString("next_expected")) ||
        !(s_received = PyUnicode_InternFromString("received")) ||
        !(s_fast_answers = PyUnicode_InternFromString("fast_answers")) ||
        !(s_request_head = PyUnicode_InternFromString("request_head")) ||
        !(s_request_tail = PyUnicode_InternFromString("request_tail")) ||
        !(s_sent_at = PyUnicode_InternFromString("sent_at")) ||
        !(s_clock_offset = PyUnicode_InternFromString("clock_offset")) ||
        !(s_clock_bound = PyUnicode_InternFromString("clock_bound")))
        return NULL;
    module = PyModule_Create(&module_definition);
    if (module != NULL && (PyModule_AddIntConstant(module, "FIELDS", FIELDS) < 0 ||
                           PyModule_AddIntConstant(module, "MAX_EVENTS", MAX_EVENTS) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
