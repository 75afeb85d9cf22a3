"""Stand-in for Supabase Auth's signing keys: key pairs the test owns, the JWKS
endpoint that publishes their public halves, and tokens signed with them.

    with JwksStandin() as auth:
        k1 = auth.new_key("ES256")          # or "RS256"; published at once
        env = {"SUPABASE_AUTH_MODE": "jwks", "SUPABASE_URL": auth.url}
        token = k1.sign(auth.user_claims(sub))
        app = k1.sign(auth.oauth_claims(sub, client_id))  # issued to a third-party app
        auth.publish(k2)                    # rotation: the endpoint now serves k2 only
        auth.fetches()                      # GETs of the JWKS so far (failed ones too)
        auth.behave("fail")                 # the endpoint answers 500 (recording.py)

The endpoint is GET /auth/v1/.well-known/jwks.json, answering {"keys": [...]}
as Supabase Auth does (public EC P-256 / RSA JWKs with kid, alg, use). Tokens are
built here with the `cryptography` package, independently of libmindroom: ES256
signatures are the raw 64-byte r||s of RFC 7518 3.4 (converted from the DER that
the library produces), RS256 is PKCS#1 v1.5 with SHA-256.
"""
import base64
import json
import time
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from recording import RecordingServer

JWKS_PATH = "/auth/v1/.well-known/jwks.json"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_json(obj):
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


class Key:
    """A signing key pair: alg "ES256" (P-256) or "RS256" (2048-bit RSA)."""

    def __init__(self, alg, kid=None):
        self.alg = alg
        self.kid = kid or "%s-%s" % (alg.lower(), uuid.uuid4().hex[:8])
        if alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(alg)

    def public_jwk(self):
        pub = self.private.public_key().public_numbers()
        if self.alg == "ES256":
            return {"kty": "EC", "crv": "P-256", "x": b64url(pub.x.to_bytes(32, "big")),
                    "y": b64url(pub.y.to_bytes(32, "big")), "kid": self.kid, "alg": "ES256",
                    "use": "sig", "key_ops": ["verify"], "ext": True}
        n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "n": b64url(n), "e": b64url(pub.e.to_bytes(3, "big")),
                "kid": self.kid, "alg": "RS256", "use": "sig", "key_ops": ["verify"], "ext": True}

    def public_pem(self):
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def signature(self, signing_input):
        if self.alg == "RS256":
            return self.private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        r, s = decode_dss_signature(self.private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def sign(self, claims, header=None, raw_payload=None):
        """A JWT of `claims` (dict) signed with this key. `header` replaces
        {"alg", "kid", "typ"}; `raw_payload` (str) replaces the JSON of claims
        (for payloads json.dumps cannot make, e.g. a key given twice)."""
        h = header if header is not None else {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        payload = b64url(raw_payload.encode()) if raw_payload is not None else encode_json(claims)
        signing_input = encode_json(h) + "." + payload
        return signing_input + "." + b64url(self.signature(signing_input.encode()))


class JwksStandin(RecordingServer):
    """Serves the JWKS of the keys currently published."""

    def __init__(self):
        super().__init__()
        self.published = []

    @property
    def issuer(self):
        return self.url + "/auth/v1"

    def new_key(self, alg, publish=True):
        k = Key(alg)
        if publish:
            with self.lock:
                self.published.append(k)
        return k

    def publish(self, *keys):
        """From now on the endpoint serves exactly these keys (Key objects, or
        public JWKs as dicts made elsewhere)."""
        with self.lock:
            self.published = list(keys)

    def fetches(self):
        return len(self.recorded("GET", JWKS_PATH))

    def user_claims(self, sub, exp_in=3600, **extra):
        """Claims shaped like a Supabase Auth access token of user `sub`."""
        now = int(time.time())
        c = {"iss": self.issuer, "aud": "authenticated", "sub": str(sub), "role": "authenticated",
             "exp": now + exp_in, "iat": now, "email": "user-%s@example.com" % str(sub)[:8],
             "phone": "", "app_metadata": {"provider": "email", "providers": ["email"]},
             "user_metadata": {}, "aal": "aal1", "amr": [{"method": "password", "timestamp": now}],
             "session_id": str(uuid.uuid4()), "is_anonymous": False}
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def oauth_claims(self, sub, client_id, scope="openid email", **extra):
        """Claims shaped like the access token Supabase Auth's OAuth 2.1 server
        issues to a third-party app (`client_id`, its registered client's id) for
        user `sub`: the user's own claims plus client_id and the granted scope
        (supabase/auth internal/tokens/service.go, AccessTokenClaims)."""
        return self.user_claims(sub, client_id=str(client_id), scope=scope, **extra)

    def answer(self, rec):
        if rec.method != "GET" or rec.path != JWKS_PATH:
            return 404, {"error": "not found"}
        with self.lock:
            return 200, {"keys": [k if isinstance(k, dict) else k.public_jwk()
                                  for k in self.published]}
