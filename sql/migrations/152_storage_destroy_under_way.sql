-- 152_storage_destroy_under_way.sql: kept storage whose destruction is under way is
-- not taken over.
--
-- When a destroyed instance's retention period ended, the worker claimed its
-- destroy_storage and called DELETE /apps/{app}/storage with no transaction open. An
-- instance re-created meanwhile under the same names (the subscription provisioned
-- again) took that storage over (instances_take_kept_storage: nothing looked at the
-- lease), so the old row stopped owing its destruction, and the new one's create went
-- ahead at once; the DELETE then destroyed the entries (the provisioner runs one
-- request per app at a time), the create made new, empty ones, and the finish recorded
-- the old row's storage destroyed while the new instance was recorded as holding it
-- (storage_taken_by): its step carried the old homeserver's identity onto an empty
-- database. Now:
-- - instances_take_kept_storage does not take storage whose row holds a lease (a
--   destroyed row's only step is destroy_storage; an expired lease still counts, its
--   worker may have died after the DELETE);
-- - lifecycle_target_wait makes an instance's first apps wait ('purge_pending', as for
--   a purge) while storage of its names on its provisioner, taken by nobody, is past
--   its retention period and not yet destroyed, so they get new entries once it is.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.instances_take_kept_storage (131_kept_storage_identity.sql: the
-- claimed_by condition) and public.lifecycle_target_wait (150_made_before_targets_stays.sql:
-- the storage_destroy_after condition of 'purge_pending'). CREATE OR REPLACE keeps
-- each function's grants.

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
           -- Not while its destroy_storage holds a lease (the DELETE may be in flight,
           -- or done by a worker that died before recording it).
           AND x.claimed_by IS NULL
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

CREATE OR REPLACE FUNCTION public.lifecycle_target_wait(i public.instances)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    t public.provisioner_targets;
BEGIN
    IF i.owed_action IS NULL OR i.owed_action = 'email' THEN
        RETURN NULL;
    END IF;
    IF i.owed_action IN ('create', 'start') AND i.provisioned_at IS NULL THEN
        IF EXISTS (SELECT 1 FROM public.instances x
                    WHERE x.dokku_app_name = i.dokku_app_name AND x.id <> i.id
                      AND x.target_id IS NOT DISTINCT FROM i.target_id
                      AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
                      AND x.storage_taken_by IS NULL
                      AND (x.purge_requested OR x.storage_destroy_after <= now())) THEN
            RETURN 'purge_pending';
        END IF;
        IF EXISTS (SELECT 1 FROM public.instance_teardowns d
                    WHERE d.dokku_app_name = i.dokku_app_name AND d.done_at IS NULL
                      AND d.target_id IS NOT DISTINCT FROM i.target_id) THEN
            RETURN 'teardown_pending';
        END IF;
    END IF;
    IF i.target_id IS NULL THEN
        IF i.owed_action NOT IN ('stop', 'destroy')
           AND i.provisioned_at IS NULL AND i.status <> 'deprovisioned' AND i.placement_waited
           AND EXISTS (SELECT 1 FROM public.provisioner_targets) THEN
            RETURN 'no_capacity';
        END IF;
        RETURN NULL;
    END IF;
    SELECT * INTO t FROM public.provisioner_targets x WHERE x.id = i.target_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT t.enabled THEN
        RETURN 'target_disabled';
    END IF;
    IF (SELECT count(*) FROM public.instances b
         WHERE b.target_id = t.id AND b.claimed_by IS NOT NULL
           AND b.claim_expires_at > now()) >= t.max_in_flight THEN
        RETURN 'target_busy';
    END IF;
    RETURN NULL;
END;
$$;
