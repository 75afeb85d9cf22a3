-- 186_returning_customer_keeps_data.sql: a customer who subscribes again while its
-- cancelled instance's data is kept gets that instance's names, and with them its
-- data; never another account's, nor data that is to be purged, past its retention,
-- being destroyed or destroyed; the subscription's own kept data comes first.
BEGIN;
\ir _helpers.inc
SELECT plan(16);

INSERT INTO auth.users (id, email) VALUES
    ('18600000-0000-4000-8000-000000000001', 'returning@example.com'),
    ('18600000-0000-4000-8000-000000000002', 'other@example.com');
CREATE FUNCTION pg_temp.sub(p_id uuid, p_account uuid) RETURNS uuid LANGUAGE sql AS $$
    INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
    VALUES (p_id, p_account, 'price_starter', 'starter', 'active') RETURNING id $$;
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
-- Provisions a subscription; its instance's id under k.
CREATE FUNCTION pg_temp.provision(p_k text, p_sub uuid) RETURNS text LANGUAGE sql AS $$
    INSERT INTO ids SELECT p_k, (public.lifecycle_provision(p_sub) #>> '{instance,id}')::uuid;
    SELECT i.dokku_app_name FROM public.instances i JOIN ids ON ids.id = i.id WHERE ids.k = p_k $$;
-- Destroys k's instance as the worker does, its data kept 30 days.
CREATE FUNCTION pg_temp.destroyed(p_k text) RETURNS void LANGUAGE sql AS $$
    SELECT public.lifecycle_deprovision((SELECT id FROM ids WHERE k = p_k), NULL, 'destroy', false);
    UPDATE public.instances SET status = 'deprovisioning' WHERE id = (SELECT id FROM ids WHERE k = p_k);
    UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = clock_timestamp(),
           storage_destroy_after = now() + interval '30 days'
     WHERE id = (SELECT id FROM ids WHERE k = p_k) $$;
CREATE FUNCTION pg_temp.taken_by(p_k text) RETURNS uuid LANGUAGE sql AS $$
    SELECT storage_taken_by FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = p_k) $$;
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;

-- 1. Subscribe, cancel, subscribe again (a new Stripe subscription) -------------------
SELECT pg_temp.sub('186aaaaa-0000-4000-8000-000000000001', '18600000-0000-4000-8000-000000000001');
SELECT is(pg_temp.provision('first', '186aaaaa-0000-4000-8000-000000000001'), 'mindroom-186aaaaa0000',
          'the first subscription''s instance has its own names');
SELECT pg_temp.destroyed('first');
SELECT pg_temp.sub('186bbbbb-0000-4000-8000-000000000002', '18600000-0000-4000-8000-000000000001');
-- As the webhook inserts it: the names of instance_names(its subscription).
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status)
SELECT '186bbbbb-0000-4000-8000-000000000002', n.dokku_app_name, n.subdomain, 'provisioning', 'running'
  FROM public.instance_names('186bbbbb-0000-4000-8000-000000000002') n;
INSERT INTO ids SELECT 'second', id FROM public.instances
 WHERE subscription_id = '186bbbbb-0000-4000-8000-000000000002';
SELECT results_eq($$SELECT dokku_app_name, subdomain FROM public.instances WHERE id = pg_temp.id('second')$$,
                  $$VALUES ('mindroom-186aaaaa0000', 'm186aaaaa0000')$$,
                  'the new subscription''s instance takes the cancelled one''s names (its address)');
SELECT is(pg_temp.taken_by('first'), pg_temp.id('second'), 'and takes its kept data over');
SELECT is((SELECT count(*)::int FROM public.audit_logs WHERE action = 'instance.storage_taken'
            AND details ->> 'instance_id' = pg_temp.id('first')::text
            AND details ->> 'by' = pg_temp.id('second')::text), 1, 'audited');

-- 2. Another account's new subscription never takes it ------------------------------
SELECT pg_temp.destroyed('second');
SELECT pg_temp.sub('186ccccc-0000-4000-8000-000000000003', '18600000-0000-4000-8000-000000000002');
SELECT is(pg_temp.provision('other', '186ccccc-0000-4000-8000-000000000003'), 'mindroom-186ccccc0000',
          'another account''s subscription keeps its own names');
