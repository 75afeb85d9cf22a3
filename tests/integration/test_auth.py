"""Supabase's current keys through real nginx and PostgreSQL: JWT signing keys
(ES256/RS256 from the project's JWKS, served by tests/standins/jwks.py with key
pairs this test owns), the sb_secret_/sb_publishable_ API keys, the legacy HS256
secret and MINDROOM_INTERNAL_SECRET, in SUPABASE_AUTH_MODE jwks and both.

The JWKS stacks run one worker, so the JWKS fetches the stand-in counts are one
process's (each worker keeps its own cache)."""
import json
import os
import secrets
import subprocess
import time
import uuid

import pytest

import mr
from jwks import JwksStandin
from stripe_api import StripeStandin
from test_health import make_account, make_instance
from test_supabase_cli import CLI_SH, copy_project

HEALTH = "check-instance-health"
PROVISION = "provision-instance"
FUNCS = [HEALTH, PROVISION]

SECRET_KEYS = ["sb_secret_" + secrets.token_urlsafe(24) for _ in range(2)]
PUBLISHABLE_KEY = "sb_publishable_" + secrets.token_urlsafe(24)
INTERNAL = secrets.token_urlsafe(40)


@pytest.fixture(scope="module")
def auth():
    with JwksStandin() as a:
        yield a


def jwks_env(auth, **extra):
    env = {"SUPABASE_AUTH_MODE": "jwks", "SUPABASE_URL": auth.url, "MR_WORKERS": "1",
           "SUPABASE_JWKS_REFETCH_S": "1", "SUPABASE_SECRET_KEYS": ",".join(SECRET_KEYS),
           "SUPABASE_PUBLISHABLE_KEYS": PUBLISHABLE_KEY, "MINDROOM_INTERNAL_SECRET": INTERNAL}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def keys(auth):
    """The project's signing keys: an ES256 one (Supabase's default) and an RS256 one."""
    es, rs = auth.new_key("ES256"), auth.new_key("RS256")
    return es, rs


@pytest.fixture(scope="module")
def stack(pg, auth, keys):
    with mr.Stack(pg, env=jwks_env(auth), functions=FUNCS, workers=1) as s:
        yield s


@pytest.fixture(autouse=True)
def published(request):
    """Each test starts with the endpoint up, serving both project keys."""
    if "auth" in request.fixturenames and "keys" in request.fixturenames:
        a = request.getfixturevalue("auth")
        a.behave("ok")
        a.publish(*request.getfixturevalue("keys"))
    yield


def health(stack, token=None, headers=None, query="?sweep=0"):
    return stack.call("GET", HEALTH + query, token=token, headers=headers)


def error(r, status, code, message=None):
    assert r.status == status, r
    assert r.json["error"]["code"] == code, r
    if message:
        assert message in r.json["error"]["message"], r
    return r.json["error"]["message"]


def role_logged(stack, name, r):
    lines = [json.loads(l) for l in stack.log(name).splitlines() if l.startswith("{")]
    return [l.get("role") for l in lines if l.get("request_id") == r.headers["X-Request-Id"]]


def wait_refetch_interval():
    time.sleep(1.2)  # SUPABASE_JWKS_REFETCH_S=1


# ---- user sessions signed with the project's keys ---------------------------------

def test_es256_and_rs256_user_sessions_are_the_user_under_rls(stack, auth, keys):
    es, rs = keys
    alice, bob = make_account(stack), make_account(stack)
    a1 = make_instance(stack, alice, "http://127.0.0.1:9/", status="stopped")
    b1 = make_instance(stack, bob, "http://127.0.0.1:9/", status="stopped")
    for key in (es, rs):
        token = key.sign(auth.user_claims(alice))
        r = health(stack, token)
        assert r.status == 200 and r.json["results"] == [], r
        assert role_logged(stack, HEALTH, r) == ["authenticated"]
        # RLS saw alice (auth.uid() from the claims the runtime handed on):
        # her stopped instance is found (409), bob's does not exist for her (404).
        error(health(stack, token, query="?sweep=0&instance_id=" + a1), 409, "not_running")
        error(health(stack, token, query="?sweep=0&instance_id=" + b1), 404, "not_found")
        # A user is not service_role.
        r = stack.call("POST", PROVISION, json={"subscription_id": str(uuid.uuid4())}, token=token)
        error(r, 403, "forbidden")


