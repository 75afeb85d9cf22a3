-- 129_customer_deleted.sql: customer.deleted unlinks the account from the customer
-- Stripe deleted, so that its next checkout creates a new customer; the deleted one
-- still names its account for late events but is never linked again. (Through nginx:
-- tests/integration/test_billing.py.)
BEGIN;
\ir _helpers.inc
SELECT plan(13);

INSERT INTO auth.users (id, email) VALUES
    ('12900000-0000-4000-8000-000000000001', 'gone@example.com'),
    ('12900000-0000-4000-8000-000000000002', 'other@example.com');

CREATE FUNCTION pg_temp.deleted(p_id text, p_customer text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.stripe_event(p_id, 'customer.deleted',
                      jsonb_build_object('id', p_customer, 'object', 'customer', 'deleted', true))
$$;
-- Our creation of a customer for an account, as create-checkout-session records it.
CREATE FUNCTION pg_temp.create_customer(p_account uuid, p_customer text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE a jsonb;
BEGIN
    a := public.billing_attempt_begin(p_account, 'customer', repeat('c', 64));
    IF a ->> 'state' = 'send' THEN
        PERFORM public.billing_attempt_succeeded((a ->> 'attempt_id')::uuid, p_customer, NULL, NULL, false);
    END IF;
    RETURN a;
END $$;
CREATE FUNCTION pg_temp.customer_of(p_account uuid) RETURNS text LANGUAGE sql AS $$
    SELECT stripe_customer_id FROM public.accounts WHERE id = p_account
$$;
CREATE FUNCTION pg_temp.audits(p_account uuid) RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM public.audit_logs WHERE account_id = p_account AND action = 'stripe.customer.deleted'
$$;

SELECT pg_temp.become('service_role');
SELECT pg_temp.create_customer('12900000-0000-4000-8000-000000000001', 'cus_gone');
-- A session of that customer, paid: its subscription goes with the customer.
SELECT public.billing_attempt_succeeded(
           (public.billing_attempt_begin('12900000-0000-4000-8000-000000000001', 'checkout', repeat('d', 64))
            ->> 'attempt_id')::uuid, 'cs_gone', 'https://checkout.stripe.test/cs_gone',
           extract(epoch FROM now() + interval '23 hours')::bigint, false);
-- The other account was linked by an operator (no attempt of ours).
UPDATE public.accounts SET stripe_customer_id = 'cus_op' WHERE id = '12900000-0000-4000-8000-000000000002';

SELECT is(public.process_stripe_event('evt_cd1', pg_temp.deleted('evt_cd1', 'cus_gone'), true) ->> 'result',
          'processed', 'customer.deleted is applied');
SELECT is(pg_temp.customer_of('12900000-0000-4000-8000-000000000001'), NULL,
          'the account no longer names the deleted customer');
SELECT is(pg_temp.audits('12900000-0000-4000-8000-000000000001'), 1::bigint, 'the unlink is audited on the account');
SELECT is(public.process_stripe_event('evt_cd1', pg_temp.deleted('evt_cd1', 'cus_gone'), true) ->> 'result',
          'duplicate', 'its redelivery is a duplicate');
SELECT is((SELECT status FROM public.billing_attempts WHERE object_id = 'cs_gone'), 'abandoned',
          'the deleted customer''s session is not one the next checkout waits on');

-- A late event of the deleted customer is still the account's, and links nothing.
SELECT is(public.process_stripe_event('evt_cd2', pg_temp.stripe_event('evt_cd2', 'invoice.payment_failed',
              '{"id": "in_cd2", "object": "invoice", "customer": "cus_gone", "status": "open"}'), true) ->> 'result',
          'processed', 'a late invoice of the deleted customer is applied');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE account_id = '12900000-0000-4000-8000-000000000001'
             AND action = 'stripe.invoice.payment_failed'), 1::bigint, 'to its account');
SELECT is(public.process_stripe_event('evt_cd3', pg_temp.stripe_event('evt_cd3', 'checkout.session.completed',
              jsonb_build_object('id', 'cs_cd3', 'object', 'checkout.session', 'customer', 'cus_gone',
                                 'client_reference_id', '12900000-0000-4000-8000-000000000001')), true) ->> 'result',
          'processed', 'a late checkout of the deleted customer naming its account is applied');
SELECT is(pg_temp.customer_of('12900000-0000-4000-8000-000000000001'), NULL,
          'and neither links the deleted customer again');

-- The next checkout creates a customer instead of answering with the deleted one.
SELECT is(pg_temp.create_customer('12900000-0000-4000-8000-000000000001', 'cus_new') ->> 'state',
          'send', 'the next checkout creates a new customer');
-- A second customer.deleted of the old customer (another event id) leaves the new one.
SELECT public.process_stripe_event('evt_cd4', pg_temp.deleted('evt_cd4', 'cus_gone'), true);
SELECT is(pg_temp.customer_of('12900000-0000-4000-8000-000000000001') || ' '
          || pg_temp.audits('12900000-0000-4000-8000-000000000001'),
          'cus_new 1', 'a later deletion of the old customer leaves the new one linked, unaudited');

-- A customer an operator linked is unlinked too.
SELECT public.process_stripe_event('evt_cd5', pg_temp.deleted('evt_cd5', 'cus_op'), true);
SELECT is(pg_temp.customer_of('12900000-0000-4000-8000-000000000002'), NULL, 'an operator''s link is removed too');
SELECT is(public.process_stripe_event('evt_cd6', pg_temp.stripe_event('evt_cd6', 'customer.deleted', '{"object": "customer"}'), true) ->> 'result',
          'failed', 'a customer.deleted without an id fails');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
