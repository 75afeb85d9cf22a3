"""Stand-in for the Resend API (RESEND_BASE_URL).

  POST /emails {from, to: [..], subject, text|html} with `Authorization: Bearer <key>`
  -> 200 {"id": "..."}; 401 for a wrong key; 422 for a malformed email.
Like Resend, a repeated Idempotency-Key within the stand-in's life answers the first
email's id without delivering again: .delivered holds each email delivered once,
.requests every request (retries included).

    with ResendStandin(api_key="re_test") as r:
        env = {"RESEND_BASE_URL": r.url, "RESEND_API_KEY": r.token}
"""
import secrets
import uuid

try:
    from .recording import RecordingServer
except ImportError:
    from recording import RecordingServer


class ResendStandin(RecordingServer):
    def __init__(self, api_key=None):
        super().__init__(token=api_key or "re_" + secrets.token_hex(16))
        self.delivered = []      # Recorded, one per distinct delivery
        self._by_key = {}

    def reset(self):
        super().reset()
        with self.lock:
            self.delivered.clear()
            self._by_key.clear()

    def answer(self, rec):
        if rec.method != "POST" or rec.path != "/emails":
            return 404, {"name": "not_found", "message": "no such route"}
        b = rec.json
        if (not isinstance(b, dict) or not isinstance(b.get("from"), str)
                or not isinstance(b.get("subject"), str)
                or not (isinstance(b.get("to"), str) or isinstance(b.get("to"), list))
                or not (isinstance(b.get("text"), str) or isinstance(b.get("html"), str))):
            return 422, {"name": "validation_error", "message": "missing fields"}
        key = rec.headers.get("Idempotency-Key")
        with self.lock:
            if key and key in self._by_key:
                return 200, {"id": self._by_key[key]}
            eid = str(uuid.uuid4())
            if key:
                self._by_key[key] = eid
            self.delivered.append(rec)
        return 200, {"id": eid}
