"""A FastCGI client for tests that talk to a function's socket directly (what
nginx does), written from the FastCGI specification (section 3.3 records, 3.4
name-value pairs), independently of libfcgi."""
import socket
import struct

BEGIN_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 3, 4, 5, 6
RESPONDER = 1


def record(rtype, body=b"", request_id=1):
    return struct.pack("!BBHHBB", 1, rtype, request_id, len(body), 0, 0) + body


def begin_request(request_id=1, role=RESPONDER):
    return record(BEGIN_REQUEST, struct.pack("!HB5x", role, 0), request_id)


def _length(n):
    return bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)


def params(pairs, request_id=1):
    """PARAMS records for a dict, then the empty one that ends them."""
    data = b"".join(_length(len(k.encode())) + _length(len(v.encode())) + k.encode() + v.encode()
                    for k, v in pairs.items())
    out = b""
    for i in range(0, len(data), 65535):
        out += record(PARAMS, data[i:i + 65535], request_id)
    return out + record(PARAMS, b"", request_id)


def stdin(body=b"", request_id=1):
    out = b""
    for i in range(0, len(body), 65535):
        out += record(STDIN, body[i:i + 65535], request_id)
    return out + record(STDIN, b"", request_id)


def request(method="GET", uri="/", body=b"", extra=None):
    """The bytes of one whole responder request, as nginx sends it."""
    p = {"REQUEST_METHOD": method, "DOCUMENT_URI": uri, "SCRIPT_NAME": uri, "QUERY_STRING": "",
         "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
         "REMOTE_ADDR": "127.0.0.1", "SERVER_PROTOCOL": "HTTP/1.1"}
    p.update(extra or {})
    return begin_request() + params(p) + stdin(body)


def read_response(sock):
    """Reads records until END_REQUEST; returns (status, headers dict, body bytes)."""
    buf, out = b"", b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before END_REQUEST (got %r)" % out[:200])
        buf += chunk
        while len(buf) >= 8:
            _, rtype, _, clen, plen, _ = struct.unpack("!BBHHBB", buf[:8])
            if len(buf) < 8 + clen + plen:
                break
            content, buf = buf[8:8 + clen], buf[8 + clen + plen:]
            if rtype == STDOUT:
                out += content
            elif rtype == END_REQUEST:
                head, _, body = out.partition(b"\r\n\r\n")
                headers = dict(l.split(": ", 1) for l in head.decode().split("\r\n") if ": " in l)
                return int(headers.get("Status", "200").split()[0]), headers, body


def call(path_or_sock, method="GET", uri="/", body=b"", timeout=10):
    """One whole request on a new connection to the unix socket path (or a
    connected socket); returns (status, headers, body)."""
    s = path_or_sock
    if isinstance(path_or_sock, (str, bytes)) or hasattr(path_or_sock, "__fspath__"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(path_or_sock))
    try:
        s.sendall(request(method, uri, body))
        return read_response(s)
    finally:
        s.close()