SELECT is(pg_temp.taken_by('second'), NULL, 'and the returning customer''s data stays kept');

-- 3. Not data to be purged, past its retention, being destroyed, or destroyed --------
UPDATE public.instances SET purge_requested = true WHERE id = pg_temp.id('second');
SELECT pg_temp.sub('186ddddd-0000-4000-8000-000000000004', '18600000-0000-4000-8000-000000000001');
SELECT is(pg_temp.provision('purged', '186ddddd-0000-4000-8000-000000000004'), 'mindroom-186ddddd0000',
          'data to be purged is not taken: the subscription''s own names');
SELECT pg_temp.destroyed('purged');
UPDATE public.instances SET storage_destroy_after = now() - interval '1 second' WHERE id = pg_temp.id('purged');
SELECT pg_temp.sub('186eeeee-0000-4000-8000-000000000005', '18600000-0000-4000-8000-000000000001');
SELECT is(pg_temp.provision('late', '186eeeee-0000-4000-8000-000000000005'), 'mindroom-186eeeee0000',
          'data past its retention is not taken');
SELECT pg_temp.destroyed('late');
UPDATE public.instances SET claimed_by = 'worker-1', claim_expires_at = now() + interval '1 minute'
 WHERE id = pg_temp.id('late');
SELECT pg_temp.sub('186fffff-0000-4000-8000-000000000006', '18600000-0000-4000-8000-000000000001');
SELECT is(pg_temp.provision('busy', '186fffff-0000-4000-8000-000000000006'), 'mindroom-186fffff0000',
          'data whose destruction holds a lease is not taken');
SELECT pg_temp.destroyed('busy');
UPDATE public.instances SET storage_destroyed_at = now() WHERE id = pg_temp.id('busy');
UPDATE public.instances SET claimed_by = NULL, claim_expires_at = NULL, storage_destroyed_at = now()
 WHERE id = pg_temp.id('late');
SELECT pg_temp.sub('18610000-0000-4000-8000-000000000007', '18600000-0000-4000-8000-000000000001');
SELECT is(pg_temp.provision('after', '18610000-0000-4000-8000-000000000007'), 'mindroom-186100000000',
          'destroyed data is not taken');
SELECT is((SELECT count(*)::int FROM public.instances WHERE storage_taken_by IS NOT NULL), 1,
          'none of those took anything');

-- 4. The newest kept data; the subscription's own first ------------------------------
UPDATE public.instances SET purge_requested = false WHERE id = pg_temp.id('second');
SELECT pg_temp.destroyed('after');      -- destroyed after 'second': the newest
SELECT pg_temp.sub('18620000-0000-4000-8000-000000000008', '18600000-0000-4000-8000-000000000001');
SELECT is(pg_temp.provision('newest', '18620000-0000-4000-8000-000000000008'), 'mindroom-186100000000',
          'of two kept, the newest destroyed is taken');
SELECT is(pg_temp.taken_by('second'), NULL, 'the older stays kept');
SELECT pg_temp.destroyed('newest');
-- 'second' (the first subscription's names) provisioned again as its own subscription:
-- its own kept data, not the newer one of 'newest'.
UPDATE public.instances SET storage_taken_by = NULL WHERE id = pg_temp.id('after');
SELECT is(pg_temp.provision('again', '186bbbbb-0000-4000-8000-000000000002'), 'mindroom-186aaaaa0000',
          'the same subscription provisioned again takes its own kept data first');
SELECT is(pg_temp.taken_by('second'), pg_temp.id('again'), 'taken over');

-- 5. Names in use by a live instance are never taken ---------------------------------
SELECT pg_temp.sub('18630000-0000-4000-8000-000000000009', '18600000-0000-4000-8000-000000000001');
SELECT isnt(pg_temp.provision('live', '18630000-0000-4000-8000-000000000009'), 'mindroom-186aaaaa0000',
            'a live instance''s names are not taken');
SELECT * FROM finish();
ROLLBACK;
