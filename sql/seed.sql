-- seed.sql: local/test data. Idempotent: running it again changes nothing.
--   psql CONNINFO -v ON_ERROR_STOP=1 -f sql/seed.sql

-- Plans for the four tiers (local/test price ids; the operator inserts the real ones):
-- a monthly and a yearly price per paid tier, the same limits on both. Amounts are in
-- cents. A row is put on sale only where no other row sells that tier and interval, and
-- a row the seed wrote before is left alone (an operator may have taken it off sale),
-- except that a row from before the catalogue existed (no amount) gets its display data.
INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_messages_per_day,
                          max_storage_gb, memory_limit_mb, cpu_limit,
                          billing_interval, amount, currency, trial_days, sort_order, active)
SELECT v.*, NOT EXISTS (SELECT 1 FROM public.plans p
                         WHERE p.tier = v.tier AND p.billing_interval = v.billing_interval
                           AND p.active AND p.stripe_price_id <> v.stripe_price_id)
  FROM (VALUES
    ('price_free', 'free'::public.subscription_tier, 'Free', 1, 100, 1, 512, 0.5,
     'month', 0, 'usd', 0, 10),
    ('price_starter',             'starter',      'Starter',        3,   1000,   5, 1024, 1.0,
     'month',   1000, 'usd', 14, 20),
    ('price_starter_annual',      'starter',      'Starter',        3,   1000,   5, 1024, 1.0,
     'year',    9600, 'usd', 14, 20),
    ('price_professional',        'professional', 'Professional',  10,  10000,  20, 2048, 2.0,
     'month',   4900, 'usd', 14, 30),
    ('price_professional_annual', 'professional', 'Professional',  10,  10000,  20, 2048, 2.0,
     'year',   47000, 'usd', 14, 30),
    ('price_enterprise',          'enterprise',   'Enterprise',   100, 100000, 100, 4096, 4.0,
     'month',  19900, 'usd',  0, 40),
    ('price_enterprise_annual',   'enterprise',   'Enterprise',   100, 100000, 100, 4096, 4.0,
     'year',  191000, 'usd',  0, 40)
  ) AS v (stripe_price_id, tier, name, max_agents, max_messages_per_day, max_storage_gb,
          memory_limit_mb, cpu_limit, billing_interval, amount, currency, trial_days, sort_order)
ON CONFLICT (stripe_price_id) DO UPDATE SET
    billing_interval = EXCLUDED.billing_interval, amount = EXCLUDED.amount,
    currency = EXCLUDED.currency, trial_days = EXCLUDED.trial_days,
    sort_order = EXCLUDED.sort_order, active = EXCLUDED.active
WHERE plans.amount IS NULL;

-- The homeserver's share of each tier (on top of the plan's memory_limit_mb and
-- cpu_limit, which are MindRoom's): a quarter to a half of MindRoom's.
UPDATE public.plans p
   SET homeserver_memory_mb = v.mb, homeserver_cpu = v.cpu
  FROM (VALUES ('free', 256, 0.25), ('starter', 512, 0.5), ('professional', 1024, 1.0),
               ('enterprise', 2048, 2.0)) AS v (tier, mb, cpu)
 WHERE p.tier::text = v.tier AND p.stripe_price_id LIKE 'price\_%'
   AND (p.homeserver_memory_mb, p.homeserver_cpu) IS DISTINCT FROM (v.mb, v.cpu);

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
