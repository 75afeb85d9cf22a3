-- 133_purge_wait_same_provisioner.sql (133_made_nowhere_yet.sql): a create waits 'purge_pending' for the purge of the entries
-- it would mount. Since 131 an instance mounts (takes over) kept storage only on
-- its own provisioner: one placed on a target while the purged data is kept on
-- DOKKU_PROVISIONER_URL starts on new, empty entries and has nothing to wait for.
-- Waiting ties a paying customer's new instance to a purge on another host, one
-- that "may not exist once targets do" (130's header): its failures retry forever,
-- and so does the wait.
BEGIN;
\ir _helpers.inc
SELECT plan(2);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('c1400000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

-- I1, on DOKKU_PROVISIONER_URL (no target then), destroyed with its data kept.
INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('c1400000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('i1');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = pg_temp.id('i1');
-- The fleet moves to targets; the old host is being retired.
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (991, 'new', 'http://10.0.0.9:8002', 'env:NEW_TOKEN', 100000);
-- I1 is purged; the purge on the old host keeps failing (retried with backoff).
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', true);
UPDATE public.instances SET last_error = 'provisioner DELETE /apps/{app}/storage: connection refused',
       attempts = 7, next_attempt_at = now() + interval '1 hour' WHERE id = pg_temp.id('i1');
-- The customer subscribes again: I2 goes to the target, on new entries.
INSERT INTO ids SELECT 'i2', (public.lifecycle_provision('c1400000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT target_id FROM public.instances WHERE id = pg_temp.id('i2')), 991::bigint,
          'I2 is placed on the target, where nothing of I1 is kept');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
          NULL, 'I2''s create does not wait for a purge on another provisioner');
SELECT * FROM finish();
ROLLBACK;
