-- 202_deleted_account_invoice_cancels.sql (202_resubscribed_while_removed.sql,
-- stripe_handle_event's invoice branch): a subscription whose first event failed (a
-- price the catalogue lacks) has no row, so deleting the account did not cancel it at
-- Stripe; its next invoice, of the deleted account's customer, records its
-- cancellation, once, and is still settled on no account. An invoice of a subscription
-- the deletion already cancelled adds nothing.
BEGIN;
\ir _helpers.inc
SELECT plan(6);

INSERT INTO auth.users (id, email) VALUES ('20600000-0000-4000-8000-000000000001', 'gone206@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_206'
 WHERE id = '20600000-0000-4000-8000-000000000001';
CREATE FUNCTION pg_temp.invoice(p_id text, p_type text, p_sub text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.stripe_event(p_id, p_type, jsonb_build_object(
        'id', 'in_' || p_id, 'object', 'invoice', 'customer', 'cus_206',
        'parent', jsonb_build_object('subscription_details', jsonb_build_object('subscription', p_sub)),
        'amount_due', 900, 'amount_paid', 900, 'currency', 'eur', 'attempt_count', 1, 'status', 'paid'))
$$;

SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_206_1', pg_temp.stripe_event('evt_206_1', 'customer.subscription.created',
              '{"id": "sub_206", "object": "subscription", "customer": "cus_206", "status": "active",
                "items": {"data": [{"price": {"id": "price_not_in_catalogue"}}]}, "metadata": {}}'::jsonb,
              1760000000)) ->> 'result',
          'failed', 'the subscription''s first event fails: no row for it');
SELECT pg_temp.unbecome();
DELETE FROM auth.users WHERE id = '20600000-0000-4000-8000-000000000001';
SELECT is((SELECT count(*)::int FROM public.stripe_cancellations WHERE stripe_customer_id = 'cus_206'), 0,
          'the deletion cancels nothing it has no row for');

SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_206_2', pg_temp.invoice('evt_206_2', 'invoice.paid', 'sub_206')) ->> 'result',
          'processed', 'the next period''s invoice is settled');
SELECT is(public.process_stripe_event('evt_206_3', pg_temp.invoice('evt_206_3', 'invoice.payment_failed', 'sub_206')) ->> 'result',
          'processed', 'and so is a later one');
SELECT pg_temp.unbecome();
SELECT results_eq($$SELECT stripe_subscription_id, stripe_customer_id, account_id, status::text
                      FROM public.stripe_cancellations WHERE stripe_customer_id = 'cus_206'$$,
                  $$VALUES ('sub_206', 'cus_206', '20600000-0000-4000-8000-000000000001'::uuid, 'active')$$,
                  'its subscription is to be cancelled at Stripe, once');
SELECT is((SELECT account_id FROM public.audit_logs WHERE details ->> 'event_id' = 'evt_206_2'), NULL::uuid,
          'the invoice is recorded on no account');

SELECT * FROM finish();
ROLLBACK;
