-- 201_ending_subscription_lowest_plan.sql (201_ending_subscription_lowest_plan.sql,
-- public.stripe_apply_subscription): on a catalogue without a 'free' plan, as in
-- production, a cancellation first seen with a price the catalogue lacks is still
-- applied and recorded (under the lowest tier that has a plan), also before the
-- subscription's delayed creation, which is then stale: no instance starts for a
-- subscription Stripe cancelled. A subscription first seen paused with such a price
-- is recorded too.
BEGIN;
\ir _helpers.inc
SELECT plan(6);

-- The catalogue of a production database: the tiers it sells, no 'free'.
DELETE FROM public.plans WHERE tier = 'free';

INSERT INTO auth.users (id, email) VALUES
    ('20100000-0000-4000-8000-000000000001', 'lowest201@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_201'
 WHERE id = '20100000-0000-4000-8000-000000000001';
CREATE FUNCTION pg_temp.sub(p_id text, p_sub text, p_status text, p_type text, p_created bigint,
                            p_price text)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', 'cus_201', 'status', p_status,
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', p_price),
                'current_period_end', p_created + 2592000))))))::text
$$;

SELECT pg_temp.become('service_role');
-- created (t=100, a known price) is delayed; the customer switches to a price the
-- catalogue lacks (t=200) and cancels (t=300); those two arrive first.
SELECT is(public.process_stripe_event('evt_201_2', pg_temp.sub('evt_201_2', 'sub_201', 'active', 'updated', 1750000200, 'price_gone'), true) ->> 'result',
          'failed', 'the update to an unknown price fails (documented)');
SELECT is(public.process_stripe_event('evt_201_3', pg_temp.sub('evt_201_3', 'sub_201', 'canceled', 'deleted', 1750000300, 'price_gone'), true) ->> 'result',
          'processed', 'the cancellation is applied whatever its price, with no free plan');
SELECT is(public.process_stripe_event('evt_201_1', pg_temp.sub('evt_201_1', 'sub_201', 'active', 'created', 1750000100, 'price_starter'), true) ->> 'result',
          'stale', 'the late creation is older than the cancellation');
SELECT is((SELECT count(*) FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
            WHERE s.stripe_subscription_id = 'sub_201' AND i.desired_status = 'running'),
          0::bigint, 'no instance runs for the cancelled subscription');
-- A subscription made in Stripe's Dashboard with a price of its own, first seen paused.
SELECT is(public.process_stripe_event('evt_201_4', pg_temp.sub('evt_201_4', 'sub_201b', 'paused', 'updated', 1750000400, 'price_custom'), true) ->> 'result',
          'processed', 'a subscription first seen paused with an unknown price is recorded');
SELECT pg_temp.unbecome();
SELECT is((SELECT string_agg(s.stripe_subscription_id || ':' || s.status::text || ':' || s.tier::text, ','
                             ORDER BY s.stripe_subscription_id)
             FROM public.subscriptions s WHERE s.stripe_subscription_id IN ('sub_201', 'sub_201b')),
          'sub_201:cancelled:starter,sub_201b:paused:starter',
          'each under the lowest tier the catalogue has');

SELECT * FROM finish();
ROLLBACK;
