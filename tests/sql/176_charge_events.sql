-- 176_charge_events.sql: refunds and disputes are recorded in the audit log, each
-- once, and never deferred; a refund is its customer's account's (which its owner
-- sees), a dispute no account's. (Through nginx: tests/integration/test_webhook.py.)
BEGIN;
\ir _helpers.inc
SELECT plan(15);

INSERT INTO auth.users (id, email) VALUES
    ('17600000-0000-4000-8000-000000000001', 'refunded@example.com'),
    ('17600000-0000-4000-8000-000000000002', 'other@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_176'
 WHERE id = '17600000-0000-4000-8000-000000000001';

CREATE FUNCTION pg_temp.refund(p_id text, p_customer jsonb) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.stripe_event(p_id, 'charge.refunded', jsonb_build_object(
        'id', 'ch_' || p_id, 'object', 'charge', 'customer', p_customer, 'amount', 2000,
        'amount_refunded', 500, 'currency', 'eur', 'refunded', false,
        'payment_intent', 'pi_' || p_id))
$$;
CREATE FUNCTION pg_temp.dispute(p_id text, p_type text, p_status text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.stripe_event(p_id, p_type, jsonb_build_object(
        'id', 'dp_176', 'object', 'dispute', 'charge', 'ch_disputed', 'amount', 2000,
        'currency', 'usd', 'reason', 'fraudulent', 'status', p_status, 'payment_intent', NULL,
        'evidence_details', jsonb_build_object('due_by', 1751000000, 'has_evidence', false)))
$$;
CREATE FUNCTION pg_temp.apply(p_id text, p_event text) RETURNS text LANGUAGE sql AS $$
    SELECT public.process_stripe_event(p_id, p_event) ->> 'result'
$$;
CREATE FUNCTION pg_temp.audit(p_event text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(account_id::text, '-') || ' ' || action || ' ' || details::text
      FROM public.audit_logs WHERE details ->> 'event_id' = p_event
$$;

SELECT is(public.stripe_event_kind('charge.refunded') || public.stripe_event_kind('charge.dispute.created')
          || public.stripe_event_kind('charge.dispute.closed'), 'chargechargecharge',
          'refunds and disputes are handled');
SELECT is(public.stripe_event_kind('charge.succeeded'), NULL, 'a charge that succeeded is still ignored');

SELECT pg_temp.become('service_role');
SELECT is(pg_temp.apply('evt_r1', pg_temp.refund('evt_r1', '"cus_176"')), 'processed',
          'a refund of our customer is applied');
SELECT is(pg_temp.audit('evt_r1'),
          '17600000-0000-4000-8000-000000000001 stripe.charge.refunded '
          || jsonb_build_object('event_id', 'evt_r1', 'charge_id', 'ch_evt_r1', 'customer', 'cus_176',
                                'payment_intent', 'pi_evt_r1', 'amount', 2000, 'amount_refunded', 500,
                                'currency', 'eur', 'refunded', false)::text,
          'on its account, with what went back');
SELECT is(pg_temp.apply('evt_r1', pg_temp.refund('evt_r1', '"cus_176"')), 'duplicate',
          'its redelivery is a duplicate');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE details ->> 'event_id' = 'evt_r1'), 1::bigint,
          'and writes no second row');
SELECT is(pg_temp.apply('evt_r2', pg_temp.refund('evt_r2', '{"id": "cus_176", "object": "customer"}')),
          'processed', 'an expanded customer is read by its id');
SELECT is(split_part(pg_temp.audit('evt_r2'), ' ', 1), '17600000-0000-4000-8000-000000000001',
          'and the refund is its account''s');

SELECT is(pg_temp.apply('evt_r3', pg_temp.refund('evt_r3', '"cus_not_ours"')), 'processed',
          'a refund of a customer not ours is applied, not deferred');
SELECT is(split_part(pg_temp.audit('evt_r3'), ' ', 1) || ' '
          || (SELECT details ->> 'customer' FROM public.audit_logs WHERE details ->> 'event_id' = 'evt_r3'),
          '- cus_not_ours', 'on no account, naming the customer');
SELECT is(pg_temp.apply('evt_r4', pg_temp.refund('evt_r4', 'null')) || ' '
          || split_part(pg_temp.audit('evt_r4'), ' ', 1), 'processed -',
          'a refund of a charge without a customer too');

SELECT is(pg_temp.apply('evt_d1', pg_temp.dispute('evt_d1', 'charge.dispute.created', 'needs_response'))
          || ' ' || pg_temp.audit('evt_d1'),
          'processed - stripe.charge.dispute.created '
          || jsonb_build_object('event_id', 'evt_d1', 'dispute_id', 'dp_176', 'charge_id', 'ch_disputed',
                                'payment_intent', NULL, 'amount', 2000, 'currency', 'usd',
                                'reason', 'fraudulent', 'status', 'needs_response',
                                'evidence_due_by', 1751000000)::text,
          'a dispute opened is recorded on no account, with when its evidence is due');
SELECT is(pg_temp.apply('evt_d2', pg_temp.dispute('evt_d2', 'charge.dispute.closed', 'lost'))
          || ' ' || split_part(pg_temp.audit('evt_d2'), ' ', 2)
          || ' ' || (pg_temp.audit('evt_d2')::text ~ '"status": "lost"')::text,
          'processed stripe.charge.dispute.closed true', 'and its closing, with its outcome');
SELECT pg_temp.unbecome();

-- The account's owner sees their refund, and nothing of anyone else's money.
SELECT is(pg_temp.cell('17600000-0000-4000-8000-000000000001',
                       $$SELECT 1 FROM public.audit_logs WHERE action LIKE 'stripe.charge.%'$$),
          'ok:2', 'the owner sees their two refunds');
SELECT is(pg_temp.cell('17600000-0000-4000-8000-000000000002',
                       $$SELECT 1 FROM public.audit_logs WHERE action LIKE 'stripe.charge.%'$$),
          'ok:0', 'another user sees none');

SELECT * FROM finish();
ROLLBACK;
