-- 197_apps_read_only.sql (197_apps_read_only_in_sql.sql): a third-party app's token
-- (Supabase Auth's OAuth server: the user's role and sub, plus client_id) reads what
-- the user reads and changes nothing, when it reaches the database without a
-- function: Supabase's Data API sets role and request.jwt.claims exactly as
-- pg_temp.cell does.
BEGIN;
\ir _helpers.inc
SELECT pg_temp.fixture();
SELECT plan(11);

-- An app's session of user A: the user's claims and a client_id, "app-1", or (the rule
-- is the claim, not its value) an empty or a null one.
CREATE FUNCTION pg_temp.as_app(p_client jsonb, p_sql text) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.cell_claims(pg_temp.claims('aaaaaaaa-0000-4000-8000-000000000001')
                               || jsonb_build_object('client_id', p_client), p_sql)
$$;
UPDATE public.instances SET applied_config_version = config_version, welcome_email_sent_at = now();

SELECT is(pg_temp.as_app('"app-1"', $$SELECT * FROM public.accounts$$), 'ok:1',
          'an app reads the user''s account');
SELECT is(pg_temp.as_app('"app-1"', $$SELECT public.tenant_instance(NULL)$$), 'ok:1',
          'and the instance (my-instance''s view)');
SELECT is(pg_temp.as_app('"app-1"', $$UPDATE public.accounts SET full_name = 'renamed by an app'$$), 'ok:0',
          'an app renames no account');
SELECT is(pg_temp.as_app('""', $$UPDATE public.accounts SET full_name = 'renamed by an app'$$), 'ok:0',
          'whatever its client_id says');
SELECT is(pg_temp.as_app('"app-1"', $$SELECT public.tenant_instance_restart(NULL)$$), 'err:42501',
          'an app cannot restart the instance');
SELECT is(pg_temp.as_app('null', $$SELECT public.tenant_instance_restart(NULL)$$), 'err:42501',
          'nor with a null client_id');
SELECT is((SELECT restart_version FROM public.instances WHERE id = 'aaaaaaaa-0000-4000-8000-000000000003'),
          0::bigint, 'nothing was owed');

-- The user's own session does both.
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$UPDATE public.accounts SET full_name = 'A'$$), 'ok:1', 'the user renames its account');
SELECT is(pg_temp.cell('aaaaaaaa-0000-4000-8000-000000000001',
                       $$SELECT public.tenant_instance_restart(NULL) ->> 'outcome'$$), 'ok:1',
          'and restarts its instance');

-- What a user's token can change without a function is these two writes alone, so
-- that both ask is_users_own_session(); a new one must be added here, and ask it too.
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname)
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public' AND p.provolatile = 'v'
              AND has_function_privilege('authenticated', p.oid, 'EXECUTE')
              -- pgTAP's own functions (an extension's) are not the schema's.
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                                 AND d.objid = p.oid AND d.deptype = 'e')),
          ARRAY['tenant_instance_restart'], 'the one function a user''s token may call that writes');
SELECT is((SELECT array_agg(c.relname || '.' || a.attname ORDER BY c.relname, a.attname)
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
              AND (has_column_privilege('authenticated', c.oid, a.attname, 'INSERT')
                   OR has_column_privilege('authenticated', c.oid, a.attname, 'UPDATE'))),
          ARRAY['accounts.company_name', 'accounts.full_name'], 'the only columns it may write');

SELECT * FROM finish();
ROLLBACK;
