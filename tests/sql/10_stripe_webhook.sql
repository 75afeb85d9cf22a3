-- 010_stripe_webhook: who may call it, the status mapping, the ordering key, and the
-- reprocess path. (The HTTP behaviour is in tests/integration/test_webhook.py.)
BEGIN;
\ir _helpers.inc
SELECT plan(29);

-- An account linked to a customer, and an event builder.
INSERT INTO auth.users (id, email) VALUES ('dddddddd-0000-4000-8000-000000000001', 'wh@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_sqltest' WHERE id = 'dddddddd-0000-4000-8000-000000000001';

CREATE FUNCTION pg_temp.ev(p_id text, p_type text, p_sub text, p_status text, p_created bigint,
                           p_price text DEFAULT 'price_starter') RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', p_type, 'created', p_created,
        'api_version', '2025-03-31.basil', 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', 'cus_sqltest', 'status', p_status,
            'cancel_at_period_end', false, 'canceled_at', NULL, 'trial_end', NULL,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', p_price), 'current_period_end', p_created + 2592000))))))
$$;

-- Privileges: service_role only.
SELECT is(pg_temp.cell('anon', $$SELECT public.process_stripe_event('{}'::jsonb)$$), 'err:42501',
          'anon cannot call process_stripe_event');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT public.process_stripe_event('{}'::jsonb)$$), 'err:42501',
          'a user cannot call process_stripe_event');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT public.reprocess_stripe_event('evt_x')$$), 'err:42501',
          'a user cannot call reprocess_stripe_event');
SELECT is(pg_temp.cell('service_role', $$SELECT public.reprocess_stripe_event('evt_nobody')$$),
          'err:P0002', 'reprocess_stripe_event of an unknown id: P0002');
SELECT is(pg_temp.cell('service_role', $$SELECT public.process_stripe_event('{"id":"evt_bad"}'::jsonb)$$),
          'err:22023', 'not an event: 22023, nothing stored');
SELECT ok(NOT EXISTS (SELECT 1 FROM public.stripe_events WHERE id = 'evt_bad'), 'evt_bad not stored');
SELECT is(pg_temp.cell('anon', $$SELECT public.process_stripe_event('evt_x', '{}')$$), 'err:42501',
          'anon cannot call process_stripe_event(id, payload)');

-- The eight Stripe statuses, spelled out.
SELECT is(ARRAY(SELECT public.stripe_subscription_status(s)::text FROM unnest(ARRAY[
              'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due',
              'canceled', 'unpaid', 'paused']) AS s),
          ARRAY['incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due',
                'cancelled', 'unpaid', 'paused'], 'each Stripe status maps explicitly');
SELECT throws_ok($$SELECT public.stripe_subscription_status('cancelled')$$, 'MRW03', NULL,
                 'our own spelling is not a Stripe status');
SELECT throws_ok($$SELECT public.stripe_subscription_status(NULL)$$, 'MRW03', NULL,
                 'a missing status is an error');

-- The ordering key within one second: type, then lifecycle status.
SELECT ok(public.stripe_event_rank('customer.subscription.updated', 'active')
          > public.stripe_event_rank('customer.subscription.created', 'past_due'),
          'an update outranks the creation');
SELECT ok(public.stripe_event_rank('customer.subscription.deleted', 'canceled')
          > public.stripe_event_rank('customer.subscription.updated', 'unpaid'),
          'a deletion outranks every update');
SELECT ok(public.stripe_event_rank('customer.subscription.updated', 'past_due')
          > public.stripe_event_rank('customer.subscription.updated', 'active'),
          'of two updates the later lifecycle status wins');

-- Apply as the webhook does (service_role), and check rows.
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s1', 'customer.subscription.created', 'sub_sql1', 'incomplete', 1750000000)) ->> 'owed',
          NULL, 'incomplete: nothing owed');
SELECT is((SELECT count(*) FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
            WHERE s.stripe_subscription_id = 'sub_sql1'), 0::bigint, 'incomplete: no instance row');
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s2', 'customer.subscription.updated', 'sub_sql1', 'active', 1750000010)) ->> 'owed',
          'create', 'active: an instance to create is owed');
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s3', 'customer.subscription.paused', 'sub_sql1', 'paused', 1750000020)) ->> 'owed',
          'stop', 'paused before it ever ran: a stop (the create may have left an app up)');
SELECT is((SELECT i.desired_status::text FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
            WHERE s.stripe_subscription_id = 'sub_sql1'), 'stopped', 'paused: desired_status stopped');
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s2b', 'customer.subscription.updated', 'sub_sql1', 'active', 1750000015)) ->> 'result',
          'stale', 'an event older than the last applied one is stale');
SELECT is((SELECT status::text FROM public.subscriptions WHERE stripe_subscription_id = 'sub_sql1'), 'paused',
          'the stale event changed nothing');
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s3', 'customer.subscription.paused', 'sub_sql1', 'paused', 1750000020)) ->> 'result',
          'duplicate', 'the same id again is a duplicate');
-- The webhook's form: the id first, the payload parsed only when the event is applied.
SELECT is(public.process_stripe_event('evt_s3', 'not json at all') ->> 'result',
          'duplicate', 'a committed id is a duplicate without parsing the payload');
SELECT throws_ok($$SELECT public.process_stripe_event('evt_s5', pg_temp.ev('evt_s6', 'customer.subscription.updated', 'sub_sql1', 'active', 1750000030)::text)$$,
                 '22023', 'event id does not match the payload', 'an id that is not the payload''s: 22023');
SELECT ok(NOT EXISTS (SELECT 1 FROM public.stripe_events WHERE id IN ('evt_s5', 'evt_s6')),
          'the mismatched event is not stored under either id');
SELECT is(public.process_stripe_event('evt_s6', pg_temp.ev('evt_s6', 'customer.subscription.updated', 'sub_sql1', 'active', 1750000030)::text) ->> 'result',
          'processed', 'a new event by (id, payload) is applied');

-- Unknown price: failed, and an operator's reprocess after adding the plan applies it.
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s4', 'customer.subscription.created', 'sub_sql2', 'active', 1750000000, 'price_new')) ->> 'result',
          'failed', 'unknown price: failed');
SELECT pg_temp.unbecome();
INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_messages_per_day, max_storage_gb, memory_limit_mb, cpu_limit)
VALUES ('price_new', 'professional', 'New', 10, 10000, 20, 2048, 2.0);
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event(pg_temp.ev('evt_s4', 'customer.subscription.created', 'sub_sql2', 'active', 1750000000, 'price_new')) ->> 'result',
          'duplicate', 'a redelivery of a failed event stays a duplicate');
SELECT is(public.reprocess_stripe_event('evt_s4') ->> 'result', 'processed',
          'reprocess_stripe_event applies it once the plan exists');
SELECT is((SELECT status || '/' || attempts FROM public.stripe_events WHERE id = 'evt_s4'), 'processed/2',
          'the event records its second attempt');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
