-- 129_customer_deleted_completed.sql: a checkout found paid (recorded 'completed')
-- whose customer is then deleted in Stripe. The subscription went with the customer; customer.deleted
-- abandons the deleted customer's sessions so that the next checkout does not answer
-- 409 checkout_completed for it (docs/billing.md step 3, docs/webhook.md).
BEGIN;
\ir _helpers.inc
SELECT plan(2);

INSERT INTO auth.users (id, email) VALUES ('12910000-0000-4000-8000-000000000001', 'paidgone@example.com');
SELECT pg_temp.become('service_role');
SELECT public.billing_attempt_succeeded(
           (public.billing_attempt_begin('12910000-0000-4000-8000-000000000001', 'customer', repeat('c', 64))
            ->> 'attempt_id')::uuid, 'cus_paidgone', NULL, NULL, false);
SELECT public.billing_attempt_succeeded(
           (public.billing_attempt_begin('12910000-0000-4000-8000-000000000001', 'checkout', repeat('d', 64))
            ->> 'attempt_id')::uuid, 'cs_paidgone', 'https://checkout.stripe.test/cs_paidgone',
           extract(epoch FROM now() + interval '23 hours')::bigint, false);
-- A newer checkout found it paid (Stripe refused to expire it): recorded completed.
SELECT public.billing_checkout_completed((SELECT id FROM public.billing_attempts WHERE object_id = 'cs_paidgone'),
                                         'no longer open at Stripe (paid)');
-- The operator deletes the customer (which cancels its subscription).
SELECT public.process_stripe_event('evt_cdc1', jsonb_build_object(
    'id', 'evt_cdc1', 'object', 'event', 'type', 'customer.deleted', 'created', 1750000000, 'livemode', false,
    'data', jsonb_build_object('object', jsonb_build_object('id', 'cus_paidgone', 'object', 'customer',
                                                            'deleted', true)))::text);
SELECT is((SELECT status FROM public.billing_attempts WHERE object_id = 'cs_paidgone'), 'abandoned',
          'the deleted customer''s paid session is abandoned with it');
SELECT is(public.billing_account('12910000-0000-4000-8000-000000000001') ->> 'checkout_paid', 'false',
          'and the next checkout is not refused as checkout_completed for it');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
