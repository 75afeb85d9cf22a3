-- 184_tenant_notice.sql: my-instance's instance.notice, the states the integration
-- walk (test_tenant.py) does not reach: data deleted, data taken by a newer instance,
-- being removed, a failed instance held for an operator or retried, a start, a trial.
BEGIN;
SELECT plan(10);

CREATE FUNCTION pg_temp.code(p_status text, p_desired text, p_held boolean, p_owed text,
                             p_after timestamptz, p_destroyed timestamptz, p_sub text,
                             p_trial timestamptz DEFAULT NULL, p_provisioned timestamptz DEFAULT now())
RETURNS text LANGUAGE sql AS $$
    SELECT public.tenant_instance_notice(p_status::public.instance_status,
        p_desired::public.instance_status, p_provisioned, p_held, p_owed, p_after, p_destroyed,
        p_sub::public.subscription_status, false, NULL, p_trial) ->> 'code'
$$;

SELECT is(pg_temp.code('deprovisioned', 'deprovisioned', false, NULL, now() - interval '1 day', now(), 'cancelled'),
          'data_deleted', 'destroyed data is said to be deleted');
SELECT is(pg_temp.code('deprovisioned', 'deprovisioned', false, NULL, now() + interval '9 days', NULL, 'cancelled'),
          'removed', 'data a newer instance took over (nothing owed) promises no date');
SELECT is(pg_temp.code('deprovisioned', 'deprovisioned', false, 'destroy_storage', now() - interval '1 minute', NULL, 'cancelled'),
          'removed', 'past its retention, no date in the past is promised');
SELECT is(public.tenant_instance_notice('deprovisioned', 'deprovisioned', now(), false, 'destroy_storage',
              '2031-02-03 23:30+00', NULL, 'cancelled', false, NULL, NULL) ->> 'message',
          'This instance was removed. Its data is kept until 2031-02-03 (UTC): subscribe again before then and your new instance gets it back.',
          'kept data: the last day, in UTC');
SELECT is(pg_temp.code('failed', 'deprovisioned', false, 'destroy', NULL, NULL, 'cancelled'),
          'being_removed', 'a destroy under way (even failing) is being removed');
SELECT is(public.tenant_instance_notice('failed', 'running', now(), true, 'create', NULL, NULL,
              'active', false, NULL, NULL) ->> 'message',
          'Your instance is not running: it waits for MindRoom''s operators.', 'a held step says so');
SELECT is(pg_temp.code('failed', 'running', false, 'create', NULL, NULL, 'active'), 'failed', 'a retried step');
SELECT is(pg_temp.code('stopped', 'running', false, 'start', NULL, NULL, 'active'), 'starting',
          'a start owed is starting, not being created');
SELECT is(pg_temp.code('running', 'running', false, NULL, NULL, NULL, 'trialing', now() + interval '3 days'),
          'trial', 'a trial says when it ends');

SET LOCAL ROLE authenticated;
SELECT is(pg_temp.code('running', 'running', false, NULL, NULL, NULL, 'active'), NULL,
          'a tenant may call it (tenant_instance runs as the tenant); running and paid: nothing');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
