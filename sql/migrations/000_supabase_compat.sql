-- 000_supabase_compat.sql
-- Makes the rest of the migrations run on plain PostgreSQL by creating, only where
-- missing, what a Supabase project already has: the roles anon, authenticated,
-- service_role and authenticator, the schema `auth` with a minimal `auth.users`, and
-- auth.uid(), auth.role(), auth.jwt() reading the `request.jwt.claims` setting.
-- On a Supabase project all of these exist (owned by other roles) and this file
-- changes nothing: every step checks the catalog first and never alters what it finds.

DO $compat$
BEGIN
  -- Roles, with Supabase's attributes. service_role bypasses RLS.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
  END IF;
  -- The login role the functions (and PostgREST on Supabase) connect as: it has no
  -- privileges of its own (NOINHERIT) and switches to one of the three per request.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticator') THEN
    CREATE ROLE authenticator LOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                 JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
                 JOIN pg_catalog.pg_roles u ON u.oid = m.member
                 WHERE r.rolname = 'anon' AND u.rolname = 'authenticator') THEN
    GRANT anon TO authenticator;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                 JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
                 JOIN pg_catalog.pg_roles u ON u.oid = m.member
                 WHERE r.rolname = 'authenticated' AND u.rolname = 'authenticator') THEN
    GRANT authenticated TO authenticator;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                 JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
                 JOIN pg_catalog.pg_roles u ON u.oid = m.member
                 WHERE r.rolname = 'service_role' AND u.rolname = 'authenticator') THEN
    GRANT service_role TO authenticator;
  END IF;

  -- The auth schema. Only when we create it do we also grant its use.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'auth') THEN
    CREATE SCHEMA auth;
    GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
  END IF;

  -- A minimal auth.users: the columns the control plane reads (Supabase's has more).
  IF to_regclass('auth.users') IS NULL THEN
    CREATE TABLE auth.users (
      id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      aud                varchar(255),
      role               varchar(255),
      email              varchar(255),
      raw_app_meta_data  jsonb,
      raw_user_meta_data jsonb,
      created_at         timestamptz DEFAULT now(),
      updated_at         timestamptz DEFAULT now()
    );
    CREATE UNIQUE INDEX users_email_key ON auth.users (email);
  END IF;

  -- Supabase's current definitions: claims come from the `request.jwt.claims`
  -- setting (a JSON object, set per transaction by the caller), with the legacy
  -- per-claim settings `request.jwt.claim.sub` / `.role` as fallback; NULL when unset.
  IF to_regprocedure('auth.uid()') IS NULL THEN
    CREATE FUNCTION auth.uid() RETURNS uuid
      LANGUAGE sql STABLE
      AS $f$
        SELECT coalesce(
          nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
          nullif(current_setting('request.jwt.claim.sub', true), '')
        )::uuid
      $f$;
    GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated, service_role;
  END IF;
  IF to_regprocedure('auth.role()') IS NULL THEN
    CREATE FUNCTION auth.role() RETURNS text
      LANGUAGE sql STABLE
      AS $f$
        SELECT coalesce(
          nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role',
          nullif(current_setting('request.jwt.claim.role', true), '')
        )::text
      $f$;
    GRANT EXECUTE ON FUNCTION auth.role() TO anon, authenticated, service_role;
  END IF;
  IF to_regprocedure('auth.jwt()') IS NULL THEN
    CREATE FUNCTION auth.jwt() RETURNS jsonb
      LANGUAGE sql STABLE
      AS $f$
        SELECT coalesce(
          nullif(current_setting('request.jwt.claim', true), ''),
          nullif(current_setting('request.jwt.claims', true), '')
        )::jsonb
      $f$;
    GRANT EXECUTE ON FUNCTION auth.jwt() TO anon, authenticated, service_role;
  END IF;
END
$compat$;
