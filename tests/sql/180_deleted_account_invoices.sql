-- 180_deleted_account_invoices.sql: an invoice of a deleted account's customer is
-- recorded at once on no account, naming its customer; one of a customer not known at
-- all is still deferred; our customer's is on its account, naming its customer.
BEGIN;
\ir _helpers.inc
SELECT plan(7);

INSERT INTO auth.users (id, email) VALUES
    ('18000000-0000-4000-8000-000000000001', 'leaving@example.com'),
    ('18000000-0000-4000-8000-000000000002', 'staying@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_180_gone'
 WHERE id = '18000000-0000-4000-8000-000000000001';
UPDATE public.accounts SET stripe_customer_id = 'cus_180_here'
 WHERE id = '18000000-0000-4000-8000-000000000002';
DELETE FROM auth.users WHERE id = '18000000-0000-4000-8000-000000000001';

CREATE FUNCTION pg_temp.invoice(p_id text, p_type text, p_customer text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.stripe_event(p_id, p_type, jsonb_build_object(
        'id', 'in_' || p_id, 'object', 'invoice', 'customer', p_customer, 'subscription', 'sub_180',
        'amount_due', 900, 'amount_paid', 0, 'currency', 'eur', 'attempt_count', 2, 'status', 'open'))
$$;
CREATE FUNCTION pg_temp.apply(p_id text, p_event text) RETURNS text LANGUAGE sql AS $$
    SELECT public.process_stripe_event(p_id, p_event) ->> 'result'
$$;

SELECT pg_temp.become('service_role');
SELECT is(pg_temp.apply('evt_i1', pg_temp.invoice('evt_i1', 'invoice.payment_failed', 'cus_180_gone')),
          'processed', 'a deleted account''s invoice is recorded, not deferred');
SELECT results_eq($$SELECT account_id, action, details ->> 'customer' FROM public.audit_logs
                     WHERE details ->> 'event_id' = 'evt_i1'$$,
                  $$VALUES (NULL::uuid, 'stripe.invoice.payment_failed', 'cus_180_gone')$$,
                  'on no account, naming its customer');
SELECT is((SELECT status FROM public.stripe_events WHERE id = 'evt_i1'), 'processed',
          'the event is settled (Stripe is answered 200)');
SELECT is(pg_temp.apply('evt_i2', pg_temp.invoice('evt_i2', 'invoice.paid', 'cus_180_unknown')),
          'deferred', 'an unknown customer''s invoice is still deferred (its link may be on its way)');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE details ->> 'event_id' = 'evt_i2'), 0::bigint,
          'and writes no row');
SELECT is(pg_temp.apply('evt_i3', pg_temp.invoice('evt_i3', 'invoice.paid', 'cus_180_here')),
          'processed', 'our customer''s invoice is applied');
SELECT results_eq($$SELECT account_id, details ->> 'customer' FROM public.audit_logs
                     WHERE details ->> 'event_id' = 'evt_i3'$$,
                  $$VALUES ('18000000-0000-4000-8000-000000000002'::uuid, 'cus_180_here')$$,
                  'on its account, naming its customer');
SELECT * FROM finish();
ROLLBACK;