def test_supabase_js_with_a_session_and_the_publishable_key_is_the_user(stack, auth, keys):
    """functions.invoke() signed in: Authorization: Bearer <session>, apikey:
    <publishable key>."""
    user = make_account(stack)
    session = keys[0].sign(auth.user_claims(user))
    r = health(stack, headers={"Authorization": "Bearer " + session, "apikey": PUBLISHABLE_KEY,
                               "x-client-info": "supabase-js/2.50.0"})
    assert r.status == 200, r
    assert role_logged(stack, HEALTH, r) == ["authenticated"]


def test_kid_rotation_is_picked_up_by_a_refetch(stack, auth, keys):
    user = make_account(stack)
    assert health(stack, keys[0].sign(auth.user_claims(user))).status == 200
    new = auth.new_key("ES256", publish=False)
    auth.publish(*keys, new)
    wait_refetch_interval()
    before = auth.fetches()
    r = health(stack, new.sign(auth.user_claims(user)))
    assert r.status == 200, r
    assert auth.fetches() == before + 1
    # Known now: no more fetches for it.
    assert health(stack, new.sign(auth.user_claims(user))).status == 200
    assert auth.fetches() == before + 1


def test_unknown_kid_refetches_once_then_401(stack, auth, keys):
    user = make_account(stack)
    assert health(stack, keys[0].sign(auth.user_claims(user))).status == 200
    wait_refetch_interval()
    before = auth.fetches()
    stranger = auth.new_key("ES256", publish=False)
    for i in range(5):
        forged = stranger.sign(auth.user_claims(user), header={
            "alg": "ES256", "kid": "made-up-%d" % i, "typ": "JWT"})
        error(health(stack, forged), 401, "unauthorized", "unknown key id")
    # Five made-up kids within the refetch interval cost one fetch.
    assert auth.fetches() == before + 1


@pytest.mark.parametrize("case", ["HS256 signed with the public key", "HS256 signed with the JWK",
                                  "alg none", "alg none without signature",
                                  "ES256 naming the RSA kid", "RS256 naming the EC kid",
                                  "signed by a key not in the JWKS under a known kid"])
def test_alg_confusion_is_401(stack, auth, keys, case):
    es, rs = keys
    claims = auth.user_claims(make_account(stack))
    from jwks import b64url, encode_json
    import hashlib
    import hmac

    def hs256(secret, kid):
        si = encode_json({"alg": "HS256", "kid": kid, "typ": "JWT"}) + "." + encode_json(claims)
        return si + "." + b64url(hmac.new(secret, si.encode(), hashlib.sha256).digest())

    stranger = auth.new_key("ES256", publish=False)
    token = {
        "HS256 signed with the public key": lambda: hs256(es.public_pem(), es.kid),
        "HS256 signed with the JWK": lambda: hs256(json.dumps(es.public_jwk()).encode(), es.kid),
        "alg none": lambda: encode_json({"alg": "none", "kid": es.kid}) + "." + encode_json(claims) + ".AAAA",
        "alg none without signature": lambda: encode_json({"alg": "none"}) + "." + encode_json(claims) + ".",
        "ES256 naming the RSA kid": lambda: es.sign(claims, header={"alg": "ES256", "kid": rs.kid}),
        "RS256 naming the EC kid": lambda: rs.sign(claims, header={"alg": "RS256", "kid": es.kid}),
        "signed by a key not in the JWKS under a known kid":
            lambda: stranger.sign(claims, header={"alg": "ES256", "kid": es.kid}),
    }[case]()
    for name in FUNCS:
        r = stack.call("POST", name, json={}, token=token)
        error(r, 401, "unauthorized")
        assert token not in r.text


