-- Catalog-driven checks: they iterate the catalogs, so they stay true (and keep
-- guarding) as later migrations add tables and functions. Extension members (pgTAP
-- itself lives in public) are excluded. Each check also asserts that it sees the
-- schema, and that it reports a violation planted on purpose (then rolled back), so
-- none of them can pass vacuously.
BEGIN;
SELECT plan(33);

CREATE TEMP VIEW our_tables AS
SELECT c.oid, c.relname::text AS name, c.relrowsecurity
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                   AND d.objid = c.oid AND d.deptype = 'e');

CREATE TEMP VIEW our_functions AS
SELECT p.oid, p.oid::regprocedure::text AS sig, p.prosecdef, p.proconfig, p.provolatile,
       coalesce(p.proacl, acldefault('f', p.proowner)) AS acl
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                   AND d.objid = p.oid AND d.deptype = 'e');

-- Offender lists, one view per rule.
CREATE TEMP VIEW no_rls AS
SELECT name AS x FROM our_tables WHERE NOT relrowsecurity;

CREATE TEMP VIEW secdef_without_search_path AS
SELECT sig AS x FROM our_functions
 WHERE prosecdef AND NOT EXISTS (SELECT 1 FROM unnest(proconfig) s WHERE s LIKE 'search\_path=%');

CREATE TEMP VIEW function_without_search_path AS
SELECT sig AS x FROM our_functions
 WHERE NOT EXISTS (SELECT 1 FROM unnest(proconfig) s WHERE s LIKE 'search\_path=%');

