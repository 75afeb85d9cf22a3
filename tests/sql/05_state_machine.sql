-- The instance status state machine: all 36 (from, to) pairs, legal ones from the
-- design written out here independently of the SQL, each legal change writing one
-- audit row; subscription status changes are audited too; one live instance per
-- subscription.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(36 + 15);

CREATE TEMP TABLE legal (f text, t text);
INSERT INTO legal VALUES
 ('provisioning', 'running'), ('provisioning', 'failed'), ('provisioning', 'stopped'),
 ('provisioning', 'deprovisioning'),
 ('running', 'stopped'), ('running', 'failed'), ('running', 'deprovisioning'),
 ('stopped', 'provisioning'), ('stopped', 'running'), ('stopped', 'deprovisioning'),
 ('failed', 'provisioning'), ('failed', 'stopped'), ('failed', 'deprovisioning'),
 ('deprovisioning', 'deprovisioned'), ('deprovisioning', 'failed');

-- Puts B's instance in status `f` (a fresh row inserted with that status), then
-- updates it to `t` as service_role, and reports 'ok:<audit rows written by the
-- change>' or 'err:<SQLSTATE>'. Rolled back each time.
CREATE FUNCTION pg_temp.transition(f text, t text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE before bigint; r text;
BEGIN
    BEGIN
        DELETE FROM public.instances WHERE subscription_id = 'bbbbbbbb-0000-4000-8000-000000000002';
        INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status)
        VALUES ('bbbbbbbb-0000-4000-8000-00000000000a', 'bbbbbbbb-0000-4000-8000-000000000002',
                'mindroom-sm', 'msm', f::public.instance_status);
        SELECT count(*) INTO before FROM public.audit_logs WHERE action = 'instance.status_changed'
           AND details ->> 'instance_id' = 'bbbbbbbb-0000-4000-8000-00000000000a';
        PERFORM pg_temp.become('service_role');
        UPDATE public.instances SET status = t::public.instance_status
         WHERE id = 'bbbbbbbb-0000-4000-8000-00000000000a';
        PERFORM pg_temp.unbecome();
        SELECT 'ok:' || (count(*) - before) INTO r FROM public.audit_logs
         WHERE action = 'instance.status_changed'
           AND details ->> 'instance_id' = 'bbbbbbbb-0000-4000-8000-00000000000a'
           AND details ->> 'from' = f AND details ->> 'to' = t
           AND account_id = 'bbbbbbbb-0000-4000-8000-000000000001';
        RAISE EXCEPTION USING ERRCODE = 'MRT00', MESSAGE = r;
    EXCEPTION
        WHEN SQLSTATE 'MRT00' THEN r := SQLERRM;
        WHEN OTHERS THEN r := 'err:' || SQLSTATE;
    END;
    RETURN r;
END $$;

SELECT is(pg_temp.transition(f.s, t.s),
          CASE WHEN f.s = t.s THEN 'ok:0'
               WHEN EXISTS (SELECT 1 FROM legal l WHERE l.f = f.s AND l.t = t.s) THEN 'ok:1'
               ELSE 'err:MR001' END,
          format('%s -> %s %s', f.s, t.s,
                 CASE WHEN f.s = t.s THEN 'is a no-op, no audit row'
                      WHEN EXISTS (SELECT 1 FROM legal l WHERE l.f = f.s AND l.t = t.s)
                      THEN 'is legal and writes one audit row' ELSE 'is rejected with MR001' END))
  FROM unnest(enum_range(NULL::public.instance_status)::text[]) WITH ORDINALITY AS f(s, i),
       unnest(enum_range(NULL::public.instance_status)::text[]) WITH ORDINALITY AS t(s, j)
 ORDER BY f.i, t.j;

SELECT throws_ok($$UPDATE public.instances SET status = 'provisioning' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$,
                 'MR001', 'illegal instance status change from running to provisioning (instance aaaaaaaa-0000-4000-8000-000000000003)',
                 'the error names both statuses and the instance');
