-- 208_attempts_per_action.sql: an owed action counts its own failures. A restart that
-- kept failing leaves no count to the redeploy the health checks then owe, nor to the
-- stop an unpaid subscription owes: each backs off from its own first failure, and
-- my-instance does not tell it as failing before it was tried, nor the failed
-- instance being stopped as set up again. A step's failure still
-- counts up across its own retries, and an instance never placed nor provisioned
-- keeps its count (instance_nowhere reads it).
BEGIN;
SELECT plan(12);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('72080000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active'),
  ('72081000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '72080000-0000-4000-8000-000000000001'
$$;
-- Makes the instance's owed step due, claims it and finishes it with p_result (the
-- step's versions added); returns "action:outcome".
CREATE FUNCTION pg_temp.step(p_result jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb; f jsonb;
BEGIN
    UPDATE public.instances SET next_attempt_at = now()
     WHERE id = (pg_temp.inst()).id AND next_attempt_at > now();
    v := public.lifecycle_claim('w1', 60);
    f := public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
        p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint,
                                       'restart_version', (v #>> '{step,restart_version}')::bigint),
        60, 30, 3600);
    RETURN (v #>> '{step,action}') || ':' || (f ->> 'outcome');
END;
$$;
-- Seconds from now to the instance's next attempt.
CREATE FUNCTION pg_temp.backoff() RETURNS integer LANGUAGE sql AS $$
    SELECT round(extract(epoch FROM (pg_temp.inst()).next_attempt_at - now()))::integer
$$;
CREATE FUNCTION pg_temp.tenant_error() RETURNS text LANGUAGE plpgsql AS $$
DECLARE v text; v_id uuid := (pg_temp.inst()).id;
BEGIN
    PERFORM pg_temp.become('5eed5eed-0000-4000-8000-000000000001');
    v := public.tenant_instance(v_id) #>> '{instance,error}';
    PERFORM pg_temp.unbecome();
    RETURN v;
END;
$$;
CREATE TEMP TABLE fail AS SELECT '{"ok": false, "error": "provisioner 502"}'::jsonb AS r;

SELECT public.lifecycle_provision('72080000-0000-4000-8000-000000000001');
SELECT pg_temp.step('{"ok": true, "welcome_email": {"ok": false, "error": "skipped", "retry_in_s": 3600}}');
-- The tenant asks a restart; the provisioner answers 502 five times.
UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
 WHERE id = (pg_temp.inst()).id;
SELECT pg_temp.step((SELECT r FROM fail)) FROM generate_series(1, 5);
SELECT results_eq($$SELECT status::text, owed_action::text, attempts, pg_temp.backoff() FROM pg_temp.inst()$$,
                  $$VALUES ('running', 'restart', 5, 480)$$,
                  'a restart that failed five times backs off as its fifth failure (30 s x 2^4)');

-- The health checks fail it: a redeploy (create) is owed.
SELECT pg_temp.health_fails((pg_temp.inst()).id, n) FROM generate_series(0, 2) n;
SELECT results_eq($$SELECT status::text, owed_action::text, attempts FROM pg_temp.inst()$$,
                  $$VALUES ('failed', 'create', 0)$$,
                  'the redeploy the health checks owe has failed no time yet');
SELECT is(pg_temp.tenant_error(), 'timeout after 5000 ms',
          'my-instance tells what the health checks found, not a failed set-up');
SELECT is(pg_temp.step((SELECT r FROM fail)), 'create:failed', 'the redeploy fails once');
SELECT results_eq($$SELECT attempts, pg_temp.backoff() FROM pg_temp.inst()$$, $$VALUES (1, 30)$$,
                  'and is retried after a first failure''s backoff, not after a sixth''s (16 minutes)');
SELECT is(pg_temp.step((SELECT r FROM fail)), 'create:failed', 'and again');
SELECT results_eq($$SELECT attempts, pg_temp.backoff() FROM pg_temp.inst()$$, $$VALUES (2, 60)$$,
                  'its own failures still count up');

-- The subscription goes unpaid: the stop owed has not failed yet.
SELECT public.instance_request((pg_temp.inst()).id, 'stopped');
SELECT results_eq($$SELECT owed_action::text, attempts FROM pg_temp.inst()$$, $$VALUES ('stop', 0)$$,
                  'a stop billing asks for starts its own count');
SELECT is(pg_temp.tenant_error(), NULL,
          'and the failed instance being stopped is told neither as failing to stop, nor as set up again');
SELECT is((pg_temp.inst()).last_error, 'provisioner 502', 'the operators'' last_error stays');

-- A running instance asked to stop keeps its health checks' error (health.error).
UPDATE public.instances SET status = 'provisioning' WHERE id = (pg_temp.inst()).id;
UPDATE public.instances SET status = 'running', error_message = 'timeout after 5000 ms', attempts = 0
 WHERE id = (pg_temp.inst()).id;
SELECT public.instance_request((pg_temp.inst()).id, 'running');
SELECT public.instance_request((pg_temp.inst()).id, 'stopped');
SELECT is((pg_temp.inst()).error_message, 'timeout after 5000 ms',
          'a running instance asked to stop keeps the health checks'' error');

-- An instance never placed nor provisioned keeps its count (instance_nowhere).
SELECT public.lifecycle_provision('72081000-0000-4000-8000-000000000001');
UPDATE public.instances SET attempts = 2
 WHERE subscription_id = '72081000-0000-4000-8000-000000000001';
SELECT public.instance_request(i.id, 'deprovisioned') FROM public.instances i
 WHERE i.subscription_id = '72081000-0000-4000-8000-000000000001';
SELECT is((SELECT attempts FROM public.instances WHERE subscription_id = '72081000-0000-4000-8000-000000000001'),
          2, 'an instance never placed nor provisioned keeps the count that says a step was tried');

SELECT * FROM finish();
ROLLBACK;
