-- 134_purge_pending_no_placement.sql (134_purged_storage_not_kept.sql, target_of_kept_storage):
-- data whose purge was asked for is never taken over (125), so it must not draw a
-- re-created instance to its target either: the instance goes by the placement rule
-- (not to a disabled target, where its create would wait target_disabled while
-- another target has room). Where the rule puts it on the target that still holds
-- the data, its create still waits for the purge (purge_pending), so the data asked
-- to be erased is erased before apps of the same names are made there.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (991, 'old', 'http://10.0.0.7:8002', 'env:OLD_TOKEN', 1000000),
       (992, 'new', 'http://10.0.0.8:8002', 'env:NEW_TOKEN', 1000000);
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a3400000-0000-4000-8000-000000000000', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('b3400000-0000-4000-8000-000000000000', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
-- A1 and B1: destroyed on 'old', their data kept, then a purge asked (their
-- customers asked to be erased); the purges have not run yet.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              target_id, provisioned_at, deprovisioned_at, storage_destroy_after,
                              created_at)
SELECT s.id, n.dokku_app_name, n.subdomain, 'deprovisioned',
       'deprovisioned', 991, now() - interval '60 days', now() - interval '1 day',
       now() + interval '29 days', now() - interval '60 days'
  FROM public.subscriptions s, LATERAL public.instance_names(s.id) n
 WHERE s.id IN ('a3400000-0000-4000-8000-000000000000', 'b3400000-0000-4000-8000-000000000000');
INSERT INTO ids SELECT CASE subscription_id WHEN 'a3400000-0000-4000-8000-000000000000' THEN 'a1' ELSE 'b1' END, id
  FROM public.instances
 WHERE subscription_id IN ('a3400000-0000-4000-8000-000000000000', 'b3400000-0000-4000-8000-000000000000');
SELECT is((SELECT string_agg(public.lifecycle_deprovision(id, NULL, 'destroy', true) ->> 'purge', ',' ORDER BY k)
             FROM ids),
          'true,true', 'A1''s and B1''s purges are recorded');

-- The operator takes 'old' out of service (disabled: its host is being replaced).
UPDATE public.provisioner_targets SET enabled = false WHERE id = 991;
-- A's customer subscribes again.
INSERT INTO ids SELECT 'a2', (public.lifecycle_provision('a3400000-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
SELECT is((SELECT t.name FROM public.instances i JOIN public.provisioner_targets t ON t.id = i.target_id
            WHERE i.id = pg_temp.id('a2')),
          'new', 'A2 goes by the rule: the data on ''old'' is to be erased, never taken');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('a2')),
          NULL, 'and its create waits for nothing');

-- 'old' is back in service, with more room than 'new' (A2 is there): B's customer
-- subscribes again and the rule puts B2 on 'old', where B1's data is still to be erased.
UPDATE public.provisioner_targets SET enabled = true WHERE id = 991;
INSERT INTO ids SELECT 'b2', (public.lifecycle_provision('b3400000-0000-4000-8000-000000000000') #>> '{instance,id}')::uuid;
SELECT is((SELECT t.name FROM public.instances i JOIN public.provisioner_targets t ON t.id = i.target_id
            WHERE i.id = pg_temp.id('b2')),
          'old', 'B2 is placed on ''old'' by the rule');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('b2')),
          'purge_pending', 'B2''s create waits for the purge of B1''s data there');
SELECT is((SELECT string_agg(w.reason, ',') FROM public.lifecycle_waiting() w
            WHERE w.instance_id = pg_temp.id('b2')),
          'purge_pending', 'lifecycle_waiting says why');

-- B1's purge runs on 'old'.
DO $$ BEGIN
    PERFORM public.lifecycle_take(pg_temp.id('b1'), 'purge/w1', 'w1', 60);
    PERFORM public.lifecycle_finish(pg_temp.id('b1'), 'purge/w1', '{"ok": true}', 60, 1, 1);
END $$;
SELECT isnt((SELECT storage_destroyed_at FROM public.instances WHERE id = pg_temp.id('b1')), NULL,
            'B1''s data on ''old'' is erased');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('b2')),
          NULL, 'then B2''s create waits for nothing (on new, empty entries)');
SELECT * FROM finish();
ROLLBACK;
