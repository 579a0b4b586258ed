"""The limits the server, gunicorn.conf.py and every client of Chattle must agree on, and
how each long-lived process holding thousands of connections is tuned (open files, the
garbage collector).

Standard library only, so all of them can import it: gunicorn's master reads
gunicorn.conf.py long before a worker patches the standard library with gevent, and
the harness's clients must not be patched at all, so neither may import chattle.py.
"""

import gc

###############################################################################
# Timeouts, in the order they must nest
###############################################################################
#
#   a poll's timeout       <= POLL_TIMEOUT_MAX              the server holds it at most this long
#   < a client's timeout    = poll's + CLIENT_TIMEOUT_MARGIN  only then does a client call it lost
#   < GRACEFUL_TIMEOUT                                      a stopping gunicorn worker waits this long
#
# Each step is built from the one before, so the order holds by construction.
# (A stopping worker does not rely on the last one: on SIGTERM it answers every held
# poll at once.)

POLL_TIMEOUT_MAX = 60         # the wire protocol's longest hold
CLIENT_TIMEOUT_MARGIN = 10    # the page, the load clients and the rig give a poll this much longer
GRACEFUL_TIMEOUT = POLL_TIMEOUT_MAX + CLIENT_TIMEOUT_MARGIN + 5  # whole seconds: gunicorn takes an int

# A reverse proxy in front (harness/proxy.py writes nginx's configuration from these) sits
# between the poll and the client:
#
#   a poll's timeout <= POLL_TIMEOUT_MAX < PROXY_TIMEOUT < client_timeout(POLL_TIMEOUT_MAX)
#
# nginx's default proxy_read_timeout, 60 s, would cut the longest poll with a 504 at the
# moment the server answers it; PROXY_TIMEOUT answers every poll the protocol allows, and a
# client waiting on the longest poll still hears the proxy's 504 before it gives up itself.
PROXY_TIMEOUT = POLL_TIMEOUT_MAX + CLIENT_TIMEOUT_MARGIN // 2


# A request body past this is refused (413) by the server, and by a proxy in front of it.
MAX_BODY_BYTES = 16 * 1024
# A client that promises a body and stalls must not hold a greenlet (nor a proxy's buffer).
BODY_READ_TIMEOUT = 10.0


def client_timeout(poll_timeout):
    """How long a client waits for the answer to a poll that asked for `poll_timeout`."""
    return poll_timeout + CLIENT_TIMEOUT_MARGIN


###############################################################################
# Open files: every held poll is a socket
###############################################################################

# gunicorn's gevent worker admits only `worker_connections` clients at once and leaves
# the rest in the listen backlog, silently; gunicorn.conf.py gives it nearly all of the
# open-file limit, and make load's preflight checks its target against the same figure.
DESCRIPTORS_RESERVED = 100    # the listener, logs, Redis and the worker's own pipes


def connections_per_worker(descriptor_limit):
    """The connections one gunicorn worker admits at once under `descriptor_limit` open
    files (None where the platform has no limit)."""
    return max(1000, (descriptor_limit or 0) - DESCRIPTORS_RESERVED)


def raise_descriptor_limit():
    """Take the hard open-file limit, not the shell's soft one; (soft, hard) after,
    (None, None) where the platform has no such limit."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None, None


###############################################################################
# Garbage collection: every long-lived process holding thousands of connections
###############################################################################

GC_THRESHOLDS = (20000, 20, 20)


def collect_garbage_seldom():
    """Collect young objects less often, and never walk the start-up ones again.

    Every held poll (and every load-test listener) keeps a few dozen objects the cyclic
    collector tracks; with Python's thresholds (700, 10, 10) a fan-out to 10,000 polls
    ran a hundred young collections and a full one over every held poll. The garbage of
    a fan-out is freed by reference counting anyway, so memory does not grow. Called once
    in each serving process after the application is loaded, and in each load worker."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
