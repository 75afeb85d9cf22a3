-- 125_purge_before_takeover.sql: storage whose purge was asked for is erased, never
-- taken over by an instance re-created under the same names (whose creation waits
-- for the purge); a destroyed row whose storage a live instance took over is
-- deleted without a teardown, and a purge of it names the instance that holds the
-- data (125_purge_before_takeover.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(10);

INSERT INTO auth.users (id, email) VALUES
    ('97000000-0000-4000-8000-000000000001', 'purged@example.com'),
    ('97000000-0000-4000-8000-000000000002', 'taken@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('97000000-0000-4000-8000-0000000000a1', '97000000-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('98000000-0000-4000-8000-0000000000a2', '97000000-0000-4000-8000-000000000002',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
-- Destroyed with its data kept (the worker's steps written out).
CREATE FUNCTION pg_temp.destroyed(p_id uuid, p_kept interval) RETURNS void LANGUAGE sql AS $$
    SELECT public.lifecycle_deprovision(p_id, NULL, 'destroy', false);
    UPDATE public.instances SET status = 'deprovisioning' WHERE id = p_id;
    UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
           storage_destroy_after = now() + p_kept WHERE id = p_id;
$$;

-- 1. I1 destroyed, then purged; the purge's step fails and backs off.
INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('97000000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT pg_temp.destroyed(pg_temp.id('i1'), interval '30 days');
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', true);
UPDATE public.instances SET last_error = 'provisioner unreachable', attempts = 1,
       next_attempt_at = now() + interval '5 minutes' WHERE id = pg_temp.id('i1');
SELECT is((SELECT owed_action::text FROM public.instances WHERE id = pg_temp.id('i1')),
          'destroy_storage', 'the purge is owed');
-- Provisioned again before the purge ran.
INSERT INTO ids SELECT 'i2', (public.lifecycle_provision('97000000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT owed_action::text FROM public.instances WHERE id = pg_temp.id('i1')),
          'destroy_storage', 'I1''s purge is still owed: data asked to be erased is not handed to I2');
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = pg_temp.id('i1')),
          NULL, 'storage whose purge was asked for is nobody''s to take');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
          'purge_pending', 'I2''s creation waits for the purge of the entries it would mount');
SELECT is((SELECT count(*) FROM public.lifecycle_waiting() w WHERE w.instance_id = pg_temp.id('i2')),
          1::bigint, 'and the operator sees why');
-- The purge is carried out: I2 is created on new, empty entries.
UPDATE public.instances SET storage_destroyed_at = now(), last_error = NULL, attempts = 0,
       next_attempt_at = NULL WHERE id = pg_temp.id('i1');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
          NULL, 'once the purge is done, I2''s creation waits for nothing');

-- 2. J1 destroyed with its data kept, J2 re-created on it and running.
INSERT INTO ids SELECT 'j1', (public.lifecycle_provision('98000000-0000-4000-8000-0000000000a2') #>> '{instance,id}')::uuid;
SELECT pg_temp.destroyed(pg_temp.id('j1'), interval '1 day');
INSERT INTO ids SELECT 'j2', (public.lifecycle_provision('98000000-0000-4000-8000-0000000000a2') #>> '{instance,id}')::uuid;
UPDATE public.instances SET status = 'running' WHERE id = pg_temp.id('j2');
-- A purge asked of J1 is not recorded (nothing would carry it out) and names J2.
SELECT is(public.lifecycle_deprovision(pg_temp.id('j1'), NULL, 'destroy', true)
            - 'instance' - 'outcome' - 'mode',
          jsonb_build_object('purge', false, 'storage_taken_by', pg_temp.id('j2')),
          'a purge of storage that was taken over names the instance that holds it');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'instance.purge_requested'
            AND details ->> 'instance_id' = pg_temp.id('j1')::text), 0::bigint,
          'no purge is recorded for it');
-- An operator removes J1's row: nothing of J2's is torn down.
DELETE FROM public.instances WHERE id = pg_temp.id('j1');
SELECT is((SELECT count(*) FROM public.instance_teardowns_due(100) t
            WHERE t.instance_id = pg_temp.id('j1')), 0::bigint,
          'no teardown is due for a row whose storage a live instance took over');
SELECT is((SELECT status::text FROM public.instances WHERE id = pg_temp.id('j2')),
          'running', 'J2 runs on');
SELECT * FROM finish();
ROLLBACK;
