-- 196_health_metrics.sql: /metrics says how many running instances fail their checks.
--
-- An operator could count the probes' results (mindroom_health_probes_total) and the
-- instances marked failed, but not how many running instances are failing now: an
-- instance whose checks fail is redeployed with a growing wait (193), and one that
-- fails every other round is never marked failed; nothing could alert on either.
-- public.ops_metrics() (191_target_metrics.sql, redefined whole, unchanged but for the
-- key added, read in the same scan as the instances by status): "health",
-- {"healthy", "failing", "unchecked"}, the running instances by their last check's
-- result.

CREATE OR REPLACE FUNCTION public.ops_metrics()
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, public
AS $$
-- The instances by status, and the running ones by their last check, in one scan:
-- the check's result is in health_status ('healthy', else the failing part's words),
-- NULL since the instance was (re)started and until its first check
-- (health_reset_on_running).
WITH st AS (
    SELECT i.status, count(*) AS n,
           count(*) FILTER (WHERE i.health_status = 'healthy') AS healthy,
           count(*) FILTER (WHERE i.health_status <> 'healthy') AS failing,
           count(*) FILTER (WHERE i.health_status IS NULL) AS unchecked
      FROM public.instances i GROUP BY i.status)
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
    'instances', coalesce((SELECT jsonb_object_agg(st.status::text, st.n) FROM st), '{}'::jsonb),
    'stripe', coalesce((
        SELECT jsonb_object_agg(e.status, jsonb_build_object('count', e.n, 'oldest_s', e.oldest_s))
          FROM (SELECT se.status, count(*) AS n,
                       round(extract(epoch FROM now() - min(se.received_at)), 3) AS oldest_s
                  FROM public.stripe_events se
                 WHERE se.status IN ('deferred', 'received', 'failed')
                 GROUP BY se.status) e), '{}'::jsonb),
    'health', coalesce((
        SELECT jsonb_build_object('healthy', st.healthy, 'failing', st.failing,
                                  'unchecked', st.unchecked)
          FROM st WHERE st.status = 'running'),
        '{"healthy": 0, "failing": 0, "unchecked": 0}'::jsonb),
    'targets', coalesce((
        SELECT jsonb_agg(jsonb_build_object('target', s.name,
                                            'answering', s.unanswered_since IS NULL,
                                            'instances', s.instances,
                                            'capacity_mb', s.capacity_mb,
                                            'free_mb', s.free_mb) ORDER BY s.id)
          FROM public.target_summary() s), '[]'::jsonb));
$$;
