-- 50_billing.sql: the plan catalogue and billing attempts (050_billing.sql).
BEGIN;
SELECT plan(45);

INSERT INTO auth.users (id, aud, role, email)
VALUES ('50000000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'buyer@example.com'),
       ('50000000-0000-4000-8000-000000000002', 'authenticated', 'authenticated', 'other@example.com');

CREATE FUNCTION pg_temp.fp(p text) RETURNS text LANGUAGE sql AS $$
    SELECT encode(sha256(convert_to(p, 'UTF8')), 'hex')
$$;
CREATE FUNCTION pg_temp.begin(p_kind text, p_request text,
                              p_account uuid DEFAULT '50000000-0000-4000-8000-000000000001')
RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.billing_attempt_begin(p_account, p_kind, pg_temp.fp(p_request))
$$;

-- The catalogue --------------------------------------------------------------------------
SELECT is(jsonb_array_length(public.plan_catalogue()), 7, 'the seed sells seven prices');
SELECT is((SELECT array_agg(e ->> 'price_id' ORDER BY n) FROM jsonb_array_elements(public.plan_catalogue())
              WITH ORDINALITY AS x(e, n)),
          ARRAY['price_free', 'price_starter', 'price_starter_annual', 'price_professional',
                'price_professional_annual', 'price_enterprise', 'price_enterprise_annual'],
          'in display order: sort_order, tier, month before year');
SELECT is(public.plan_catalogue() -> 2,
          '{"price_id": "price_starter_annual", "tier": "starter", "name": "Starter", "interval": "year",
            "amount": 9600, "currency": "usd", "trial_days": 14,
            "limits": {"max_agents": 3, "max_messages_per_day": 1000, "max_storage_gb": 5,
                       "memory_limit_mb": 1024, "cpu_limit": 1.00}}'::jsonb,
          'a plan shows its price, interval, trial and limits');
INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_storage_gb, memory_limit_mb,
                          cpu_limit, amount)
VALUES ('price_starter_2023', 'starter', 'Starter (2023)', 3, 5, 1024, 1.0, 500);
SELECT ok(NOT public.plan_catalogue() @> '[{"price_id": "price_starter_2023"}]',
          'a new plan is not for sale until it is made active');
SELECT throws_ok($$UPDATE public.plans SET active = true WHERE stripe_price_id = 'price_starter_2023'$$,
                 '23505', NULL, 'one active price per tier and interval');
SELECT throws_ok($$INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_storage_gb,
                   memory_limit_mb, cpu_limit, active) VALUES ('price_x', 'free', 'X', 1, 1, 256, 0.25, true)$$,
                 '23514', NULL, 'an active plan needs an amount');
SELECT is((SELECT tier::text FROM public.plan_for('starter', 'price_starter_annual')), 'starter',
          'a yearly price maps to its tier like any plan');
SELECT is((SELECT stripe_price_id FROM public.plan_for('starter', 'price_unknown')), 'price_starter',
          'the tier''s first plan is still the monthly one');

-- The plan a checkout asks for -------------------------------------------------------------
SELECT is(public.billing_checkout_plan('professional', 'year', NULL) ->> 'price_id',
          'price_professional_annual', 'by tier and interval');
SELECT is(public.billing_checkout_plan(NULL, NULL, 'price_enterprise') - 'name',
          '{"result": "ok", "price_id": "price_enterprise", "tier": "enterprise", "interval": "month",
            "trial_days": 0}'::jsonb, 'by price id');
SELECT is(public.billing_checkout_plan(NULL, NULL, 'price_starter_2023') ->> 'result', 'inactive',
          'an inactive price is named as such');
SELECT is(public.billing_checkout_plan('gold', 'month', NULL) ->> 'result', 'unknown', 'an unknown tier');
SELECT is(public.billing_checkout_plan('free', 'year', NULL) ->> 'result', 'unknown',
          'a tier without that interval');
SELECT is(public.billing_checkout_plan(NULL, NULL, 'price_nope') ->> 'result', 'unknown', 'an unknown price');

