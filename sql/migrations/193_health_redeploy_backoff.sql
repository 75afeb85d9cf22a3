-- 193_health_redeploy_backoff.sql: an instance the health checks fail again right
-- after its redeploy is redeployed with a growing pause, not every few minutes for
-- ever.
--
-- At HEALTH_FAILURE_THRESHOLD counted failures health_record marks a running
-- instance failed and its redeploy (and a restart) due at once; the redeploy makes
-- it running, the count starts at 0, and when the cause is one a redeploy does not
-- cure (MindRoom failing at start on its saved configuration, an expired
-- certificate, the control plane's resolver or network down for every instance)
-- the next threshold fails it again: a POST /apps and a restart of the customer's
-- instance every threshold x interval (about 3 minutes), around the clock, for
-- every instance so affected at once. Now instances.health_redeploys counts the
-- redeploys the health checks made owed since the instance was last counted
-- healthy: the first is due at once, as before; the n-th after it waits threshold
-- x interval x 2^(n-1) seconds, at most an hour (the instance stays failed
-- meanwhile, and says so). A counted healthy result sets it back to 0.
--
-- Redefines public.health_record (140_failed_owes_restart.sql) whole: only the
-- recording's health_redeploys line and the threshold's UPDATE (health_redeploys,
-- next_attempt_at and the comment above them) differ.
--
-- And an instance running again shows no health result from before: a start (after
-- a stop) or a redeploy (after the health checks failed it) made it running, and
-- its health columns still held the last result of when it ran before, which
-- my-instance and mindroomctl status showed as its health until the next round: a
-- process still starting "healthy", a cured one "unreachable". Whatever moves it
-- into running now clears health_status and last_health_check with the count, so
-- it reads "not checked yet" (null) until its first check. Redefines
-- public.health_reset_on_running (030_health.sql) whole.

ALTER TABLE public.instances
    ADD COLUMN health_redeploys integer NOT NULL DEFAULT 0 CHECK (health_redeploys >= 0);

CREATE OR REPLACE FUNCTION public.health_record(p_results jsonb, p_threshold integer, p_counted boolean,
                                     p_round_started timestamptz, p_interval_s integer)
RETURNS TABLE (instance_id uuid, consecutive_failures integer, marked_failed boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_started timestamptz := coalesce(p_round_started, now());
    v_ids uuid[];
    v_failures integer[];
    v_to_fail boolean[];
BEGIN
    IF p_threshold IS NULL OR p_threshold < 1 OR p_interval_s IS NULL OR p_interval_s < 1 THEN
        RAISE EXCEPTION 'threshold and interval must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(p_results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'results must be a JSON array' USING ERRCODE = '22023';
    END IF;

    WITH r AS (
        SELECT DISTINCT ON ((e->>'instance_id')::uuid)
               (e->>'instance_id')::uuid AS id,
               coalesce((e->>'ok')::boolean, false) AS ok,
               left(coalesce(e->>'health_status', 'unknown'), 200) AS hs,
               left(e->>'error', 1000) AS err
          FROM jsonb_array_elements(p_results) AS e
    ), c AS (
        -- Whether this result moves the counter: a counting caller, no live lease,
        -- and (for a failure) nothing counted yet in this interval. Decided on the
        -- locked row: a recording that waited for another one's lock sees what that
        -- one left (locked in id order, so that two recordings of many rows do not
        -- deadlock).
        SELECT r.*, i.id AS iid,
               p_counted AND NOT (i.claimed_by IS NOT NULL AND i.claim_expires_at > now())
               AND (r.ok OR i.health_counted_at IS NULL
                    OR i.health_counted_at <= v_started - make_interval(secs => p_interval_s))
                   AS counts
          FROM r JOIN public.instances i ON i.id = r.id
         WHERE i.status = 'running'
         ORDER BY i.id
           FOR NO KEY UPDATE OF i
    ), u AS (
        UPDATE public.instances i SET
               last_health_check = now(),
               health_status = c.hs,
               error_message = CASE WHEN c.ok THEN NULL ELSE coalesce(c.err, c.hs) END,
               consecutive_failures = CASE WHEN NOT c.counts THEN i.consecutive_failures
                                           WHEN c.ok THEN 0
                                           ELSE i.consecutive_failures + 1 END,
               health_counted_at = CASE WHEN c.counts AND NOT c.ok THEN v_started
                                        ELSE i.health_counted_at END,
               health_redeploys = CASE WHEN c.counts AND c.ok THEN 0 ELSE i.health_redeploys END
          FROM c
         WHERE i.id = c.iid AND i.status = 'running'
        RETURNING i.id, i.consecutive_failures AS failures,
                  c.counts AND NOT c.ok AND i.consecutive_failures >= p_threshold
                  AND i.desired_status = 'running' AS to_fail
    )
    SELECT coalesce(array_agg(u.id), '{}'), coalesce(array_agg(u.failures), '{}'),
           coalesce(array_agg(u.to_fail), '{}')
      INTO v_ids, v_failures, v_to_fail
      FROM u;

    -- The threshold: failed, owed a redeploy. A separate statement so that the
    -- status triggers (state machine, audit, owed work) run only for these rows.
    -- The redeploy of an unchanged instance leaves a running app as it is, and a
    -- hung process keeps its container running: a restart is owed too.
    -- The first redeploy since the instance was last counted healthy is due now;
    -- each one after it waits threshold x interval, doubled each time, at most an
    -- hour: a cause a redeploy does not cure is not met by restarting the instance
    -- every few minutes for ever.
    UPDATE public.instances i SET
           status = 'failed',
           health_redeploys = i.health_redeploys + 1,
           next_attempt_at = now() + make_interval(secs => CASE WHEN i.health_redeploys = 0 THEN 0
               ELSE least(3600, p_threshold::double precision * p_interval_s
                                * power(2, least(i.health_redeploys - 1, 20))) END),
           restart_version = greatest(i.restart_version, i.applied_restart_version + 1),
           last_error = left('health: ' || coalesce(i.health_status, 'failing') || ' ('
                             || i.consecutive_failures || ' checks in a row)', 1000)
     WHERE i.id IN (SELECT t.id FROM unnest(v_ids, v_to_fail) AS t(id, f) WHERE t.f)
       AND i.status = 'running';

    RETURN QUERY SELECT t.id, t.n, t.f FROM unnest(v_ids, v_failures, v_to_fail) AS t(id, n, f);
END;
$$;

REVOKE ALL ON FUNCTION public.health_record(jsonb, integer, boolean, timestamptz, integer)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.health_record(jsonb, integer, boolean, timestamptz, integer)
    TO service_role;

-- A (re)deployed instance starts counting afresh: whatever moves it into running
-- (a redeploy, a start) clears the old failures, or the first failed probe after a
-- redeploy would fail it again at once; and the last result, which is of the
-- processes before: it has not been checked since.
CREATE OR REPLACE FUNCTION public.health_reset_on_running()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running' THEN
        NEW.consecutive_failures := 0;
        NEW.health_status := NULL;
        NEW.last_health_check := NULL;
    END IF;
    RETURN NEW;
END;
$$;
