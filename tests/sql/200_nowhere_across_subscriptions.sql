-- 200_nowhere_across_subscriptions.sql (200_nowhere_across_subscriptions.sql,
-- public.instance_nowhere): a customer who subscribes again takes over the kept
-- data of its cancelled subscription's instance (186), also while the new instance
-- waits for room on a target. That data lies on DOKKU_PROVISIONER_URL, where the old
-- instance was made before targets existed, so the new instance is not "nowhere":
-- - cancelled while it still waits, its destroy is a real step (the provisioner keeps
--   the data for the retention, as for any destroy), not one the claim records done
--   calling nobody, which marked the storage destroyed and left the data there for
--   good, neither offered back nor erased;
-- - with the account erased, deleting the new instance's row before the old one's
--   still leaves one teardown that erases the data.
BEGIN;
\ir _helpers.inc
SELECT plan(7);

CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

-- Two customers, X and Y, each with a cancelled subscription (X1, Y1) whose instance
-- was made on DOKKU_PROVISIONER_URL before targets existed and destroyed there with
-- its data kept, and a new subscription (X2, Y2).
INSERT INTO auth.users (id, email) VALUES
    ('20000000-0000-4000-8000-0000000000a0', 'x200@example.com'),
    ('20000000-0000-4000-8000-0000000000b0', 'y200@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a2010000-0000-4000-8000-0000000000a1', '20000000-0000-4000-8000-0000000000a0',
     'price_starter', 'starter', 'cancelled'),
    ('a2020000-0000-4000-8000-0000000000a2', '20000000-0000-4000-8000-0000000000a0',
     'price_starter', 'starter', 'active'),
    ('b2010000-0000-4000-8000-0000000000b1', '20000000-0000-4000-8000-0000000000b0',
     'price_starter', 'starter', 'cancelled'),
    ('b2020000-0000-4000-8000-0000000000b2', '20000000-0000-4000-8000-0000000000b0',
     'price_starter', 'starter', 'active');
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              provisioned_at, deprovisioned_at, storage_destroy_after, created_at)
SELECT s.id, n.dokku_app_name, n.subdomain, 'deprovisioned', 'deprovisioned',
       now() - interval '60 days', now() - interval '1 day', now() + interval '29 days',
       now() - interval '60 days'
  FROM public.subscriptions s, LATERAL public.instance_names(s.id) n
 WHERE s.id IN ('a2010000-0000-4000-8000-0000000000a1', 'b2010000-0000-4000-8000-0000000000b1');
INSERT INTO ids SELECT CASE WHEN subscription_id::text LIKE '%a1' THEN 'x1' ELSE 'y1' END, id
  FROM public.instances
 WHERE subscription_id IN ('a2010000-0000-4000-8000-0000000000a1', 'b2010000-0000-4000-8000-0000000000b1');

-- A target is registered, with no room; both customers subscribe again and wait.
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (200, 'small', 'http://10.0.0.9:8002', 'env:SMALL_TOKEN', 1);
INSERT INTO ids SELECT 'x2', (public.lifecycle_provision('a2020000-0000-4000-8000-0000000000a2') #>> '{instance,id}')::uuid;
INSERT INTO ids SELECT 'y2', (public.lifecycle_provision('b2020000-0000-4000-8000-0000000000b2') #>> '{instance,id}')::uuid;

SELECT is((SELECT string_agg(coalesce(public.lifecycle_target_wait(i2), '-') || '/'
                             || (i2.dokku_app_name = i1.dokku_app_name)::text || '/'
                             || (i1.storage_taken_by = i2.id)::text, ',' ORDER BY ids.k)
             FROM ids JOIN public.instances i2 ON i2.id = ids.id
             JOIN public.instances i1 ON i1.id = pg_temp.id(left(ids.k, 1) || '1')
            WHERE ids.k IN ('x2', 'y2')),
          'no_capacity/true/true,no_capacity/true/true',
          'X2 and Y2 wait for room, each under its cancelled instance''s names, holding its kept data');
SELECT is((SELECT string_agg(public.instance_nowhere(i)::text, ',' ORDER BY ids.k)
             FROM ids JOIN public.instances i USING (id) WHERE ids.k IN ('x2', 'y2')),
          'false,false',
          'neither is nowhere: its data is on DOKKU_PROVISIONER_URL');

-- X's new subscription is cancelled while its instance still waits: the destroy is
-- handed to a worker, for DOKKU_PROVISIONER_URL, where the data is.
SELECT is((SELECT public.lifecycle_deprovision(pg_temp.id('x2'), NULL, 'destroy', false) ->> 'outcome'),
          'ok', 'X2 is cancelled while it waits');
SELECT is((SELECT c ->> 'outcome' || '/' || (c #>> '{step,action}') || '/' || (c #>> '{step,app}')
                  || '/' || coalesce(c #>> '{step,target}', '-')
             FROM public.lifecycle_claim('w1', 60) c
            WHERE c #>> '{step,instance_id}' = pg_temp.id('x2')::text),
          'claimed/destroy/' || (SELECT dokku_app_name FROM public.instances WHERE id = pg_temp.id('x1')) || '/-',
          'its destroy is a step for a worker, on DOKKU_PROVISIONER_URL under the data''s names');
SELECT is((SELECT i.status::text || '/' || (i.storage_destroyed_at IS NULL)::text
             FROM public.instances i WHERE i.id = pg_temp.id('x2')),
          'deprovisioning/true',
          'and is not recorded done: its storage is not marked destroyed');

-- Y's account is erased: the new instance's row first, then the old one's.
DELETE FROM public.instances WHERE id = pg_temp.id('y2');
DELETE FROM public.instances WHERE id = pg_temp.id('y1');
SELECT is((SELECT count(*)::int FROM public.instance_teardowns t
            WHERE t.dokku_app_name = (SELECT n.dokku_app_name
                                        FROM public.instance_names('b2010000-0000-4000-8000-0000000000b1') n)
              AND t.target_id IS NULL AND t.done_at IS NULL),
          1, 'Y''s rows deleted taker first: one teardown erases the kept data on DOKKU_PROVISIONER_URL');
SELECT is((SELECT count(*)::int FROM public.audit_logs l
            WHERE l.action = 'instance.teardown_skipped'
              AND (l.details ->> 'instance_id')::uuid IN (pg_temp.id('x2'), pg_temp.id('y2'))),
          0, 'no delete is audited as skipped for an instance that holds kept data');
SELECT * FROM finish();
ROLLBACK;
