-- 124_kept_storage_taken.sql: an instance re-created under its subscription's names
-- takes over the destroyed one's kept storage, and the old row no longer owes its
-- destruction: the shared entries go on the new instance's clock
-- (124_kept_storage_taken.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(6);

INSERT INTO auth.users (id, email) VALUES ('96000000-0000-4000-8000-000000000001', 'kept@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('96000000-0000-4000-8000-0000000000a1', '96000000-0000-4000-8000-000000000001',
     'price_starter', 'starter', 'active');
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
INSERT INTO ids SELECT 'i1', (public.lifecycle_provision('96000000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
-- I1 destroyed (operator deprovision --mode destroy); storage kept 30 days, 1 day left.
SELECT public.lifecycle_deprovision((SELECT id FROM ids WHERE k = 'i1'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = (SELECT id FROM ids WHERE k = 'i1');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '1 day' WHERE id = (SELECT id FROM ids WHERE k = 'i1');
-- Provisioned again: I2, same app name, mounts the kept entries.
INSERT INTO ids SELECT 'i2', (public.lifecycle_provision('96000000-0000-4000-8000-0000000000a1') #>> '{instance,id}')::uuid;
SELECT is((SELECT count(DISTINCT dokku_app_name) FROM public.instances
            WHERE subscription_id = '96000000-0000-4000-8000-0000000000a1'), 1::bigint,
          'I1 and I2 share one app name, so one pair of storage entries');
-- I2 destroyed now (the customer cancels): its data is to be kept 30 days.
SELECT public.lifecycle_deprovision((SELECT id FROM ids WHERE k = 'i2'), NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = (SELECT id FROM ids WHERE k = 'i2');
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE id = (SELECT id FROM ids WHERE k = 'i2');
SELECT is((SELECT owed_action::text FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'i2')),
          'destroy_storage', 'I2 owes destroy_storage in 30 days');
SELECT is((SELECT owed_action::text FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'i1')),
          NULL, 'I1 no longer owes a storage destruction: its entries are I2''s now');
SELECT ok((SELECT min(owed_due_at) FROM public.instances
            WHERE subscription_id = '96000000-0000-4000-8000-0000000000a1'
              AND owed_action = 'destroy_storage') > now() + interval '29 days',
          'the shared entries are not due for destruction before I2''s retention ends');
SELECT is((SELECT storage_taken_by FROM public.instances WHERE id = (SELECT id FROM ids WHERE k = 'i1')),
          (SELECT id FROM ids WHERE k = 'i2'), 'I1 records who took its storage');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'instance.storage_taken'
            AND details ->> 'instance_id' = (SELECT id::text FROM ids WHERE k = 'i1')), 1::bigint,
          'audited once');
SELECT * FROM finish();
ROLLBACK;
