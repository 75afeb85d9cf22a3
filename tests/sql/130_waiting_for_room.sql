-- 130_waiting_for_room.sql: provisioner targets and the instances that wait for
-- room (130_waiting_for_room.sql).
--   1. A new instance goes where its names' data is really kept: not to the target
--      of a destroyed row whose storage another row took over and destroyed.
BEGIN;
SELECT plan(3);
\ir _helpers.inc

-- 1. -------------------------------------------------------------------------------
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (971, 'old', 'http://10.0.0.7:8002', 'env:OLD_TOKEN', 1000000),
       (972, 'new', 'http://10.0.0.8:8002', 'env:NEW_TOKEN', 1000000);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
VALUES ('a2500003-0000-4000-8000-000000000000', '5eed5eed-0000-4000-8000-000000000001',
        'price_starter', 'starter', 'active');
-- A: destroyed on 'old', its data kept.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              target_id, provisioned_at, deprovisioned_at, storage_destroy_after, created_at)
SELECT 'a2500003-0000-4000-8000-000000000000', n.dokku_app_name, n.subdomain, 'deprovisioned',
       'deprovisioned', 971, now() - interval '60 days', now() - interval '40 days',
       now() - interval '10 days', now() - interval '60 days'
  FROM public.instance_names('a2500003-0000-4000-8000-000000000000') n;
-- B: re-created on 'old' where A's data is (it takes A's storage), then destroyed,
-- its data kept.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              provisioned_at, deprovisioned_at, storage_destroy_after, created_at)
SELECT 'a2500003-0000-4000-8000-000000000000', n.dokku_app_name, n.subdomain, 'deprovisioned',
       'deprovisioned', now() - interval '30 days', now() - interval '2 days',
       now() + interval '28 days', now() - interval '30 days'
  FROM public.instance_names('a2500003-0000-4000-8000-000000000000') n;
-- The operator moves off 'old': drained. B's data is still there: a re-creation goes
-- there, whatever the rule says.
UPDATE public.provisioner_targets SET drained = true WHERE id = 971;
SELECT is((SELECT public.target_of_kept_storage(n.dokku_app_name, gen_random_uuid())
             FROM public.instance_names('a2500003-0000-4000-8000-000000000000') n),
          971::bigint, 'a re-creation goes where the data of its names is kept');
-- B's data destroyed (a purge, or its retention); 'old' disabled.
UPDATE public.instances SET storage_destroyed_at = now() - interval '1 day'
 WHERE subscription_id = 'a2500003-0000-4000-8000-000000000000' AND target_id = 971
   AND storage_taken_by IS NULL;
UPDATE public.provisioner_targets SET enabled = false WHERE id = 971;
DO $$ BEGIN PERFORM public.lifecycle_provision('a2500003-0000-4000-8000-000000000000'); END $$;
SELECT is((SELECT t.name FROM public.instances i JOIN public.provisioner_targets t ON t.id = i.target_id
            WHERE i.subscription_id = 'a2500003-0000-4000-8000-000000000000' AND i.status <> 'deprovisioned'),
          'new', 'no data is kept on the drained, disabled target any more: the new instance goes by the rule');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i
            WHERE subscription_id = 'a2500003-0000-4000-8000-000000000000' AND status <> 'deprovisioned'),
          NULL, 'and its create does not wait for a disabled target');

SELECT * FROM finish();
ROLLBACK;
