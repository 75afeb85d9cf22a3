-- 147_health_only_while_running.sql: a tenant sees its instance's health while it
-- runs, and "not_checked" (with when it was last checked) while it does not: never
-- the last result of a stopped, failed or destroyed instance.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(8);

CREATE TEMP TABLE r (k text PRIMARY KEY, v jsonb);
GRANT ALL ON r TO authenticated;
CREATE FUNCTION pg_temp.seen(p_k text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RETURN pg_temp.run('bbbbbbbb-0000-4000-8000-000000000001',
                       format($q$INSERT INTO r VALUES (%L, public.tenant_instance(NULL))$q$, p_k));
END $$;
CREATE FUNCTION pg_temp.health(p_k text) RETURNS TABLE (status text, checked_at timestamptz, error text,
                                                        failures int) LANGUAGE sql AS $$
    SELECT v #>> '{instance,status}' || ': ' || (v #>> '{health,status}'),
           (v #>> '{health,checked_at}')::timestamptz, v #>> '{health,error}',
           (v #>> '{health,consecutive_failures}')::int
      FROM r WHERE k = p_k
$$;

-- B's instance runs and was checked healthy.
UPDATE public.instances SET health_status = 'healthy', last_health_check = '2026-11-30 12:00+00',
       error_message = NULL, consecutive_failures = 0
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(pg_temp.seen('running'), 'ok:1', 'B reads its running instance');
SELECT results_eq($$SELECT * FROM pg_temp.health('running')$$,
                  $$VALUES ('running: healthy', '2026-11-30 12:00+00'::timestamptz, NULL::text, 0)$$,
                  'a running instance shows its last check');

-- Billing stops it: no longer probed, its last result is not its health.
UPDATE public.instances SET status = 'stopped', desired_status = 'stopped'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(pg_temp.seen('stopped'), 'ok:1', 'B reads its stopped instance');
SELECT results_eq($$SELECT * FROM pg_temp.health('stopped')$$,
                  $$VALUES ('stopped: not_checked', '2026-11-30 12:00+00'::timestamptz, NULL::text, NULL::int)$$,
                  'a stopped instance is not checked (not "healthy"), with when it last was');

-- Running again and failing its checks, then marked failed.
UPDATE public.instances SET status = 'running', desired_status = 'running'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
UPDATE public.instances SET health_status = 'unreachable: timeout after 5000 ms',
       error_message = 'unreachable: timeout after 5000 ms', consecutive_failures = 3,
       last_health_check = '2026-11-30 13:00+00'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
UPDATE public.instances SET status = 'failed' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(pg_temp.seen('failed'), 'ok:1', 'B reads its failed instance');
SELECT results_eq($$SELECT * FROM pg_temp.health('failed')$$,
                  $$VALUES ('failed: not_checked', '2026-11-30 13:00+00'::timestamptz, NULL::text, NULL::int)$$,
                  'a failed instance is not checked either');

-- Destroyed.
UPDATE public.instances SET status = 'deprovisioning', desired_status = 'deprovisioned'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
UPDATE public.instances SET status = 'deprovisioned' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(pg_temp.seen('destroyed'), 'ok:1', 'B reads its destroyed instance');
SELECT results_eq($$SELECT * FROM pg_temp.health('destroyed')$$,
                  $$VALUES ('deprovisioned: not_checked', '2026-11-30 13:00+00'::timestamptz, NULL::text,
                            NULL::int)$$,
                  'nor a destroyed one');

SELECT * FROM finish();
ROLLBACK;
