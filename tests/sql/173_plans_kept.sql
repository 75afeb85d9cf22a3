-- 173_plans_kept.sql: stripe_deleted_account and lifecycle_step_json, rewritten so
-- that PostgreSQL keeps their plans, give the answers they gave
-- (173_plans_kept.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(10);

-- Three deleted accounts: one whose customer was deleted twice (two accounts, the
-- newer deleted last), and one without a customer.
INSERT INTO public.deleted_account_customers (account_id, stripe_customer_id, deleted_at) VALUES
    ('17300000-0000-4000-8000-00000000000a', 'cus_c173twice', now() - interval '2 days'),
    ('17300000-0000-4000-8000-00000000000b', 'cus_c173twice', now() - interval '1 day'),
    ('17300000-0000-4000-8000-00000000000c', NULL, now() - interval '3 days');

SELECT is(public.stripe_deleted_account('cus_c173twice', NULL),
          '17300000-0000-4000-8000-00000000000b'::uuid,
          'a deleted customer names the account deleted last');
SELECT is(public.stripe_deleted_account('cus_c173twice', '17300000-0000-4000-8000-00000000000c'),
          '17300000-0000-4000-8000-00000000000b'::uuid,
          'the customer''s deleted account comes before the one the claim names');
SELECT is(public.stripe_deleted_account('cus_c173new', '17300000-0000-4000-8000-00000000000C'),
          '17300000-0000-4000-8000-00000000000c'::uuid,
          'a customer that is no deleted account''s: the claim''s (any case)');
SELECT is(public.stripe_deleted_account('cus_c173new', NULL), NULL, 'neither: none');
SELECT is(public.stripe_deleted_account('cus_c173new', 'not-a-uuid'), NULL,
          'a claim that is no account id names none');
SELECT is(public.stripe_deleted_account('cus_c173new', '17300000-0000-4000-8000-0000000000ff'), NULL,
          'a claim of an account never deleted names none');

-- The customer is a live account's again: it is no deleted account's customer.
INSERT INTO auth.users (id, email) VALUES ('17300000-0000-4000-8000-000000000001', 'live173@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_c173twice'
 WHERE id = '17300000-0000-4000-8000-000000000001';
SELECT is(public.stripe_deleted_account('cus_c173twice', '17300000-0000-4000-8000-00000000000c'), NULL,
          'a customer a live account has names no deleted account, whatever the claim');

-- lifecycle_step_json: a create of an instance that took no storage over names no
-- predecessor and no server name; one that took over a destroyed instance's storage
-- names that instance, its keys and its server name.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('173000a' || n || '-0000-4000-8000-000000000000')::uuid, '17300000-0000-4000-8000-000000000001',
       'price_starter', 'starter', 'active'
  FROM generate_series(1, 2) n;
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status)
SELECT '173000a1-0000-4000-8000-000000000000', x.dokku_app_name, x.subdomain, 'provisioning', 'running'
  FROM public.instance_names('173000a1-0000-4000-8000-000000000000') x;
-- A destroyed instance of subscription 2 with its storage kept, then a new one on it.
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                              provisioned_at, deprovisioned_at, storage_destroy_after,
                              matrix_server_name)
SELECT '173000a2-0000-4000-8000-000000000000', x.dokku_app_name, x.subdomain, 'deprovisioned',
       'deprovisioned', now() - interval '30 days', now() - interval '1 day',
       now() + interval '29 days', 'kept173.example.com'
  FROM public.instance_names('173000a2-0000-4000-8000-000000000000') x;
INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
SELECT i.id, 'homeserver', 'signing_key', 'mrs1:kept173', 'mrd1:kept173'
  FROM public.instances i WHERE i.subscription_id = '173000a2-0000-4000-8000-000000000000';
INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status)
SELECT '173000a2-0000-4000-8000-000000000000', x.dokku_app_name, x.subdomain, 'provisioning', 'running'
  FROM public.instance_names('173000a2-0000-4000-8000-000000000000') x;
UPDATE public.instances SET claimed_by = 'c173/test', claim_expires_at = now() + interval '1 minute',
       claim_action = 'create'
 WHERE subscription_id IN ('173000a1-0000-4000-8000-000000000000', '173000a2-0000-4000-8000-000000000000')
   AND status = 'provisioning';
CREATE FUNCTION pg_temp.step(n integer) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_step_json(i) FROM public.instances i
     WHERE i.subscription_id = ('173000a' || n || '-0000-4000-8000-000000000000')::uuid
       AND i.status = 'provisioning' $$;

SELECT ok(pg_temp.step(1) -> 'predecessor' = 'null'::jsonb
          AND NOT (pg_temp.step(1) #> '{payload,homeserver}') ? 'server_name',
          'an instance that took no storage over: no predecessor, no server name');
SELECT is(pg_temp.step(2) #>> '{payload,homeserver,server_name}', 'kept173.example.com',
          'one that took storage over: the homeserver''s name found there');
SELECT is(pg_temp.step(2) #>> '{predecessor,homeserver,signing_key}', 'mrs1:kept173',
          'and its keys');

SELECT * FROM finish();
ROLLBACK;