-- The account ------------------------------------------------------------------------------
SELECT is(public.billing_account('not-a-uuid'), '{"found": false}', 'a sub that is not a uuid');
SELECT is(public.billing_account('50000000-0000-4000-8000-00000000ffff'), '{"found": false}',
          'a user without an account');
SELECT is(public.billing_account('50000000-0000-4000-8000-000000000001'),
          '{"found": true, "email": "buyer@example.com", "customer": null, "live_status": null,
            "had_subscription": false, "checkout_paid": false}', 'a new account');
SELECT is(public.billing_account('5eed5eed-0000-4000-8000-000000000001') ->> 'live_status', 'active',
          'the seed''s account has a live subscription');
INSERT INTO public.subscriptions (account_id, tier, stripe_price_id, status)
VALUES ('50000000-0000-4000-8000-000000000002', 'starter', 'price_starter', 'cancelled');
SELECT is(public.billing_account('50000000-0000-4000-8000-000000000002') - 'email' - 'found',
          '{"customer": null, "live_status": null, "had_subscription": true, "checkout_paid": false}',
          'a cancelled subscription does not block a checkout, and counts as had');
UPDATE public.subscriptions SET status = 'paused' WHERE account_id = '50000000-0000-4000-8000-000000000002';
SELECT is(public.billing_account('50000000-0000-4000-8000-000000000002') ->> 'live_status', 'paused',
          'a paused one does');
UPDATE public.subscriptions SET status = 'incomplete' WHERE account_id = '50000000-0000-4000-8000-000000000002';
SELECT is(public.billing_account('50000000-0000-4000-8000-000000000002') ->> 'live_status', 'incomplete',
          'so does an incomplete one (its first payment may be processing)');
UPDATE public.subscriptions SET status = 'incomplete_expired' WHERE account_id = '50000000-0000-4000-8000-000000000002';
SELECT is(public.billing_account('50000000-0000-4000-8000-000000000002') ->> 'live_status', NULL,
          'an incomplete_expired one does not');
UPDATE public.subscriptions SET status = 'paused' WHERE account_id = '50000000-0000-4000-8000-000000000002';

-- Attempts -----------------------------------------------------------------------------------
SELECT is(pg_temp.begin('customer', 'c1') - 'attempt_id' - 'idempotency_key',
          '{"state": "send", "resumed": false}', 'a first request starts an attempt');
SELECT is((SELECT idempotency_key ~ '^mindroom-customer-[0-9a-f-]{36}$' FROM public.billing_attempts
            WHERE kind = 'customer'), true, 'with a key of its own');
SELECT is(pg_temp.begin('customer', 'c1') ->> 'idempotency_key',
          (SELECT idempotency_key FROM public.billing_attempts WHERE kind = 'customer'),
          'the same request while pending is sent again with the same key');
SELECT is((SELECT calls FROM public.billing_attempts WHERE kind = 'customer'), 2, 'and counted');
SELECT isnt(pg_temp.begin('customer', 'c2') ->> 'idempotency_key',
            (SELECT idempotency_key FROM public.billing_attempts WHERE kind = 'customer' AND calls = 2),
            'another request gets a new key');
SELECT results_eq($$SELECT status FROM public.billing_attempts WHERE kind = 'customer' ORDER BY calls DESC$$,
                  ARRAY['abandoned', 'pending'], 'and the older pending attempt is abandoned');
SELECT is(public.billing_attempt_succeeded(
              (SELECT id FROM public.billing_attempts WHERE kind = 'customer' AND status = 'pending'),
              'cus_new', NULL, NULL, false),
          '{"object_id": "cus_new", "url": null, "expires_at": null}', 'a created customer...');
SELECT is((SELECT stripe_customer_id FROM public.accounts WHERE id = '50000000-0000-4000-8000-000000000001'),
          'cus_new', '... is linked to the account in the same transaction');
SELECT is(pg_temp.begin('customer', 'c3') ->> 'object_id', 'cus_new',
          'once linked, no customer is created again');
