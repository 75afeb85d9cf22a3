-- 140_failed_owes_restart.sql: an instance the health check marks failed owes a
-- restart as well as its redeploy; an unset environment variable stays unset.
--
-- 1. At HEALTH_FAILURE_THRESHOLD failures health_record marks an instance failed,
-- which owes a create (a POST /apps). The failure the check exists for is a
-- process that hangs or stops answering while its container keeps running; for an
-- instance whose image and configuration are unchanged the POST /apps runs no ps:
-- command at all (it starts only an app that is not running), so the instance was
-- recorded running again, still dead, and marked failed again a few rounds later,
-- for ever. Marking it failed now also owes one restart (restart_version raised
-- to one past applied_restart_version; a restart already owed stays the one): the
-- worker counts the create as that restart only when its POST /apps answered that
-- every app got new processes (all_restarted), and otherwise carries out the
-- restart (POST /apps/{app}/restart) right after the create.
--
-- Redefines public.health_record (115_health_record_lock.sql) whole: only the
-- threshold's UPDATE differs (the restart_version line and the comment above it),
-- and search_path is '' (every name in it was already schema-qualified).

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
                                        ELSE i.health_counted_at END
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

    -- The threshold: failed, owed a redeploy now. A separate statement so that the
    -- status triggers (state machine, audit, owed work) run only for these rows.
    -- The redeploy of an unchanged instance leaves a running app as it is, and a
    -- hung process keeps its container running: a restart is owed too.
    UPDATE public.instances i SET
           status = 'failed',
           next_attempt_at = now(),
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

-- 2. An unset environment variable stays unset.
--
-- `mindroomctl env unset X` (instance_secret_delete) removed X's sealed value only.
-- While the instance's legacy plaintext environment_vars still held X, the next
-- step moved that column into instance_secrets (instance_plain_env_put, 136) and
-- sealed the legacy X again: the unset was undone, on the row and on the app.
-- Deleting an env name now removes it from the legacy column too, in the same
-- statement as the config_version bump (so the owed-work trigger does not bump it a
-- second time); a name found only there counts as removed. A step that read the
-- column before is not harmed: instance_plain_env_sealed empties the column only
-- while it holds what was read, and the bump owes an update that unsets X on the app.
-- (Setting needs no such rule: a sealed value already wins over the column, 136.)
--
-- Redefines public.instance_secret_delete (060_instance.sql) whole: the body
-- differs (the DELETE's outcome kept, one UPDATE that also edits environment_vars
-- and returns whether anything was removed); signature and grants are 060's.

CREATE OR REPLACE FUNCTION public.instance_secret_delete(p_instance_id uuid, p_kind text, p_name text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_sealed boolean;
BEGIN
    DELETE FROM public.instance_secrets
     WHERE instance_id = p_instance_id AND kind = p_kind AND name = p_name;
    v_sealed := FOUND;
    UPDATE public.instances SET
           environment_vars = CASE WHEN p_kind = 'env' AND jsonb_typeof(environment_vars) = 'object'
                                   THEN environment_vars - p_name ELSE environment_vars END,
           config_version = config_version + 1
     WHERE id = p_instance_id
       AND (v_sealed OR (p_kind = 'env' AND jsonb_typeof(environment_vars) = 'object'
                         AND environment_vars ? p_name));
    RETURN FOUND;
END;
$$;

REVOKE ALL ON FUNCTION public.instance_secret_delete(uuid, text, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_secret_delete(uuid, text, text) TO service_role;
