-- SQL functions and triggers other than the state machine: instance_names,
-- get_user_instance, track_usage, tier -> limits, auth.users -> accounts, auth.*(),
-- updated_at.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(70);

-- instance_names --------------------------------------------------------------------------
SELECT results_eq($$SELECT * FROM public.instance_names('0123abcd-ef45-4678-9abc-def012345678')$$,
                  $$VALUES ('mindroom-0123abcdef45', 'm0123abcdef45')$$,
                  'instance_names: mindroom-/m + first 12 hex digits');
SELECT is((SELECT dokku_app_name FROM public.instance_names('0123abcd-ef45-4678-9abc-def012345678')),
          (SELECT dokku_app_name FROM public.instance_names('0123abcd-ef45-4678-9abc-def012345678')),
          'instance_names is deterministic');
SELECT is(pg_temp.cell('service_role', $$SELECT * FROM public.instance_names(gen_random_uuid())$$),
          'ok:1', 'service_role can call instance_names');
SELECT is(pg_temp.cell('anon', $$SELECT * FROM public.instance_names(gen_random_uuid())$$),
          'err:42501', 'anon cannot call instance_names');

-- get_user_instance -------------------------------------------------------------------------
SELECT results_eq(
    $$SELECT instance_id, subdomain, status::text, tier::text FROM public.get_user_instance('aaaaaaaa-0000-4000-8000-000000000001')$$,
    $$SELECT 'aaaaaaaa-0000-4000-8000-000000000003'::uuid, subdomain, 'running', 'starter'
        FROM public.instance_names('aaaaaaaa-0000-4000-8000-000000000002')$$,
    'get_user_instance (superuser) returns the user''s running instance with the plan''s columns');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT * FROM public.get_user_instance('aaaaaaaa-0000-4000-8000-000000000001')$$),
          'ok:1', 'user A gets own instance');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT * FROM public.get_user_instance('bbbbbbbb-0000-4000-8000-000000000001')$$),
          'ok:0', 'user A gets nothing for B''s id');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT * FROM public.get_user_instance(NULL)$$),
          'ok:0', 'user A gets nothing for a NULL id');
SELECT is(pg_temp.cell('service_role',
          $$SELECT 1 FROM public.get_user_instance('bbbbbbbb-0000-4000-8000-000000000001')
             WHERE instance_id = 'bbbbbbbb-0000-4000-8000-000000000003'$$),
          'ok:1', 'service_role gets B''s instance by B''s id');
SELECT is(pg_temp.cell('anon', $$SELECT * FROM public.get_user_instance('aaaaaaaa-0000-4000-8000-000000000001')$$),
          'err:42501', 'anon cannot call get_user_instance');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT set_config('request.jwt.claims', '{"sub":"aaaaaaaa-0000-4000-8000-000000000001","role":"service_role"}', true);
            SELECT * FROM public.get_user_instance('bbbbbbbb-0000-4000-8000-000000000001')$$),
          'ok:0', 'a forged role claim does not make an authenticated caller service_role');
-- No `sub` in the claims: the guard alone answers, not Row Level Security (off for
-- this check, as for a role RLS does not hold).
ALTER TABLE public.instances DISABLE ROW LEVEL SECURITY;
ALTER TABLE public.subscriptions DISABLE ROW LEVEL SECURITY;
SELECT set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated"}', true);
SELECT count(*) AS bypass_rows
  FROM public.get_user_instance('bbbbbbbb-0000-4000-8000-000000000001') \gset
SELECT set_config('role', 'none', true), set_config('request.jwt.claims', '', true);
ALTER TABLE public.instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.subscriptions ENABLE ROW LEVEL SECURITY;
SELECT is(:bypass_rows::bigint, 0::bigint,
          'no sub in the claims: nothing for any user id, whatever RLS would hide');
SELECT is(pg_temp.cell('service_role',
          $$UPDATE public.subscriptions SET status = 'cancelled' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
            SELECT * FROM public.get_user_instance('aaaaaaaa-0000-4000-8000-000000000001')$$),
          'ok:0', 'nothing once the subscription is cancelled');
SELECT is(pg_temp.cell('service_role',
          $$UPDATE public.subscriptions SET status = 'past_due' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
            SELECT * FROM public.get_user_instance('aaaaaaaa-0000-4000-8000-000000000001')$$),
          'ok:1', 'past_due is still entitled');