CREATE TEMP VIEW writer_executable_by_anon_or_public AS
SELECT sig AS x FROM our_functions f
 WHERE provolatile = 'v'
   AND (has_function_privilege('anon', f.oid, 'EXECUTE')
        OR EXISTS (SELECT 1 FROM aclexplode(f.acl) a WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'));

CREATE TEMP VIEW function_executable_by_anon_or_public AS
SELECT sig AS x FROM our_functions f
 WHERE has_function_privilege('anon', f.oid, 'EXECUTE')
    OR EXISTS (SELECT 1 FROM aclexplode(f.acl) a WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE');

CREATE TEMP VIEW unindexed_foreign_key AS
SELECT c.conrelid::regclass::text || '.' || c.conname AS x
  FROM pg_constraint c JOIN our_tables t ON t.oid = c.conrelid
 WHERE c.contype = 'f'
   AND NOT EXISTS (
       SELECT 1 FROM pg_index i
        WHERE i.indrelid = c.conrelid AND i.indpred IS NULL
          AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] @> c.conkey
          AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] <@ c.conkey);

CREATE TEMP VIEW anon_table_privilege AS
SELECT name AS x FROM our_tables t
 WHERE has_table_privilege('anon', t.oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
    OR has_any_column_privilege('anon', t.oid, 'SELECT,INSERT,UPDATE,REFERENCES');

CREATE TEMP VIEW authenticated_write_privilege AS
SELECT name AS x FROM our_tables t
 WHERE has_table_privilege('authenticated', t.oid, 'INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
    OR has_any_column_privilege('authenticated', t.oid, 'INSERT,REFERENCES');

CREATE TEMP VIEW authenticated_updatable_column AS
SELECT t.name || '.' || a.attname AS x
  FROM our_tables t JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE has_column_privilege('authenticated', t.oid, a.attname, 'UPDATE');

-- Occurrences of auth.uid() not written as (SELECT auth.uid()) in a policy expression.
CREATE TEMP VIEW policy_with_bare_auth_uid AS
SELECT tablename || ': ' || policyname AS x
  FROM pg_policies p,
       LATERAL (SELECT coalesce(p.qual, '') || ' ' || coalesce(p.with_check, '') AS e) q
 WHERE schemaname = 'public'
   AND (length(q.e) - length(replace(q.e, 'auth.uid()', ''))) / length('auth.uid()')
       <> (length(q.e) - length(replace(q.e, 'SELECT auth.uid()', ''))) / length('SELECT auth.uid()');

CREATE TEMP VIEW updated_at_without_trigger AS
SELECT t.name AS x FROM our_tables t
 WHERE EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.oid
               AND a.attname = 'updated_at' AND NOT a.attisdropped)
   AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.oid
                   AND g.tgfoid = 'public.set_updated_at()'::regprocedure);

CREATE FUNCTION pg_temp.offenders(p_view text) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE r text[];
BEGIN
    EXECUTE format('SELECT coalesce(array_agg(x ORDER BY x), ''{}'') FROM %I', p_view) INTO r;
    RETURN r;
END $$;

-- What the rule reports once `p_plant` has run (in a subtransaction, rolled back).
CREATE FUNCTION pg_temp.planted(p_plant text, p_view text) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE r text[];
BEGIN
    BEGIN
        EXECUTE p_plant;
        r := pg_temp.offenders(p_view);
        RAISE EXCEPTION USING ERRCODE = 'MRT00';
    EXCEPTION WHEN SQLSTATE 'MRT00' THEN NULL;
    END;
    RETURN r;
END $$;

-- The rules see the schema ----------------------------------------------------------------
SELECT cmp_ok((SELECT count(*) FROM our_tables), '>=', 7::bigint, 'the catalog query sees the tables');
SELECT cmp_ok((SELECT count(*) FROM our_functions WHERE prosecdef), '>=', 2::bigint,
              'the catalog query sees SECURITY DEFINER functions');
SELECT cmp_ok((SELECT count(*) FROM our_functions WHERE provolatile = 'v'), '>=', 5::bigint,
              'the catalog query sees functions that write');
SELECT cmp_ok((SELECT count(*) FROM pg_constraint c JOIN our_tables t ON t.oid = c.conrelid
                WHERE c.contype = 'f'), '>=', 5::bigint, 'the catalog query sees foreign keys');
SELECT cmp_ok((SELECT count(*) FROM pg_policies WHERE schemaname = 'public'
                AND coalesce(qual, '') LIKE '%auth.uid()%'), '>=', 5::bigint,
              'the catalog query sees policies calling auth.uid()');

-- The rules hold ----------------------------------------------------------------------------
SELECT is(pg_temp.offenders('no_rls'), '{}', 'every table in public has RLS enabled');
SELECT is(pg_temp.offenders('secdef_without_search_path'), '{}',
          'every SECURITY DEFINER function in public pins search_path');
SELECT is(pg_temp.offenders('function_without_search_path'), '{}',
          'every function in public pins search_path');
SELECT is(pg_temp.offenders('writer_executable_by_anon_or_public'), '{}',
          'neither anon nor PUBLIC can execute a function in public that writes');
SELECT is(pg_temp.offenders('function_executable_by_anon_or_public'), '{}',
          'neither anon nor PUBLIC can execute any function in public');
SELECT is(pg_temp.offenders('unindexed_foreign_key'), '{}', 'every foreign key in public has an index');
SELECT is(pg_temp.offenders('anon_table_privilege'), '{}', 'anon has no privilege on any table in public');
SELECT is(pg_temp.offenders('authenticated_write_privilege'), '{}',
          'authenticated cannot insert, delete or update whole rows of any table in public');
SELECT is(pg_temp.offenders('authenticated_updatable_column'),
          ARRAY['accounts.company_name', 'accounts.full_name'],
          'the only columns authenticated may update are accounts.full_name and company_name');
SELECT ok(NOT has_column_privilege('authenticated', 'public.instances', 'environment_vars', 'SELECT'),
          'authenticated cannot read instances.environment_vars');
SELECT ok(NOT has_table_privilege('authenticated', 'public.stripe_events', 'SELECT'),
          'authenticated cannot read stripe_events');
SELECT is(pg_temp.offenders('policy_with_bare_auth_uid'), '{}',
          'every policy calls auth.uid() as (select auth.uid())');
SELECT is(pg_temp.offenders('updated_at_without_trigger'), '{}',
          'every table with updated_at has the set_updated_at trigger');

-- Each rule reports a planted violation -------------------------------------------------------
SELECT is(pg_temp.planted('CREATE TABLE public.zz_plain (id int)', 'no_rls'),
          '{zz_plain}', 'a table without RLS is reported');
SELECT is(pg_temp.planted($p$CREATE FUNCTION public.zz_def() RETURNS int LANGUAGE sql
                             SECURITY DEFINER AS 'SELECT 1'$p$, 'secdef_without_search_path'),
          '{zz_def()}', 'a SECURITY DEFINER function without search_path is reported');
SELECT is(pg_temp.planted($p$CREATE FUNCTION public.zz_inv() RETURNS int LANGUAGE sql
                             AS 'SELECT 1'$p$, 'function_without_search_path'),
          '{zz_inv()}', 'a function without search_path is reported');
SELECT is(pg_temp.planted($p$CREATE FUNCTION public.zz_w() RETURNS void LANGUAGE sql
                             SET search_path = '' AS 'SELECT 1'$p$, 'writer_executable_by_anon_or_public'),
          '{zz_w()}', 'a writing function executable by PUBLIC (the default) is reported');
SELECT is(pg_temp.planted($p$CREATE FUNCTION public.zz_w() RETURNS void LANGUAGE sql
                             SET search_path = '' AS 'SELECT 1';
                             REVOKE ALL ON FUNCTION public.zz_w() FROM PUBLIC;
                             GRANT EXECUTE ON FUNCTION public.zz_w() TO anon$p$,
                            'writer_executable_by_anon_or_public'),
          '{zz_w()}', 'a writing function executable by anon is reported');
SELECT is(pg_temp.planted($p$CREATE FUNCTION public.zz_r() RETURNS int LANGUAGE sql STABLE
                             SET search_path = '' AS 'SELECT 1'$p$, 'function_executable_by_anon_or_public'),
          '{zz_r()}', 'a read-only function executable by PUBLIC is reported');
SELECT is(pg_temp.planted($p$CREATE TABLE public.zz_child (id int,
                             account_id uuid REFERENCES public.accounts (id))$p$, 'unindexed_foreign_key'),
          '{zz_child.zz_child_account_id_fkey}', 'an unindexed foreign key is reported');
SELECT is(pg_temp.planted($p$CREATE TABLE public.zz_child (id int,
                             account_id uuid REFERENCES public.accounts (id));
                             CREATE INDEX ON public.zz_child (account_id) WHERE id > 0$p$, 'unindexed_foreign_key'),
          '{zz_child.zz_child_account_id_fkey}', 'a foreign key covered only by a partial index is reported');
SELECT is(pg_temp.planted($p$CREATE TABLE public.zz_child (id int,
                             account_id uuid REFERENCES public.accounts (id));
                             CREATE INDEX ON public.zz_child (account_id, id)$p$, 'unindexed_foreign_key'),
          '{}', 'a foreign key leading a composite index counts as indexed');
SELECT is(pg_temp.planted('GRANT SELECT (name) ON public.plans TO anon', 'anon_table_privilege'),
          '{plans}', 'a column grant to anon is reported');
SELECT is(pg_temp.planted('GRANT INSERT ON public.audit_logs TO authenticated', 'authenticated_write_privilege'),
          '{audit_logs}', 'an insert grant to authenticated is reported');
SELECT is(pg_temp.planted('GRANT UPDATE (email) ON public.accounts TO authenticated', 'authenticated_updatable_column'),
          ARRAY['accounts.company_name', 'accounts.email', 'accounts.full_name'],
          'an extra updatable column is reported');
SELECT is(pg_temp.planted($p$CREATE POLICY zz ON public.plans FOR SELECT TO authenticated
                             USING (auth.uid() IS NOT NULL)$p$, 'policy_with_bare_auth_uid'),
          '{"plans: zz"}', 'a policy calling auth.uid() per row is reported');
SELECT is(pg_temp.planted($p$CREATE POLICY zz ON public.plans FOR UPDATE TO authenticated
                             USING ((SELECT auth.uid()) IS NOT NULL) WITH CHECK (auth.uid() IS NOT NULL)$p$,
                          'policy_with_bare_auth_uid'),
          '{"plans: zz"}', 'a WITH CHECK calling auth.uid() per row is reported');
SELECT is(pg_temp.planted($p$CREATE TABLE public.zz_t (id int, updated_at timestamptz);
                             ALTER TABLE public.zz_t ENABLE ROW LEVEL SECURITY$p$, 'updated_at_without_trigger'),
          '{zz_t}', 'a table with updated_at but no trigger is reported');

SELECT * FROM finish();
ROLLBACK;
