-- 135_deleted_while_waiting.sql (135_no_teardown_made_nowhere.sql, instances_record_teardown):
-- an instance inserted while targets existed and none had room has nothing on any
-- provisioner (instance_nowhere): its stop or destroy is done by the claim, calling
-- nobody, because it would otherwise go to DOKKU_PROVISIONER_URL, "a host that may
-- not exist once targets do". Deleting its row (the account erased while it waits)
-- must not record a teardown either: one with target_id NULL goes to that same
-- DOKKU_PROVISIONER_URL, about apps that were never made anywhere, and is retried
-- with backoff for good when nothing answers there.
-- But a waiting instance that took over the kept storage of an instance destroyed on
-- DOKKU_PROVISIONER_URL is not "nowhere": that data is there, and deleting the rows
-- (in a cascade, or one by one in either order) must leave a teardown that erases it.
BEGIN;
\ir _helpers.inc
SELECT plan(9);

CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
-- The teardowns not done of a subscription's app name on DOKKU_PROVISIONER_URL.
CREATE FUNCTION pg_temp.legacy_teardowns(p_sub uuid) RETURNS integer LANGUAGE sql AS $$
    SELECT count(*)::int FROM public.instance_teardowns t
     WHERE t.dokku_app_name = (SELECT n.dokku_app_name FROM public.instance_names(p_sub) n)
       AND t.target_id IS NULL AND t.done_at IS NULL $$;

-- C, D and E are other customers than A and B: a customer's new subscription would
-- take its own kept data over (186_returning_customer_keeps_data.sql).
INSERT INTO auth.users (id, email) VALUES
    ('13500000-0000-4000-8000-0000000000c0', 'c@example.com'),
    ('13500000-0000-4000-8000-0000000000d0', 'd@example.com'),
    ('13500000-0000-4000-8000-0000000000e0', 'e@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a3510000-0000-4000-8000-0000000000a1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('b3510000-0000-4000-8000-0000000000b1', '5eed5eed-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('c3510000-0000-4000-8000-0000000000c1', '13500000-0000-4000-8000-0000000000c0',
     'price_starter', 'starter', 'active'),
    ('d3510000-0000-4000-8000-0000000000d1', '13500000-0000-4000-8000-0000000000d0',
     'price_starter', 'starter', 'active'),
    ('e3510000-0000-4000-8000-0000000000e1', '13500000-0000-4000-8000-0000000000e0',
     'price_starter', 'starter', 'active');
-- C1, D1, E1: made on DOKKU_PROVISIONER_URL before targets existed, destroyed there
-- with their data kept.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              provisioned_at, deprovisioned_at, storage_destroy_after, created_at)
SELECT s.id, n.dokku_app_name, n.subdomain, 'deprovisioned', 'deprovisioned',
       now() - interval '60 days', now() - interval '1 day', now() + interval '29 days',
       now() - interval '60 days'
  FROM public.subscriptions s, LATERAL public.instance_names(s.id) n
 WHERE s.id IN ('c3510000-0000-4000-8000-0000000000c1', 'd3510000-0000-4000-8000-0000000000d1',
                'e3510000-0000-4000-8000-0000000000e1');
INSERT INTO ids SELECT left(subscription_id::text, 1) || '1', id FROM public.instances
 WHERE subscription_id IN ('c3510000-0000-4000-8000-0000000000c1', 'd3510000-0000-4000-8000-0000000000d1',
                           'e3510000-0000-4000-8000-0000000000e1');

