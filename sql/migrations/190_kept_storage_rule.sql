-- 190_kept_storage_rule.sql: which destroyed instance's kept data may be taken over
-- is decided in one place, and data past its retention is never taken over.
--
-- The rule was written out in five functions: the takeover itself
-- (instances_take_kept_storage), the choice of a returning customer's names
-- (instances_names_of_kept_data), the refusal of names whose data another account
-- keeps (instances_names_not_anothers), the wait of a new instance's first apps
-- (lifecycle_target_wait's 'purge_pending') and placement
-- (target_of_kept_storage). They had drifted:
-- - instances_take_kept_storage took over data whose retention was over whenever
--   its destroy_storage held no lease at that moment: before the worker claimed it,
--   or after a DELETE /apps/{app}/storage that failed or timed out (the lease given
--   back for the backoff, the entries possibly half removed on the host). A
--   subscription provisioned again then got data that should have been gone (or what
--   was left of it, with the homeserver's identity carried onto it), while one
--   whose worker had claimed a moment earlier waited and got new, empty entries,
--   and a returning customer's new subscription was never given those names
--   (instances_names_of_kept_data: retention not over);
-- - target_of_kept_storage drew a new instance to the provisioner of data it may
--   not take (past its retention, or its destruction under way), where it could only
--   wait for that destruction ('purge_pending') even on a disabled or full target; and
--   without the status condition it could not use instances_kept_storage_idx and read
--   every instance placed on a target at each insert.
--
-- Now one view holds the rule, public.instances_kept_storage: the destroyed rows whose
-- data is kept (status deprovisioned, storage neither destroyed nor taken over by
-- another row: exactly the WHERE clause of the partial index
-- instances_kept_storage_idx, so that the index serves every reader; a change of one is
-- a change of the other), with takeable: a new instance of its names on its
-- provisioner may take it over (not to be purged, no destroy_storage under lease: a
-- DELETE may be in flight, or done by a worker that died before recording it; its
-- retention not over: storage_destroy_after NULL or later than now). The planner
-- always flattens a simple view into the query that reads it, so each caller's plan
-- keeps the index. Functions could not hold the rule: a SQL function is inlined only
-- without a SET clause, and every function here pins search_path (01_catalog; the
-- Supabase linter's function_search_path_mutable). The view is security_invoker
-- (each caller's own rights and row security apply, as when it read the table; the
-- linter's security_definer_view), readable by service_role alone: the SECURITY
-- DEFINER triggers read it as their owner, service_role calls lifecycle_target_wait
-- and target_of_kept_storage itself. It has only the columns its callers read, and
-- storage_taken_by, which the takeover sets through it (a one-table view is
-- updatable: the UPDATE is rewritten onto public.instances, whose triggers fire as
-- before).
-- Each caller reads the view, its own conditions beside:
-- - instances_take_kept_storage, instances_names_of_kept_data, target_of_kept_storage:
--   takeable;
-- - lifecycle_target_wait: not takeable (what a new instance of the names there could
--   not take, and so must see destroyed before its first apps);
-- - instances_names_not_anothers: not to be purged, wider than takeable on purpose
--   (below).
--
-- CURRENT_TIMESTAMP is now(), evaluated without a function call whose EXECUTE right
-- every execution of a caller's statement would check: a new instance's insert costs
-- no more than before (instructions counted under callgrind: docs/benchmarks.md).
-- instances_names_not_anothers drops x.subscription_id <> NEW.subscription_id, which
-- its other-account condition already implies (a subscription has one account).
--
-- Redefines, each whole from its last definition and unchanged but for the rule's
-- conditions (CREATE OR REPLACE keeps their grants): public.instances_take_kept_storage
-- (152_storage_destroy_under_way.sql), public.instances_names_not_anothers and
-- public.instances_names_of_kept_data (186_returning_customer_keeps_data.sql),
-- public.lifecycle_target_wait (166_teardown_lease.sql), public.target_of_kept_storage
-- (134_purged_storage_not_kept.sql).

CREATE VIEW public.instances_kept_storage WITH (security_invoker = true) AS
SELECT i.id, i.subscription_id, i.dokku_app_name, i.subdomain, i.target_id,
       i.purge_requested, i.created_at, i.deprovisioned_at, i.storage_taken_by,
       (NOT i.purge_requested AND i.claimed_by IS NULL
        AND (i.storage_destroy_after IS NULL OR i.storage_destroy_after > CURRENT_TIMESTAMP))
           AS takeable
  FROM public.instances i
 WHERE i.status = 'deprovisioned' AND i.storage_destroyed_at IS NULL
   AND i.storage_taken_by IS NULL;

-- Supabase's default privileges give anon, authenticated and service_role ALL on a
-- new relation in public: each is taken back, then service_role may read it.
REVOKE ALL ON public.instances_kept_storage FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON public.instances_kept_storage TO service_role;

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
        UPDATE public.instances_kept_storage k SET storage_taken_by = NEW.id
         WHERE k.dokku_app_name = NEW.dokku_app_name AND k.id <> NEW.id
           AND k.target_id IS NOT DISTINCT FROM NEW.target_id AND k.takeable
        RETURNING k.id, k.subscription_id
    LOOP
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.storage_taken',
               jsonb_build_object('instance_id', r.id, 'by', NEW.id, 'app', NEW.dokku_app_name)
          FROM public.subscriptions s WHERE s.id = r.subscription_id;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION public.instances_names_of_kept_data()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_app text;
    v_subdomain text;
BEGIN
    -- A new instance under its subscription's names: not a row inserted destroyed (an
    -- import), nor one given names of its own.
    IF NEW.status = 'deprovisioned' OR NEW.dokku_app_name IS DISTINCT FROM
       (SELECT n.dokku_app_name FROM public.instance_names(NEW.subscription_id) n) THEN
        RETURN NEW;
    END IF;
    SELECT x.dokku_app_name, x.subdomain INTO v_app, v_subdomain
      FROM public.subscriptions mine
      JOIN public.subscriptions s ON s.account_id = mine.account_id
      JOIN public.instances_kept_storage x ON x.subscription_id = s.id
     WHERE mine.id = NEW.subscription_id AND x.takeable
       AND NOT EXISTS (SELECT 1 FROM public.instances l
                        WHERE l.dokku_app_name = x.dokku_app_name AND l.status <> 'deprovisioned')
     ORDER BY (s.id = NEW.subscription_id) DESC, x.deprovisioned_at DESC NULLS LAST,
              x.created_at DESC, x.id
     LIMIT 1;
    IF FOUND THEN
        NEW.dokku_app_name := v_app;
        NEW.subdomain := v_subdomain;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION public.instances_names_not_anothers()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    -- Another account's data is refused while it is there at all, not only while it
    -- could be taken: past its retention or under destruction too, until it is
    -- destroyed, so a 48-bit collision never depends on the worker's timing. Data to
    -- be purged is the exception (179): a new instance of those names waits for the
    -- purge there ('purge_pending') and starts on new, empty entries.
    IF EXISTS (SELECT 1 FROM public.instances_kept_storage x
                 JOIN public.subscriptions s ON s.id = x.subscription_id
                WHERE x.dokku_app_name = NEW.dokku_app_name AND NOT x.purge_requested
                  AND s.account_id <> (SELECT m.account_id FROM public.subscriptions m
                                        WHERE m.id = NEW.subscription_id)) THEN
        RAISE EXCEPTION USING ERRCODE = '23505',
            MESSAGE = pg_catalog.format('the instance names %s hold the kept data of another '
                                        'subscription', NEW.dokku_app_name);
    END IF;
    RETURN NEW;
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
        -- Data of its names there that it could not take over (to be purged, past its
        -- retention, its destruction under way) is destroyed before its first apps.
        IF EXISTS (SELECT 1 FROM public.instances_kept_storage x
                    WHERE x.dokku_app_name = i.dokku_app_name AND x.id <> i.id
                      AND x.target_id IS NOT DISTINCT FROM i.target_id AND NOT x.takeable) THEN
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
    IF public.target_in_flight(t.id) >= t.max_in_flight THEN
        RETURN 'target_busy';
    END IF;
    RETURN NULL;
END;
$$;

-- Where the data of an earlier instance under the same app name is kept and may be
-- taken over by the names' new instance: its target. NULL when none.
CREATE OR REPLACE FUNCTION public.target_of_kept_storage(p_app text, p_except uuid)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT x.target_id FROM public.instances_kept_storage x
     WHERE x.dokku_app_name = p_app AND x.id <> p_except
       AND x.target_id IS NOT NULL AND x.takeable
     ORDER BY x.created_at DESC
     LIMIT 1;
$$;
