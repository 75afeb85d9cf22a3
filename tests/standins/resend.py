"""Stand-in for the Resend API (RESEND_BASE_URL), in Resend's wire format.

  POST /emails {from, to: [..] | "..", subject, text|html} with `Authorization: Bearer <key>`
  -> 200 {"id": "..."}. Errors are Resend's {"statusCode", "name", "message"}: 401
  missing_api_key (no key), 403 invalid_api_key (a wrong one), 422 validation_error (a
  missing field, a `to` that is not an address).
Like Resend, a repeated Idempotency-Key answers the first email's id without delivering
again (Resend keeps a key 24 hours; the stand-in for its life); the same key with
another payload is 409 invalid_idempotent_request. .delivered holds each email
delivered once, .requests every request (retries included).
Scripted Resend errors, besides the recording server's behaviours:

    r.next(("resend", 422, "validation_error", "Invalid `to` field."))
    r.next(("resend", 429, "rate_limit_exceeded", "Too many requests.", {"retry-after": "7"}))

    with ResendStandin(api_key="re_test") as r:
        env = {"RESEND_BASE_URL": r.url, "RESEND_API_KEY": r.token}
"""
import re
import secrets
import uuid

try:
    from .recording import RecordingServer
except ImportError:
    from recording import RecordingServer

ADDRESS = re.compile(r"^(?:[^<>@\s]+@[^<>@\s]+\.[^<>@\s]+|[^<>]*<[^<>@\s]+@[^<>@\s]+\.[^<>@\s]+>)$")


def error(status, name, message, headers=None):
    body = {"statusCode": status, "name": name, "message": message}
    return (status, body, headers) if headers else (status, body)


class ResendStandin(RecordingServer):
    def __init__(self, api_key=None):
        super().__init__(token=api_key or "re_" + secrets.token_hex(16))
        self.delivered = []      # Recorded, one per distinct delivery
        self._by_key = {}        # Idempotency-Key -> (email id, the request's body)

    def reset(self):
        super().reset()
        with self.lock:
            self.delivered.clear()
            self._by_key.clear()

    def unauthorized_answer(self, headers):
        if not headers.get("Authorization"):
            return error(401, "missing_api_key", "Missing API key in the authorization header.")
        return error(403, "invalid_api_key", "API key is invalid")

    def _apply(self, behaviour, rec):
        if isinstance(behaviour, tuple) and behaviour[0] == "resend":
            return error(*behaviour[1:])
        return super()._apply(behaviour, rec)

    def answer(self, rec):
        if rec.method != "POST" or rec.path != "/emails":
            return error(404, "not_found", "The requested endpoint does not exist.")
        b = rec.json
        if (not isinstance(b, dict) or not isinstance(b.get("from"), str)
                or not isinstance(b.get("subject"), str)
                or not (isinstance(b.get("to"), str) or isinstance(b.get("to"), list))
                or not (isinstance(b.get("text"), str) or isinstance(b.get("html"), str))):
            return error(422, "missing_required_field", "Missing `to`, `from`, `subject` or a body.")
        to = [b["to"]] if isinstance(b["to"], str) else b["to"]
        if not to or not all(isinstance(a, str) and ADDRESS.match(a) for a in to):
            return error(422, "validation_error",
                         "Invalid `to` field. The email address needs to follow the "
                         "`email@example.com` or `Name <email@example.com>` format.")
        key = rec.headers.get("Idempotency-Key")
        with self.lock:
            if key and key in self._by_key:
                eid, body = self._by_key[key]
                if body != b:
                    return error(409, "invalid_idempotent_request",
                                 "Same idempotency key used with a different request payload.")
                return 200, {"id": eid}
            eid = str(uuid.uuid4())
            if key:
                self._by_key[key] = (eid, b)
            self.delivered.append(rec)
        return 200, {"id": eid}
