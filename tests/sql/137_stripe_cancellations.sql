-- 137_stripe_cancellations.sql (137_stripe_cancellations.sql): deleting an account
-- records, in the same transaction, the cancellation at Stripe of each of its
-- subscriptions Stripe still has live (once each, with the customer); the
-- worker's job takes the due ones and records each outcome, a failure with backoff.
-- Only service_role can see or work the table.
BEGIN;
\ir _helpers.inc
SELECT plan(22);

-- An account linked to a customer, with one subscription in each kind of state.
INSERT INTO auth.users (id, email) VALUES
    ('c1370000-0000-4000-8000-000000000001', 'leaving@example.com'),
    ('c1370000-0000-4000-8000-000000000002', 'staying@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_leaving' WHERE id = 'c1370000-0000-4000-8000-000000000001';
UPDATE public.accounts SET stripe_customer_id = 'cus_staying' WHERE id = 'c1370000-0000-4000-8000-000000000002';
INSERT INTO public.subscriptions (id, account_id, stripe_subscription_id, stripe_price_id, tier, status) VALUES
    ('c1370000-0000-4000-8000-0000000000a1', 'c1370000-0000-4000-8000-000000000001', 'sub_c137_active', 'price_starter', 'starter', 'active'),
    ('c1370000-0000-4000-8000-0000000000a2', 'c1370000-0000-4000-8000-000000000001', 'sub_c137_pastdue', 'price_starter', 'starter', 'past_due'),
    ('c1370000-0000-4000-8000-0000000000a3', 'c1370000-0000-4000-8000-000000000001', 'sub_c137_cancelled', 'price_starter', 'starter', 'cancelled'),
    ('c1370000-0000-4000-8000-0000000000a4', 'c1370000-0000-4000-8000-000000000001', 'sub_c137_expired', 'price_starter', 'starter', 'incomplete_expired'),
    ('c1370000-0000-4000-8000-0000000000a5', 'c1370000-0000-4000-8000-000000000001', NULL, 'price_free', 'free', 'active'),
    ('c1370000-0000-4000-8000-0000000000b1', 'c1370000-0000-4000-8000-000000000002', 'sub_c137_alone', 'price_starter', 'starter', 'trialing');

-- Nothing is owed while the rows live.
SELECT is((SELECT count(*) FROM public.stripe_cancellations WHERE stripe_subscription_id LIKE 'sub_c137%'),
          0::bigint, 'no cancellation is owed while the subscriptions exist');

-- The account is deleted as Supabase Auth does it (the cascade).
DELETE FROM auth.users WHERE id = 'c1370000-0000-4000-8000-000000000001';
SELECT set_eq($$SELECT stripe_subscription_id, account_id, stripe_customer_id, status::text
                FROM public.stripe_cancellations WHERE stripe_subscription_id LIKE 'sub_c137%'$$,
              $$VALUES ('sub_c137_active', 'c1370000-0000-4000-8000-000000000001'::uuid, 'cus_leaving', 'active'),
                       ('sub_c137_pastdue', 'c1370000-0000-4000-8000-000000000001'::uuid, 'cus_leaving', 'past_due')$$,
              'deleting the account owes the cancellation of its live Stripe subscriptions only, with its customer');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.cancellation_requested'
             AND details ->> 'account_id' = 'c1370000-0000-4000-8000-000000000001'),
          2::bigint, 'each is audited once (the account''s and the subscriptions'' triggers both saw them)');
SELECT is((SELECT count(*) FROM public.stripe_cancellations_due(100) d
            WHERE d.stripe_subscription_id LIKE 'sub_c137%'), 2::bigint, 'both are due at once');

-- A subscription row deleted on its own, by service_role (which cannot write the table).
SELECT is(pg_temp.run('service_role', $$DELETE FROM public.subscriptions
                                        WHERE id = 'c1370000-0000-4000-8000-0000000000b1'$$),
          'ok:1', 'service_role deletes a subscription row');
SELECT is((SELECT stripe_customer_id || '/' || status FROM public.stripe_cancellations
            WHERE stripe_subscription_id = 'sub_c137_alone'),
          'cus_staying/trialing', 'a live subscription deleted alone is owed too, with its customer');

-- The job's calls: a failure is retried after a backoff that doubles, up to the cap.
SELECT ok(public.stripe_cancellation_finish('sub_c137_active', NULL, 'Stripe /v1/subscriptions/sub_c137_active: 500', 30, 100),
          'a failure is recorded');
