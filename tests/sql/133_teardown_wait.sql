-- 133_teardown_wait.sql (133_made_nowhere_yet.sql): a re-created instance's create waits
-- while a destroyed row of its names owes the purge of its storage. If that row is
-- deleted meanwhile (an operator clearing a destroyed instance), the purge becomes a
-- teardown (instances_record_teardown: DELETE /apps/{app}?purge=true on the same
-- provisioner, by app name, run by the periodic teardown job) and the wait ends at
-- once: the new instance is created under the same app name, and the teardown that
-- follows destroys its apps and data. Its create must wait for that teardown too.
BEGIN;
\ir _helpers.inc
SELECT plan(3);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('d1500000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('d1500000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('i1');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = pg_temp.id('i1');
SELECT public.lifecycle_deprovision(pg_temp.id('i1'), NULL, 'destroy', true);
UPDATE public.instances SET last_error = 'provisioner unreachable', attempts = 1,
       next_attempt_at = now() + interval '5 minutes' WHERE id = pg_temp.id('i1');
INSERT INTO ids SELECT 'i2', (public.lifecycle_provision('d1500000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
          'purge_pending', 'I2 waits for I1''s purge');
-- The operator deletes I1's row.
DELETE FROM public.instances WHERE id = pg_temp.id('i1');
SELECT is((SELECT count(*) FROM public.instance_teardowns_due(100) t
            WHERE t.dokku_app_name = (SELECT dokku_app_name FROM public.instances WHERE id = pg_temp.id('i2'))),
          1::bigint, 'a teardown of the app name I2 is about to use is due');
SELECT isnt((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('i2')),
            NULL, 'I2''s create waits until that teardown is done (it would destroy I2''s apps and data)');
SELECT * FROM finish();
ROLLBACK;
