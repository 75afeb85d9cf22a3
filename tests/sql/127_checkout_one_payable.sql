-- 127_checkout_one_payable.sql: of an account's checkouts only the newest session
-- stands, whichever request reaches step 5 first, and a session found paid blocks
-- new checkouts until its subscription is recorded (127_checkout_one_payable.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(14);

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
          ('{"newer": false, "paid": false, "older": [{"attempt_id": "' || ((SELECT v FROM a WHERE k = 'A') ->> 'attempt_id')
          || '", "session_id": "cs_a"}]}')::jsonb, 'B sees A as older and nothing newer');
SELECT is(public.billing_checkout_older_open('97000000-0000-4000-8000-000000000001', 'cs_a') - 'attempt_id',
          '{"newer": true, "paid": false, "older": []}', 'A sees that B is newer');
SELECT public.billing_checkout_abandoned(((SELECT v FROM a WHERE k = 'B') ->> 'attempt_id')::uuid, 'test');
SELECT is(public.billing_checkout_older_open('97000000-0000-4000-8000-000000000001', 'cs_a') ->> 'newer',
          'false', 'an abandoned newer attempt does not count');
SELECT public.billing_attempt_succeeded(((SELECT v FROM a WHERE k = 'B') ->> 'attempt_id')::uuid, 'cs_b',
                                        'https://checkout.test/cs_b', extract(epoch FROM now() + interval '24 hours')::bigint, false);

-- The same requests again: B's session is answered again, A's is not while B is newer.
SELECT is(pg_temp.begin('professional') - 'expires_at',
          jsonb_build_object('state', 'done', 'object_id', 'cs_b', 'url', 'https://checkout.test/cs_b',
                             'attempt_id', (SELECT v FROM a WHERE k = 'B') -> 'attempt_id'),
          'the newest checkout''s session is still answered again, with its attempt');
SELECT is(pg_temp.begin('year') ->> 'state', 'send', 'a plan clicked after a newer checkout gets a new session');

-- B's session is found paid (a newer checkout could not expire it). A subscription the
-- account had before does not count as its subscription.
INSERT INTO public.subscriptions (account_id, tier, stripe_price_id, status, created_at)
VALUES ('97000000-0000-4000-8000-000000000001', 'starter', 'price_starter', 'cancelled', now() - interval '1 day');
SELECT is(public.billing_checkout_completed(((SELECT v FROM a WHERE k = 'B') ->> 'attempt_id')::uuid, 'paid'),
          '{"completed": true, "paid": true}', 'a session found paid is recorded completed');
SELECT is(public.billing_account('97000000-0000-4000-8000-000000000001') ->> 'checkout_paid', 'true',
          'and the account''s next checkout is refused');
SELECT is(public.billing_checkout_older_open('97000000-0000-4000-8000-000000000001', 'cs_a') ->> 'paid',
          'true', 'and a checkout already past step 1 sees it in step 5');
SELECT public.billing_attempt_succeeded(((SELECT v FROM a WHERE k = 'B') ->> 'attempt_id')::uuid, 'cs_b',
                                        'https://checkout.test/cs_b',
                                        extract(epoch FROM now() + interval '20 hours')::bigint, false);
SELECT is((SELECT status FROM public.billing_attempts WHERE object_id = 'cs_b'), 'completed',
          'a late answer to a resumed request does not make it payable again');
SELECT throws_ok($$UPDATE public.billing_attempts SET status = 'paid' WHERE object_id = 'cs_b'$$,
                 '23514', NULL, 'the statuses are still checked');
-- Stripe retries a webhook for 3 days: after that the block lifts.
UPDATE public.billing_attempts SET expires_at = now() - interval '3 days 1 minute' WHERE object_id = 'cs_b';
SELECT is(public.billing_account('97000000-0000-4000-8000-000000000001') ->> 'checkout_paid', 'false',
          'a paid session whose webhook never came blocks no longer than Stripe retries it');
UPDATE public.billing_attempts SET expires_at = now() + interval '20 hours' WHERE object_id = 'cs_b';
-- The subscription is recorded (the webhook came), then cancelled.
INSERT INTO public.subscriptions (account_id, tier, stripe_price_id, status)
VALUES ('97000000-0000-4000-8000-000000000001', 'professional', 'price_professional', 'cancelled');
SELECT is(public.billing_account('97000000-0000-4000-8000-000000000001') - 'email',
          '{"found": true, "customer": null, "live_status": null, "had_subscription": true,
            "checkout_paid": false}', 'once its subscription is recorded, the block lifts');
-- Two tabs expiring one older session: the one that saw it expire is right.
UPDATE public.billing_attempts SET status = 'succeeded' WHERE object_id = 'cs_a';
SELECT public.billing_checkout_completed((SELECT id FROM public.billing_attempts WHERE object_id = 'cs_a'),
                                         'no longer open at Stripe (paid)');
SELECT is(public.billing_checkout_abandoned((SELECT id FROM public.billing_attempts WHERE object_id = 'cs_a'),
                                            'expired: a newer checkout of the account replaced it'),
          '{"abandoned": true}', 'a session seen expiring is abandoned even when recorded paid');
SELECT is(public.billing_checkout_completed((SELECT id FROM public.billing_attempts WHERE object_id = 'cs_a'),
                                            'no longer open at Stripe (paid)') ->> 'completed',
          'false', 'and not taken for paid after that');

SELECT * FROM finish();
ROLLBACK;
