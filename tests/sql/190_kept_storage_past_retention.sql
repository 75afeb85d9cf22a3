-- 190_kept_storage_past_retention.sql (190_kept_storage_rule.sql): data whose retention
-- is over is never taken over, whatever the worker's lease says at that moment. The
-- worker's DELETE /apps/{app}/storage failed (it timed out: the provisioner may have
-- removed part of the entries) and its lease was given back for the backoff; or the
-- worker has not claimed it yet. An instance made again under the same names waits
-- for the destruction ('purge_pending') and gets new, empty entries, as when the
-- worker's lease is held (152); and the data does not draw a new instance to its
-- provisioner (a disabled one here), where it could only wait.
BEGIN;
\ir _helpers.inc
SELECT plan(11);

INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a1900000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('b1900000-0000-4000-8000-0000000000b1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

-- A1 destroyed on DOKKU_PROVISIONER_URL, its data kept; the retention has just ended.
INSERT INTO ids SELECT 'a1', (public.lifecycle_provision('a1900000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
DO $$ BEGIN PERFORM public.lifecycle_deprovision(pg_temp.id('a1'), NULL, 'destroy', false); END $$;
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('a1');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() - interval '1 second' WHERE id = pg_temp.id('a1');
-- The worker claims its destroy_storage; the DELETE times out and the step fails
-- (the lease given back, the next attempt after the backoff).
CREATE TEMP TABLE c AS SELECT public.lifecycle_claim('w1', 60) AS j;
SELECT is((SELECT j #>> '{step,action}' FROM c), 'destroy_storage', 'the worker is destroying A1''s data');
SELECT is(public.lifecycle_finish(pg_temp.id('a1'), (SELECT j #>> '{step,token}' FROM c),
                                  '{"ok": false, "error": "provisioner timed out"}', 60, 1, 1) ->> 'outcome',
          'failed', 'its DELETE failed: the data may be partly gone');

-- The subscription is provisioned again meanwhile: A2, the same names.
INSERT INTO ids SELECT 'a2', (public.lifecycle_provision('a1900000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = pg_temp.id('a1')), NULL,
          'A2 does not take over data past its retention');
SELECT is((SELECT owed_action::text FROM public.instances WHERE id = pg_temp.id('a1')), 'destroy_storage',
          'A1 still owes the destruction of its data');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('a2')),
          'purge_pending', 'A2''s create waits for that destruction, then gets new, empty entries');

-- Within the retention the rule is unchanged: A's subscription, destroyed again with its
-- data kept for 30 days (A2's), is taken over by A3 on the same provisioner.
UPDATE public.instances SET status = 'deprovisioning' WHERE id = pg_temp.id('a2');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = pg_temp.id('a2');
INSERT INTO ids SELECT 'a3', (public.lifecycle_provision('a1900000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = pg_temp.id('a2')), pg_temp.id('a3'),
          'data within its retention is taken over by the names'' new instance');

-- B1: destroyed on target 'old', past its retention, not yet claimed (the worker is
-- busy). 'old' is then disabled; 'new' has room.
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (1901, 'old', 'http://10.0.0.7:8002', 'env:OLD_TOKEN', 1000000),
       (1902, 'new', 'http://10.0.0.8:8002', 'env:NEW_TOKEN', 1000000);
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              target_id, provisioned_at, deprovisioned_at, storage_destroy_after,
                              created_at)
SELECT 'b1900000-0000-4000-8000-0000000000b1', n.dokku_app_name, n.subdomain, 'deprovisioned',
       'deprovisioned', 1901, now() - interval '60 days', now() - interval '31 days',
       now() - interval '1 day', now() - interval '60 days'
  FROM public.instance_names('b1900000-0000-4000-8000-0000000000b1') n;
INSERT INTO ids SELECT 'b1', id FROM public.instances WHERE subscription_id = 'b1900000-0000-4000-8000-0000000000b1';
UPDATE public.provisioner_targets SET enabled = false WHERE id = 1901;
INSERT INTO ids SELECT 'b2', (public.lifecycle_provision('b1900000-0000-4000-8000-0000000000b1') #>> '{instance,id}')::uuid;
SELECT is((SELECT t.name FROM public.instances i JOIN public.provisioner_targets t ON t.id = i.target_id
            WHERE i.id = pg_temp.id('b2')),
          'new', 'B2 goes by the rule: the data on the disabled ''old'' is past its retention, never taken');
SELECT is((SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE i.id = pg_temp.id('b2')),
          NULL, 'and its create waits for nothing');
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = pg_temp.id('b1')), NULL,
          'B1''s data is nobody''s');

-- The rule's view reads with its reader's rights (Supabase's linter: a view in public
-- must be security_invoker) and only service_role may read it, whatever default
-- privileges the database gives new relations.
SELECT is((SELECT c.reloptions FROM pg_class c WHERE c.oid = 'public.instances_kept_storage'::regclass),
          '{security_invoker=true}', 'instances_kept_storage is security_invoker');
SELECT is(ARRAY(SELECT r || ':' || p
                  FROM unnest(ARRAY['anon', 'authenticated', 'service_role', 'authenticator']) r,
                       unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                                    'TRIGGER']) p
                 WHERE has_table_privilege(r, 'public.instances_kept_storage', p) ORDER BY 1),
          ARRAY['service_role:SELECT'], 'only service_role reads instances_kept_storage, and only reads it');

SELECT * FROM finish();
ROLLBACK;