SELECT is(pg_temp.cell('service_role',
          $$UPDATE public.instances SET status = 'stopped' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003';
            SELECT * FROM public.get_user_instance('aaaaaaaa-0000-4000-8000-000000000001')$$),
          'ok:0', 'nothing while the instance is stopped');

SELECT is(ARRAY(SELECT s::text FROM unnest(enum_range(NULL::public.subscription_status)) s
                 WHERE public.is_entitled(s) ORDER BY 1),
          ARRAY['active', 'past_due', 'trialing'], 'is_entitled: exactly trialing, active, past_due');

-- track_usage ---------------------------------------------------------------------------------
SELECT is(pg_temp.cell('anon', $$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003')$$),
          'err:42501', 'anon cannot call track_usage');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003')$$),
          'err:42501', 'an authenticated user cannot call track_usage, even for own instance');
SELECT is(pg_temp.cell('service_role', $$SELECT * FROM public.track_usage(gen_random_uuid())$$),
          'err:P0002', 'track_usage of an unknown instance raises P0002');

-- Counting, as service_role (kept).
SELECT pg_temp.become('service_role');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'alice', 'search')$$,
                  $$VALUES (true, 999)$$, 'first message: allowed, 999 of 1000 left');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'alice', 'calc')$$,
                  $$VALUES (true, 998)$$, 'second message: 998 left');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'bob', NULL)$$,
                  $$VALUES (true, 997)$$, 'third message: 997 left');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003')$$,
                  $$VALUES (true, 996)$$, 'a message without agent or tool counts too');
SELECT pg_temp.unbecome();
SELECT results_eq(
    $$SELECT messages_sent, agents_used, tools_used FROM public.usage_metrics
       WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003' AND date = CURRENT_DATE$$,
    $$VALUES (4, '{"alice": 2, "bob": 1}'::jsonb, '{"search": 1, "calc": 1}'::jsonb)$$,
    'usage_metrics counts messages per agent and per tool');
SELECT is((SELECT messages_sent FROM public.usage_metrics WHERE id = 'aaaaaaaa-0000-4000-8000-000000000004'),
          5, 'yesterday''s usage row is untouched');
SELECT is((SELECT current_messages_today FROM public.subscriptions WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'),
          4, 'the subscription''s daily counter follows');
SELECT is((SELECT current_messages_today FROM public.subscriptions WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002'),
          0, 'B''s counter is untouched');

-- Lazy reset on a new day.
UPDATE public.subscriptions SET current_messages_today = 1000, last_reset_at = CURRENT_DATE - 1
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT pg_temp.become('service_role');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'alice')$$,
                  $$VALUES (true, 999)$$, 'first call of a new day starts again from zero');
SELECT pg_temp.unbecome();
SELECT results_eq($$SELECT current_messages_today, last_reset_at FROM public.subscriptions
                     WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$,
                  $$VALUES (1, CURRENT_DATE)$$, 'the counter was reset and last_reset_at is today');

-- The limit.
UPDATE public.subscriptions SET current_messages_today = 998 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT pg_temp.become('service_role');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'alice')$$,
                  $$VALUES (true, 1)$$, 'message 999 of 1000: one left');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'alice')$$,
                  $$VALUES (true, 0)$$, 'message 1000 of 1000: allowed, none left');
SELECT results_eq($$SELECT * FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003', 'alice')$$,
                  $$VALUES (false, 0)$$, 'message 1001: refused');
SELECT pg_temp.unbecome();
SELECT is((SELECT current_messages_today FROM public.subscriptions WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'),
          1000, 'a refused message is not counted on the subscription');
SELECT is((SELECT messages_sent FROM public.usage_metrics
            WHERE instance_id = 'aaaaaaaa-0000-4000-8000-000000000003' AND date = CURRENT_DATE),
          7, 'nor in usage_metrics');
-- Refused yesterday, allowed again today.
UPDATE public.subscriptions SET last_reset_at = CURRENT_DATE - 1 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.cell('service_role', $$SELECT 1 FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003')
                                          WHERE allowed AND remaining = 999$$),
          'ok:1', 'a subscription at its limit yesterday may send again today');
-- A tier change moves the limit.
UPDATE public.subscriptions SET last_reset_at = CURRENT_DATE, tier = 'professional', stripe_price_id = 'price_professional'
 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.cell('service_role', $$SELECT 1 FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003')
                                          WHERE allowed AND remaining = 10000 - 1001$$),
          'ok:1', 'after an upgrade the new tier''s limit applies');
