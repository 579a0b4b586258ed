"""A certificate authority and a server certificate made for one run, with the openssl
command-line tool, so that TLS is ended at the proxy and the clients check it against
that CA alone (never the system's store, never unchecked).

    python -m harness.tls DIRECTORY      # ca.pem, server.pem, server.key in DIRECTORY

The server certificate names 127.0.0.1, ::1 and localhost: the addresses a run on this
host reaches it by. Keys are P-256: made in milliseconds, and the cheapest handshake
nginx and Python's ssl module both offer.
"""

import os
import ssl
import subprocess
import sys

DAYS = 2                    # a run's certificate needs to outlive the run, nothing more
SUBJECT_NAMES = "IP:127.0.0.1,IP:::1,DNS:localhost"
OPENSSL_DEADLINE = 30
RECORD_BYTES = 16384        # TLS's largest record of plain bytes: one read takes a whole one


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


# -- the client side: TLS over a socket the caller reads itself -------------------------------

_CONTEXTS = {}


def client_context(ca_file=""):
    """The ssl context a client checks https:// servers with: against `ca_file` alone when
    given (the run's own CA, or --ca-file for a real target), else the system's CAs; the
    host name is always checked. One per CA file and process."""
    if ca_file not in _CONTEXTS:
        context = ssl.create_default_context(cafile=ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _CONTEXTS[ca_file] = context
    return _CONTEXTS[ca_file]


def refusal_line(exc, url):
    """One line for a TLS failure against `url`: a certificate no CA given vouches for says
    which option trusts one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ("%s: its certificate is not trusted (%s); give the CA that signed it with --ca-file (CA_FILE=)"
                % (url, exc.verify_message or exc.reason))
    return "%s: TLS failed: %s" % (url, exc)


class ClientTls:
    """One TLS connection's state, in memory: the caller reads the socket itself (recvmsg,
    so the kernel's arrival stamp is that of the encrypted bytes), hands what it read to
    `decrypt`, and sends what `encrypt` and `handshake` give it. The decryption is then
    this process's work, between the bytes' arrival and their reading."""

    __slots__ = ("incoming", "outgoing", "tls", "done")

    def __init__(self, context, server_name):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self.done = False

    def handshake(self, received=b""):
        """Take the server's handshake bytes `received`: (finished, bytes to send now).
        Raises ssl.SSLError (a certificate not trusted among them)."""
        if received:
            self.incoming.write(received)
        try:
            self.tls.do_handshake()
            self.done = True
        except ssl.SSLWantReadError:
            pass
        return self.done, self.outgoing.read()

    def encrypt(self, plain):
        self.tls.write(plain)
        return self.outgoing.read()

    def decrypt(self, received):
        """The plain bytes in `received` with what came before: b"" until a record is
        whole (or for records that carry none, a session ticket); None once the server
        has closed the TLS session."""
        self.incoming.write(received)
        chunks = []
        try:
            # a read past the last record raises: stop once nothing is left to read (a held
            # poll's answer is one record, so one read without an exception)
            while self.incoming.pending or self.tls.pending() or not chunks:
                chunk = self.tls.read(RECORD_BYTES)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            if not chunks:
                return None
        return b"".join(chunks)

    def handshake_blocking(self, sock):
        """The whole handshake on a blocking `sock` (its timeout bounds each read)."""
        done, out = self.handshake()
        while True:
            if out:
                sock.sendall(out)
            if done:
                return
            received = sock.recv(65536)
            if not received:
                raise ConnectionResetError("the server closed the connection during the TLS handshake")
            done, out = self.handshake(received)
