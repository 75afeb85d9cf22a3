-- 128_subscription_items.sql: a subscription with several items (a plan and an add-on
-- the catalogue does not know, or two plans) is sized by the highest plan among its
-- items, whatever order Stripe lists them in.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO auth.users (id, email) VALUES ('96000000-0000-4000-8000-000000000001', 'items@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_items' WHERE id = '96000000-0000-4000-8000-000000000001';
CREATE FUNCTION pg_temp.sub(p_id text, p_sub text, p_type text, p_created bigint, p_prices text[])
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', 'cus_items', 'status', 'active',
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('object', 'list', 'data', (
                SELECT jsonb_agg(jsonb_build_object('id', 'si_' || p_sub || '_' || n, 'object', 'subscription_item',
                           'price', jsonb_build_object('id', pr), 'quantity', 1,
                           'current_period_end', p_created + 2592000) ORDER BY n)
                  FROM unnest(p_prices) WITH ORDINALITY AS u(pr, n))))))::text
$$;

SELECT pg_temp.become('service_role');
-- An operator added an add-on price the catalogue does not know; Stripe lists it first.
SELECT is(public.process_stripe_event('evt_it1', pg_temp.sub('evt_it1', 'sub_it1', 'created', 1750000100,
              ARRAY['price_addon_extra_seats', 'price_professional']), true) ->> 'result',
          'processed', 'a paid subscription whose first item is an add-on is applied');
SELECT is((SELECT s.tier::text || ' ' || s.stripe_price_id FROM public.subscriptions s
            WHERE s.stripe_subscription_id = 'sub_it1'),
          'professional price_professional', 'its tier and recorded price are the plan item''s');
SELECT is((SELECT count(*) FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
            WHERE s.stripe_subscription_id = 'sub_it1' AND i.desired_status = 'running'),
          1::bigint, 'the paying customer gets an instance');

-- A starter subscription to which the enterprise plan is added as a second item.
SELECT is(public.process_stripe_event('evt_it2', pg_temp.sub('evt_it2', 'sub_it2', 'created', 1750000100,
              ARRAY['price_starter']), true) ->> 'result', 'processed', 'starter subscription created');
SELECT is(public.process_stripe_event('evt_it3', pg_temp.sub('evt_it3', 'sub_it2', 'updated', 1750000200,
              ARRAY['price_starter', 'price_enterprise']), true) ->> 'result',
          'processed', 'the second plan item is applied');
SELECT is((SELECT i.memory_limit_mb FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
            WHERE s.stripe_subscription_id = 'sub_it2'),
          (SELECT p.memory_limit_mb FROM public.plans p WHERE p.stripe_price_id = 'price_enterprise'),
          'a subscription paying for the enterprise plan is sized as enterprise');
SELECT is((SELECT s.tier::text || ' ' || s.stripe_price_id FROM public.subscriptions s
            WHERE s.stripe_subscription_id = 'sub_it2'),
          'enterprise price_enterprise', 'it records the enterprise price');

-- No item is a plan: as with one unknown price, nothing to size a running instance by.
SELECT is(public.process_stripe_event('evt_it4', pg_temp.sub('evt_it4', 'sub_it3', 'created', 1750000100,
              ARRAY['price_addon_a', 'price_addon_b']), true) ->> 'result',
          'failed', 'a running subscription without a plan item still fails (unknown price)');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
