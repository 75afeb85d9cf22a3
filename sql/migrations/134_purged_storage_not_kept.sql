-- 134_purged_storage_not_kept.sql: storage whose purge was asked for draws no
-- re-created instance to its target.
--
-- An instance created under the names of a destroyed one whose data is still kept
-- is placed on that data's target, whatever the rule says
-- (target_of_kept_storage): it will mount those entries there. But storage whose
-- purge was asked for is never taken over (125_purge_before_takeover.sql): it is
-- erased, and the new instance starts on new, empty entries wherever it goes.
-- target_of_kept_storage still counted it as kept, so the new instance went to the
-- purge's target even when the rule would never have chosen it: a disabled one (its
-- create then waited 'purge_pending', and 'target_disabled' once the purge was done,
-- for as long as the target stayed disabled), a drained one, or one without room
-- for it, while another target had room. Now such storage is not kept for placement
-- (AND NOT x.purge_requested) and the instance goes by the rule, at its insert
-- (instances_target_placement) as when the claim places it after waiting for room
-- (instance_place). When the rule puts it on the provisioner that still holds the
-- data, its first apps wait 'purge_pending' there as before (lifecycle_target_wait):
-- they are made only once the purge has erased those entries.
--
-- Redefines public.target_of_kept_storage (130_waiting_for_room.sql), whole and
-- unchanged but for that condition. CREATE OR REPLACE keeps its grants.

-- Where the data of an earlier instance under the same app name still is and is
-- kept for the names (neither destroyed, nor taken over by another row, nor to be
-- erased): its target. NULL when none.
CREATE OR REPLACE FUNCTION public.target_of_kept_storage(p_app text, p_except uuid)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT x.target_id FROM public.instances x
     WHERE x.dokku_app_name = p_app AND x.id <> p_except
       AND x.target_id IS NOT NULL AND x.storage_destroyed_at IS NULL
       AND x.storage_taken_by IS NULL AND NOT x.purge_requested
     ORDER BY x.created_at DESC
     LIMIT 1;
$$;
