-- 198_subscription_without_instance_own_account.sql: the account's subscription
-- without an instance is answered only to that account or the service role, also to
-- a caller Row Level Security does not hold.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(7);

INSERT INTO public.subscriptions (id, account_id, tier, status)
VALUES ('aaaaaaaa-0000-4000-8000-000000000009', 'aaaaaaaa-0000-4000-8000-000000000001', 'starter', 'incomplete'),
       ('bbbbbbbb-0000-4000-8000-000000000009', 'bbbbbbbb-0000-4000-8000-000000000001', 'starter', 'incomplete');

-- p_account's answer to a caller of these claims (RLS as it stands).
CREATE FUNCTION pg_temp.asked(p_claims jsonb, p_account uuid) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v text;
BEGIN
    PERFORM pg_temp.become_claims(p_claims);
    v := public.tenant_subscription_without_instance_id(p_account)::text || ' '
         || public.tenant_subscription_without_instance(p_account)::text;
    PERFORM pg_temp.unbecome();
    RETURN v;
END $$;

SELECT is(pg_temp.asked(pg_temp.claims('aaaaaaaa-0000-4000-8000-000000000001'),
                        'aaaaaaaa-0000-4000-8000-000000000001'),
          'aaaaaaaa-0000-4000-8000-000000000009 incomplete', 'a user gets its own');
SELECT is(pg_temp.asked(pg_temp.claims('aaaaaaaa-0000-4000-8000-000000000001'),
                        'bbbbbbbb-0000-4000-8000-000000000001'),
          NULL, 'not another account''s');
SELECT is(pg_temp.cell('service_role', $$
            SELECT 1 WHERE public.tenant_subscription_without_instance_id('bbbbbbbb-0000-4000-8000-000000000001')
                           = 'bbbbbbbb-0000-4000-8000-000000000009'
                       AND public.tenant_subscription_without_instance('bbbbbbbb-0000-4000-8000-000000000001')
                           = 'incomplete'$$),
          'ok:1', 'the service role gets any account''s');

-- As a caller exempt from Row Level Security (BYPASSRLS) would: the functions' own
-- rule alone answers. (psql unsets a variable \gset gives NULL: '-' stands for none.)
ALTER TABLE public.subscriptions DISABLE ROW LEVEL SECURITY;
ALTER TABLE public.instances DISABLE ROW LEVEL SECURITY;
SELECT set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"sub":"aaaaaaaa-0000-4000-8000-000000000001","role":"authenticated"}', true);
SELECT coalesce(public.tenant_subscription_without_instance_id('bbbbbbbb-0000-4000-8000-000000000001')::text || ' '
                || public.tenant_subscription_without_instance('bbbbbbbb-0000-4000-8000-000000000001')::text,
                '-') AS other_account,
       coalesce(public.tenant_subscription_without_instance_id('aaaaaaaa-0000-4000-8000-000000000001')::text || ' '
                || public.tenant_subscription_without_instance('aaaaaaaa-0000-4000-8000-000000000001')::text,
                '-') AS own \gset
SELECT set_config('request.jwt.claims', '{"role":"authenticated"}', true);
SELECT coalesce(public.tenant_subscription_without_instance_id('bbbbbbbb-0000-4000-8000-000000000001')::text,
                '-') AS no_user \gset
SELECT set_config('role', 'none', true), set_config('request.jwt.claims', '', true);
ALTER TABLE public.subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.instances ENABLE ROW LEVEL SECURITY;
SELECT is(:'other_account'::text, '-', 'RLS off: still not another account''s');
SELECT is(:'no_user'::text, '-', 'RLS off: nothing to claims without a user');
SELECT is(:'own'::text, 'aaaaaaaa-0000-4000-8000-000000000009 incomplete', 'RLS off: its own still');
SELECT is((SELECT count(*) FROM public.subscriptions WHERE id IN ('aaaaaaaa-0000-4000-8000-000000000009',
                                                               'bbbbbbbb-0000-4000-8000-000000000009')),
          2::bigint, 'nothing changed');

SELECT * FROM finish();
ROLLBACK;
