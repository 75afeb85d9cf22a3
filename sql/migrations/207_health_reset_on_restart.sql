-- 207_health_reset_on_restart.sql: a running instance whose processes were restarted
-- starts its health count afresh, as one that became running does.
--
-- A restart (a tenant's, an operator's, or the one owed with a health redeploy)
-- leaves the instance running: health_reset_on_running (193) only cleared the count
-- and the last result when the status moved into running. So after a restart asked
-- for because checks were failing, consecutive_failures kept its count and the next
-- check, while MindRoom and its homeserver were still starting, reached
-- HEALTH_FAILURE_THRESHOLD and failed the instance: a full redeploy, owed by the
-- restart meant to cure it. And my-instance showed the processes before the restart
-- as the instance's health (health.status "unreachable: ..." beside an error
-- lifecycle_finish had just cleared) until the next round.
--
-- Now a restart recorded done (applied_restart_version moves forward) on a running
-- instance clears consecutive_failures, health_status and last_health_check too: it
-- reads "not checked yet" until its first check. health_redeploys, the redeploys the
-- health checks made owed since the instance was last counted healthy, is not reset:
-- a restart is not a healthy result.
--
-- Redefines public.health_reset_on_running (193_health_redeploy_backoff.sql) whole
-- and its trigger instances_health_reset (080_webhook_cost.sql). The trigger's WHEN
-- is the one statement of when the health columns reset (the function, called only
-- then, no longer repeats it), so an update that moves neither costs nothing more.

CREATE OR REPLACE FUNCTION public.health_reset_on_running()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    -- Called by instances_health_reset only when its WHEN holds.
    NEW.consecutive_failures := 0;
    NEW.health_status := NULL;
    NEW.last_health_check := NULL;
    RETURN NEW;
END;
$$;

DROP TRIGGER instances_health_reset ON public.instances;
CREATE TRIGGER instances_health_reset BEFORE UPDATE OF status, applied_restart_version ON public.instances
    FOR EACH ROW WHEN (NEW.status = 'running' AND (OLD.status IS DISTINCT FROM 'running'
                                                   OR NEW.applied_restart_version > OLD.applied_restart_version))
    EXECUTE FUNCTION public.health_reset_on_running();
