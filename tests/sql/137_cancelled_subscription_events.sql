-- 137_cancelled_subscription_events.sql: the events Stripe sends for a subscription
-- deleted with its account (customer.subscription.deleted for the cancellation our
-- stripe-cancel job made, an .updated before or after it) are our own doing: each
-- is recorded ignored, neither a refused account link (a security event, logged at
-- error level) nor deferred for 72 h and then failed, and brings back no
-- subscription row, whether the cancellation at Stripe has run yet or not.
BEGIN;
\ir _helpers.inc
SELECT plan(11);

INSERT INTO auth.users (id, email) VALUES
    ('c1371000-0000-4000-8000-000000000001', 'gone@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_c137gone'
 WHERE id = 'c1371000-0000-4000-8000-000000000001';
-- As create-checkout-session makes it: subscription_data.metadata.account_id.
CREATE FUNCTION pg_temp.sub(p_id text, p_status text, p_type text, p_created bigint, p_meta jsonb)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', 'sub_c137gone', 'object', 'subscription', 'customer', 'cus_c137gone',
            'status', p_status, 'metadata', p_meta,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', 'price_starter'),
                'current_period_end', p_created + 2592000))))))::text
$$;

SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_c137g1', pg_temp.sub('evt_c137g1', 'active', 'created', 1750000100,
              '{"account_id": "c1371000-0000-4000-8000-000000000001"}'), true) ->> 'result',
          'processed', 'the subscription is created');
SELECT pg_temp.unbecome();

-- The account is deleted (Supabase Auth): its cancellation is owed.
DELETE FROM auth.users WHERE id = 'c1371000-0000-4000-8000-000000000001';

-- Before the job has run, an update of the subscription (a renewal) arrives.
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_c137g0', pg_temp.sub('evt_c137g0', 'active', 'updated', 1750000150,
              '{"account_id": "c1371000-0000-4000-8000-000000000001"}'), true) ->> 'result',
          'ignored', 'an update of it before our cancellation has run is ignored');
SELECT pg_temp.unbecome();

-- The job cancels it at Stripe.
SELECT ok(public.stripe_cancellation_finish('sub_c137gone', 'cancelled', NULL, 30, 100),
          'the job cancelled it at Stripe');

-- Stripe then sends the cancellation's event, with the subscription's metadata.
SELECT pg_temp.become('service_role');
SELECT isnt(public.process_stripe_event('evt_c137g2', pg_temp.sub('evt_c137g2', 'canceled', 'deleted', 1750000200,
              '{"account_id": "c1371000-0000-4000-8000-000000000001"}'), true) ->> 'result',
            'refused', 'our own cancellation''s event is not a refused account link');
-- A subscription made without that metadata (e.g. by an operator in the dashboard).
SELECT isnt(public.process_stripe_event('evt_c137g3', pg_temp.sub('evt_c137g3', 'canceled', 'deleted', 1750000300,
              '{}'), true) ->> 'result',
            'deferred', 'nor deferred for 72 h and then failed');
-- Its redelivery is a duplicate.
SELECT is(public.process_stripe_event('evt_c137g2', pg_temp.sub('evt_c137g2', 'canceled', 'deleted', 1750000200,
              '{"account_id": "c1371000-0000-4000-8000-000000000001"}'), true) ->> 'result',
          'duplicate', 'its redelivery is a duplicate');
SELECT pg_temp.unbecome();

SELECT results_eq(
    $$SELECT id, status FROM public.stripe_events
       WHERE id IN ('evt_c137g0', 'evt_c137g2', 'evt_c137g3') ORDER BY id$$,
    $$VALUES ('evt_c137g0'::text, 'ignored'::text), ('evt_c137g2', 'ignored'), ('evt_c137g3', 'ignored')$$,
    'each is recorded ignored');
SELECT ok((SELECT bool_and(error LIKE 'ignored: %') FROM public.stripe_events
            WHERE id IN ('evt_c137g0', 'evt_c137g2', 'evt_c137g3')),
          'with the reason for the operator');
SELECT is((SELECT count(*) FROM public.subscriptions WHERE stripe_subscription_id = 'sub_c137gone'),
          0::bigint, 'no subscription row comes back');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.account_link_refused'),
          0::bigint, 'no refusal is audited');
SELECT is((SELECT count(*) FROM public.stripe_events WHERE status IN ('refused', 'deferred', 'failed')),
          0::bigint, 'mindroomctl refused-links and failed-events count none');

SELECT * FROM finish();
ROLLBACK;
