-- 133_purge_wait_start.sql (133_made_nowhere_yet.sql): storage whose purge was asked for is
-- never taken over by a re-created instance. The create waits 'purge_pending'; but a
-- re-created instance paused before its create (a stop of a missing app is done)
-- and then resumed owes a 'start', which the worker turns into POST /apps on the
-- same storage entries (steps.c: start 404 -> apply; 'apply' is true as nothing was
-- ever applied). The start must wait for the purge as the create does.
BEGIN;
\ir _helpers.inc
SELECT plan(3);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a1200000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

-- I1 destroyed with its data kept, then purged; the purge's step backs off.
INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('a1200000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('i1');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = pg_temp.id('i1');
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', true);
UPDATE public.instances SET last_error = 'provisioner unreachable', attempts = 1,
       next_attempt_at = now() + interval '5 minutes' WHERE id = pg_temp.id('i1');

-- The subscription is provisioned again: I2's create waits for the purge.
INSERT INTO ids SELECT 'i2', (public.lifecycle_provision('a1200000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
-- Paused before the create ran: the worker's stop of the missing app is done.
SELECT public.lifecycle_deprovision(pg_temp.id('i2'), NULL, 'stop', false);
CREATE TEMP TABLE c AS SELECT public.lifecycle_claim('w1', 60) AS j;
SELECT is((SELECT j #>> '{step,action}' FROM c), 'stop', 'the paused I2 is claimed for its stop');
SELECT public.lifecycle_finish(pg_temp.id('i2'), (SELECT j #>> '{step,token}' FROM c),
                               '{"ok": true}', 60, 1, 1);
-- Resumed: a start is owed.
SELECT public.lifecycle_provision('a1200000-0000-4000-8000-0000000000a1');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
          'purge_pending', 'I2''s start (a POST /apps on the same entries) waits for I1''s purge');
SELECT is((SELECT public.lifecycle_claim('w1', 60) #>> '{step,action}'), NULL,
          'no step of I2 is handed out while the data asked to be erased is still there');
SELECT * FROM finish();
ROLLBACK;
