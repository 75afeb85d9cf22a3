-- 179_kept_storage_one_subscription.sql: a subscription whose id shares the first 12
-- digits of another's gets no instance over that one's kept data: neither the data
-- taken over nor its names made again while it is kept; the same subscription still
-- takes its own kept data over.
BEGIN;
\ir _helpers.inc
SELECT plan(7);

INSERT INTO auth.users (id, email) VALUES
    ('17900000-0000-4000-8000-000000000001', 'first@example.com'),
    ('17900000-0000-4000-8000-000000000002', 'second@example.com');
-- Two accounts' subscriptions whose ids share their first 12 digits: one set of names.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('17901234-5678-4000-8000-0000000000a1', '17900000-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active'),
    ('17901234-5678-4000-8000-0000000000b2', '17900000-0000-4000-8000-000000000002',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
INSERT INTO ids SELECT 'first', (public.lifecycle_provision('17901234-5678-4000-8000-0000000000a1')
                                 #>> '{instance,id}')::uuid;
-- The first customer's instance destroyed, its data kept 30 days.
SELECT public.lifecycle_deprovision((SELECT id FROM ids WHERE k = 'first'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = (SELECT id FROM ids WHERE k = 'first');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days'
 WHERE id = (SELECT id FROM ids WHERE k = 'first');

SELECT is(public.lifecycle_provision('17901234-5678-4000-8000-0000000000b2') ->> 'outcome', 'conflict',
          'provision-instance: the second subscription''s names hold the first''s kept data');
SELECT throws_ok($$INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain)
                   SELECT '17901234-5678-4000-8000-0000000000b2', n.dokku_app_name, n.subdomain
                     FROM public.instance_names('17901234-5678-4000-8000-0000000000b2') n$$,
                 '23505', 'the instance names mindroom-179012345678 hold the kept data of another subscription',
                 'the webhook''s insert is refused the same way');
SELECT is((SELECT count(*) FROM public.instances
            WHERE subscription_id = '17901234-5678-4000-8000-0000000000b2'), 0::bigint,
          'the second subscription has no instance');
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'first')),
          NULL, 'the first customer''s data is not taken over');

-- The first subscription provisioned again takes its own data over.
INSERT INTO ids SELECT 'again', (public.lifecycle_provision('17901234-5678-4000-8000-0000000000a1')
                                 #>> '{instance,id}')::uuid;
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'first')),
          (SELECT id FROM ids WHERE k = 'again'), 'the same subscription takes its kept data over');

-- Once that data is destroyed, nothing of the first customer's is left under the
-- names: the second subscription's instance is made (once the first's live one is gone).
UPDATE public.instances SET storage_taken_by = NULL, storage_destroyed_at = now()
 WHERE id = (SELECT id FROM ids WHERE k = 'first');
DELETE FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'again');
SELECT is(public.lifecycle_provision('17901234-5678-4000-8000-0000000000b2') ->> 'outcome', 'ok',
          'the second subscription gets its instance once no data of the first is kept');
SELECT is((SELECT count(*) FROM public.instances
            WHERE subscription_id = '17901234-5678-4000-8000-0000000000b2'), 1::bigint,
          'made');
SELECT * FROM finish();
ROLLBACK;
