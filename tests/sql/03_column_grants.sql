-- Column grants: a user changes only harmless profile columns of their own account,
-- and never reads instances.environment_vars.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(30);

-- A's own rows; every statement below targets them (so RLS alone would allow them).
CREATE TEMP TABLE t_denied (label text, stmt text);
INSERT INTO t_denied VALUES
 ('accounts.email',                       $$UPDATE public.accounts SET email = 'evil@example.com' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$),
 ('accounts.stripe_customer_id',          $$UPDATE public.accounts SET stripe_customer_id = 'cus_evil' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$),
 ('accounts.id',                          $$UPDATE public.accounts SET id = 'bbbbbbbb-0000-4000-8000-000000000001' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$),
 ('accounts.created_at',                  $$UPDATE public.accounts SET created_at = now() WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$),
 ('subscriptions.tier',                   $$UPDATE public.subscriptions SET tier = 'enterprise' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.status',                 $$UPDATE public.subscriptions SET status = 'active' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.max_agents',             $$UPDATE public.subscriptions SET max_agents = 1000 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.max_messages_per_day',   $$UPDATE public.subscriptions SET max_messages_per_day = NULL WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.max_storage_gb',         $$UPDATE public.subscriptions SET max_storage_gb = 1000 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.current_messages_today', $$UPDATE public.subscriptions SET current_messages_today = 0 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.stripe_subscription_id', $$UPDATE public.subscriptions SET stripe_subscription_id = 'sub_evil' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('subscriptions.stripe_price_id',        $$UPDATE public.subscriptions SET stripe_price_id = 'price_enterprise' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000002'$$),
 ('instances.status',                     $$UPDATE public.instances SET status = 'stopped' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('instances.desired_status',             $$UPDATE public.instances SET desired_status = 'stopped' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('instances.backend_url',                $$UPDATE public.instances SET backend_url = 'https://evil.test' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('instances.frontend_url',               $$UPDATE public.instances SET frontend_url = 'https://evil.test' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('instances.matrix_server_url',          $$UPDATE public.instances SET matrix_server_url = 'https://evil.test' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('instances.memory_limit_mb',            $$UPDATE public.instances SET memory_limit_mb = 65536 WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('instances.environment_vars',           $$UPDATE public.instances SET environment_vars = '{}' WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('read instances.environment_vars',      $$SELECT environment_vars FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('read instances.* (includes environment_vars)', $$SELECT * FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
 ('filter on instances.environment_vars', $$SELECT id FROM public.instances WHERE environment_vars ? 'OPENAI_API_KEY'$$);

SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001', stmt), 'err:42501',
          'user A cannot ' || CASE WHEN label LIKE 'read %' OR label LIKE 'filter %' THEN label
                                   ELSE 'change own ' || label END)
  FROM t_denied ORDER BY label;

-- What A may do.
SELECT is(pg_temp.run('aaaaaaaa-0000-4000-8000-000000000001',
          $$UPDATE public.accounts SET full_name = 'Ada A', company_name = 'A Corp'
             WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$),
          'ok:1', 'user A can change own full_name and company_name');
SELECT is((SELECT full_name || '/' || company_name FROM public.accounts
            WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'),
          'Ada A/A Corp', 'the change is stored');
SELECT is(pg_temp.run('aaaaaaaa-0000-4000-8000-000000000001',
          $$UPDATE public.accounts SET full_name = 'hijacked' WHERE id = 'bbbbbbbb-0000-4000-8000-000000000001'$$),
          'ok:0', 'user A''s update of B''s full_name matches no row');
SELECT is((SELECT full_name FROM public.accounts WHERE id = 'bbbbbbbb-0000-4000-8000-000000000001'),
          'User bbbbbbbb', 'B''s full_name is unchanged');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$SELECT id, subdomain, status, backend_url, frontend_url, memory_limit_mb, cpu_limit
              FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'$$),
          'ok:1', 'user A can read own instance''s other columns');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
          $$UPDATE public.accounts SET id = id WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'$$),
          'err:42501', 'user A cannot even rewrite own id to itself');
SELECT is(pg_temp.cell('service_role',
          $$SELECT 1 FROM public.instances WHERE environment_vars ->> 'OPENAI_API_KEY' = 'sk-secret'$$),
          'ok:2', 'service_role reads environment_vars');
SELECT is((SELECT email || ' ' || stripe_customer_id FROM public.accounts
            WHERE id = 'aaaaaaaa-0000-4000-8000-000000000001'),
          'aaaaaaaa@example.com cus_aaaaaaaa', 'A''s email and Stripe customer are unchanged');

SELECT * FROM finish();
ROLLBACK;
