-- 202_resubscribed_while_removed.sql (202_resubscribed_while_removed.sql,
-- instances_names_of_kept_data, stripe_handle_event): a customer who subscribes again
-- while its cancelled instance is still being destroyed gets that instance's data
-- back once the destroy is done, instead of an empty instance beside it whose data is
-- then kept for nobody; the new subscription's event waits for it as a deferred event
-- (recorded, answered 503 instance_names_taken, applied again by the sweep), and
-- provision-instance answers conflict meanwhile. An account with another instance
-- that stays (several MindRooms) is not held back by one of them being destroyed.
BEGIN;
\ir _helpers.inc
SELECT plan(11);

INSERT INTO auth.users (id, email) VALUES
    ('20200000-0000-4000-8000-0000000000a0', 'resub202@example.com'),
    ('20200000-0000-4000-8000-0000000000b0', 'two202@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_202a' WHERE id = '20200000-0000-4000-8000-0000000000a0';
UPDATE public.accounts SET stripe_customer_id = 'cus_202b' WHERE id = '20200000-0000-4000-8000-0000000000b0';
-- Each customer's first subscription, its instance running on DOKKU_PROVISIONER_URL.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) VALUES
    ('a2021000-0000-4000-8000-0000000000a1', '20200000-0000-4000-8000-0000000000a0',
     'price_starter', 'starter', 'active'),
    ('a2023000-0000-4000-8000-0000000000a3', '20200000-0000-4000-8000-0000000000a0',
     'price_starter', 'starter', 'active'),
    ('b2021000-0000-4000-8000-0000000000b1', '20200000-0000-4000-8000-0000000000b0',
     'price_starter', 'starter', 'active'),
    ('b2024000-0000-4000-8000-0000000000b4', '20200000-0000-4000-8000-0000000000b0',
     'price_starter', 'starter', 'active');
DO $$ BEGIN
    PERFORM public.lifecycle_provision('a2021000-0000-4000-8000-0000000000a1');
    PERFORM public.lifecycle_provision('b2021000-0000-4000-8000-0000000000b1');
    PERFORM public.lifecycle_provision('b2024000-0000-4000-8000-0000000000b4');
END $$;
UPDATE public.instances SET status = 'running', provisioned_at = now() - interval '60 days',
       applied_config_version = config_version, welcome_email_sent_at = now()
 WHERE subscription_id IN ('a2021000-0000-4000-8000-0000000000a1', 'b2021000-0000-4000-8000-0000000000b1',
                           'b2024000-0000-4000-8000-0000000000b4');
CREATE TEMP TABLE ids AS
SELECT left(subscription_id::text, 5) AS k, id, dokku_app_name FROM public.instances
 WHERE subscription_id IN ('a2021000-0000-4000-8000-0000000000a1', 'b2021000-0000-4000-8000-0000000000b1');

CREATE FUNCTION pg_temp.created(p_id text, p_sub text, p_cust text) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.created',
        'created', 1750000000, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', p_cust, 'status', 'active',
            'metadata', '{}'::jsonb,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', 'price_starter'),
                'current_period_end', 1752592000))))))::text
$$;

-- A's first subscription is cancelled: its instance owes a destroy that keeps its data.
SELECT is(public.lifecycle_deprovision(NULL, 'a2021000-0000-4000-8000-0000000000a1', 'destroy', false) ->> 'outcome',
          'ok', 'A''s first subscription is cancelled; its instance is to be destroyed');

-- A subscribes again before that destroy is done.
SELECT pg_temp.become('service_role');
CREATE TEMP TABLE r AS
SELECT public.process_stripe_event('evt_202a', pg_temp.created('evt_202a', 'sub_202a', 'cus_202a'), true) AS j;
SELECT pg_temp.unbecome();
SELECT is((SELECT j ->> 'result' || '/' || (j ->> 'code') FROM r), 'deferred/instance_names_taken',
          'the new subscription''s event is deferred while the old instance is being removed');
SELECT ok((SELECT (j ->> 'error') LIKE '%' || (SELECT dokku_app_name FROM ids WHERE k = 'a2021') || ' is still being removed%'
             FROM r), 'its error names the instance it waits for');
SELECT is((SELECT status || '/' || (processed_at IS NULL)::text FROM public.stripe_events WHERE id = 'evt_202a'),
          'deferred/true', 'the event is recorded, for the sweep to apply again');
SELECT is((SELECT count(*)::int FROM public.subscriptions WHERE stripe_subscription_id = 'sub_202a'),
          0, 'nothing of it is applied yet: no empty instance is made beside the old one');
SELECT is((SELECT j ->> 'outcome' || ': ' || (j ->> 'message')
             FROM public.lifecycle_provision('a2023000-0000-4000-8000-0000000000a3') j),
          'conflict: the account''s instance ' || (SELECT dokku_app_name FROM ids WHERE k = 'a2021')
          || ' is still being removed; this subscription''s instance is made on its data once it is',
          'provision-instance of another of the account''s subscriptions is a conflict meanwhile, saying why');

-- The destroy is done, the data kept for the retention; the sweep applies the event again.
DO $$
DECLARE c jsonb;
BEGIN
    c := public.lifecycle_claim('w1', 60);
    IF c #>> '{step,action}' IS DISTINCT FROM 'destroy' THEN
        RAISE EXCEPTION 'expected the destroy, got %', c;
    END IF;
    PERFORM public.lifecycle_finish((c #>> '{step,instance_id}')::uuid, c #>> '{step,token}',
                                    '{"ok": true, "purged": false, "retention_s": 2592000}', 60, 1, 1);
END $$;
SELECT is(public.reprocess_stripe_event('evt_202a') ->> 'result', 'processed',
          'once the old instance is destroyed, the event is applied');
SELECT is((SELECT (n.dokku_app_name = ids.dokku_app_name)::text || '/' || (o.storage_taken_by = n.id)::text
             FROM public.subscriptions s JOIN public.instances n ON n.subscription_id = s.id
             JOIN ids ON ids.k = 'a2021' JOIN public.instances o ON o.id = ids.id
            WHERE s.stripe_subscription_id = 'sub_202a'),
          'true/true', 'the new instance has the old one''s names and takes its data over');

-- B has two MindRooms; one is being destroyed, the other keeps running. A third
-- subscription is not held back by the one being destroyed.
SELECT is(public.lifecycle_deprovision(NULL, 'b2024000-0000-4000-8000-0000000000b4', 'destroy', false) ->> 'outcome',
          'ok', 'one of B''s two instances is to be destroyed');
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_202b', pg_temp.created('evt_202b', 'sub_202b', 'cus_202b'), true) ->> 'result',
          'processed', 'a third subscription beside the one that stays is applied at once');
SELECT pg_temp.unbecome();
SELECT is((SELECT (n.dokku_app_name NOT IN (SELECT dokku_app_name FROM ids WHERE k LIKE 'b%'))::text
             FROM public.subscriptions s JOIN public.instances n ON n.subscription_id = s.id
            WHERE s.stripe_subscription_id = 'sub_202b'),
          'true', 'under names of its own');

SELECT * FROM finish();
ROLLBACK;
