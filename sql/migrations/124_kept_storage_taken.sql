-- 124_kept_storage_taken.sql: storage that a new instance takes over is no longer
-- the destroyed instance's to destroy.
--
-- An instance is created under its subscription's names (instance_names), so one
-- re-created after a destroy, while the destroyed one's data is still kept, mounts
-- the same storage entries (and is placed on their target: target_of_kept_storage).
-- The destroyed row still owed destroy_storage on its own clock: once the new
-- instance was destroyed in turn (its apps gone, its data to be kept for the
-- retention period), the old row's step deleted the shared entries early, or,
-- while the new instance's apps existed, was refused (409 apps_exist) and held for
-- an operator for good.
--
-- instances.storage_taken_by records the instance that took a destroyed one's kept
-- storage: set on every destroyed row of the same app name whose storage is not
-- destroyed when a new row is inserted (instances_take_kept_storage, AFTER INSERT),
-- audited as instance.storage_taken. lifecycle_owed_action owes destroy_storage
-- only for storage nobody took; the entries' fate is the new instance's
-- (its own destroy, retention and purge).
--
-- Redefines public.lifecycle_owed_action (080_webhook_cost.sql): unchanged but for
-- that condition.

-- (No foreign key: both rows are one subscription's, and go together.)
ALTER TABLE public.instances ADD COLUMN storage_taken_by uuid;
-- What a new instance may take over, found by name without reading every destroyed row.
CREATE INDEX instances_kept_storage_idx ON public.instances (dokku_app_name)
    WHERE status = 'deprovisioned' AND storage_destroyed_at IS NULL AND storage_taken_by IS NULL;

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
        WHEN i.applied_config_version IS DISTINCT FROM i.config_version THEN 'update'
        WHEN i.restart_version > i.applied_restart_version THEN 'restart'
        WHEN i.welcome_email_sent_at IS NULL THEN 'email'
    END)::public.lifecycle_action;
END;
$$;

CREATE FUNCTION public.instances_take_kept_storage()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        UPDATE public.instances x SET storage_taken_by = NEW.id
         WHERE x.dokku_app_name = NEW.dokku_app_name AND x.id <> NEW.id
           AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
           AND x.storage_taken_by IS NULL
        RETURNING x.id, x.subscription_id
    LOOP
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.storage_taken',
               jsonb_build_object('instance_id', r.id, 'by', NEW.id, 'app', NEW.dokku_app_name)
          FROM public.subscriptions s WHERE s.id = r.subscription_id;
    END LOOP;
    RETURN NULL;
END;
$$;
REVOKE ALL ON FUNCTION public.instances_take_kept_storage() FROM PUBLIC, anon, authenticated, service_role;

CREATE TRIGGER instances_take_kept_storage AFTER INSERT ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.instances_take_kept_storage();