SELECT is((SELECT attempts || '/' || last_error FROM public.stripe_cancellations WHERE stripe_subscription_id = 'sub_c137_active'),
          '1/Stripe /v1/subscriptions/sub_c137_active: 500', 'with its attempt and error');
SELECT ok((SELECT not_before BETWEEN now() + interval '29 seconds' AND now() + interval '31 seconds'
             FROM public.stripe_cancellations WHERE stripe_subscription_id = 'sub_c137_active'),
          'first retry after the base backoff');
SELECT is((SELECT count(*) FROM public.stripe_cancellations_due(100) d WHERE d.stripe_subscription_id = 'sub_c137_active'),
          0::bigint, 'not due before then');
UPDATE public.stripe_cancellations SET not_before = now() WHERE stripe_subscription_id = 'sub_c137_active';
SELECT ok(public.stripe_cancellation_finish('sub_c137_active', NULL, 'again', 30, 100), 'a second failure');
SELECT ok((SELECT not_before BETWEEN now() + interval '59 seconds' AND now() + interval '61 seconds'
             FROM public.stripe_cancellations WHERE stripe_subscription_id = 'sub_c137_active'),
          'the backoff doubles');
UPDATE public.stripe_cancellations SET not_before = now() WHERE stripe_subscription_id = 'sub_c137_active';
SELECT public.stripe_cancellation_finish('sub_c137_active', NULL, 'and again', 30, 100);
SELECT ok((SELECT not_before BETWEEN now() + interval '99 seconds' AND now() + interval '101 seconds'
             FROM public.stripe_cancellations WHERE stripe_subscription_id = 'sub_c137_active'),
          'up to the cap');

-- Done: cancelled by Stripe, or Stripe no longer has it.
UPDATE public.stripe_cancellations SET not_before = now() WHERE stripe_subscription_id = 'sub_c137_active';
SELECT ok(public.stripe_cancellation_finish('sub_c137_active', 'cancelled', NULL, 30, 100), 'a cancellation is recorded');
SELECT ok(public.stripe_cancellation_finish('sub_c137_pastdue', 'not_found', NULL, 30, 100), 'so is a subscription Stripe no longer has');
SELECT set_eq($$SELECT stripe_subscription_id, outcome, attempts, last_error FROM public.stripe_cancellations
                WHERE stripe_subscription_id IN ('sub_c137_active', 'sub_c137_pastdue') AND done_at IS NOT NULL$$,
              $$VALUES ('sub_c137_active', 'cancelled', 4, NULL::text), ('sub_c137_pastdue', 'not_found', 1, NULL)$$,
              'both are done, with their outcome and attempts');
SELECT is((SELECT count(*) FROM public.stripe_cancellations_due(100) d
            WHERE d.stripe_subscription_id IN ('sub_c137_active', 'sub_c137_pastdue')),
          0::bigint, 'and no longer due');
SELECT ok(NOT public.stripe_cancellation_finish('sub_c137_active', 'cancelled', NULL, 30, 100),
          'a second outcome for a done cancellation changes nothing');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.subscription_cancelled'
             AND details ->> 'stripe_subscription_id' IN ('sub_c137_active', 'sub_c137_pastdue')),
          2::bigint, 'each cancellation is audited once');

-- Grants: service_role only.
SELECT is(ARRAY[pg_temp.cell('anon', 'SELECT * FROM public.stripe_cancellations'),
                pg_temp.cell('c1370000-0000-4000-8000-000000000002', 'SELECT * FROM public.stripe_cancellations'),
                pg_temp.cell('c1370000-0000-4000-8000-000000000002', 'SELECT * FROM public.stripe_cancellations_due(10)'),
                pg_temp.cell('anon', $$SELECT public.stripe_cancellation_finish('sub_c137_alone', 'cancelled', NULL, 1, 1)$$)],
          ARRAY['err:42501', 'err:42501', 'err:42501', 'err:42501'],
          'anon and authenticated can neither read the table nor call its functions');
SELECT is(ARRAY[pg_temp.cell('service_role', $$SELECT * FROM public.stripe_cancellations WHERE stripe_subscription_id = 'sub_c137_alone'$$),
                pg_temp.cell('service_role', $$INSERT INTO public.stripe_cancellations (stripe_subscription_id, status) VALUES ('sub_x', 'active')$$)],
          ARRAY['ok:1', 'err:42501'],
          'service_role reads it; only the delete triggers write new rows');
SELECT ok((SELECT relrowsecurity FROM pg_class WHERE oid = 'public.stripe_cancellations'::regclass),
          'row level security is enabled');

SELECT * FROM finish();
ROLLBACK;