-- A target is registered, with no room for anyone.
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (993, 'small', 'http://10.0.0.9:8002', 'env:SMALL_TOKEN', 1);
INSERT INTO ids SELECT 'a', (public.lifecycle_provision('a3510000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
INSERT INTO ids SELECT 'b', (public.lifecycle_provision('b3510000-0000-4000-8000-0000000000b1') #>> '{instance,id}')::uuid;
-- B is paused while it waits: the claim records its stop done, calling nobody.
DO $$ BEGIN
    PERFORM public.lifecycle_deprovision(pg_temp.id('b'), NULL, 'stop', false);
    PERFORM public.lifecycle_claim('w1', 60);
END $$;
SELECT is((SELECT string_agg(coalesce(public.lifecycle_target_wait(i), '-') || '/' || i.status::text || '/'
                             || public.instance_nowhere(i)::text, ',' ORDER BY k)
             FROM public.instances i JOIN ids USING (id) WHERE k IN ('a', 'b')),
          'no_capacity/provisioning/true,-/stopped/true',
          'A waits for room; B, paused while it waited, is stopped; nothing of either exists anywhere');

-- C, D and E are subscribed again and wait for room too; each takes over its
-- names' kept data on DOKKU_PROVISIONER_URL, where its apps would be made.
INSERT INTO ids SELECT k || '2', (public.lifecycle_provision(s) #>> '{instance,id}')::uuid
  FROM (VALUES ('c', 'c3510000-0000-4000-8000-0000000000c1'::uuid),
               ('d', 'd3510000-0000-4000-8000-0000000000d1'::uuid),
               ('e', 'e3510000-0000-4000-8000-0000000000e1'::uuid)) v(k, s);
SELECT is((SELECT string_agg(coalesce(public.lifecycle_target_wait(i2), '-') || '/'
                             || public.instance_nowhere(i2)::text || '/'
                             || (i1.storage_taken_by = i2.id)::text, ',' ORDER BY ids.k)
             FROM ids JOIN public.instances i2 ON i2.id = ids.id
             JOIN public.instances i1 ON i1.subscription_id = i2.subscription_id AND i1.id <> i2.id
            WHERE ids.k IN ('c2', 'd2', 'e2')),
          'no_capacity/false/true,no_capacity/false/true,no_capacity/false/true',
          'C2, D2 and E2 wait for room, each holding its names'' kept data on DOKKU_PROVISIONER_URL');

-- C2 is paused while it waits (its row is written again, after C1's: the cascade
-- below reaches C1 first).
SELECT is((SELECT public.lifecycle_deprovision(pg_temp.id('c2'), NULL, 'stop', false) ->> 'outcome'), 'ok',
          'C2 is paused while it waits');

-- The accounts are erased: A and B go (one statement), C by the cascade, D's
-- destroyed row before its taker, E's taker before its destroyed row.
DELETE FROM public.subscriptions WHERE id IN ('a3510000-0000-4000-8000-0000000000a1',
                                              'b3510000-0000-4000-8000-0000000000b1',
                                              'c3510000-0000-4000-8000-0000000000c1');
DELETE FROM public.instances WHERE id = pg_temp.id('d1');
DELETE FROM public.instances WHERE id = pg_temp.id('d2');
DELETE FROM public.instances WHERE id = pg_temp.id('e2');
DELETE FROM public.instances WHERE id = pg_temp.id('e1');

SELECT is((SELECT count(*)::int FROM public.instance_teardowns t JOIN ids ON ids.id = t.instance_id
            WHERE ids.k IN ('a', 'b')),
          0, 'no teardown is recorded for instances that were never made anywhere');
SELECT is((SELECT count(*)::int FROM public.instance_teardowns_due(100) d JOIN ids ON ids.id = d.instance_id
            WHERE ids.k IN ('a', 'b')),
          0, 'and none is handed to the teardown job for DOKKU_PROVISIONER_URL');
SELECT is((SELECT string_agg(l.details ->> 'made', ',' ORDER BY ids.k)
             FROM public.audit_logs l JOIN ids ON ids.id = (l.details ->> 'instance_id')::uuid
            WHERE l.action = 'instance.teardown_skipped' AND ids.k IN ('a', 'b')),
          'false,false', 'their deletes are audited');
SELECT is(pg_temp.legacy_teardowns('c3510000-0000-4000-8000-0000000000c1'), 1,
          'the cascade leaves one teardown of C''s kept data on DOKKU_PROVISIONER_URL');
SELECT is(pg_temp.legacy_teardowns('d3510000-0000-4000-8000-0000000000d1'), 1,
          'D''s destroyed row deleted before its taker: one teardown of the data');
SELECT is(pg_temp.legacy_teardowns('e3510000-0000-4000-8000-0000000000e1'), 1,
          'E''s taker deleted before its destroyed row: one teardown of the data');
SELECT * FROM finish();
ROLLBACK;