SELECT lives_ok($$SELECT public.billing_attempt_succeeded(
                     (SELECT id FROM public.billing_attempts WHERE object_id = 'cus_new'), 'cus_new', NULL, NULL, false)$$,
                'recording the same success twice is harmless');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'billing.customer_created'
             AND account_id = '50000000-0000-4000-8000-000000000001'), 1::bigint, 'and audited once');
-- A customer created while the account got another one keeps the account's.
SELECT is(public.billing_attempt_succeeded(
              (SELECT id FROM public.billing_attempts WHERE status = 'abandoned'), 'cus_late', NULL, NULL, false)
          ->> 'object_id', 'cus_new', 'a late second customer does not replace the linked one');
SELECT is((SELECT error FROM public.billing_attempts WHERE object_id = 'cus_late'),
          'account already linked to another customer; this one is unused', 'and says so');

-- Checkout: an open session of the last hour is answered again.
SELECT public.billing_attempt_succeeded((pg_temp.begin('checkout', 's1') ->> 'attempt_id')::uuid,
                                        'cs_1', 'https://checkout.test/cs_1',
                                        extract(epoch FROM now() + interval '24 hours')::bigint, false);
SELECT is(pg_temp.begin('checkout', 's1') - 'expires_at',
          jsonb_build_object('state', 'done', 'object_id', 'cs_1', 'url', 'https://checkout.test/cs_1',
                             'attempt_id', (SELECT b.id FROM public.billing_attempts b WHERE b.object_id = 'cs_1')),
          'the same checkout request gets the same open session, and the attempt that made it');
UPDATE public.billing_attempts SET created_at = now() - interval '2 hours' WHERE object_id = 'cs_1';
SELECT is(pg_temp.begin('checkout', 's1') ->> 'state', 'send', 'an older one does not');
-- Stripe keeps keys 24 hours: a pending attempt older than 23 is never resumed.
UPDATE public.billing_attempts SET created_at = now() - interval '23 hours 1 minute'
 WHERE kind = 'checkout' AND status = 'pending';
SELECT is(pg_temp.begin('checkout', 's1') ->> 'resumed', 'false', 'an expiring key is not reused');
-- A portal session lives minutes: its pending attempt is resumed for one minute only.
SELECT pg_temp.begin('portal', 'p1');
SELECT is(pg_temp.begin('portal', 'p1') ->> 'resumed', 'true', 'a portal retry within the minute');
UPDATE public.billing_attempts SET created_at = now() - interval '2 minutes' WHERE kind = 'portal';
SELECT is(pg_temp.begin('portal', 'p1') ->> 'resumed', 'false', 'not after it');
-- Failures.
SELECT is(public.billing_attempt_failed((SELECT id FROM public.billing_attempts
                                          WHERE kind = 'portal' AND status = 'pending'), 'no answer', false),
          '{"status": "pending"}', 'an unknown outcome stays pending');
SELECT is(public.billing_attempt_failed((SELECT id FROM public.billing_attempts
                                          WHERE kind = 'portal' AND status = 'pending'), 'HTTP 400', true),
          '{"status": "failed"}', 'a refusal closes the attempt');
SELECT is(pg_temp.begin('portal', 'p1') ->> 'resumed', 'false', 'and a failed attempt is never resumed');
SELECT throws_ok($$SELECT public.billing_attempt_begin('50000000-0000-4000-8000-00000000ffff', 'customer',
                                                       pg_temp.fp('x'))$$,
                 'P0002', NULL, 'an unknown account is refused');

-- Privileges ---------------------------------------------------------------------------------
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'public' AND (p.proname LIKE 'billing\_%' OR p.proname = 'plan_catalogue')
             AND (has_function_privilege('authenticated', p.oid, 'EXECUTE')
                  OR NOT has_function_privilege('service_role', p.oid, 'EXECUTE'))),
          NULL, 'only service_role executes the billing functions (users could link any customer)');

SELECT * FROM finish();
ROLLBACK;
