"""A certificate authority and a server certificate made for one run, with the openssl
command-line tool, so that TLS is ended at the proxy and the clients check it against
that CA alone (never the system's store, never unchecked).

    python -m harness.tls DIRECTORY      # ca.pem, server.pem, server.key in DIRECTORY

The server certificate names 127.0.0.1, ::1 and localhost: the addresses a run on this
host reaches it by. Keys are P-256: made in milliseconds, and the cheapest handshake
nginx and Python's ssl module both offer.
"""

import os
import subprocess
import sys

DAYS = 2                    # a run's certificate needs to outlive the run, nothing more
SUBJECT_NAMES = "IP:127.0.0.1,IP:::1,DNS:localhost"
OPENSSL_DEADLINE = 30


class RunCertificates:
    """Paths of the CA certificate (`ca`), the server's certificate (`cert`) and its key (`key`)."""

    def __init__(self, directory):
        self.directory = directory
        self.ca = os.path.join(directory, "ca.pem")
        self.ca_key = os.path.join(directory, "ca.key")
        self.cert = os.path.join(directory, "server.pem")
        self.key = os.path.join(directory, "server.key")


def _openssl(*args, cwd):
    try:
        done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=OPENSSL_DEADLINE,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RuntimeError("the openssl command is not installed (Debian: apt-get install openssl)") from None
    if done.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (args[0], done.stderr.strip()[-500:]))


def make_certificates(directory):
    """A fresh CA and a server certificate it signed, in `directory`; a RunCertificates."""
    os.makedirs(directory, exist_ok=True)
    made = RunCertificates(directory)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *curve, "-keyout", made.ca_key, "-out", made.ca, "-days", str(DAYS),
             "-subj", "/CN=Chattle run CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    request = os.path.join(directory, "server.csr")
    _openssl("req", "-new", *curve, "-keyout", made.key, "-out", request, "-subj", "/CN=localhost", cwd=directory)
    extensions = os.path.join(directory, "server.ext")
    with open(extensions, "w") as text:
        text.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n" % SUBJECT_NAMES)
    _openssl("x509", "-req", "-in", request, "-CA", made.ca, "-CAkey", made.ca_key, "-CAcreateserial",
             "-out", made.cert, "-days", str(DAYS), "-extfile", extensions, cwd=directory)
    return made


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.tls DIRECTORY")
    print(make_certificates(sys.argv[1]).ca)
