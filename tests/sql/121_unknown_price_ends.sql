-- 121_unknown_price_ends.sql: a cancellation whose price the catalogue lacks is
-- applied whatever its price, also before the subscription's (delayed) creation,
-- which is then stale: no instance starts for a subscription Stripe cancelled.
BEGIN;
\ir _helpers.inc
SELECT plan(4);

INSERT INTO auth.users (id, email) VALUES
    ('95000000-0000-4000-8000-000000000001', 'order@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_ord'
 WHERE id = '95000000-0000-4000-8000-000000000001';
CREATE FUNCTION pg_temp.sub(p_id text, p_status text, p_type text, p_created bigint, p_price text)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', 'sub_ord', 'object', 'subscription', 'customer', 'cus_ord', 'status', p_status,
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', p_price),
                'current_period_end', p_created + 2592000))))))::text
$$;

SELECT pg_temp.become('service_role');
-- created (t=100, a known price) is delayed; the customer switches to a price the
-- catalogue lacks (t=200) and cancels (t=300); those two arrive first.
SELECT is(public.process_stripe_event('evt_o2', pg_temp.sub('evt_o2', 'active', 'updated', 1750000200, 'price_gone'), true) ->> 'result',
          'failed', 'the update to an unknown price fails (documented)');
SELECT is(public.process_stripe_event('evt_o3', pg_temp.sub('evt_o3', 'canceled', 'deleted', 1750000300, 'price_gone'), true) ->> 'result',
          'processed', 'the cancellation is applied whatever its price');
-- Stripe's retry of the creation finally gets through.
SELECT is(public.process_stripe_event('evt_o1', pg_temp.sub('evt_o1', 'active', 'created', 1750000100, 'price_starter'), true) ->> 'result',
          'stale', 'the late creation is older than the cancellation');
SELECT is((SELECT count(*) FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
            WHERE s.stripe_subscription_id = 'sub_ord' AND i.desired_status = 'running'),
          0::bigint, 'no instance runs for the cancelled subscription');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
