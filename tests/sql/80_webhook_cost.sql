-- 080_webhook_cost: the same rules for less work per event. An ignored type is
-- recorded once by one insert; the webhook's call defers the wake to after its
-- commit and says when one is owed; the status triggers fire only on a change; the
-- helpers rewritten in PL/pgSQL still answer as 060 defined them.
BEGIN;
\ir _helpers.inc
SELECT plan(19);

INSERT INTO auth.users (id, email) VALUES
    ('80000000-0000-4000-8000-000000000001', 'cost@example.com');
CREATE FUNCTION pg_temp.sub(p_id text, p_status text, p_type text, p_created bigint)
RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', 'sub_cost', 'object', 'subscription', 'customer', 'cus_cost', 'status', p_status,
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', 'price_starter'),
                'current_period_end', p_created + 2592000))))))::text
$$;
CREATE FUNCTION pg_temp.other(p_id text, p_type text) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object('id', p_id, 'object', 'event', 'type', p_type,
                              'created', 1750000000, 'livemode', false,
                              'data', jsonb_build_object('object', jsonb_build_object('id', 'x')))::text
$$;
CREATE FUNCTION pg_temp.audits(p_action text) RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM public.audit_logs
     WHERE account_id = '80000000-0000-4000-8000-000000000001' AND action = p_action
$$;
UPDATE public.accounts SET stripe_customer_id = 'cus_cost'
 WHERE id = '80000000-0000-4000-8000-000000000001';

-- Privileges: the new entry points are the service's.
SELECT is(pg_temp.cell('anon', $$SELECT public.lifecycle_wake()$$), 'err:42501',
          'anon cannot wake the lifecycle worker');
SELECT is(pg_temp.cell('80000000-0000-4000-8000-000000000001',
                       $$SELECT public.process_stripe_event('evt_c0', '{}', true)$$), 'err:42501',
          'a user cannot call the webhook''s process_stripe_event');
SELECT is(pg_temp.cell('80000000-0000-4000-8000-000000000001', $$SELECT public.stripe_event_kind('invoice.paid')$$), 'err:42501',
          'nor stripe_event_kind');
SELECT is(pg_temp.cell('service_role', $$SELECT public.lifecycle_wake()$$), 'ok:1',
          'the service can');

SELECT pg_temp.become('service_role');

-- An ignored type: one row, 'ignored'; a redelivery is a duplicate; a malformed one
-- of an ignored type is still refused as not an event.
SELECT is(public.process_stripe_event('evt_c1', pg_temp.other('evt_c1', 'customer.updated'), true),
          '{"result": "ignored", "status": "ignored", "owed": null, "subscription_id": null,
            "instance_id": null, "error": null}',
          'a type the webhook does not handle: ignored');
SELECT is((SELECT status || '/' || type || '/' || (processed_at IS NOT NULL)::text
             FROM public.stripe_events WHERE id = 'evt_c1'),
          'ignored/customer.updated/true', 'and recorded once, with its payload''s type');
SELECT is(public.process_stripe_event('evt_c1', pg_temp.other('evt_c1', 'customer.updated'), true) ->> 'result',
          'duplicate', 'a redelivery of it is a duplicate');
SELECT throws_ok($$SELECT public.process_stripe_event('evt_c2', '{"id": "evt_c2", "type": "customer.updated", "data": {"object": {}}}', true)$$,
                 '22023', 'not a Stripe event', 'an ignored type without created is not an event');

-- A new subscription: its instance is owed and the caller owes the wake.
SELECT is((SELECT (v ->> 'owed') || '/' || coalesce(v ->> 'wake', 'none')
             FROM public.process_stripe_event('evt_c3', pg_temp.sub('evt_c3', 'active', 'created', 1750000000), true) AS v),
          'create/true', 'a new subscription: create owed, the wake is the caller''s');
-- An update that keeps the status asks nothing new: no wake, no audit row.
SELECT is((SELECT coalesce(v ->> 'wake', 'none')
             FROM public.process_stripe_event('evt_c4', pg_temp.sub('evt_c4', 'active', 'updated', 1750000100), true) AS v),
          'none', 'an update that keeps the status wakes nobody');
SELECT is(pg_temp.audits('subscription.status_changed'), 0::bigint, 'and audits no status change');
SELECT is(pg_temp.audits('subscription.created'), 1::bigint, 'the creation was audited once');
SELECT is(pg_temp.audits('instance.created'), 1::bigint, 'and its instance''s');
-- A status change: audited once, the instance asked to stop.
SELECT is(public.process_stripe_event('evt_c5', pg_temp.sub('evt_c5', 'unpaid', 'updated', 1750000200), true) ->> 'result',
          'processed', 'unpaid: processed');
SELECT is(pg_temp.audits('subscription.status_changed'), 1::bigint, 'the status change is audited once');
SELECT pg_temp.unbecome();

-- 060's rule survives the rewrite: a destroyed instance whose storage remains owes its removal.
SELECT is((SELECT public.lifecycle_owed_action(jsonb_populate_record(i,
                    '{"status": "deprovisioned", "storage_destroyed_at": null}'))::text
             FROM public.instances i
            WHERE i.subscription_id = (SELECT id FROM public.subscriptions
                                        WHERE stripe_subscription_id = 'sub_cost')),
          'destroy_storage', 'a destroyed instance whose storage remains owes destroy_storage');
SELECT is((SELECT public.lifecycle_instance_json(i) ?& ARRAY['matrix_server_name', 'storage_gb',
                                                          'homeserver_memory_mb', 'purge_requested']
             FROM public.instances i
            WHERE i.subscription_id = (SELECT id FROM public.subscriptions
                                        WHERE stripe_subscription_id = 'sub_cost')),
          true, 'the instance JSON keeps 060''s fields');
SELECT is((SELECT public.lifecycle_owed_action(jsonb_populate_record(i,
                    '{"status": "running", "desired_status": "running", "config_version": 1,
                      "applied_config_version": 1, "restart_version": 2, "applied_restart_version": 1}'))::text
             FROM public.instances i
            WHERE i.subscription_id = (SELECT id FROM public.subscriptions
                                        WHERE stripe_subscription_id = 'sub_cost')),
          'restart', 'a restart a tenant asked for is still owed (the rule as the tenant edges define it)');
-- This server has lz4 (Debian's PostgreSQL 15 is built with it): payloads use it.
SELECT is((SELECT attcompression::text FROM pg_attribute
            WHERE attrelid = 'public.stripe_events'::regclass AND attname = 'payload'),
          'l', 'event payloads are compressed with lz4');

SELECT * FROM finish();
ROLLBACK;
