-- 189_stripe_cancel_at.sql: a cancellation Stripe says only as cancel_at (flexible
-- billing mode: the customer portal's, cancel_at_period_end false) is recorded, shown
-- to the tenant with the date it ends, and cleared by a renewal; a stale event changes
-- nothing. A returning customer whose new first payment is processing is told that,
-- not "subscribe again".
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(20);

INSERT INTO auth.users (id, email) VALUES ('18900000-0000-4000-8000-000000000001', 'portal@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_189' WHERE id = '18900000-0000-4000-8000-000000000001';

-- A subscription event as Stripe sends it (basil and later: the period end on the item).
CREATE FUNCTION pg_temp.ev(p_id text, p_type text, p_sub text, p_created bigint,
                           p_cancel_at bigint, p_at_period_end boolean DEFAULT false,
                           p_status text DEFAULT 'active') RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', p_type, 'created', p_created,
        'api_version', '2025-09-30.clover', 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', 'cus_189', 'status', p_status,
            'billing_mode', jsonb_build_object('type', 'flexible'),
            'cancel_at', p_cancel_at, 'cancel_at_period_end', p_at_period_end,
            'canceled_at', CASE WHEN p_cancel_at IS NOT NULL THEN p_created END, 'trial_end', NULL,
            'metadata', jsonb_build_object('account_id', '18900000-0000-4000-8000-000000000001'),
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', 'price_starter'),
                'current_period_end', 1752592000))))))
$$;
CREATE FUNCTION pg_temp.apply(p_ev jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
    PERFORM pg_temp.become('service_role');
    r := public.process_stripe_event(p_ev) ->> 'result';
    PERFORM pg_temp.unbecome();
    RETURN r;
END $$;
CREATE FUNCTION pg_temp.rec(p_sub text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(to_char(cancel_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), 'null')
           || '/' || cancel_at_period_end
      FROM public.subscriptions WHERE stripe_subscription_id = p_sub $$;
-- The tenant's my-instance answer.
CREATE FUNCTION pg_temp.mine(p_who text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE v jsonb;
BEGIN
    PERFORM pg_temp.become(p_who);
    v := public.tenant_instance(NULL);
    PERFORM pg_temp.unbecome();
    RETURN v;
END $$;

-- 1. Recorded as Stripe says it ---------------------------------------------------------
-- 1752592000 = 2025-07-15 15:06:40 UTC (the period's end); 1760000000 = 2025-10-09 08:53:20.
SELECT is(pg_temp.apply(pg_temp.ev('evt_189a', 'customer.subscription.created', 'sub_189', 1750000000, NULL)),
          'processed', 'a new subscription');
SELECT is(pg_temp.rec('sub_189'), 'null/false', 'not set to end: cancel_at null');
SELECT is(pg_temp.apply(pg_temp.ev('evt_189b', 'customer.subscription.updated', 'sub_189', 1750000100, 1752592000)),
          'processed', 'the portal''s cancellation at the period''s end (flexible mode)');
SELECT is(pg_temp.rec('sub_189'), '2025-07-15 15:06:40/false',
          'cancel_at recorded; cancel_at_period_end stays as Stripe says it');
SELECT is(pg_temp.apply(pg_temp.ev('evt_189c', 'customer.subscription.updated', 'sub_189', 1750000050, NULL)),
          'stale', 'an older event (not set to end) arrives late');
SELECT is(pg_temp.rec('sub_189'), '2025-07-15 15:06:40/false', 'the stale event does not clear it');
SELECT is(pg_temp.apply(pg_temp.ev('evt_189d', 'customer.subscription.updated', 'sub_189', 1750000200, NULL)),
          'processed', 'renewed in the portal');
SELECT is(pg_temp.rec('sub_189'), 'null/false', 'the renewal clears it');
SELECT pg_temp.apply(pg_temp.ev('evt_189e', 'customer.subscription.updated', 'sub_189', 1750000300, 1760000000));
SELECT is(pg_temp.rec('sub_189'), '2025-10-09 08:53:20/false', 'a date the merchant set, as it is');
SELECT pg_temp.apply(pg_temp.ev('evt_189f', 'customer.subscription.updated', 'sub_189', 1750000400, NULL, true));
SELECT is(pg_temp.rec('sub_189'), '2025-07-15 15:06:40/true',
          'only cancel_at_period_end: it ends at the period''s end');
SELECT pg_temp.apply(pg_temp.ev('evt_189g', 'customer.subscription.created', 'sub_189_2', 1750000000, 1760000000));
SELECT is(pg_temp.rec('sub_189_2'), '2025-10-09 08:53:20/false', 'recorded on a subscription''s first event too');

-- 2. The tenant sees it: the date and the notice ------------------------------------------
UPDATE public.subscriptions SET cancel_at = '2031-02-03 23:30+00', cancel_at_period_end = false,
       current_period_end = '2031-03-01 00:00+00'
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.mine('aaaaaaaa-0000-4000-8000-000000000001') #>> '{subscription,cancel_at}',
          '2031-02-03T23:30:00+00:00', 'my-instance''s subscription says when it ends');
SELECT is(pg_temp.mine('aaaaaaaa-0000-4000-8000-000000000001') #> '{instance,notice}',
          '{"code": "ends_at_period_end", "message": "Your subscription ends on 2031-02-03 (UTC): your instance runs until then."}'::jsonb,
          'and the notice says it ends then (cancel_at, not the period''s end)');
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #> '{instance,notice}', 'null'::jsonb,
          'not set to end: nothing to say');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT cancel_at FROM public.subscriptions WHERE cancel_at IS NOT NULL$$),
          'ok:1', 'the tenant reads its own cancel_at, no one else''s');

-- 3. A returning customer whose new first payment is processing ----------------------------
-- B's subscription ended and its instance was destroyed, its data kept.
UPDATE public.subscriptions SET status = 'cancelled' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
SELECT public.lifecycle_deprovision('bbbbbbbb-0000-4000-8000-000000000003', NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(), owed_action = 'destroy_storage',
       storage_destroy_after = now() + interval '30 days'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{instance,notice,code}', 'data_kept',
          'destroyed, its data kept: subscribe again before ...');
INSERT INTO public.subscriptions (id, account_id, tier, status)
VALUES ('bbbbbbbb-0000-4000-8000-000000000006', 'bbbbbbbb-0000-4000-8000-000000000001', 'starter', 'incomplete');
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #> '{instance,notice}',
          '{"code": "payment_processing", "message": "Your first payment is still processing (a bank debit takes a few days to clear): your instance is created as soon as it clears."}'::jsonb,
          'subscribed again, its first payment processing: told that, not to subscribe again');
SELECT is(pg_temp.mine('aaaaaaaa-0000-4000-8000-000000000001') #>> '{instance,notice,code}', 'ends_at_period_end',
          'never another account''s subscription');
UPDATE public.subscriptions SET status = 'incomplete_expired' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000006';
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{instance,notice,code}', 'data_kept',
          'that payment given up: subscribe again, the data still kept');
-- A's live instance with an instance-less subscription processing (…0006): the live one's notice.
UPDATE public.subscriptions SET status = 'incomplete' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000006';
SELECT is(pg_temp.mine('aaaaaaaa-0000-4000-8000-000000000001') #>> '{instance,notice,code}', 'ends_at_period_end',
          'a live instance says its own state');

SELECT * FROM finish();
ROLLBACK;
