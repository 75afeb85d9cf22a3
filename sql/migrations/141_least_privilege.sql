-- 141_least_privilege.sql: the grants of 040, 060, 070 and 100 as they were meant,
-- also on a database whose default privileges grant ALL on every new object to the
-- API roles (Supabase's: ALTER DEFAULT PRIVILEGES ... GRANT ALL ON TABLES and
-- SEQUENCES TO anon, authenticated, service_role).
--
-- Those migrations revoked only FROM PUBLIC, anon, authenticated before granting
-- service_role what it needs, so on Supabase service_role kept TRUNCATE, DELETE,
-- INSERT, REFERENCES and TRIGGER on these six tables (a TRUNCATE of instance_secrets
-- or instance_tokens, or a DELETE of the teardowns still owed, skipping every row
-- trigger and audit), and anon and authenticated kept USAGE, SELECT and UPDATE on
-- provisioner_targets' identity sequence (setval is not rolled back). Here every
-- right is taken from service_role and the ones it needs are given back, as 002 and
-- 050 do; an identity column's sequence needs no grant for an INSERT of its table.
-- On a plain PostgreSQL nothing changes.
REVOKE ALL ON public.lifecycle_limits, public.scheduled_jobs, public.instance_secrets,
              public.instance_teardowns, public.instance_tokens, public.provisioner_targets
    FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT, UPDATE                 ON public.lifecycle_limits    TO service_role;
GRANT SELECT, INSERT, UPDATE         ON public.scheduled_jobs      TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.instance_secrets    TO service_role;
GRANT SELECT, UPDATE                 ON public.instance_teardowns  TO service_role;
GRANT SELECT, INSERT, DELETE         ON public.instance_tokens     TO service_role;
GRANT SELECT, INSERT, UPDATE         ON public.provisioner_targets TO service_role;
REVOKE ALL ON SEQUENCE public.provisioner_targets_id_seq FROM PUBLIC, anon, authenticated, service_role;
