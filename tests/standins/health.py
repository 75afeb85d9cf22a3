"""Stand-in for many MindRoom instances' health endpoints, on loopback.

One asyncio listener serves every instance; the instance is the first path
segments of its backend URL, and how it answers is chosen per instance:

    ok      200 {"status": "healthy"}
    500     500 {"status": "broken"}
    hang    accepts, reads the request, never answers (until the client leaves)
    close   closes the connection without a word (empty reply)
    redirect 302 to http://169.254.169.254/ (must not be followed)
    big     200 with a 4 MiB body (must be cut off)

Two ways to choose:
    /i/<key>/...        mode from set_mode(key, mode), default "ok"
    /h/<mode>/<key>/... mode in the URL itself (no state: used by the benchmark)

"Refused" is a real ECONNREFUSED: refused_url(key) points at a port that is
bound but not listening, kept for the stand-in's lifetime so nothing else can
take it.

In-process (tests):
    with HealthStandin() as h:
        url = h.url("a", "hang")      # backend_url for instance "a"
        h.hits("a")                   # requests seen for "a"
Standalone (benchmark):  python3 tests/standins/health.py
    prints "<port> <refused_port>" on one line, serves until SIGTERM/SIGINT.
"""
import asyncio
import signal
import socket
import sys
import threading

MODES = ("ok", "500", "hang", "close", "redirect", "big")


class HealthStandin:
    def __init__(self, host="127.0.0.1"):
        self.host = host
        self.port = None
        self.refused_port = None
        self._modes = {}
        self._seen = []
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._server = None
        self._refused_sock = None
        self._hanging = set()
        self._ready = threading.Event()

    # ---- control ----
    def set_mode(self, key, mode):
        assert mode in MODES, mode
        with self._lock:
            self._modes[key] = mode

    def url(self, key, mode=None):
        """Backend URL of instance `key` (the prober appends the health path)."""
        if mode is not None:
            self.set_mode(key, mode)
        return "http://%s:%d/i/%s" % (self.host, self.port, key)

    def refused_url(self, key):
        return "http://%s:%d/i/%s" % (self.host, self.refused_port, key)

    def requests(self, key=None):
        with self._lock:
            return [r for r in self._seen if key is None or r["key"] == key]

    def hits(self, key=None):
        return len(self.requests(key))

    def reset(self):
        with self._lock:
            self._seen.clear()

    # ---- lifecycle ----
    def start(self):
        rs = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        rs.bind((self.host, 0))  # bound, never listening: connect() gets ECONNREFUSED
        self._refused_sock = rs
        self.refused_port = rs.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("health stand-in did not start")
        return self

    def stop(self):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._refused_sock is not None:
            self._refused_sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, 0, backlog=4096, limit=65536))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for t in list(self._hanging):
                t.cancel()
            self._loop.close()

    # ---- serving ----
    def _mode_of(self, path):
        parts = path.split("?", 1)[0].split("/")
        # ["", "i", key, ...] or ["", "h", mode, key, ...]
        if len(parts) >= 3 and parts[1] == "i":
            key = parts[2]
            with self._lock:
                return key, self._modes.get(key, "ok")
        if len(parts) >= 4 and parts[1] == "h" and parts[2] in MODES:
            return parts[3], parts[2]
        return None, None

    async def _handle(self, reader, writer):
        task = asyncio.current_task()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                fields = line.split(" ")
                method, path = (fields[0], fields[1]) if len(fields) >= 3 else ("?", "/")
                key, mode = self._mode_of(path)
                with self._lock:
                    self._seen.append({"key": key, "mode": mode, "method": method, "path": path})
                if mode is None:
                    await self._send(writer, 404, b'{"error":"no such instance"}')
                elif mode == "ok":
                    await self._send(writer, 200, b'{"status":"healthy"}')
                elif mode == "500":
                    await self._send(writer, 500, b'{"status":"broken"}')
                elif mode == "redirect":
                    await self._send(writer, 302, b"", [("Location", "http://169.254.169.254/latest/meta-data/")])
                elif mode == "big":
                    await self._send(writer, 200, b"x" * (4 << 20))
                elif mode == "close":
                    return
                else:  # hang: hold the connection until the client gives up
                    self._hanging.add(task)
                    try:
                        while await reader.read(4096):
                            pass
                    finally:
                        self._hanging.discard(task)
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    async def _send(writer, status, body, headers=()):
        reason = {200: "OK", 302: "Found", 404: "Not Found", 500: "Internal Server Error"}[status]
        head = "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
            status, reason, len(body))
        for k, v in headers:
            head += "%s: %s\r\n" % (k, v)
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()


def main():
    h = HealthStandin().start()
    print("%d %d" % (h.port, h.refused_port), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    done.wait()
    h.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