-- NULL limit = unlimited.
UPDATE public.subscriptions SET max_messages_per_day = NULL WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002';
SELECT is(pg_temp.cell('service_role', $$SELECT 1 FROM public.track_usage('aaaaaaaa-0000-4000-8000-000000000003')
                                          WHERE allowed AND remaining IS NULL$$),
          'ok:1', 'an unlimited subscription is always allowed, remaining NULL');

-- tier -> limits ------------------------------------------------------------------------------
SELECT results_eq($$SELECT max_agents, max_messages_per_day, max_storage_gb FROM public.subscriptions
                     WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002'$$,
                  $$VALUES (3, 1000, 5)$$, 'a starter subscription gets the starter limits (3 agents, 1000/day)');
SELECT results_eq($$SELECT memory_limit_mb, cpu_limit FROM public.instances
                     WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                  $$VALUES (1024, 1.00::numeric)$$, 'its instance gets the starter memory and CPU');
UPDATE public.subscriptions SET tier = 'enterprise', stripe_price_id = 'price_enterprise'
 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
SELECT results_eq($$SELECT max_agents, max_messages_per_day, max_storage_gb FROM public.subscriptions
                     WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002'$$,
                  $$SELECT max_agents, max_messages_per_day, max_storage_gb FROM public.plans
                     WHERE stripe_price_id = 'price_enterprise'$$, 'an upgrade copies the new tier''s limits');
SELECT results_eq($$SELECT memory_limit_mb, cpu_limit FROM public.instances
                     WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                  $$VALUES (4096, 4.00::numeric)$$, 'and the live instance follows');
UPDATE public.subscriptions SET max_agents = 7 WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
UPDATE public.subscriptions SET status = 'past_due' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002';
SELECT is((SELECT max_agents FROM public.subscriptions WHERE id = 'bbbbbbbb-0000-4000-8000-000000000002'),
          7, 'an operator override survives updates that do not change tier or price');
INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_messages_per_day, max_storage_gb,
                          memory_limit_mb, cpu_limit)
VALUES ('price_starter_yearly', 'starter', 'Starter (yearly)', 4, 1200, 6, 1536, 1.5);
INSERT INTO public.subscriptions (id, account_id, tier, stripe_price_id)
VALUES ('bbbbbbbb-0000-4000-8000-000000000007', 'bbbbbbbb-0000-4000-8000-000000000001', 'starter', 'price_starter_yearly'),
       ('bbbbbbbb-0000-4000-8000-000000000008', 'bbbbbbbb-0000-4000-8000-000000000001', 'starter', 'price_unknown'),
       ('bbbbbbbb-0000-4000-8000-000000000009', 'bbbbbbbb-0000-4000-8000-000000000001', 'free', 'price_starter_yearly');
SELECT results_eq($$SELECT id, max_agents, max_messages_per_day FROM public.subscriptions
                     WHERE id IN ('bbbbbbbb-0000-4000-8000-000000000007', 'bbbbbbbb-0000-4000-8000-000000000008',
                                  'bbbbbbbb-0000-4000-8000-000000000009') ORDER BY id$$,
                  $$VALUES ('bbbbbbbb-0000-4000-8000-000000000007'::uuid, 4, 1200),
                           ('bbbbbbbb-0000-4000-8000-000000000008'::uuid, 3, 1000),
                           ('bbbbbbbb-0000-4000-8000-000000000009'::uuid, 1, 100)$$,
                  'the price''s own plan wins; an unknown price or one of another tier falls back to the tier''s first plan');
SELECT throws_ok($$DELETE FROM public.plans WHERE tier = 'enterprise';
                   INSERT INTO public.subscriptions (account_id, tier) VALUES ('bbbbbbbb-0000-4000-8000-000000000001', 'enterprise')$$,
                 '23514', 'no plan for tier enterprise', 'a tier without any plan is an error, not silent defaults');

-- auth.users -> accounts ---------------------------------------------------------------------
SELECT results_eq($$SELECT email, full_name FROM public.accounts WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$,
                  $$VALUES ('aaaaaaaa@example.com', 'User aaaaaaaa')$$,
                  'a new auth user gets an account with email and full_name from sign-up metadata');
SELECT is((SELECT count(*) FROM public.accounts WHERE id = 'cccccccc-0000-4000-8000-000000000001'),
          0::bigint, 'a user without email gets no account yet');
UPDATE auth.users SET email = 'c@example.com' WHERE id = 'cccccccc-0000-4000-8000-000000000001';
SELECT is((SELECT email FROM public.accounts WHERE id = 'cccccccc-0000-4000-8000-000000000001'),
          'c@example.com', '... and one once an email is set');
