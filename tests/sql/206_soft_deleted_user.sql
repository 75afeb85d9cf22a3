-- 206_soft_deleted_user.sql: a user Supabase Auth deletes softly (the admin API's
-- should_soft_delete: one UPDATE sets deleted_at and obfuscates the email) loses its
-- account as a deleted user does: its live subscription's cancellation at Stripe is
-- owed, its instance's teardown recorded, its customer kept; the obfuscated email
-- makes no account. Other updates of a user, and of a user already deleted, end
-- nothing.
BEGIN;
\ir _helpers.inc
SELECT plan(10);

-- Supabase's auth.users has deleted_at; plain PostgreSQL's minimal one (000) has not
-- (added here, in this transaction only).
ALTER TABLE auth.users ADD COLUMN IF NOT EXISTS deleted_at timestamptz;

INSERT INTO auth.users (id, email) VALUES
    ('c2060000-0000-4000-8000-000000000001', 'leaving@example.com'),
    ('c2060000-0000-4000-8000-000000000002', 'staying@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_c206leaving'
 WHERE id = 'c2060000-0000-4000-8000-000000000001';
INSERT INTO public.subscriptions (id, account_id, stripe_subscription_id, stripe_price_id, tier, status) VALUES
    ('c206a000-0000-4000-8000-000000000001', 'c2060000-0000-4000-8000-000000000001', 'sub_c206_leaving',
     'price_starter', 'starter', 'active'),
    ('c206b000-0000-4000-8000-000000000001', 'c2060000-0000-4000-8000-000000000002', 'sub_c206_staying',
     'price_starter', 'starter', 'active');
SELECT public.lifecycle_provision(id) FROM public.subscriptions
 WHERE id IN ('c206a000-0000-4000-8000-000000000001', 'c206b000-0000-4000-8000-000000000001');
UPDATE public.instances SET status = 'running', provisioned_at = now()
 WHERE subscription_id IN ('c206a000-0000-4000-8000-000000000001', 'c206b000-0000-4000-8000-000000000001');
CREATE TEMP TABLE leaving AS
SELECT id, dokku_app_name FROM public.instances WHERE subscription_id = 'c206a000-0000-4000-8000-000000000001';

-- What the account of a user who signs in again, or changes a name, goes through.
UPDATE auth.users SET raw_user_meta_data = '{"full_name": "Stays"}', updated_at = now()
 WHERE id IN ('c2060000-0000-4000-8000-000000000001', 'c2060000-0000-4000-8000-000000000002');
SELECT is((SELECT count(*) FROM public.accounts WHERE id::text LIKE 'c2060000%'), 2::bigint,
          'an update of a user that does not delete it ends no account');

-- The soft delete, as Supabase Auth's SoftDeleteUser writes it: one UPDATE.
UPDATE auth.users SET email = encode(sha256('leaving@example.com'::bytea), 'hex') || '@example.invalid',
       deleted_at = now()
 WHERE id = 'c2060000-0000-4000-8000-000000000001';
SELECT is((SELECT count(*) FROM public.accounts WHERE id = 'c2060000-0000-4000-8000-000000000001'), 0::bigint,
          'a soft-deleted user has no account any more');
SELECT is((SELECT count(*) FROM auth.users WHERE id = 'c2060000-0000-4000-8000-000000000001'), 1::bigint,
          'while its user row stays, as Supabase Auth keeps it');
SELECT is((SELECT stripe_customer_id || '/' || status FROM public.stripe_cancellations
            WHERE stripe_subscription_id = 'sub_c206_leaving'),
          'cus_c206leaving/active', 'its live subscription''s cancellation at Stripe is owed, with its customer');
SELECT is((SELECT dokku_app_name FROM public.instance_teardowns WHERE instance_id = (SELECT id FROM leaving)),
          (SELECT dokku_app_name FROM leaving), 'its instance''s apps and data are to be torn down');
SELECT is((SELECT stripe_customer_id FROM public.deleted_account_customers
            WHERE account_id = 'c2060000-0000-4000-8000-000000000001'),
          'cus_c206leaving', 'its customer is kept, for a subscription Stripe makes for it later');

-- Supabase Auth then clears the metadata (another UPDATE); an operator may touch the row.
UPDATE auth.users SET raw_user_meta_data = '{}', email = 'other@example.com'
 WHERE id = 'c2060000-0000-4000-8000-000000000001';
SELECT is((SELECT count(*) FROM public.accounts WHERE id = 'c2060000-0000-4000-8000-000000000001'), 0::bigint,
          'a later update of the deleted user, its email included, makes no account again');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.cancellation_requested'
             AND details ->> 'account_id' = 'c2060000-0000-4000-8000-000000000001'),
          1::bigint, 'the cancellation was asked for once');

-- The other user, and its instance, are untouched.
SELECT is((SELECT email FROM public.accounts WHERE id = 'c2060000-0000-4000-8000-000000000002'),
          'staying@example.com', 'another user keeps its account');
SELECT is((SELECT status::text || '/' || desired_status::text FROM public.instances
            WHERE subscription_id = 'c206b000-0000-4000-8000-000000000001'),
          'running/running', 'and its instance');

SELECT * FROM finish();
ROLLBACK;
