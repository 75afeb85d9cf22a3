-- 138_operator_stop.sql: an operator's stop holds through billing events that keep
-- the subscription running, until the operator provisions again; billing that ends
-- the subscription still destroys the instance; a stop that came from billing is
-- still undone by billing.
BEGIN;
\ir _helpers.inc
SELECT plan(20);

INSERT INTO auth.users (id, email) VALUES ('13800000-0000-4000-8000-000000000001', 'held@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_held' WHERE id = '13800000-0000-4000-8000-000000000001';
CREATE FUNCTION pg_temp.ev(p_id text, p_sub text, p_type text, p_created bigint, p_status text, p_price text)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', 'cus_held', 'status', p_status,
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('object', 'list', 'data', jsonb_build_array(
                jsonb_build_object('id', 'si_' || p_sub, 'object', 'subscription_item',
                    'price', jsonb_build_object('id', p_price), 'quantity', 1,
                    'current_period_end', p_created + 2592000))))))::text
$$;
CREATE FUNCTION pg_temp.inst(p_sub text) RETURNS public.instances LANGUAGE sql AS $$
    SELECT i.* FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
     WHERE s.stripe_subscription_id = p_sub AND i.status <> 'deprovisioned'
$$;
-- The worker's part: the instance's apps came up (or were stopped).
CREATE FUNCTION pg_temp.now_is(p_sub text, p_status public.instance_status) RETURNS void LANGUAGE sql AS $$
    UPDATE public.instances SET status = p_status, applied_config_version = config_version,
           welcome_email_sent_at = coalesce(welcome_email_sent_at, now())
     WHERE id = (pg_temp.inst(p_sub)).id
$$;

SELECT pg_temp.become('service_role');

-- An operator stops a running starter instance.
SELECT is(public.process_stripe_event('evt_h1', pg_temp.ev('evt_h1', 'sub_h1', 'created', 1750000100,
              'active', 'price_starter'), true) ->> 'result', 'processed', 'a starter subscription');
SELECT pg_temp.now_is('sub_h1', 'running');
SELECT is(public.lifecycle_deprovision((pg_temp.inst('sub_h1')).id, NULL, 'stop') #>> '{instance,owed_action}',
          'stop', 'the operator''s stop is owed');
SELECT isnt((pg_temp.inst('sub_h1')).operator_stopped_at, NULL, 'it records that an operator stopped it');
SELECT pg_temp.now_is('sub_h1', 'stopped');

-- The monthly renewal, then an upgrade: both applied to the subscription, neither
-- resumes the instance; the upgrade resizes it.
SELECT is(public.process_stripe_event('evt_h2', pg_temp.ev('evt_h2', 'sub_h1', 'updated', 1750000200,
              'active', 'price_starter'), true) ->> 'result', 'processed', 'the renewal is applied');
SELECT is(public.process_stripe_event('evt_h3', pg_temp.ev('evt_h3', 'sub_h1', 'updated', 1750000300,
              'active', 'price_professional'), true) ->> 'result', 'processed', 'the upgrade is applied');
SELECT is((SELECT s.tier::text || ' ' || s.status FROM public.subscriptions s WHERE s.stripe_subscription_id = 'sub_h1'),
          'professional active', 'the subscription has the new plan');
SELECT is((SELECT i.status::text || ' ' || i.desired_status || ' ' || coalesce(i.owed_action::text, '-')
             FROM pg_temp.inst('sub_h1') i),
          'stopped stopped -', 'the operator-stopped instance stays stopped, nothing owed');
SELECT is((pg_temp.inst('sub_h1')).memory_limit_mb,
          (SELECT p.memory_limit_mb FROM public.plans p WHERE p.stripe_price_id = 'price_professional'),
          'it is sized for the new plan');
SELECT throws_ok($$UPDATE public.instances SET desired_status = 'running' WHERE id = (pg_temp.inst('sub_h1')).id$$,
                 '23514', NULL, 'nothing asks a held instance to run but provision');

-- The operator provisions: the hold ends and the instance starts with its new size.
SELECT is(public.lifecycle_provision((SELECT s.id FROM public.subscriptions s WHERE s.stripe_subscription_id = 'sub_h1'))
            #>> '{instance,owed_action}', 'start', 'provision resumes it');
SELECT is((pg_temp.inst('sub_h1')).operator_stopped_at, NULL, 'and clears the hold');
SELECT pg_temp.now_is('sub_h1', 'running');
SELECT is(public.process_stripe_event('evt_h4', pg_temp.ev('evt_h4', 'sub_h1', 'updated', 1750000400,
              'unpaid', 'price_professional'), true) ->> 'owed', 'stop', 'billing stops it (unpaid)');
SELECT is((pg_temp.inst('sub_h1')).operator_stopped_at, NULL, 'a billing stop is no operator''s');
SELECT pg_temp.now_is('sub_h1', 'stopped');
SELECT is(public.process_stripe_event('evt_h5', pg_temp.ev('evt_h5', 'sub_h1', 'updated', 1750000500,
              'active', 'price_professional'), true) ->> 'owed', 'start', 'paid again, billing resumes it');

-- An operator-stopped instance of a subscription that is then cancelled is destroyed.
SELECT is(public.process_stripe_event('evt_h6', pg_temp.ev('evt_h6', 'sub_h2', 'created', 1750000100,
              'active', 'price_starter'), true) ->> 'result', 'processed', 'a second subscription');
SELECT pg_temp.now_is('sub_h2', 'running');
SELECT is(public.lifecycle_deprovision(NULL, (SELECT s.id FROM public.subscriptions s
                                                WHERE s.stripe_subscription_id = 'sub_h2'), 'stop') ->> 'outcome',
          'ok', 'an operator stops it');
SELECT pg_temp.now_is('sub_h2', 'stopped');
SELECT is(public.process_stripe_event('evt_h7', pg_temp.ev('evt_h7', 'sub_h2', 'deleted', 1750000200,
              'canceled', 'price_starter'), true) ->> 'owed', 'destroy', 'the cancellation destroys it');
SELECT is((pg_temp.inst('sub_h2')).desired_status::text, 'deprovisioned', 'it is to be destroyed');

-- deprovision-instance's answer shows the hold.
SELECT is(public.process_stripe_event('evt_h8', pg_temp.ev('evt_h8', 'sub_h3', 'created', 1750000100,
              'active', 'price_starter'), true) ->> 'result', 'processed', 'a third subscription');
SELECT isnt(public.lifecycle_deprovision((pg_temp.inst('sub_h3')).id, NULL, NULL) #>> '{instance,operator_stopped_at}',
            NULL, 'a stop without --mode is the operator''s too, and the answer says so');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
