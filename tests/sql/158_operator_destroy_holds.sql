-- 158_operator_destroy_holds.sql: an operator's destroy holds like their stop: billing
-- that keeps the subscription running (a renewal, the Stripe sweep's retry of an
-- event) does not make the instance again; the operator's provision does.
BEGIN;
\ir _helpers.inc
SELECT plan(8);

INSERT INTO auth.users (id, email) VALUES ('15800000-0000-4000-8000-000000000001', 'gone@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_gone' WHERE id = '15800000-0000-4000-8000-000000000001';
CREATE FUNCTION pg_temp.ev(p_id text, p_sub text, p_type text, p_created bigint, p_status text)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', 'cus_gone', 'status', p_status,
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('object', 'list', 'data', jsonb_build_array(
                jsonb_build_object('id', 'si_' || p_sub, 'object', 'subscription_item',
                    'price', jsonb_build_object('id', 'price_starter'), 'quantity', 1,
                    'current_period_end', p_created + 2592000))))))::text
$$;
CREATE FUNCTION pg_temp.sub() RETURNS uuid LANGUAGE sql AS $$
    SELECT s.id FROM public.subscriptions s WHERE s.stripe_subscription_id = 'sub_gone'
$$;
CREATE FUNCTION pg_temp.live() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM public.instances i WHERE i.subscription_id = pg_temp.sub() AND i.status <> 'deprovisioned'
$$;

SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_g1', pg_temp.ev('evt_g1', 'sub_gone', 'created', 1750000100, 'active'),
              true) ->> 'owed', 'create', 'an active subscription');
UPDATE public.instances SET status = 'running', applied_config_version = config_version,
       welcome_email_sent_at = now() WHERE subscription_id = pg_temp.sub();

-- The operator destroys it while the subscription is active; the worker does it.
SELECT is(public.lifecycle_deprovision(NULL, pg_temp.sub(), 'destroy') #>> '{instance,owed_action}',
          'destroy', 'the operator''s destroy is owed');
UPDATE public.instances SET status = 'deprovisioning' WHERE subscription_id = pg_temp.sub();
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
       storage_destroy_after = now() + interval '30 days' WHERE subscription_id = pg_temp.sub();

-- The monthly renewal, and a payment after past_due: applied, nothing made again.
SELECT is(public.process_stripe_event('evt_g2', pg_temp.ev('evt_g2', 'sub_gone', 'updated', 1750000200, 'active'),
              true) ->> 'result', 'processed', 'the renewal is applied');
SELECT is(pg_temp.live(), 0::bigint, 'the destroyed instance is not made again by the renewal');
SELECT is(public.process_stripe_event('evt_g3', pg_temp.ev('evt_g3', 'sub_gone', 'updated', 1750000300, 'past_due'),
              true) ->> 'owed', NULL, 'nor by a late payment');
SELECT is(pg_temp.live(), 0::bigint, 'still nothing live');

-- The operator provisions: a new instance, and billing keeps it running again.
SELECT is(public.lifecycle_provision(pg_temp.sub()) #>> '{instance,owed_action}', 'create',
          'provision makes it again');
SELECT is(public.process_stripe_event('evt_g4', pg_temp.ev('evt_g4', 'sub_gone', 'updated', 1750000400, 'active'),
              true) ->> 'owed', 'create', 'billing sees the provisioned instance');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