UPDATE auth.users SET email = 'a2@example.com' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001';
SELECT is((SELECT email FROM public.accounts WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'),
          'a2@example.com', 'an email change in auth.users reaches the account');
SELECT is((SELECT stripe_customer_id FROM public.accounts WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'),
          'cus_aaaaaaaa', 'and leaves the rest of the account alone');
DELETE FROM auth.users WHERE id = 'cccccccc-0000-4000-8000-000000000001';
SELECT is((SELECT count(*) FROM public.accounts WHERE id = 'cccccccc-0000-4000-8000-000000000001'),
          0::bigint, 'deleting the auth user deletes the account');
SELECT results_eq($$SELECT a.email, a.full_name, a.stripe_customer_id, s.tier::text, s.status::text,
                           s.max_agents, s.max_messages_per_day
                      FROM public.accounts a JOIN public.subscriptions s ON s.account_id = a.id
                     WHERE a.email = 'test@example.com'$$,
                  $$VALUES ('test@example.com', 'Test User', 'cus_test123', 'starter', 'active', 3, 1000)$$,
                  'the seed''s test account has an active starter subscription (3 agents, 1000/day)');

-- auth.uid(), auth.role(), auth.jwt() ----------------------------------------------------------
DO $do$ BEGIN PERFORM set_config('request.jwt.claims', '', true); PERFORM set_config('request.jwt.claim.sub', '', true); END $do$;
SELECT is(auth.uid(), NULL, 'auth.uid() is NULL without claims');
SELECT is(auth.role(), NULL, 'auth.role() is NULL without claims');
SELECT is(auth.jwt(), NULL, 'auth.jwt() is NULL without claims');
DO $do$ BEGIN PERFORM set_config('request.jwt.claims', '{"sub":"aaaaaaaa-0000-4000-8000-000000000001","role":"authenticated","email":"a@x"}', true); END $do$;
SELECT is(auth.uid(), 'aaaaaaaa-0000-4000-8000-000000000001'::uuid, 'auth.uid() reads sub from request.jwt.claims');
SELECT is(auth.role(), 'authenticated', 'auth.role() reads role from request.jwt.claims');
SELECT is(auth.jwt() ->> 'email', 'a@x', 'auth.jwt() returns the claims');
DO $do$ BEGIN PERFORM set_config('request.jwt.claims', '', true); PERFORM set_config('request.jwt.claim.sub', 'bbbbbbbb-0000-4000-8000-000000000001', true); END $do$;
SELECT is(auth.uid(), 'bbbbbbbb-0000-4000-8000-000000000001'::uuid, 'auth.uid() falls back to request.jwt.claim.sub');
DO $do$ BEGIN PERFORM set_config('request.jwt.claim.sub', '', true); END $do$;
SELECT is(pg_temp.cell('anon', 'SELECT auth.uid()'), 'ok:1', 'anon can call auth.uid() (policies need it)');

-- updated_at ---------------------------------------------------------------------------------
UPDATE public.instances SET updated_at = '2000-01-01' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003';
SELECT is((SELECT updated_at FROM public.instances WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'),
          now(), 'updated_at is set by the trigger, whatever the writer says');
SELECT is((SELECT updated_at FROM public.stripe_events WHERE id = 'evt_aaaaaaaa'),
          now(), 'stripe_events has updated_at as well');
SELECT has_column('public', 'instances', c, 'instances has ' || c)
  FROM unnest(ARRAY['desired_status', 'attempts', 'next_attempt_at', 'last_error', 'welcome_email_sent_at']) c;
SELECT col_default_is('public', 'instances', 'desired_status', 'running'::public.instance_status, 'desired_status defaults to running');
SELECT throws_ok($$UPDATE public.instances SET desired_status = 'provisioning' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000003'$$,
                 '23514', NULL, 'desired_status accepts only running, stopped, deprovisioned');
SELECT throws_ok($$INSERT INTO public.stripe_events (id, type, created, payload, status) VALUES ('evt_x', 'x', now(), '{}', 'weird')$$,
                 '23514', NULL, 'stripe_events.status is checked');
SELECT throws_ok($$INSERT INTO public.stripe_events (id, type, created, payload) VALUES ('evt_aaaaaaaa', 'x', now(), '{}')$$,
                 '23505', NULL, 'a duplicate Stripe event id is rejected');

SELECT * FROM finish();
ROLLBACK;
