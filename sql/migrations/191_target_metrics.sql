-- 191_target_metrics.sql: /metrics says how each provisioner target is doing.
--
-- An operator learned whether a target answers, how many instances it has and how
-- much room is left only from `mindroomctl target list`; nothing could alert on a
-- target that stopped answering or on a host filled past its capacity (a plan
-- upgrade of an instance on a full host reserves more than is free, which
-- placement never does on its own).
-- - public.target_summary(): each target as `mindroomctl target list` shows it and
--   /metrics exports it, in one place: its free memory as placement counts it
--   (public.target_free_mb, 100_provisioner_targets.sql: its capacity less what
--   every instance placed there and not deprovisioned reserves; below zero when
--   overfilled), the number of those instances, its steps in flight
--   (public.target_in_flight) and whether its last call was answered
--   (unanswered_since, 170_target_answering.sql).
-- - public.ops_metrics() (091_ops_retention.sql, redefined whole, unchanged but for
--   the key added): "targets", [{"target", "answering", "instances", "capacity_mb",
--   "free_mb"}] in id order.

CREATE FUNCTION public.target_summary()
RETURNS TABLE (id bigint, name text, scheduler text, url text, token_ref text,
               capacity_mb integer, free_mb bigint, instances bigint, in_flight integer,
               max_in_flight integer, enabled boolean, drained boolean, pinned boolean,
               unanswered_since timestamptz)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT t.id, t.name, t.scheduler, t.url, t.token_ref, t.capacity_mb,
           public.target_free_mb(t.id),
           -- The instances whose reservations target_free_mb subtracts.
           (SELECT count(*) FROM public.instances i
             WHERE i.target_id = t.id AND i.status <> 'deprovisioned'),
           public.target_in_flight(t.id), t.max_in_flight, t.enabled, t.drained, t.pinned,
           t.unanswered_since
      FROM public.provisioner_targets t
     ORDER BY t.id;
$$;

REVOKE ALL ON FUNCTION public.target_summary() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.target_summary() TO service_role;

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
                 GROUP BY se.status) e), '{}'::jsonb),
    'targets', coalesce((
        SELECT jsonb_agg(jsonb_build_object('target', s.name,
                                            'answering', s.unanswered_since IS NULL,
                                            'instances', s.instances,
                                            'capacity_mb', s.capacity_mb,
                                            'free_mb', s.free_mb) ORDER BY s.id)
          FROM public.target_summary() s), '[]'::jsonb));
$$;
