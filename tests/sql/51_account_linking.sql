-- 051_account_linking: an event's claim (client_reference_id, metadata.account_id)
-- never links a customer; only a customer we created does. Refusals are recorded,
-- audited and leave the claimed account's own events alone; a claim on an account
-- whose customer of ours is still being created waits. (Through nginx:
-- tests/integration/test_billing.py's victim scenario, test_webhook.py.)
BEGIN;
\ir _helpers.inc
SELECT plan(29);

-- victim: signs up, will check out; attacker: a customer Stripe made without us.
-- linked: an account with a customer of ours; pending: one whose customer is being
-- created right now; repaired: one whose customer we created but whose link is gone.
INSERT INTO auth.users (id, email) VALUES
    ('51000000-0000-4000-8000-000000000001', 'victim@example.com'),
    ('51000000-0000-4000-8000-000000000002', 'linked@example.com'),
    ('51000000-0000-4000-8000-000000000003', 'pending@example.com'),
    ('51000000-0000-4000-8000-000000000004', 'repaired@example.com');

CREATE FUNCTION pg_temp.sub(p_id text, p_sub text, p_customer text, p_claim text,
                            p_created bigint DEFAULT 1750000000, p_type text DEFAULT 'created')
RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'customer.subscription.' || p_type,
        'created', p_created, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', p_sub, 'object', 'subscription', 'customer', p_customer, 'status', 'active',
            'metadata', CASE WHEN p_claim IS NULL THEN '{}'::jsonb
                             ELSE jsonb_build_object('account_id', p_claim) END,
            'items', jsonb_build_object('data', jsonb_build_array(jsonb_build_object(
                'price', jsonb_build_object('id', 'price_starter'),
                'current_period_end', p_created + 2592000))))))
$$;
CREATE FUNCTION pg_temp.checkout(p_id text, p_customer text, p_ref text, p_meta text)
RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'checkout.session.completed',
        'created', 1750000000, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', 'cs_' || p_id, 'object', 'checkout.session', 'mode', 'subscription',
            'customer', p_customer, 'client_reference_id', p_ref,
            'metadata', CASE WHEN p_meta IS NULL THEN '{}'::jsonb
                             ELSE jsonb_build_object('account_id', p_meta) END)))
$$;
-- Our creation of a customer for an account, as create-checkout-session records it.
CREATE FUNCTION pg_temp.create_customer(p_account uuid, p_customer text, p_finish boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE a jsonb;
BEGIN
    a := public.billing_attempt_begin(p_account, 'customer', repeat('c', 64));
    IF p_finish THEN
        PERFORM public.billing_attempt_succeeded((a ->> 'attempt_id')::uuid, p_customer, NULL, NULL, false);
    END IF;
END $$;
CREATE FUNCTION pg_temp.customer_of(p_account uuid) RETURNS text LANGUAGE sql AS $$
    SELECT stripe_customer_id FROM public.accounts WHERE id = p_account
$$;
CREATE FUNCTION pg_temp.status(p_id text) RETURNS text LANGUAGE sql AS $$
    SELECT status FROM public.stripe_events WHERE id = p_id
$$;

SELECT pg_temp.become('service_role');
SELECT pg_temp.create_customer('51000000-0000-4000-8000-000000000002', 'cus_linked', true);

-- The attack: a checkout of the attacker's customer naming the victim.
SELECT is(public.process_stripe_event(pg_temp.checkout('evt_a1', 'cus_attacker',
              '51000000-0000-4000-8000-000000000001', NULL)) - 'error',
          '{"result": "refused", "status": "refused", "owed": null, "subscription_id": null,
            "instance_id": null, "customer": "cus_attacker",
            "claimed_account": "51000000-0000-4000-8000-000000000001"}',
          'a checkout naming an account with no customer of ours: refused');
SELECT is(pg_temp.customer_of('51000000-0000-4000-8000-000000000001'), NULL,
          'the claim linked nothing');
