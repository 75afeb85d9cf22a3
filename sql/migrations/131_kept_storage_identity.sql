-- 131_kept_storage_identity.sql: storage is taken over only where the new instance is.
--
-- instances_take_kept_storage (124_kept_storage_taken.sql) took a destroyed
-- instance's kept storage by app name alone. An instance destroyed on
-- DOKKU_PROVISIONER_URL (no target) and created again once targets exist is placed
-- on a target: the new instance started empty there, and the old host's data,
-- marked taken, was never owed its destruction (it outlived its retention for
-- good). Now storage is taken only where the new instance is (the same target_id,
-- NULL being DOKKU_PROVISIONER_URL). An instance that waited for room and is then
-- placed (its target_id set before it was ever provisioned, instance_place) gives
-- back what it took elsewhere, which it never mounted (audited
-- instance.storage_released: the destroyed row owes its storage's destruction
-- again, on its own clock), and takes what is kept on its target. Adopting the
-- legacy host (mindroomctl target add --adopt) moves the destroyed rows with the
-- live ones in one statement: nothing is given back.
--
-- Redefines public.instances_take_kept_storage (125_purge_before_takeover.sql),
-- unchanged but for the target condition and the TG_OP = 'UPDATE' block; CREATE OR
-- REPLACE keeps its grants.

CREATE OR REPLACE FUNCTION public.instances_take_kept_storage()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    r record;
BEGIN
    -- Placed (instances_take_kept_storage_placed) before it was ever provisioned:
    -- storage it took elsewhere was never mounted, and is the destroyed row's again.
    IF TG_OP = 'UPDATE' THEN
        FOR r IN
            UPDATE public.instances x SET storage_taken_by = NULL
             WHERE x.storage_taken_by = NEW.id
               AND x.target_id IS DISTINCT FROM NEW.target_id
            RETURNING x.id, x.subscription_id
        LOOP
            INSERT INTO public.audit_logs (account_id, action, details)
            SELECT s.account_id, 'instance.storage_released',
                   jsonb_build_object('instance_id', r.id, 'by', NEW.id, 'app', NEW.dokku_app_name)
              FROM public.subscriptions s WHERE s.id = r.subscription_id;
        END LOOP;
    END IF;
    FOR r IN
        UPDATE public.instances x SET storage_taken_by = NEW.id
         WHERE x.dokku_app_name = NEW.dokku_app_name AND x.id <> NEW.id
           AND x.target_id IS NOT DISTINCT FROM NEW.target_id
           AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
           AND x.storage_taken_by IS NULL AND NOT x.purge_requested
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

-- AFTER: a statement that moves several rows at once (an adoption) has moved them all
-- when this runs.
CREATE TRIGGER instances_take_kept_storage_placed AFTER UPDATE OF target_id ON public.instances
    FOR EACH ROW
    WHEN (OLD.target_id IS DISTINCT FROM NEW.target_id AND NEW.provisioned_at IS NULL
          AND NEW.status <> 'deprovisioned')
    EXECUTE FUNCTION public.instances_take_kept_storage();
