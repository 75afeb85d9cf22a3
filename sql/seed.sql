-- seed.sql: local/test data. Idempotent: running it again changes nothing.
--   psql CONNINFO -v ON_ERROR_STOP=1 -f sql/seed.sql

-- Plans for the four tiers (local/test price ids; the operator inserts the real ones).
INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_messages_per_day,
                          max_storage_gb, memory_limit_mb, cpu_limit)
VALUES ('price_free',         'free',         'Free',            1,    100,   1,  512, 0.5),
       ('price_starter',      'starter',      'Starter',         3,   1000,   5, 1024, 1.0),
       ('price_professional', 'professional', 'Professional',   10,  10000,  20, 2048, 2.0),
       ('price_enterprise',   'enterprise',   'Enterprise',    100, 100000, 100, 4096, 4.0)
ON CONFLICT (stripe_price_id) DO NOTHING;

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
