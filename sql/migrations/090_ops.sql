-- 090_ops.sql: what the operations endpoints read (mindroom-admin, docs/install.md).
--
-- GET /ready asks schema_versions() whether every migration its build knows has
-- been applied; GET /metrics reads ops_metrics() at scrape time: the owed work by
-- action and age, instances by status, and the Stripe events waiting or given up,
-- all from indexed columns. Both run as service_role, one short statement each.

-- The versions recorded by the migration runner (scripts/migrate.sh or the Supabase
-- CLI) in supabase_migrations.schema_migrations, oldest first; empty when nothing
-- was recorded there. SECURITY DEFINER: service_role has no grant on that schema.
CREATE FUNCTION public.schema_versions()
RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog
AS $$
BEGIN
    IF to_regclass('supabase_migrations.schema_migrations') IS NULL THEN
        RETURN '{}'::text[];
    END IF;
    RETURN (SELECT coalesce(array_agg(m.version ORDER BY m.version), '{}'::text[])
              FROM supabase_migrations.schema_migrations m);
END;
$$;

REVOKE ALL ON FUNCTION public.schema_versions() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.schema_versions() TO service_role;

-- One object for the gauges of /metrics:
--   owed       [{"action", "count", "held", "in_flight", "oldest_s"}]: instances owed
--              each action (held: waiting for an operator; in_flight: a worker holds
--              the lease now), and how long the oldest has been owed
--   instances  {"<status>": count}
--   stripe     {"<status>": {"count", "oldest_s"}} for deferred, received and failed
--              events (oldest by received_at)
CREATE FUNCTION public.ops_metrics()
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
SELECT jsonb_build_object(
    'owed', coalesce((
        SELECT jsonb_agg(o ORDER BY o.action)
          FROM (SELECT i.owed_action::text AS action,
                       count(*) AS count,
                       count(*) FILTER (WHERE i.owed_due_at IS NULL) AS held,
                       count(*) FILTER (WHERE i.claimed_by IS NOT NULL
                                          AND i.claim_expires_at > now()) AS in_flight,
                       round(extract(epoch FROM now() - min(i.owed_since)), 3) AS oldest_s
                  FROM public.instances i
                 WHERE i.owed_action IS NOT NULL
                 GROUP BY i.owed_action) o), '[]'::jsonb),
    'instances', coalesce((
        SELECT jsonb_object_agg(s.status, s.n)
          FROM (SELECT i.status::text AS status, count(*) AS n
                  FROM public.instances i GROUP BY i.status) s), '{}'::jsonb),
    'stripe', coalesce((
        SELECT jsonb_object_agg(e.status, jsonb_build_object('count', e.n, 'oldest_s', e.oldest_s))
          FROM (SELECT se.status, count(*) AS n,
                       round(extract(epoch FROM now() - min(se.received_at)), 3) AS oldest_s
                  FROM public.stripe_events se
                 WHERE se.status IN ('deferred', 'received', 'failed')
                 GROUP BY se.status) e), '{}'::jsonb));
$$;

REVOKE ALL ON FUNCTION public.ops_metrics() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.ops_metrics() TO service_role;
