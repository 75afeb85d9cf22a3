-- 142_deleted_account_late_subscription.sql: a subscription Stripe made for an
-- account after it was deleted (a checkout paid in a session opened before, or its
-- first event applied only after the deletion) is cancelled at Stripe like the
-- account's others: its first event records the cancellation owed and no
-- subscription row, and neither it nor a later one is a refused account link or a
-- deferral. A live account's new subscription is not touched.
BEGIN;
\ir _helpers.inc
SELECT plan(12);

INSERT INTO auth.users (id, email) VALUES
    ('c1420000-0000-4000-8000-000000000001', 'gone@example.com'),
    ('c1420000-0000-4000-8000-000000000002', 'here@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_c142gone'
 WHERE id = 'c1420000-0000-4000-8000-000000000001';
UPDATE public.accounts SET stripe_customer_id = 'cus_c142here'
 WHERE id = 'c1420000-0000-4000-8000-000000000002';
-- As create-checkout-session makes it: subscription_data.metadata.account_id.
CREATE FUNCTION pg_temp.sub(p_id text, p_sub text, p_customer text, p_status text, p_type text,
                            p_created bigint, p_meta jsonb)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', p_customer,
            'status', p_status, 'metadata', p_meta,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', 'price_starter'),
                'current_period_end', p_created + 2592000))))))::text
$$;

-- The account (which has no subscription yet) is deleted (Supabase Auth).
DELETE FROM auth.users WHERE id = 'c1420000-0000-4000-8000-000000000001';

-- Its checkout, opened before, is paid after: the subscription's first event.
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_c142a1', pg_temp.sub('evt_c142a1', 'sub_c142late', 'cus_c142gone',
              'active', 'created', 1750000100, '{"account_id": "c1420000-0000-4000-8000-000000000001"}'),
              true) ->> 'result',
          'processed', 'the first event of a deleted account''s new subscription is processed');
SELECT pg_temp.unbecome();
SELECT is((SELECT stripe_customer_id || '/' || account_id || '/' || status FROM public.stripe_cancellations
            WHERE stripe_subscription_id = 'sub_c142late'),
          'cus_c142gone/c1420000-0000-4000-8000-000000000001/active',
          'its cancellation at Stripe is owed, with the customer and the deleted account');
SELECT is((SELECT count(*) FROM public.stripe_cancellations_due(100) d
            WHERE d.stripe_subscription_id = 'sub_c142late'), 1::bigint, 'due at once');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.cancellation_requested'
             AND details ->> 'stripe_subscription_id' = 'sub_c142late'), 1::bigint, 'and audited');

-- A subscription an operator made for that customer in the dashboard (no metadata),
-- and one that names the deleted account under a customer it never linked.
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_c142b1', pg_temp.sub('evt_c142b1', 'sub_c142dash', 'cus_c142gone',
              'trialing', 'created', 1750000110, '{}'), true) ->> 'result',
          'processed', 'a subscription of the deleted account''s customer without metadata');
SELECT is(public.process_stripe_event('evt_c142c1', pg_temp.sub('evt_c142c1', 'sub_c142new', 'cus_c142newcust',
              'incomplete', 'created', 1750000120, '{"account_id": "c1420000-0000-4000-8000-000000000001"}'),
              true) ->> 'result',
          'processed', 'a subscription naming the deleted account under a new customer');
-- Its later events, and one of a subscription whose first event ends it.
SELECT is(public.process_stripe_event('evt_c142a2', pg_temp.sub('evt_c142a2', 'sub_c142late', 'cus_c142gone',
              'canceled', 'deleted', 1750000200, '{"account_id": "c1420000-0000-4000-8000-000000000001"}'),
              true) ->> 'result',
          'ignored', 'our cancellation''s event is ignored');
SELECT is(public.process_stripe_event('evt_c142d1', pg_temp.sub('evt_c142d1', 'sub_c142ended', 'cus_c142gone',
              'canceled', 'deleted', 1750000210, '{"account_id": "c1420000-0000-4000-8000-000000000001"}'),
              true) ->> 'result',
          'processed', 'an ended subscription of the deleted account is not refused');
-- A live account's new subscription is created as always.
SELECT is(public.process_stripe_event('evt_c142h1', pg_temp.sub('evt_c142h1', 'sub_c142here', 'cus_c142here',
              'active', 'created', 1750000300, '{"account_id": "c1420000-0000-4000-8000-000000000002"}'),
              true) ->> 'result',
          'processed', 'a live account''s new subscription');
SELECT pg_temp.unbecome();

SELECT set_eq($$SELECT stripe_subscription_id, status::text FROM public.stripe_cancellations
                WHERE stripe_subscription_id LIKE 'sub_c142%'$$,
              $$VALUES ('sub_c142late', 'active'), ('sub_c142dash', 'trialing'), ('sub_c142new', 'incomplete')$$,
              'each live subscription of the deleted account is owed its cancellation, the ended one none');
SELECT set_eq($$SELECT stripe_subscription_id, account_id FROM public.subscriptions
                WHERE stripe_subscription_id LIKE 'sub_c142%'$$,
              $$VALUES ('sub_c142here', 'c1420000-0000-4000-8000-000000000002'::uuid)$$,
              'only the live account''s subscription has a row');
SELECT is((SELECT count(*) FROM public.stripe_events
            WHERE id LIKE 'evt_c142%' AND status IN ('refused', 'deferred', 'failed')),
          0::bigint, 'no refused account link, no deferral (mindroomctl refused-links and failed-events count none)');

SELECT * FROM finish();
ROLLBACK;