SELECT is((SELECT error FROM public.stripe_events WHERE id = 'evt_a1'),
          'account link refused: the account it names has no Stripe customer of ours',
          'the event records why');
SELECT is((SELECT details - 'event_id' FROM public.audit_logs
            WHERE action = 'stripe.account_link_refused' AND details ->> 'event_id' = 'evt_a1'
              AND account_id = '51000000-0000-4000-8000-000000000001'),
          '{"type": "checkout.session.completed", "customer": "cus_attacker",
            "claimed_account": "51000000-0000-4000-8000-000000000001",
            "reason": "account link refused: the account it names has no Stripe customer of ours"}',
          'audited on the claimed account: event, customer, claim, reason');
SELECT is(public.process_stripe_event(pg_temp.sub('evt_a2', 'sub_attacker', 'cus_attacker',
              '51000000-0000-4000-8000-000000000001')) ->> 'result', 'refused',
          'a subscription naming it the same way: refused');
SELECT ok(NOT EXISTS (SELECT 1 FROM public.subscriptions WHERE stripe_subscription_id = 'sub_attacker'),
          'no subscription recorded for the forged event');
SELECT is(public.process_stripe_event(pg_temp.checkout('evt_a1', 'cus_attacker',
              '51000000-0000-4000-8000-000000000001', NULL)) ->> 'result', 'duplicate',
          'a refused event redelivered is a duplicate (settled)');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.account_link_refused'
            AND details ->> 'event_id' = 'evt_a1'), 1::bigint, 'and is audited once');

-- The victim checks out: our customer, then Stripe's events for it.
SELECT pg_temp.create_customer('51000000-0000-4000-8000-000000000001', 'cus_victim', true);
SELECT is(public.process_stripe_event(pg_temp.checkout('evt_v1', 'cus_victim',
              '51000000-0000-4000-8000-000000000001', '51000000-0000-4000-8000-000000000001')) ->> 'result',
          'processed', 'the victim''s own checkout applies');
SELECT is(public.process_stripe_event(pg_temp.sub('evt_v2', 'sub_victim', 'cus_victim',
              '51000000-0000-4000-8000-000000000001')) ->> 'owed', 'create',
          'the victim''s subscription applies and owes an instance');
SELECT is((SELECT account_id::text || ' ' || status FROM public.subscriptions WHERE stripe_subscription_id = 'sub_victim'),
          '51000000-0000-4000-8000-000000000001 active', 'the victim''s subscription is active');

-- After the link: a forged claim on a linked account, and mismatched claims.
SELECT is(public.process_stripe_event(pg_temp.sub('evt_a3', 'sub_attacker2', 'cus_attacker',
              '51000000-0000-4000-8000-000000000001')) ->> 'error',
          'account link refused: the account it names is linked to another Stripe customer',
          'naming an account linked to another customer: refused');
SELECT is(public.process_stripe_event(pg_temp.sub('evt_a4', 'sub_linked', 'cus_linked',
              '51000000-0000-4000-8000-000000000001')) ->> 'error',
          'account link refused: it names an account other than its customer''s',
          'our customer naming another account: refused');
SELECT is(public.process_stripe_event(pg_temp.checkout('evt_a5', 'cus_victim',
              '51000000-0000-4000-8000-000000000001', '51000000-0000-4000-8000-000000000002')) ->> 'error',
          'account link refused: client_reference_id and metadata.account_id name different accounts',
          'a checkout whose two claims disagree: refused');
SELECT is(public.process_stripe_event(pg_temp.checkout('evt_a6', 'cus_attacker', 'robert''); drop', NULL)) ->> 'error',
          'account link refused: the account id it names is not an account id',
          'a claim that is not an account id: refused');
SELECT is(public.process_stripe_event(pg_temp.checkout('evt_a7', 'cus_attacker',
              '51000000-0000-4000-8000-0000000000ff', NULL)) ->> 'error',
          'account link refused: the account it names does not exist', 'a claim on no account: refused');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.account_link_refused'
            AND details ->> 'event_id' = 'evt_a7' AND account_id IS NULL), 1::bigint,
          'audited without an account when it names none');
