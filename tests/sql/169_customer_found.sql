-- 169_customer_found.sql: a customer Stripe may have made for a customer attempt that
-- was closed without one is looked for before another is made
-- (billing_customer_unsure), and one found is linked to the account as a made one
-- would be (billing_customer_found): only to an account without a customer, its
-- pending customer attempts given up, audited.
BEGIN;
SELECT plan(16);
\ir _helpers.inc

INSERT INTO auth.users (id, aud, role, email)
VALUES ('16900000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'found@example.com'),
       ('16900000-0000-4000-8000-000000000002', 'authenticated', 'authenticated', 'linked@example.com');
CREATE FUNCTION pg_temp.attempt(p_n int, p_status text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint, status)
    VALUES ('16900000-0000-4000-8000-000000000001', 'customer', 'mindroom-customer-t' || p_n,
            repeat(p_n::text, 64), p_status)
$$;
CREATE FUNCTION pg_temp.unsure() RETURNS boolean LANGUAGE sql AS $$
    SELECT public.billing_customer_unsure('16900000-0000-4000-8000-000000000001')
$$;

SELECT is(pg_temp.unsure(), false, 'no attempt: nothing to look for');
SELECT pg_temp.attempt(1, 'pending');
SELECT is(pg_temp.unsure(), false, 'a pending attempt is resumed with its own key, not looked for');
SELECT pg_temp.attempt(2, 'failed');
SELECT is(pg_temp.unsure(), true, 'a failed one (a 500 Stripe kept for its key) may have made one');
UPDATE public.billing_attempts SET status = 'abandoned' WHERE idempotency_key = 'mindroom-customer-t2';
SELECT is(pg_temp.unsure(), true, 'so may one given up');
SELECT is(public.billing_customer_unsure('16900000-0000-4000-8000-000000000002'), false,
          'another account''s attempts are not this one''s');

SELECT is(pg_temp.cell('anon', $$SELECT public.billing_customer_found('16900000-0000-4000-8000-000000000001', 'cus_F1', false)$$),
          'err:42501', 'anon cannot record a customer');
SELECT is(pg_temp.cell('16900000-0000-4000-8000-000000000001',
                       $$SELECT public.billing_customer_unsure('16900000-0000-4000-8000-000000000001')$$),
          'err:42501', 'nor can the account''s own user ask');
SELECT throws_ok($$SELECT public.billing_customer_found('16900000-0000-4000-8000-000000000001', 'cs_not_a_customer', false)$$,
                 '22023', NULL, 'only a customer id is recorded');

SELECT is(pg_temp.cell('service_role', $$SELECT public.billing_customer_found('16900000-0000-4000-8000-000000000001', 'cus_F1', false)$$),
          'ok:1', 'the service role records it');
SELECT is(public.billing_customer_found('16900000-0000-4000-8000-000000000001', 'cus_F1', false), 'cus_F1',
          'the customer found is the account''s');
SELECT is((SELECT stripe_customer_id FROM public.accounts WHERE id = '16900000-0000-4000-8000-000000000001'),
          'cus_F1', 'linked');
SELECT results_eq($$SELECT left(idempotency_key, 24), status, calls, object_id FROM public.billing_attempts
                     WHERE account_id = '16900000-0000-4000-8000-000000000001' ORDER BY idempotency_key$$,
                  $$VALUES ('mindroom-customer-found-', 'succeeded', 0, 'cus_F1'),
                           ('mindroom-customer-t1', 'abandoned', 1, NULL), ('mindroom-customer-t2', 'abandoned', 1, NULL)$$,
                  'its pending attempt is given up (its key is never sent again); the customer is recorded ours, never sent');
UPDATE public.accounts SET stripe_customer_id = NULL WHERE id = '16900000-0000-4000-8000-000000000001';
SELECT is(public.stripe_account_for('cus_F1', NULL), '16900000-0000-4000-8000-000000000001'::uuid,
          'unlinked, the record still names the account for that customer''s events');
SELECT is((SELECT stripe_customer_id FROM public.accounts WHERE id = '16900000-0000-4000-8000-000000000001'),
          'cus_F1', 'and links it again');
SELECT results_eq($$SELECT details FROM public.audit_logs
                     WHERE account_id = '16900000-0000-4000-8000-000000000001' AND action = 'billing.customer_found'$$,
                  $$VALUES ('{"object_id": "cus_F1", "livemode": false}'::jsonb)$$, 'audited once');
UPDATE public.accounts SET stripe_customer_id = 'cus_L2' WHERE id = '16900000-0000-4000-8000-000000000002';
SELECT is(public.billing_customer_found('16900000-0000-4000-8000-000000000002', 'cus_F2', false), 'cus_L2',
          'an account with a customer keeps it');

SELECT * FROM finish();
ROLLBACK;
