-- 152_storage_destroy_under_way.sql (152_storage_destroy_under_way.sql): kept storage
-- whose destruction is under way (retention over, destroy_storage claimed: the
-- worker's DELETE /apps/{app}/storage is in flight) is not taken over by an instance
-- re-created meanwhile under the same names: that instance would mount entries being
-- destroyed and be recorded as holding data that is gone. Its first apps wait, as
-- for a purge, until the destruction is done, and then get new, empty entries.
BEGIN;
\ir _helpers.inc
SELECT plan(6);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a1520000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

-- I1 destroyed, its data kept; the retention period has just ended.
INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('a1520000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('i1');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() - interval '1 second' WHERE id = pg_temp.id('i1');
-- A worker claims its destroy_storage and calls the provisioner.
CREATE TEMP TABLE c AS SELECT public.lifecycle_claim('w1', 60) AS j;
SELECT is((SELECT j #>> '{step,action}' FROM c) || ' ' || (SELECT j #>> '{step,instance_id}' FROM c),
          'destroy_storage ' || pg_temp.id('i1'), 'the worker is destroying I1''s kept storage');

-- Meanwhile the customer subscribes again: I2, the same names.
INSERT INTO ids SELECT 'i2', (public.lifecycle_provision('a1520000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = pg_temp.id('i1')), NULL,
          'I2 does not take over storage that is being destroyed');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
          'purge_pending', 'I2''s create waits for the destruction in flight');
SELECT is((SELECT public.lifecycle_claim('w2', 60) #>> '{step,action}'), NULL,
          'no step of I2 is handed out while its names'' old entries are being destroyed');

-- The destruction succeeds: I1's storage is recorded destroyed, and I2 goes ahead.
SELECT public.lifecycle_finish(pg_temp.id('i1'), (SELECT j #>> '{step,token}' FROM c),
                               '{"ok": true}', 60, 1, 1);
SELECT is((SELECT storage_destroyed_at IS NOT NULL AND storage_taken_by IS NULL
             FROM public.instances WHERE id = pg_temp.id('i1')), true,
          'I1''s storage is destroyed and nobody is recorded as holding it');
SELECT is((SELECT public.lifecycle_claim('w2', 60) #>> '{step,action}'), 'create',
          'then I2 is created, on new entries');
SELECT * FROM finish();
ROLLBACK;
