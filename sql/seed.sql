-- seed.sql: local/test data. Idempotent: running it again changes nothing.
--   psql CONNINFO -v ON_ERROR_STOP=1 -f sql/seed.sql

-- Plans for the four tiers (local/test price ids; the operator inserts the real ones):
-- a monthly and a yearly price per paid tier, the same limits on both. Amounts are in
-- cents. On a database seeded before the catalogue existed, the display columns are
-- filled in (limits are left as they are).
INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_messages_per_day,
                          max_storage_gb, memory_limit_mb, cpu_limit,
                          billing_interval, amount, currency, trial_days, sort_order, active)
VALUES ('price_free',                'free',         'Free',           1,    100,   1,  512, 0.5,
        'month',      0, 'usd',  0, 10, true),
       ('price_starter',             'starter',      'Starter',        3,   1000,   5, 1024, 1.0,
        'month',   1000, 'usd', 14, 20, true),
       ('price_starter_annual',      'starter',      'Starter',        3,   1000,   5, 1024, 1.0,
        'year',    9600, 'usd', 14, 20, true),
       ('price_professional',        'professional', 'Professional',  10,  10000,  20, 2048, 2.0,
        'month',   4900, 'usd', 14, 30, true),
       ('price_professional_annual', 'professional', 'Professional',  10,  10000,  20, 2048, 2.0,
        'year',   47000, 'usd', 14, 30, true),
       ('price_enterprise',          'enterprise',   'Enterprise',   100, 100000, 100, 4096, 4.0,
        'month',  19900, 'usd',  0, 40, true),
       ('price_enterprise_annual',   'enterprise',   'Enterprise',   100, 100000, 100, 4096, 4.0,
        'year',  191000, 'usd',  0, 40, true)
ON CONFLICT (stripe_price_id) DO UPDATE SET
    billing_interval = EXCLUDED.billing_interval, amount = EXCLUDED.amount,
    currency = EXCLUDED.currency, trial_days = EXCLUDED.trial_days,
    sort_order = EXCLUDED.sort_order, active = EXCLUDED.active
WHERE (plans.billing_interval, plans.amount, plans.currency, plans.trial_days,
       plans.sort_order, plans.active)
      IS DISTINCT FROM (EXCLUDED.billing_interval, EXCLUDED.amount, EXCLUDED.currency,
                        EXCLUDED.trial_days, EXCLUDED.sort_order, EXCLUDED.active);

-- The plan's test account, created through auth.users so the account trigger runs.
INSERT INTO auth.users (id, aud, role, email, raw_app_meta_data, raw_user_meta_data)
VALUES ('5eed5eed-0000-4000-8000-000000000001', 'authenticated', 'authenticated',
        'test@example.com', '{"provider": "email"}', '{"full_name": "Test User"}')
ON CONFLICT (id) DO NOTHING;

UPDATE public.accounts
   SET full_name = 'Test User', stripe_customer_id = 'cus_test123'
 WHERE id = '5eed5eed-0000-4000-8000-000000000001'
   AND (full_name IS DISTINCT FROM 'Test User' OR stripe_customer_id IS DISTINCT FROM 'cus_test123');

-- An active starter subscription: its limits (3 agents, 1000 messages a day) come
-- from the starter plan through the trigger.
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
VALUES ('5eed5eed-0000-4000-8000-000000000101', '5eed5eed-0000-4000-8000-000000000001',
        'price_starter', 'starter', 'active')
ON CONFLICT (id) DO NOTHING;
