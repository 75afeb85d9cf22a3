-- 159_deleted_account_checkout.sql: the checkout.session.completed of an account that
-- was deleted (its session paid after the deletion) is recorded ignored, with why,
-- not as a refused account link; a checkout naming a live account other than its
-- customer's, or an account that never existed, is still refused.
BEGIN;
\ir _helpers.inc
SELECT plan(7);

INSERT INTO auth.users (id, email) VALUES
    ('c1590000-0000-4000-8000-000000000001', 'gone@example.com'),
    ('c1590000-0000-4000-8000-000000000002', 'here@example.com');
UPDATE public.accounts SET stripe_customer_id = 'cus_c159gone'
 WHERE id = 'c1590000-0000-4000-8000-000000000001';
UPDATE public.accounts SET stripe_customer_id = 'cus_c159here'
 WHERE id = 'c1590000-0000-4000-8000-000000000002';
-- As create-checkout-session makes it: client_reference_id and metadata.account_id.
CREATE FUNCTION pg_temp.checkout(p_id text, p_customer text, p_account text) RETURNS text LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'id', p_id, 'object', 'event', 'type', 'checkout.session.completed',
        'created', 1750000100, 'livemode', false,
        'data', jsonb_build_object('object', jsonb_build_object(
            'id', 'cs_' || p_id, 'object', 'checkout.session', 'customer', p_customer,
            'client_reference_id', p_account, 'metadata', jsonb_build_object('account_id', p_account),
            'mode', 'subscription', 'subscription', 'sub_' || p_id)))::text
$$;
CREATE FUNCTION pg_temp.refusals() RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM public.audit_logs WHERE action = 'stripe.account_link_refused'
$$;

DELETE FROM auth.users WHERE id = 'c1590000-0000-4000-8000-000000000001';

SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_c159a', pg_temp.checkout('evt_c159a', 'cus_c159gone',
              'c1590000-0000-4000-8000-000000000001'), true) ->> 'result',
          'ignored', 'the deleted account''s paid checkout is ignored');
SELECT pg_temp.unbecome();
SELECT matches((SELECT e.error FROM public.stripe_events e WHERE e.id = 'evt_c159a'),
            'deleted', 'with why');
SELECT is(pg_temp.refusals(), 0::bigint, 'no refused link is recorded');

-- Under a customer of its own (a session whose customer our record of was deleted
-- with the account): ignored too.
SELECT pg_temp.become('service_role');
SELECT is(public.process_stripe_event('evt_c159b', pg_temp.checkout('evt_c159b', 'cus_c159new',
              'c1590000-0000-4000-8000-000000000001'), true) ->> 'result',
          'ignored', 'under another customer no account has, ignored too');

-- Real refusals stay: a live account's customer naming the deleted account, and a
-- customer no account has naming an account that never existed.
SELECT is(public.process_stripe_event('evt_c159c', pg_temp.checkout('evt_c159c', 'cus_c159here',
              'c1590000-0000-4000-8000-000000000001'), true) ->> 'result',
          'refused', 'a live account''s customer naming another account is refused');
SELECT is(public.process_stripe_event('evt_c159d', pg_temp.checkout('evt_c159d', 'cus_c159other',
              'c1590000-0000-4000-8000-00000000dead'), true) ->> 'result',
          'refused', 'naming an account that never existed is refused');
SELECT pg_temp.unbecome();
SELECT is(pg_temp.refusals(), 2::bigint, 'both are audited as refused links');

SELECT * FROM finish();
ROLLBACK;
