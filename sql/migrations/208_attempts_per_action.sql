-- 208_attempts_per_action.sql: an owed action counts its own failures, not the ones
-- of the action owed before it.
--
-- instances.attempts counted a step's failures since the instance's last successful
-- step, whatever the action: it went back to 0 only when a step succeeded. So when
-- something else became owed while a step was failing, the new action inherited the
-- count:
-- - its first failure backed off as the old one's n-th (MR_PROVISION_BACKOFF_BASE_S x
--   2^attempts, up to MR_PROVISION_BACKOFF_CAP_S, an hour): after five failed
--   restarts, the redeploy owed when the health checks then failed the instance
--   waited 16 minutes after its first failure instead of 30 s, and a cancelled
--   customer's destroy as long;
-- - my-instance told the new action as failing before it was ever tried (its
--   instance.error names the owed step while attempts > 0): "Stopping your instance
--   failed" for an unpaid customer whose restart had failed once, "Setting up your
--   instance failed" for one the health checks had just failed, in place of what
--   the checks found.
--
-- Now, when the owed action changes by anything but a step's failure being counted
-- (lifecycle_finish's own update, whose new count stays), attempts goes back to 0:
-- the new action's failures are counted from its first, and its backoff with them.
-- Two counts stay as they are:
-- - while a rejected step's hold stands (rejected_actions): my-instance tells the
--   held step from that count, and the operator's provision lifts it;
-- - for an instance never placed on a target nor provisioned: instance_nowhere (130)
--   reads attempts = 0 as "no step of it was ever tried", which a destroy skips.
--
-- And an instance that is not running and is asked to become something else (an
-- unpaid subscription's stop, a cancellation's destroy, an operator's request) no
-- longer tells the tenant what failed before: its error_message (my-instance's
-- instance.error while it is not running) said "Setting up your instance failed: it
-- is tried again automatically" for a failed instance being removed, which will not
-- be tried again. A change of desired_status clears it; the new action's own failure
-- sets it again (lifecycle_finish). A running instance's error_message is the health
-- checks' (health.error) and stays. last_error, the operators', stays.
--
-- Redefines public.instances_work_owed (188_welcome_email_rejection_held.sql) whole,
-- unchanged but for the block after NEW.owed_action is set and the one before it.

CREATE OR REPLACE FUNCTION public.instances_work_owed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_action public.lifecycle_action;
    v_held boolean;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.config_version = OLD.config_version
       AND (NEW.memory_limit_mb IS DISTINCT FROM OLD.memory_limit_mb
            OR NEW.cpu_limit IS DISTINCT FROM OLD.cpu_limit
            OR NEW.homeserver_memory_mb IS DISTINCT FROM OLD.homeserver_memory_mb
            OR NEW.homeserver_cpu IS DISTINCT FROM OLD.homeserver_cpu
            OR NEW.storage_gb IS DISTINCT FROM OLD.storage_gb
            OR NEW.subdomain IS DISTINCT FROM OLD.subdomain
            OR (NEW.environment_vars IS DISTINCT FROM OLD.environment_vars
                AND NEW.environment_vars IS DISTINCT FROM '{}'::jsonb)) THEN
        NEW.config_version := OLD.config_version + 1;
    END IF;

    -- The actions the provisioner rejected, while the hold stands (a 4xx:
    -- last_error 'rejected: ...', no next_attempt_at): lifecycle_finish recording a
    -- step's rejection (its attempts counted under its lease) adds the step's action.
    IF NEW.next_attempt_at IS NOT NULL OR NEW.last_error IS NULL
       OR NEW.last_error NOT LIKE 'rejected: %' THEN
        NEW.rejected_actions := NULL;
    ELSIF TG_OP = 'UPDATE' AND NEW.claim_action IS NOT NULL AND NEW.attempts > OLD.attempts
          AND NOT coalesce(NEW.claim_action = ANY (OLD.rejected_actions), false) THEN
        NEW.rejected_actions := array_append(OLD.rejected_actions, NEW.claim_action);
    END IF;

    -- Asked to become something else while not running: what failed before is not
    -- what happens now.
    IF TG_OP = 'UPDATE' AND NEW.desired_status IS DISTINCT FROM OLD.desired_status
       AND NEW.status <> 'running' AND NEW.error_message IS NOT DISTINCT FROM OLD.error_message THEN
        NEW.error_message := NULL;
    END IF;

    v_action := public.lifecycle_owed_action(NEW);
    NEW.owed_action := v_action;
    -- Another action owed (or none): its failures are counted from its first. Not in
    -- the update that counts a failure, nor while a hold stands, nor for an instance
    -- never placed nor provisioned (instance_nowhere).
    IF TG_OP = 'UPDATE' AND v_action IS DISTINCT FROM OLD.owed_action
       AND NEW.attempts > 0 AND NEW.attempts = OLD.attempts
       AND NEW.rejected_actions IS NULL
       AND (NEW.target_id IS NOT NULL OR NEW.provisioned_at IS NOT NULL) THEN
        NEW.attempts := 0;
    END IF;
    IF v_action IS NULL THEN
        NEW.owed_since := NULL;
        NEW.owed_due_at := NULL;
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' OR OLD.owed_action IS DISTINCT FROM v_action OR OLD.owed_since IS NULL THEN
        NEW.owed_since := now();
    END IF;
    -- A rejected step holds the action it rejected, not another one (a restart, a
    -- cancellation's destroy, an unpaid subscription's stop, whenever it became owed).
    -- So does a welcome email Resend refused (lifecycle_finish: 'infinity').
    v_held := coalesce(v_action = ANY (NEW.rejected_actions), false)
              OR (v_action = 'email' AND NEW.welcome_email_next_at = 'infinity');
    NEW.owed_due_at := CASE WHEN v_held THEN NULL ELSE
        greatest(NEW.owed_since,
                 CASE WHEN v_action = 'email' THEN NEW.welcome_email_next_at ELSE NEW.next_attempt_at END,
                 CASE WHEN v_action = 'destroy_storage' THEN NEW.storage_destroy_after END,
                 CASE WHEN NEW.claimed_by IS NOT NULL THEN NEW.claim_expires_at END) END;

    IF NEW.owed_due_at <= now()
       AND (TG_OP = 'INSERT' OR OLD.owed_due_at IS NULL OR OLD.owed_due_at > now()) THEN
        IF current_setting('mindroom.wake_after_commit', true) = 'on' THEN
            PERFORM pg_catalog.set_config('mindroom.wake', 'on', true);
        ELSE
            PERFORM public.lifecycle_wake();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