SELECT is((SELECT status::text FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'),
          'running', 'the rejected change left the row as it was');

-- Timestamps stamped on the way.
UPDATE public.instances SET status = 'deprovisioning' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003';
UPDATE public.instances SET status = 'deprovisioned' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003';
SELECT is((SELECT deprovisioned_at FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'),
          now(), 'entering deprovisioned stamps deprovisioned_at');
SELECT is((SELECT array_agg(details ->> 'to' ORDER BY created_at, details ->> 'to') FROM public.audit_logs
            WHERE action = 'instance.status_changed' AND details ->> 'instance_id' = 'aaaaaaaa-0000-4000-8000-000000000003'),
          ARRAY['deprovisioned', 'deprovisioning'], 'two changes, two audit rows');

-- One live instance per subscription; a deprovisioned one no longer counts.
SELECT lives_ok($$INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status)
                  SELECT 'aaaaaaaa-0000-4000-8000-000000000002', n.dokku_app_name, n.subdomain, 'provisioning'
                    FROM public.instance_names('aaaaaaaa-0000-4000-8000-000000000002') n$$,
                'after deprovisioning, the subscription may get a new live instance with the same names');
SELECT is((SELECT provisioned_at FROM public.instances WHERE subscription_id = 'aaaaaaaa-0000-4000-8000-000000000002'
            AND status = 'provisioning'), NULL, 'a new instance is not provisioned yet');
SELECT throws_ok($$INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
                   VALUES ('aaaaaaaa-0000-4000-8000-000000000002', 'mindroom-other', 'mother')$$,
                 '23505', NULL, 'a second live instance for the same subscription is rejected');
SELECT throws_ok($$INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
                   SELECT 'aaaaaaaa-0000-4000-8000-000000000006', n.dokku_app_name, 'mfresh'
                     FROM public.instance_names('bbbbbbbb-0000-4000-8000-000000000002') n$$,
                 '23505', NULL, 'a live app name cannot be taken twice');
SELECT is((SELECT count(*) FROM public.instances i
            WHERE subscription_id = 'aaaaaaaa-0000-4000-8000-000000000002'
            GROUP BY subscription_id), 2::bigint, 'the old (deprovisioned) row is kept for history');
UPDATE public.instances SET status = 'running' WHERE subscription_id = 'aaaaaaaa-0000-4000-8000-000000000002'
   AND status = 'provisioning';
SELECT is((SELECT provisioned_at FROM public.instances WHERE subscription_id = 'aaaaaaaa-0000-4000-8000-000000000002'
            AND status = 'running'), now(), 'entering running stamps provisioned_at');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'instance.created'
            AND details ->> 'subscription_id' = 'aaaaaaaa-0000-4000-8000-000000000002'), 2::bigint,
          'each created instance has an instance.created audit row');

-- Subscription status changes are audited, once per real change.
UPDATE public.subscriptions SET status = 'past_due' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
UPDATE public.subscriptions SET status = 'past_due' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
UPDATE public.subscriptions SET status = 'cancelled', cancelled_at = now() WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
UPDATE public.subscriptions SET cancel_at_period_end = true WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
SELECT results_eq($$SELECT details ->> 'from', details ->> 'to', account_id FROM public.audit_logs
                     WHERE action = 'subscription.status_changed'
                       AND details ->> 'subscription_id' = 'bbbbbbbb-0000-4000-8000-000000000002'
                     ORDER BY created_at, details ->> 'from'$$,
                  $$VALUES ('active', 'past_due', 'bbbbbbbb-0000-4000-8000-000000000001'::uuid),
                           ('past_due', 'cancelled', 'bbbbbbbb-0000-4000-8000-000000000001'::uuid)$$,
                  'each subscription status change writes one audit row for the owner; repeats and other columns none');
SELECT is(pg_temp.cell('bbbbbbbb-0000-4000-8000-000000000001',
          $$SELECT 1 FROM public.audit_logs WHERE action = 'subscription.status_changed'$$),
          'ok:2', 'the owner can read those audit rows');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT 1 FROM public.audit_logs WHERE account_id = 'bbbbbbbb-0000-4000-8000-000000000001'$$),
          'ok:0', 'another user cannot');
SELECT is(pg_temp.cell('service_role',
          $$UPDATE public.audit_logs SET action = 'tampered' WHERE account_id = 'bbbbbbbb-0000-4000-8000-000000000001'$$),
          'err:42501', 'audit_logs is append-only, even for service_role');

SELECT * FROM finish();
ROLLBACK;
