-- 172_step_error_shown.sql: a failed step of a running instance is told to its tenant
-- as my-instance's instance.error for as long as it fails (a healthy health round
-- does not erase it), and health.error stays the health checks' own.
BEGIN;
SELECT plan(14);
\ir _helpers.inc

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
  ('71720000-0000-4000-8000-000000000001', '5eed5eed-0000-4000-8000-000000000001', 'price_starter', 'starter', 'active');
CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO service_role, authenticated;
CREATE FUNCTION pg_temp.inst() RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = '71720000-0000-4000-8000-000000000001'
$$;
-- Claims the next step and finishes it with p_result; returns "action:outcome".
CREATE FUNCTION pg_temp.step(p_result jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v jsonb := public.lifecycle_claim('w1', 60); f jsonb;
BEGIN
    f := public.lifecycle_finish((v #>> '{step,instance_id}')::uuid, v #>> '{step,token}',
        p_result || jsonb_build_object('config_version', (v #>> '{step,config_version}')::bigint,
                                       'restart_version', (v #>> '{step,restart_version}')::bigint),
        60, 30, 3600);
    RETURN (v #>> '{step,action}') || ':' || (f ->> 'outcome');
END;
$$;
-- my-instance's instance.error and health.error as the tenant gets them.
CREATE FUNCTION pg_temp.shown(p_k text) RETURNS text[] LANGUAGE sql AS $$
    SELECT pg_temp.run('5eed5eed-0000-4000-8000-000000000001',
                       format('INSERT INTO r SELECT %L, public.tenant_instance(%L)', p_k, (pg_temp.inst()).id));
    SELECT ARRAY[v #>> '{instance,status}', v #>> '{instance,error}', v #>> '{health,error}']
      FROM r WHERE k = p_k
$$;
GRANT EXECUTE ON FUNCTION pg_temp.inst(), pg_temp.step(jsonb) TO service_role;

SET LOCAL role service_role;
SELECT is(public.lifecycle_provision('71720000-0000-4000-8000-000000000001')->>'outcome', 'ok', 'a customer');
SELECT is(pg_temp.step('{"ok": true, "welcome_email": {"ok": true}}'), 'create:done', 'running');
RESET role;

-- The health checks find it unreachable, then the tenant asks a restart, which fails.
UPDATE public.instances SET health_status = 'unhealthy', error_message = 'unreachable: timeout after 5000 ms',
       last_health_check = now(), consecutive_failures = 1
 WHERE id = (pg_temp.inst()).id;
UPDATE public.instances SET restart_version = restart_version + 1, restart_requested_at = now()
 WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": false, "error": "POST http://10.9.8.7:8002/apps/x/restart: HTTP 502"}'),
          'restart:failed', 'the restart failed');
RESET role;
SELECT is(ARRAY[(pg_temp.inst()).status::text, (pg_temp.inst()).error_message],
          ARRAY['running', 'unreachable: timeout after 5000 ms'],
          'still running; error_message is still the health checks''');
SELECT is(pg_temp.shown('t1'),
          ARRAY['running', 'Restarting your instance failed: it is tried again automatically.',
                'unreachable: timeout after 5000 ms'],
          'my-instance tells the failed restart as instance.error, the health checks'' as health.error');

-- A healthy round: nothing for health.error, the restart still failing.
UPDATE public.instances SET health_status = 'healthy', error_message = NULL, consecutive_failures = 0,
       last_health_check = now()
 WHERE id = (pg_temp.inst()).id;
SELECT is(pg_temp.shown('t2'),
          ARRAY['running', 'Restarting your instance failed: it is tried again automatically.', NULL],
          'a healthy round does not erase the failing restart');

-- Its retry is rejected: held for an operator.
UPDATE public.instances SET next_attempt_at = now() WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": false, "rejected": true, "error": "HTTP 422: no such process type"}'),
          'restart:failed', 'the retry is rejected');
RESET role;
SELECT is(pg_temp.shown('t3'),
          ARRAY['running', 'Restarting your instance failed: it waits for an operator.', NULL],
          'the tenant is told it waits for an operator');
SELECT ok((SELECT v::text NOT LIKE '%10.9.8.7%' AND v::text NOT LIKE '%process type%' FROM r WHERE k = 't3'),
          'and nothing of the provisioner''s text');

-- An operator lifts the hold and the restart is done: nothing left to tell.
UPDATE public.instances SET next_attempt_at = now(), last_error = NULL WHERE id = (pg_temp.inst()).id;
SET LOCAL role service_role;
SELECT is(pg_temp.step('{"ok": true}'), 'restart:done', 'restarted');
RESET role;
SELECT is(pg_temp.shown('t4'), ARRAY['running', NULL, NULL], 'no error once it is done');

-- Least privilege: tenant_instance runs as the tenant, who may run the wording
-- function (words of its arguments alone); anon may not, and last_error stays the
-- operators'.
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001',
                       $$SELECT public.instance_step_error('restart', false)$$),
          'ok:1', 'a tenant may run the wording function');
SELECT is(pg_temp.cell('anon', $$SELECT public.instance_step_error('restart', false)$$),
          'err:42501', 'anon may not');
SELECT is(pg_temp.cell('5eed5eed-0000-4000-8000-000000000001', 'SELECT last_error FROM public.instances'),
          'err:42501', 'and still cannot read last_error');

SELECT * FROM finish();
ROLLBACK;
