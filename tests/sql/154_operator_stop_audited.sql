-- 154_operator_stop_audited.sql: an operator's stop that holds an instance, and the
-- provision that ends the hold, are each audited once, on the owner's account.
BEGIN;
\ir _helpers.inc
SELECT plan(9);
SELECT pg_temp.fixture();
CREATE FUNCTION pg_temp.audited(p_action text) RETURNS SETOF jsonb LANGUAGE sql AS $$
    SELECT a.details || jsonb_build_object('account', a.account_id, 'actor_role', a.actor_role)
      FROM public.audit_logs a
     WHERE a.action = p_action AND a.details ->> 'instance_id' = 'aaaaaaaa-0000-4000-8000-000000000003'
     ORDER BY a.created_at, a.id
$$;

SELECT pg_temp.become('service_role');
SELECT is(public.lifecycle_deprovision('aaaaaaaa-0000-4000-8000-000000000003', NULL, 'stop') #>> '{instance,desired_status}',
          'stopped', 'an operator stops a running instance');
SELECT pg_temp.unbecome();
SELECT results_eq($$SELECT d - 'app' FROM pg_temp.audited('instance.stop_requested') d$$,
    $$VALUES (jsonb_build_object('instance_id', 'aaaaaaaa-0000-4000-8000-000000000003', 'by', 'service_role',
                                 'account', 'aaaaaaaa-0000-4000-8000-000000000001', 'actor_role', 'service_role'))$$,
    'the stop is audited on the owner''s account, with who asked');
SELECT is((SELECT d ->> 'app' FROM pg_temp.audited('instance.stop_requested') d),
          (SELECT dokku_app_name FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'),
          'and names the app');

SELECT pg_temp.become('service_role');
SELECT is(public.lifecycle_deprovision(NULL, 'aaaaaaaa-0000-4000-8000-000000000002', 'stop') ->> 'outcome',
          'ok', 'the same stop again');
SELECT pg_temp.unbecome();
SELECT is((SELECT count(*)::int FROM pg_temp.audited('instance.stop_requested')), 1,
          'changes nothing and is not audited again');

-- Provision while the subscription is unpaid: refused, the hold stays, nothing audited.
UPDATE public.subscriptions SET status = 'unpaid' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT pg_temp.become('service_role');
SELECT is(public.lifecycle_provision('aaaaaaaa-0000-4000-8000-000000000002') ->> 'outcome',
          'not_entitled', 'a provision of an unpaid subscription is refused');
SELECT pg_temp.unbecome();
UPDATE public.subscriptions SET status = 'active' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';

-- The operator's provision ends the hold: audited once, with when the hold began.
SELECT pg_temp.become('service_role');
SELECT is(public.lifecycle_provision('aaaaaaaa-0000-4000-8000-000000000002') #>> '{instance,operator_stopped_at}',
          NULL, 'the operator''s provision ends the hold');
SELECT is(public.lifecycle_provision('aaaaaaaa-0000-4000-8000-000000000002') ->> 'outcome',
          'ok', 'and a second provision is ok');
SELECT pg_temp.unbecome();
SELECT results_eq($$SELECT d ->> 'by', d ->> 'account', (d ->> 'stopped_at')::timestamptz IS NOT NULL
                      FROM pg_temp.audited('instance.resume_requested') d$$,
    $$VALUES ('service_role'::text, 'aaaaaaaa-0000-4000-8000-000000000001'::text, true)$$,
    'the resume is audited once (the refused one and the second write nothing), with when the hold began');

SELECT * FROM finish();
ROLLBACK;
