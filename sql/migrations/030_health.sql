-- 030_health.sql: what check-instance-health records.
--
-- A probe round is recorded in one round trip: health_record() takes every
-- result of the round as one jsonb array. consecutive_failures counts failed
-- probes in a row; at the threshold a running instance moves to failed (a legal
-- running -> failed transition) with next_attempt_at = now(), which is exactly
-- what lifecycle_owed() (020) treats as a redeploy owed now: the same call's
-- sweep, or the next one, asks provision-instance for it.

ALTER TABLE public.instances
    ADD COLUMN IF NOT EXISTS consecutive_failures integer NOT NULL DEFAULT 0
        CHECK (consecutive_failures >= 0);

-- Tenants see their instances' health, as they see health_status already.
GRANT SELECT (consecutive_failures) ON public.instances TO authenticated;

-- The probe round selects running instances.
CREATE INDEX IF NOT EXISTS instances_running_idx
    ON public.instances (id) WHERE status = 'running';

-- Records one probe round. p_results: [{"instance_id": uuid, "ok": bool,
-- "health_status": text, "error": text|null}, ...]; p_threshold >= 1.
-- Only rows still running are touched: an instance stopped, destroyed or
-- redeployed since it was selected keeps its newer state.
-- While another worker holds a live lease on the instance (a deploy, an update,
-- a stop in progress) the result is recorded but not counted: an app being
-- worked on is expected to be down, and moving it to failed under a lease would
-- make the lease holder's own outcome an illegal transition.
-- Only instances owed "running" are marked failed: failed means "redeploy me".
-- Returns one row per recorded instance: its failure count and whether this
-- round marked it failed.
CREATE OR REPLACE FUNCTION public.health_record(p_results jsonb, p_threshold integer)
RETURNS TABLE (instance_id uuid, consecutive_failures integer, marked_failed boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, public
AS $$
DECLARE
    v_ids uuid[];
    v_failures integer[];
    v_to_fail boolean[];
BEGIN
    IF p_threshold IS NULL OR p_threshold < 1 THEN
        RAISE EXCEPTION 'threshold must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(p_results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'results must be a JSON array' USING ERRCODE = '22023';
    END IF;

    -- Health columns for every result; the counter only outside a live lease.
    WITH r AS (
        SELECT DISTINCT ON ((e->>'instance_id')::uuid)
               (e->>'instance_id')::uuid AS id,
               coalesce((e->>'ok')::boolean, false) AS ok,
               left(coalesce(e->>'health_status', 'unknown'), 200) AS hs,
               left(e->>'error', 1000) AS err
          FROM jsonb_array_elements(p_results) AS e
    ), u AS (
        UPDATE public.instances i SET
               last_health_check = now(),
               health_status = r.hs,
               error_message = CASE WHEN r.ok THEN NULL ELSE coalesce(r.err, r.hs) END,
               consecutive_failures = CASE
                   WHEN r.ok THEN 0
                   WHEN i.claimed_by IS NOT NULL AND i.claim_expires_at > now()
                       THEN i.consecutive_failures
                   ELSE i.consecutive_failures + 1 END
          FROM r
         WHERE i.id = r.id AND i.status = 'running'
        RETURNING i.id, i.consecutive_failures AS failures,
                  NOT r.ok AND i.consecutive_failures >= p_threshold
                  AND i.desired_status = 'running'
                  AND NOT (i.claimed_by IS NOT NULL AND i.claim_expires_at > now()) AS to_fail
    )
    SELECT coalesce(array_agg(u.id), '{}'), coalesce(array_agg(u.failures), '{}'),
           coalesce(array_agg(u.to_fail), '{}')
      INTO v_ids, v_failures, v_to_fail
      FROM u;

    -- The threshold: failed, owed a redeploy now. A separate statement so that the
    -- status triggers (state machine, audit) run only for these rows.
    UPDATE public.instances i SET
           status = 'failed',
           next_attempt_at = now(),
           last_error = left('health: ' || coalesce(i.health_status, 'failing') || ' ('
                             || i.consecutive_failures || ' checks in a row)', 1000)
     WHERE i.id IN (SELECT t.id FROM unnest(v_ids, v_to_fail) AS t(id, f) WHERE t.f)
       AND i.status = 'running';

    RETURN QUERY SELECT t.id, t.n, t.f FROM unnest(v_ids, v_failures, v_to_fail) AS t(id, n, f);
END;
$$;

-- A (re)deployed instance starts counting afresh: whatever moves it into running
-- (provision-instance after a redeploy, a start) clears the old failures, or the
-- first failed probe after a redeploy would fail it again at once.
CREATE OR REPLACE FUNCTION public.health_reset_on_running()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    IF NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running' THEN
        NEW.consecutive_failures := 0;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER instances_health_reset BEFORE UPDATE OF status ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.health_reset_on_running();

REVOKE ALL ON FUNCTION public.health_reset_on_running() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION public.health_record(jsonb, integer) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.health_record(jsonb, integer) TO service_role;