@pytest.mark.parametrize("case,message", [
    ("expired", "expired"), ("not yet valid", "not yet valid"), ("wrong issuer", "wrong issuer"),
    ("wrong audience", "wrong audience"), ("no audience", "wrong audience"),
    ("legacy anon key shape", "wrong issuer"), ("two subs", "malformed token payload")])
def test_claims_that_do_not_hold_are_401(stack, auth, keys, case, message):
    es = keys[0]
    user = make_account(stack)
    now = int(time.time())
    claims = {
        "expired": auth.user_claims(user, exp_in=-120),
        "not yet valid": auth.user_claims(user, nbf=now + 600),
        "wrong issuer": auth.user_claims(user, iss="https://other-project.supabase.co/auth/v1"),
        "wrong audience": auth.user_claims(user, aud="anon"),
        "no audience": auth.user_claims(user, aud=None),
        # What `supabase start` signs its legacy keys with when it has a signing key.
        "legacy anon key shape": {"iss": "supabase-demo", "role": "service_role", "exp": now + 600},
    }.get(case)
    if case == "two subs":
        other = make_account(stack)
        raw = json.dumps(auth.user_claims(user))[:-1] + ', "sub": "%s"}' % other
        token = es.sign(None, raw_payload=raw)
    else:
        token = es.sign(claims)
    error(health(stack, token), 401, "unauthorized", message)


