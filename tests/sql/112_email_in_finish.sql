-- 112_email_in_finish.sql: a welcome email the worker cannot send is recorded by the
-- finish of the step before it (112_email_in_finish.sql); with a key it is chained.
BEGIN;
SELECT plan(13);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71200000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('71300000-0000-4000-8000-000000000002', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role;
CREATE FUNCTION pg_temp.inst(p_sub text) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = p_sub::uuid
$$;
CREATE FUNCTION pg_temp.finish(p_k text, p_result jsonb) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
                                   p_result, 60, 30, 3600) FROM r WHERE k = p_k
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(text), pg_temp.finish(text, jsonb) TO service_role;
SET LOCAL role service_role;

-- 1. No key: the create's finish records the email's wait and gives the lease back ------
SELECT is(public.lifecycle_provision('71200000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a new instance');
INSERT INTO r VALUES ('c1', public.lifecycle_claim('w1', 60));
SELECT is((SELECT v #>> '{step,action}' FROM r WHERE k = 'c1'), 'create', 'the create is claimed');
INSERT INTO r VALUES ('f1', pg_temp.finish('c1', jsonb_build_object('ok', true, 'frontend_url', 'https://m1.example',
    'config_version', (SELECT v #>> '{step,config_version}' FROM r WHERE k = 'c1')::bigint,
    'welcome_email', '{"ok": false, "error": "skipped: RESEND_API_KEY is not set", "retry_in_s": 3600}'::jsonb)));
SELECT is((SELECT v->>'outcome' FROM r WHERE k = 'f1'), 'done', 'done: no email step chained');
SELECT results_eq($$SELECT status::text, frontend_url, claimed_by, welcome_email_sent_at, welcome_email_attempts,
                           welcome_email_error, owed_action::text, owed_due_at = now() + interval '1 hour'
                      FROM pg_temp.inst('71200000-0000-4000-8000-000000000001')$$,
                  $$VALUES ('running', 'https://m1.example', NULL::text, NULL::timestamptz, 1,
                            'skipped: RESEND_API_KEY is not set', 'email', true)$$,
                  'running, lease free, the email recorded as the email step would: owed in an hour');
SELECT is(public.lifecycle_claim('w1', 60)->>'outcome', 'none', 'nothing is due now');

-- 2. The email's answer applies only when the email is what is due next -------------------
RESET role;
UPDATE public.instances SET welcome_email_next_at = now() + interval '10 minutes'
 WHERE subscription_id = '71200000-0000-4000-8000-000000000001';
UPDATE public.instances SET config_version = config_version + 1
 WHERE subscription_id = '71200000-0000-4000-8000-000000000001';
SET LOCAL role service_role;
INSERT INTO r VALUES ('c2', public.lifecycle_claim('w1', 60));
SELECT is((SELECT v #>> '{step,action}' FROM r WHERE k = 'c2'), 'update', 'an update is claimed');
SELECT is(pg_temp.finish('c2', jsonb_build_object('ok', true,
    'config_version', (SELECT v #>> '{step,config_version}' FROM r WHERE k = 'c2')::bigint,
    'welcome_email', '{"ok": false, "error": "skipped: RESEND_API_KEY is not set", "retry_in_s": 3600}'::jsonb))->>'outcome',
    'done', 'update done');
SELECT results_eq($$SELECT welcome_email_attempts, owed_due_at = welcome_email_next_at,
                           welcome_email_next_at BETWEEN now() + interval '9 minutes' AND now() + interval '10 minutes'
                      FROM pg_temp.inst('71200000-0000-4000-8000-000000000001')$$,
                  $$VALUES (1, true, true)$$,
                  'an email not yet due again is left as it was');

-- 3. A failed step records no email ------------------------------------------------------
SELECT is(public.lifecycle_provision('71300000-0000-4000-8000-000000000002')->>'outcome', 'ok', 'another');
INSERT INTO r VALUES ('c3', public.lifecycle_claim('w1', 60));
SELECT is(pg_temp.finish('c3', '{"ok": false, "error": "provisioner answered 500",
    "welcome_email": {"ok": false, "error": "skipped: RESEND_API_KEY is not set", "retry_in_s": 3600}}')->>'outcome',
    'failed', 'the create failed');
SELECT results_eq($$SELECT status::text, welcome_email_attempts, welcome_email_error, owed_action::text
                      FROM pg_temp.inst('71300000-0000-4000-8000-000000000002')$$,
                  $$VALUES ('failed', 0, NULL::text, 'create')$$,
                  'a failed create: the email untouched, the create owed');

-- 4. With a key (no "welcome_email" in the result) the email is chained as before -----------------
RESET role;
UPDATE public.instances SET next_attempt_at = now() - interval '1 second'
 WHERE subscription_id = '71300000-0000-4000-8000-000000000002';
SET LOCAL role service_role;
INSERT INTO r VALUES ('c4', public.lifecycle_claim('w1', 60));
INSERT INTO r VALUES ('f4', pg_temp.finish('c4', jsonb_build_object('ok', true,
    'config_version', (SELECT v #>> '{step,config_version}' FROM r WHERE k = 'c4')::bigint)));
SELECT results_eq($$SELECT v->>'outcome', v #>> '{step,action}' FROM r WHERE k = 'f4'$$,
                  $$VALUES ('claimed', 'email')$$, 'the email chained');
SELECT is(pg_temp.finish('f4', '{"ok": true}')->>'outcome', 'done', 'and sent');

SELECT * FROM finish();
ROLLBACK;
