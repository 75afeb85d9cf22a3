-- 127_checkout_one_payable.sql: of an account's checkouts only the newest session
-- stands, whichever request reaches step 5 first (127_checkout_one_payable.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(5);

INSERT INTO auth.users (id, email) VALUES ('97000000-0000-4000-8000-000000000001', 'tabs@example.com');
CREATE FUNCTION pg_temp.begin(p_request text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.billing_attempt_begin('97000000-0000-4000-8000-000000000001', 'checkout',
                                        encode(sha256(convert_to(p_request, 'UTF8')), 'hex'))
$$;
CREATE FUNCTION pg_temp.got(p_attempt jsonb, p_session text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.billing_attempt_succeeded((p_attempt ->> 'attempt_id')::uuid, p_session,
                                            'https://checkout.test/' || p_session,
                                            extract(epoch FROM now() + interval '24 hours')::bigint, false)
$$;
CREATE TEMP TABLE a (k text PRIMARY KEY, v jsonb);

-- Tab A starts, tab B starts and records its session, then A's answer arrives.
INSERT INTO a VALUES ('A', pg_temp.begin('year'));
UPDATE public.billing_attempts SET created_at = now() - interval '1 second';
INSERT INTO a VALUES ('B', pg_temp.begin('professional'));
SELECT pg_temp.got((SELECT v FROM a WHERE k = 'B'), 'cs_b');
SELECT pg_temp.got((SELECT v FROM a WHERE k = 'A'), 'cs_a');
SELECT is(public.billing_checkout_older_open('97000000-0000-4000-8000-000000000001', 'cs_b') - 'attempt_id',
          ('{"newer": false, "older": [{"attempt_id": "' || ((SELECT v FROM a WHERE k = 'A') ->> 'attempt_id')
          || '", "session_id": "cs_a"}]}')::jsonb, 'B sees A as older and nothing newer');
SELECT is(public.billing_checkout_older_open('97000000-0000-4000-8000-000000000001', 'cs_a') - 'attempt_id',
          '{"newer": true, "older": []}', 'A sees that B is newer');
SELECT public.billing_checkout_abandoned(((SELECT v FROM a WHERE k = 'B') ->> 'attempt_id')::uuid, 'test');
SELECT is(public.billing_checkout_older_open('97000000-0000-4000-8000-000000000001', 'cs_a') ->> 'newer',
          'false', 'an abandoned newer attempt does not count');
SELECT public.billing_attempt_succeeded(((SELECT v FROM a WHERE k = 'B') ->> 'attempt_id')::uuid, 'cs_b',
                                        'https://checkout.test/cs_b', extract(epoch FROM now() + interval '24 hours')::bigint, false);

-- The same requests again: B's session is answered again, A's is not while B is newer.
SELECT is(pg_temp.begin('professional') - 'expires_at',
          '{"state": "done", "object_id": "cs_b", "url": "https://checkout.test/cs_b"}',
          'the newest checkout''s session is still answered again');
SELECT is(pg_temp.begin('year') ->> 'state', 'send', 'a plan clicked after a newer checkout gets a new session');

SELECT * FROM finish();
ROLLBACK;