def test_a_session_signed_by_supabases_own_code_is_accepted(stack, auth, keys, tmp_path):
    """The pinned Supabase CLI makes the signing key and signs the token (the Go code
    a local `supabase start` Auth signs with), following docs/auth.md's steps on a
    copy of this project; only its public half reaches the functions, via the JWKS."""
    sb = subprocess.run([CLI_SH], capture_output=True, text=True, timeout=600)
    assert sb.returncode == 0, sb.stderr
    env = dict(os.environ, HOME=str(tmp_path), SUPABASE_TELEMETRY_DISABLED="1", DO_NOT_TRACK="1",
               MINDROOM_SITE_URL="http://127.0.0.1:3000", MINDROOM_REDIRECT_URLS="http://127.0.0.1:3000/cb")

    def supabase(*args):
        p = subprocess.run([sb.stdout.strip().splitlines()[-1], *args], cwd=tmp_path, env=env,
                           input="\n", capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    cfg = copy_project(str(tmp_path))
    private = json.loads(supabase("gen", "signing-key", "--algorithm", "ES256"))
    (tmp_path / "supabase" / "signing_keys.json").write_text(json.dumps([private]))
    with open(cfg) as f:
        text = f.read()
    assert '# signing_keys_path = "./signing_keys.json"' in text
    with open(cfg, "w") as f:
        f.write(text.replace('# signing_keys_path', 'signing_keys_path'))
    user = make_account(stack)
    token = supabase("gen", "bearer-jwt", "--role", "authenticated", "--sub", user, "--valid-for", "10m",
                     "--payload", json.dumps({"iss": auth.issuer, "aud": "authenticated"})).strip()
    public = {k: v for k, v in private.items() if k != "d"}
    public["key_ops"] = ["verify"]
    auth.publish(*keys, public)
    wait_refetch_interval()
    r = health(stack, token)
    assert r.status == 200, r
    assert role_logged(stack, HEALTH, r) == ["authenticated"]


# ---- tokens Supabase Auth's OAuth 2.1 server issued to third-party apps ------------

CHECKOUT, PORTAL, MINE = "create-checkout-session", "create-portal-session", "my-instance"


@pytest.fixture(scope="module")
def stripe():
    with StripeStandin() as s:
        yield s


@pytest.fixture(scope="module")
def user_stack(pg, auth, keys, stripe):
    """The functions a signed-in user calls: the read-only ones and those that pay,
    manage billing or restart the instance."""
    env = jwks_env(auth, STRIPE_SECRET_KEY=stripe.key, STRIPE_API_BASE=stripe.url,
                   STRIPE_CHECKOUT_SUCCESS_URL="https://app.mindroom.test/done",
                   STRIPE_CHECKOUT_CANCEL_URL="https://app.mindroom.test/pricing",
                   STRIPE_PORTAL_RETURN_URL="https://app.mindroom.test/account")
    with mr.Stack(pg, env=env, functions=[HEALTH, CHECKOUT, PORTAL, MINE], workers=1) as s:
        yield s


def test_a_third_party_apps_token_reads_but_neither_pays_nor_manages_billing_nor_restarts(
        user_stack, auth, keys, stripe):
    """A token with client_id is the user as seen by an app they authorised: it may
    read the instance and its health, but checkout, the billing portal and a restart
    take the user's own session. Nothing reaches Stripe, nothing is restarted."""
    s, es = user_stack, keys[0]
    stripe.reset()
    client = uuid.uuid4()
    # A user with a running instance, and one who has not subscribed yet.
    user, payer = make_account(s), make_account(s)
    iid = make_instance(s, user, "http://127.0.0.1:9/")

    def restarts():
        return s.sql("SELECT restart_version FROM public.instances WHERE id = %s", iid)[0][0]

    def refused(r):
        msg = error(r, 403, "oauth_client_not_allowed", "takes the user's own session")
        assert "third-party app" in msg

    app = es.sign(auth.oauth_claims(user, client))
    r = s.call("GET", MINE, token=app)
    assert r.status == 200 and r.json["instance"]["id"] == iid, r
    assert health(s, app, query="?instance_id=" + iid).status == 200
    before = restarts()
    refused(s.call("POST", MINE + "/restart", json={}, token=app))
    assert restarts() == before

    app = es.sign(auth.oauth_claims(payer, client))
    refused(s.call("POST", CHECKOUT, json={"tier": "starter"}, token=app))
    refused(s.call("POST", PORTAL, json={}, token=app))
    assert stripe.recorded() == []
    assert s.sql("SELECT count(*) FROM public.billing_attempts WHERE account_id = %s",
                 payer)[0][0] == 0

    # The users' own sessions do all three.
    r = s.call("POST", MINE + "/restart", json={}, token=es.sign(auth.user_claims(user)))
    assert r.status == 202, r
    assert restarts() == before + 1
    own = es.sign(auth.user_claims(payer))
    r = s.call("POST", CHECKOUT, json={"tier": "starter"}, token=own)
    assert r.status == 200 and r.json["url"], r
    assert len(stripe.recorded("/v1/checkout/sessions")) == 1
    r = s.call("POST", PORTAL, json={}, token=own)
    assert r.status == 200 and r.json["url"], r


# ---- API keys --------------------------------------------------------------------

@pytest.mark.parametrize("key", SECRET_KEYS, ids=["first", "second"])
@pytest.mark.parametrize("where", ["apikey", "bearer", "both"])
def test_secret_keys_are_service_role(stack, key, where):
    headers = {"apikey": key} if where != "bearer" else {}
    if where != "apikey":
        headers["Authorization"] = "Bearer " + key
    # An unknown subscription is the handler's own 404: past auth, as service_role.
    r = stack.call("POST", PROVISION, json={"subscription_id": str(uuid.uuid4())}, headers=headers)
    error(r, 404, "not_found")
    assert role_logged(stack, PROVISION, r) == ["service_role"]
    r = health(stack, headers=headers)
    assert r.status == 200, r


BROWSERS = {
    "chrome": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/131.0.0.0 Safari/537.36",
    "firefox": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "safari": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
              "Gecko) Version/18.1 Safari/605.1.15",
}


@pytest.mark.parametrize("browser", sorted(BROWSERS))
def test_a_secret_key_from_a_browser_is_401_and_does_nothing(stack, browser):
    """A secret key leaked into a web page (CORS lets any page call the functions)
    is refused as Supabase's gateway refuses it: by the browser's User-Agent, in
    either header; the same key from a server's client still works."""
    sub = str(uuid.uuid4())
    page = {"User-Agent": BROWSERS[browser], "Origin": "https://leaky.example"}
    for cred in ({"apikey": SECRET_KEYS[0]},
                 {"apikey": SECRET_KEYS[1], "Authorization": "Bearer " + SECRET_KEYS[1]}):
        r = stack.call("POST", PROVISION, json={"subscription_id": sub}, headers=dict(page, **cred))
        error(r, 401, "unauthorized", "secret API key used from a browser")
        assert SECRET_KEYS[0] not in r.text and SECRET_KEYS[1] not in r.text
        assert r.headers.get("Access-Control-Allow-Origin") == "*"  # the page can read why
        error(health(stack, headers=dict(page, **cred)), 401, "unauthorized")
    # The publishable key from that page is still just anon.
    error(health(stack, headers=dict(page, apikey=PUBLISHABLE_KEY)), 403, "forbidden")
    # Servers' clients name themselves, and keep the key.
    for ua in ("curl/8.5.0", "node", "Deno/2.1.4", "python-requests/2.32.3"):
        r = stack.call("POST", PROVISION, json={"subscription_id": sub},
                       headers={"User-Agent": ua, "apikey": SECRET_KEYS[0]})
        error(r, 404, "not_found")


@pytest.mark.parametrize("where", ["apikey", "bearer"])
def test_publishable_key_alone_is_anon_which_no_function_takes(stack, where):
    headers = {"apikey": PUBLISHABLE_KEY} if where == "apikey" else {
        "Authorization": "Bearer " + PUBLISHABLE_KEY}
    for name in FUNCS:
        r = stack.call("POST", name, json={}, headers=headers)
        error(r, 403, "forbidden", "role anon may not call " + name)
        assert role_logged(stack, name, r) == ["anon"]


@pytest.mark.parametrize("key", [
    SECRET_KEYS[0][:-1] + ("A" if SECRET_KEYS[0][-1] != "A" else "B"),
    SECRET_KEYS[0] + "x", SECRET_KEYS[0][:-1], "sb_secret_" + secrets.token_urlsafe(24),
    PUBLISHABLE_KEY[:-1] + ("A" if PUBLISHABLE_KEY[-1] != "A" else "B"),
    "sb_" + SECRET_KEYS[0][3:].replace("secret", "admin"), "not-a-key"])
@pytest.mark.parametrize("where", ["apikey", "bearer"])
def test_wrong_keys_are_401(stack, key, where):
    headers = {"apikey": key} if where == "apikey" else {"Authorization": "Bearer " + key}
    for name in FUNCS:
        r = stack.call("POST", name, json={}, headers=headers)
        error(r, 401, "unauthorized")
        assert key not in r.text


def test_legacy_jwts_are_refused_in_jwks_mode_and_internal_ones_accepted(stack):
    legacy = stack.jwt()  # service_role, signed with SUPABASE_JWT_SECRET
    error(health(stack, legacy), 401, "unauthorized", "bad signature")
    error(health(stack, headers={"apikey": legacy}), 401, "unauthorized")
    now = int(time.time())
    internal = mr.make_jwt({"role": "service_role", "iat": now, "exp": now + 60}, INTERNAL)
    assert health(stack, internal).status == 200
    # Internal tokens are short-lived by rule: more than 24 h ahead is refused.
    long_lived = mr.make_jwt({"role": "service_role", "iat": now, "exp": now + 2 * 86400}, INTERNAL)
    error(health(stack, long_lived), 401, "unauthorized", "lifetime")


def test_mindroomctl_and_mr_jwt_tokens_work_in_jwks_mode(stack):
    """Our own tools sign with MINDROOM_INTERNAL_SECRET when it is set."""
    env = {"PATH": "/usr/bin:/bin", "MINDROOM_INTERNAL_SECRET": INTERNAL,
           "SUPABASE_JWT_SECRET": stack.env["SUPABASE_JWT_SECRET"],
           "MR_RUN_DIR": "/nonexistent-run", "MR_ENV_FILE": "/nonexistent.env"}
    tok = subprocess.run([str(mr.build_dir() / "bin" / "mr-jwt")], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert health(stack, tok).status == 200
    tok = subprocess.run([str(mr.ROOT / "scripts/mindroomctl"), "token"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert health(stack, tok).status == 200
    p = subprocess.run([str(mr.build_dir() / "bin" / "mr-jwt"), "--exp", "86401"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "86400" in p.stderr, p.stderr


# ---- mode both: the migration window ----------------------------------------------

def test_both_mode_takes_legacy_and_signing_key_tokens_and_api_keys(pg, auth, keys):
    with mr.Stack(pg, env=jwks_env(auth, SUPABASE_AUTH_MODE="both"), functions=[HEALTH],
                  workers=1) as s:
        user = make_account(s)
        assert health(s, s.jwt()).status == 200                       # legacy service_role JWT
        assert health(s, s.jwt(role="authenticated", sub=user)).status == 200  # legacy session
        assert health(s, keys[0].sign(auth.user_claims(user))).status == 200   # ES256 session
        assert health(s, headers={"apikey": SECRET_KEYS[1]}).status == 200
        error(health(s, headers={"apikey": s.jwt(role="anon")}), 403, "forbidden")


# ---- the JWKS endpoint down ---------------------------------------------------------

def test_endpoint_down_cached_keys_work_for_the_bound_then_503(pg, auth, keys):
    ttl, stale = 2, 3
    env = jwks_env(auth, SUPABASE_JWKS_TTL_S=str(ttl), SUPABASE_JWKS_STALE_S=str(stale))
    with mr.Stack(pg, env=env, functions=[HEALTH], workers=1) as s:
        user = make_account(s)
        token = keys[0].sign(auth.user_claims(user))
        assert health(s, token).status == 200
        fetched_by = time.monotonic()  # the keys were fetched before this
        auth.behave("fail")
        before = auth.fetches()
        # Served from the cache past the TTL (the refetches fail) until ttl + stale.
        while time.monotonic() < fetched_by + ttl + stale - 1.0:
            r = health(s, token)
            assert r.status == 200, r
            time.sleep(0.2)
        failed = auth.fetches() - before
        assert failed >= 1   # it did try, and failing did not break anything
        assert failed <= stale + 1  # at most one attempt per refetch interval
        time.sleep(max(0.0, fetched_by + ttl + stale + 0.5 - time.monotonic()))
        r = health(s, token)
        error(r, 503, "transient", "signing keys unavailable")
        assert "JWKS fetch from %s" % auth.url in s.log(HEALTH)
        # The endpoint is back: keys are trusted again after the next fetch.
        auth.behave("ok")
        wait_refetch_interval()
        assert health(s, token).status == 200
        # A key taken out of the JWKS stops working once the cache is refreshed.
        auth.publish(keys[1])
        time.sleep(ttl + 0.3)
        error(health(s, token), 401, "unauthorized", "unknown key id")


def test_keys_idle_past_the_bound_still_serve_when_the_outage_starts(pg, auth, keys):
    """A worker nobody asked for longer than TTL + stale has not seen the JWKS fail:
    an outage that starts only then is served from its keys for the stale bound,
    counted from the first failed fetch, like an outage under steady traffic."""
    ttl, stale = 1, 3
    env = jwks_env(auth, SUPABASE_JWKS_TTL_S=str(ttl), SUPABASE_JWKS_STALE_S=str(stale))
    with mr.Stack(pg, env=env, functions=[HEALTH], workers=1) as s:
        user = make_account(s)
        token = keys[0].sign(auth.user_claims(user))
        assert health(s, token).status == 200
        time.sleep(ttl + stale + 0.5)  # idle: no fetch was due, none failed
        auth.behave("fail")
        before = auth.fetches()
        outage_from = time.monotonic()
        r = health(s, token)
        assert r.status == 200, r
        assert auth.fetches() == before + 1  # it did ask, and the endpoint failed
        while time.monotonic() < outage_from + stale - 1.0:
            assert health(s, token).status == 200
            time.sleep(0.2)
        # The bound holds from the first failure on.
        time.sleep(max(0.0, outage_from + stale + 0.5 - time.monotonic()))
        error(health(s, token), 503, "transient", "signing keys unavailable")
