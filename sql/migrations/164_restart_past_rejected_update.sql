-- 164_restart_past_rejected_update.sql: a tenant's restart is carried out while an
-- update the provisioner rejected waits for an operator; a cancellation's destroy
-- is due after an update rejected while it was owed.
--
-- A rejected step (a 4xx: last_error 'rejected: ...', no next_attempt_at) is held
-- until an operator asks again, and the hold was the row's: whatever was owed was
-- held. instances_work_owed lifted it only when the owed action changed after the
-- rejection (119), and lifecycle_owed_action owes an update before a restart. So a
-- restart asked past a rejected update (my-instance/restart answered ok) stayed
-- owed behind it for good: restart.pending true, nothing due, nothing saying why.
-- And work that became owed while the rejected step ran (a restart, a
-- cancellation's destroy) was held with it.
--
-- instances.rejected_actions records the actions the provisioner rejected while
-- the hold stands: the trigger adds the claimed action (claim_action) of the step
-- whose rejection lifecycle_finish records (its attempts counted, its lease still
-- held), and clears them when the hold ends (an explicit request's
-- next_attempt_at, a step that succeeded or failed otherwise). Only an action in
-- it is held; any other owed action is due. A restart goes ahead of a rejected
-- update (restarting the running apps needs none of the rejected configuration);
-- when it succeeds the update is tried once more (and held again if rejected).
-- If the restart is rejected too, both are held: nothing is retried in a loop.
--
-- Redefines public.lifecycle_owed_action (124_kept_storage_taken.sql): unchanged
-- but for the restart line ahead of the update; and public.instances_work_owed
-- (119_lease_per_step.sql): unchanged but for the rejected_actions lines and the
-- hold, which replaces 119's lift on a change of the owed action.

ALTER TABLE public.instances ADD COLUMN rejected_actions public.lifecycle_action[];

CREATE OR REPLACE FUNCTION public.lifecycle_owed_action(i public.instances)
RETURNS public.lifecycle_action
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
    RETURN (CASE
        WHEN i.status = 'deprovisioned' THEN
            CASE WHEN i.storage_destroyed_at IS NULL AND i.storage_taken_by IS NULL
                 THEN 'destroy_storage' END
        WHEN i.desired_status = 'deprovisioned' OR i.status = 'deprovisioning' THEN 'destroy'
        WHEN i.desired_status = 'stopped' THEN
            CASE WHEN i.status IN ('running', 'provisioning', 'failed') THEN 'stop' END
        WHEN i.status IN ('provisioning', 'failed') THEN 'create'
        WHEN i.status = 'stopped' THEN 'start'
        -- A restart of the running apps needs nothing of a configuration the
        -- provisioner rejected: it goes ahead of that update.
        WHEN i.restart_version > i.applied_restart_version
             AND 'update' = ANY (i.rejected_actions) THEN 'restart'
        WHEN i.applied_config_version IS DISTINCT FROM i.config_version THEN 'update'
        WHEN i.restart_version > i.applied_restart_version THEN 'restart'
        WHEN i.welcome_email_sent_at IS NULL THEN 'email'
    END)::public.lifecycle_action;
END;
$$;

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

    v_action := public.lifecycle_owed_action(NEW);
    NEW.owed_action := v_action;
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
    v_held := coalesce(v_action = ANY (NEW.rejected_actions), false);
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

-- A row held before this migration holds the action it owes (the one rejected).
UPDATE public.instances SET rejected_actions = ARRAY[owed_action]
 WHERE owed_action IS NOT NULL AND owed_due_at IS NULL
   AND next_attempt_at IS NULL AND last_error LIKE 'rejected: %';
