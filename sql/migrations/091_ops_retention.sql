-- 091_ops_retention.sql: /metrics' owed work leaves out what is not due by design.
--
-- A destroyed instance keeps its data for MINDROOM_RETENTION_DAYS: destroy_storage
-- is owed from the destroy on, but due only at storage_destroy_after. Counted as
-- owed work from the destroy, every destroyed instance would read as work stuck
-- for days (mindroom_owed_work_oldest_seconds, the alert on it in docs/install.md).
-- Such rows are counted apart as "scheduled", and once due their age runs from
-- storage_destroy_after. Work waiting out a retry's backoff stays owed work: that
-- is work that failed, and its age is what an operator wants to see.
--   owed  [{"action", "count", "held", "in_flight", "oldest_s", "scheduled"}]
CREATE OR REPLACE FUNCTION public.ops_metrics()
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
SELECT jsonb_build_object(
    'owed', coalesce((
        SELECT jsonb_agg(o ORDER BY o.action)
          FROM (SELECT w.action,
                       count(*) FILTER (WHERE NOT w.scheduled) AS count,
                       count(*) FILTER (WHERE NOT w.scheduled AND w.held) AS held,
                       count(*) FILTER (WHERE NOT w.scheduled AND w.in_flight) AS in_flight,
                       coalesce(round(extract(epoch FROM now() - min(w.since)
                                                  FILTER (WHERE NOT w.scheduled)), 3), 0) AS oldest_s,
                       count(*) FILTER (WHERE w.scheduled) AS scheduled
                  FROM (SELECT i.owed_action::text AS action,
                               i.owed_due_at IS NULL AS held,
                               i.claimed_by IS NOT NULL AND i.claim_expires_at > now() AS in_flight,
                               i.owed_action = 'destroy_storage'
                                 AND i.storage_destroy_after > now() AS scheduled,
                               CASE WHEN i.owed_action = 'destroy_storage'
                                    THEN greatest(i.owed_since, i.storage_destroy_after)
                                    ELSE i.owed_since END AS since
                          FROM public.instances i
                         WHERE i.owed_action IS NOT NULL) w
                 GROUP BY w.action) o), '[]'::jsonb),
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
