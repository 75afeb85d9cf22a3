-- 133_made_nowhere_yet.sql: an instance's first apps wait for every destruction of
-- its names' data on its provisioner; "nothing of it exists anywhere" is known, not
-- guessed from a count.
--
-- - A re-created instance's create waited for the purge of the data a destroyed
--   instance of the same names kept (125), but only as a create: paused before its
--   create ran, then resumed, it owed a start, which (never deployed) makes the apps
--   on those same entries while the purge was still owed; the purge was then
--   refused (409 apps_exist) and held, and the data asked to be erased was mounted.
--   Now a create, or a start of an instance never provisioned, waits.
-- - The wait did not look at where the data is: an instance placed on another
--   provisioner than the purge's starts on new entries and waited for nothing
--   (for good, if that provisioner no longer answers). Now only data on the
--   instance's own provisioner (target_id, NULL for DOKKU_PROVISIONER_URL) counts.
-- - Deleting the destroyed row ended that wait and recorded a teardown of the same
--   app name (instance_teardowns): the new instance was created at once and the
--   teardown job then destroyed its apps and data. Its first apps now also wait,
--   'teardown_pending', while a teardown of its app name on its provisioner is not
--   done (a partial index finds it; the table holds only deleted rows' leftovers).
-- - instance_nowhere (130) took "no attempt counted" for "no provisioner was ever
--   called", but a success resets the count and a call cut short by a restart
--   counts nothing: an instance made or half-made on DOKKU_PROVISIONER_URL before
--   targets existed, destroyed once they did, was recorded destroyed without a call
--   and its apps and data there were orphaned. instances.placement_waited now says
--   it: true when the instance was inserted while targets existed and none had room
--   (instances_target_placement), so no provisioner was asked about it while it has
--   no target; instance_nowhere requires it. Rows from before this migration keep
--   false: their stop or destroy goes to DOKKU_PROVISIONER_URL, as for any
--   instance without a target.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.instances_target_placement (100_provisioner_targets.sql:
-- placement_waited), public.instance_nowhere and public.lifecycle_target_wait
-- (130_waiting_for_room.sql: placement_waited instead of the attempts; the waits
-- of an instance's first apps). CREATE OR REPLACE keeps each function's grants.

ALTER TABLE public.instances ADD COLUMN placement_waited boolean NOT NULL DEFAULT false;
CREATE INDEX instance_teardowns_app_idx ON public.instance_teardowns (dokku_app_name)
    WHERE done_at IS NULL;

CREATE OR REPLACE FUNCTION public.instances_target_placement()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF NEW.target_id IS NULL AND EXISTS (SELECT 1 FROM public.provisioner_targets) THEN
        PERFORM public.target_placement_lock();
        NEW.target_id := coalesce(public.target_of_kept_storage(NEW.dokku_app_name, NEW.id),
                                  public.target_choose(public.instance_reserved_mb(NEW)));
        NEW.placement_waited := NEW.target_id IS NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION public.instance_nowhere(i public.instances)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    RETURN i.target_id IS NULL AND i.provisioned_at IS NULL AND i.placement_waited
       AND EXISTS (SELECT 1 FROM public.provisioner_targets)
       AND NOT EXISTS (SELECT 1 FROM public.instances x
                        WHERE x.subscription_id = i.subscription_id AND x.storage_taken_by = i.id);
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
                      AND x.storage_taken_by IS NULL AND x.purge_requested) THEN
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
           AND i.provisioned_at IS NULL AND i.status <> 'deprovisioned'
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
