-- 195_returning_customer_subscription_shown.sql: beside a destroyed instance whose
-- customer has subscribed again (the new subscription's first payment processing, no
-- instance yet), my-instance shows the new subscription and its plan, not the one that
-- ended; an instance-less subscription older than the destroyed instance's is not
-- taken for it.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(9);

CREATE FUNCTION pg_temp.mine(p_who text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE v jsonb;
BEGIN
    PERFORM pg_temp.become(p_who);
    v := public.tenant_instance(NULL);
    PERFORM pg_temp.unbecome();
    RETURN v;
END $$;

-- B's subscription ended and its instance was destroyed, its data kept. Long before,
-- B had a first payment given up (no instance).
INSERT INTO public.subscriptions (id, account_id, tier, status, created_at)
VALUES ('bbbbbbbb-0000-4000-8000-000000000007', 'bbbbbbbb-0000-4000-8000-000000000001', 'free',
        'incomplete_expired', now() - interval '1 year');
UPDATE public.subscriptions SET status = 'cancelled' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
SELECT public.lifecycle_deprovision('bbbbbbbb-0000-4000-8000-000000000003', NULL, 'destroy', false);
UPDATE public.instances SET status = 'deprovisioning' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(), owed_action = 'destroy_storage',
       storage_destroy_after = now() + interval '30 days'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';

SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{instance,notice,code}', 'data_kept',
          'destroyed, its data kept');
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{subscription,id}',
          'bbbbbbbb-0000-4000-8000-000000000002',
          'the subscription that ended, not an older one given up before it');

-- B subscribes again, to another plan, by bank debit.
INSERT INTO public.subscriptions (id, account_id, stripe_subscription_id, stripe_price_id, tier, status)
VALUES ('bbbbbbbb-0000-4000-8000-000000000006', 'bbbbbbbb-0000-4000-8000-000000000001', 'sub_bbbbbbbb_again',
        'price_professional', 'professional', 'incomplete');
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{instance,notice,code}',
          'payment_processing', 'told its first payment is processing');
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{instance,id}',
          'bbbbbbbb-0000-4000-8000-000000000003', 'beside its destroyed instance');
SELECT is((SELECT jsonb_build_object('id', j ->> 'id', 'status', j ->> 'status', 'tier', j ->> 'tier')
             FROM (SELECT pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') -> 'subscription' AS j) x),
          '{"id": "bbbbbbbb-0000-4000-8000-000000000006", "status": "incomplete", "tier": "professional"}'::jsonb,
          'the subscription shown is the new one, the one the notice speaks of');
SELECT is((SELECT pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') -> 'plan' ->> 'max_agents'),
          (SELECT max_agents::text FROM public.subscriptions WHERE id = 'bbbbbbbb-0000-4000-8000-000000000006'),
          'with the plan it pays for');
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{plan,tier}', 'professional',
          'its tier');
SELECT is(pg_temp.mine('aaaaaaaa-0000-4000-8000-000000000001') #>> '{subscription,id}',
          'aaaaaaaa-0000-4000-8000-000000000002', 'never another account''s subscription');

-- That payment given up: the data still kept, the subscription shown the one given up.
UPDATE public.subscriptions SET status = 'incomplete_expired' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000006';
SELECT is(pg_temp.mine('bbbbbbbb-0000-4000-8000-000000000001') #>> '{subscription,status}', 'incomplete_expired',
          'the newest subscription, given up, is the current one');

SELECT * FROM finish();
ROLLBACK;
