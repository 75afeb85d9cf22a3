-- 130_waiting_for_room.sql: placement follows the data that is really kept.
--
-- target_of_kept_storage (100_provisioner_targets.sql) counted a destroyed row's
-- storage as kept on its target even after a new instance had taken it over
-- (storage_taken_by, 124_kept_storage_taken.sql) and that instance's storage had
-- been destroyed in turn: every later re-creation under the same names went to the
-- first row's target whatever the rule said, even a drained, disabled or full one
-- holding nothing of it (on a disabled one its create waited target_disabled for
-- good). Storage another row took is that row's: the condition is now the one of
-- instances_kept_storage_idx (storage_taken_by IS NULL).
--
-- Redefines public.target_of_kept_storage (100_provisioner_targets.sql), whole and
-- unchanged but for that condition. CREATE OR REPLACE keeps its grants.

CREATE OR REPLACE FUNCTION public.target_of_kept_storage(p_app text, p_except uuid)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT x.target_id FROM public.instances x
     WHERE x.dokku_app_name = p_app AND x.id <> p_except
       AND x.target_id IS NOT NULL AND x.storage_destroyed_at IS NULL
       AND x.storage_taken_by IS NULL
     ORDER BY x.created_at DESC
     LIMIT 1;
$$;