SELECT is(public.process_stripe_event(pg_temp.sub('evt_v3', 'sub_victim', 'cus_victim',
              '51000000-0000-4000-8000-000000000001', 1750000100, 'updated')) ->> 'result', 'processed',
          'the owner''s later events apply after every refusal');
SELECT is(public.process_stripe_event(pg_temp.sub('evt_l1', 'sub_linked2', 'cus_linked', NULL)) ->> 'result',
          'processed', 'our customer without a claim: applied by the customer');
SELECT is((SELECT count(*) FROM public.stripe_events WHERE status = 'refused'), 7::bigint,
          'refusals are counted by status');

-- Pending: the claimed account's customer creation has not been recorded yet.
SELECT pg_temp.create_customer('51000000-0000-4000-8000-000000000003', NULL, false);
SELECT is(public.process_stripe_event(pg_temp.sub('evt_p1', 'sub_pending', 'cus_pending',
              '51000000-0000-4000-8000-000000000003')) ->> 'result', 'deferred',
          'a claim on an account whose customer of ours is being created: deferred');
SELECT is(public.process_stripe_event(pg_temp.sub('evt_p2', 'sub_pending_forged', 'cus_forger',
              '51000000-0000-4000-8000-000000000003')) ->> 'result', 'deferred',
          'a forged one looks the same until the creation lands');
SELECT is(pg_temp.customer_of('51000000-0000-4000-8000-000000000003'), NULL, 'neither linked anything');
UPDATE public.billing_attempts SET status = 'succeeded', object_id = 'cus_pending'
 WHERE account_id = '51000000-0000-4000-8000-000000000003';
UPDATE public.accounts SET stripe_customer_id = 'cus_pending' WHERE id = '51000000-0000-4000-8000-000000000003';
SELECT is(public.reprocess_stripe_event('evt_p1') ->> 'result', 'processed',
          'once our creation is recorded, the retry applies ours');
SELECT is(public.reprocess_stripe_event('evt_p2') ->> 'result', 'refused',
          '... and refuses the forged one');
-- A pending attempt older than Stripe keeps idempotency keys can no longer land.
UPDATE public.billing_attempts SET created_at = now() - interval '25 hours', status = 'pending', object_id = NULL
 WHERE account_id = '51000000-0000-4000-8000-000000000003';
UPDATE public.accounts SET stripe_customer_id = NULL WHERE id = '51000000-0000-4000-8000-000000000003';
SELECT is(public.process_stripe_event(pg_temp.sub('evt_p3', 'sub_pending3', 'cus_other',
              '51000000-0000-4000-8000-000000000003')) ->> 'result', 'refused',
          'a customer creation pending for more than 24 h defers nothing');

-- Repair: a customer we created for an account whose stored link is gone.
SELECT pg_temp.create_customer('51000000-0000-4000-8000-000000000004', 'cus_repaired', true);
UPDATE public.accounts SET stripe_customer_id = NULL WHERE id = '51000000-0000-4000-8000-000000000004';
SELECT is(public.process_stripe_event(pg_temp.sub('evt_r1', 'sub_repaired', 'cus_repaired',
              '51000000-0000-4000-8000-000000000004')) ->> 'result', 'processed',
          'our customer (by its creation record) applies');
SELECT is(pg_temp.customer_of('51000000-0000-4000-8000-000000000004'), 'cus_repaired',
          'and is linked again');

-- No customer at all: malformed, not a claim to follow.
SELECT is(public.process_stripe_event(pg_temp.sub('evt_n1', 'sub_nocust', NULL,
              '51000000-0000-4000-8000-000000000002')) ->> 'error',
          'the event names no Stripe customer', 'a subscription without a customer: failed');
SELECT pg_temp.unbecome();

SELECT * FROM finish();
ROLLBACK;
