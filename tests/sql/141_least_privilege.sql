-- 141_least_privilege.sql: least privilege exactly as the migrations grant it, whatever default privileges
-- the database came with. On Supabase (simulated in test_schema_supabase.py, which
-- runs this suite) ALTER DEFAULT PRIVILEGES gives anon, authenticated and
-- service_role ALL on every new table and sequence in public; a migration that
-- revokes only FROM PUBLIC, anon, authenticated before its GRANT ... TO service_role
-- leaves service_role ALL (TRUNCATE, TRIGGER, REFERENCES, DELETE, ...) there, and a
-- sequence nobody revokes stays readable and settable by anon.
BEGIN;
SELECT plan(4);

CREATE TEMP VIEW our_tables AS
SELECT c.oid, c.relname::text AS name
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                   AND d.objid = c.oid AND d.deptype = 'e');

-- service_role's table privileges, one 'table:PRIV,PRIV' per table.
CREATE TEMP VIEW service_role_privileges AS
SELECT t.name || ':' || coalesce((
           SELECT string_agg(p, ',' ORDER BY p)
             FROM unnest(ARRAY['DELETE', 'INSERT', 'REFERENCES', 'SELECT', 'TRIGGER',
                               'TRUNCATE', 'UPDATE']) p
            WHERE has_table_privilege('service_role', t.oid, p)), '') AS x
  FROM our_tables t;

-- What the migrations grant service_role (002, 040, 050, 060, 070, 100, 181) and
-- docs/schema.md describes: audit_logs append-only, plans read-only, stripe_events
-- and billing_attempts never deleted, teardowns written only by the delete trigger,
-- token rows and usage report keys inserted and removed but never rewritten.
SELECT is((SELECT array_agg(x ORDER BY x) FROM service_role_privileges),
          ARRAY['accounts:DELETE,INSERT,SELECT,UPDATE',
                'audit_logs:INSERT,SELECT',
                'billing_attempts:INSERT,SELECT,UPDATE',
                'deleted_account_customers:',
                'instance_secrets:DELETE,INSERT,SELECT,UPDATE',
                'instance_teardowns:SELECT,UPDATE',
                'instance_tokens:DELETE,INSERT,SELECT',
                'instances:DELETE,INSERT,SELECT,UPDATE',
                'lifecycle_limits:SELECT,UPDATE',
                'plans:SELECT',
                'provisioner_targets:INSERT,SELECT,UPDATE',
                'scheduled_jobs:INSERT,SELECT,UPDATE',
                'stripe_cancellations:SELECT,UPDATE',
                'stripe_events:INSERT,SELECT,UPDATE',
                'subscriptions:DELETE,INSERT,SELECT,UPDATE',
                'usage_metrics:DELETE,INSERT,SELECT,UPDATE',
                'usage_report_keys:DELETE,INSERT,SELECT'],
          'service_role holds exactly the table privileges the migrations grant it');

SELECT is((SELECT coalesce(array_agg(t.name || ':' || r ORDER BY t.name, r), '{}')
             FROM our_tables t,
                  unnest(ARRAY['anon', 'authenticated', 'service_role', 'authenticator']) r
            WHERE has_table_privilege(r, t.oid, 'TRUNCATE,REFERENCES,TRIGGER')),
          '{}',
          'no API role may TRUNCATE, REFERENCE or put triggers on any table in public');

SELECT is((SELECT coalesce(array_agg(c.relname::text || ':' || r ORDER BY c.relname, r), '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                  unnest(ARRAY['anon', 'authenticated']) r
            WHERE n.nspname = 'public' AND c.relkind = 'S'
              AND has_sequence_privilege(r, c.oid, 'USAGE,SELECT,UPDATE')),
          '{}',
          'anon and authenticated hold no privilege on any sequence in public');

-- The check sees the schema: without any grant, service_role reads nothing.
SELECT ok((SELECT count(*) FROM service_role_privileges) >= 15,
          'the privilege view sees every table');

SELECT * FROM finish();
ROLLBACK;
