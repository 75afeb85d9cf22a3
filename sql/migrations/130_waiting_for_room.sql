-- 130_waiting_for_room.sql: instances that wait for room on a provisioner target.
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

-- A claim while instances wait for room took seconds. lifecycle_claim runs with
-- enable_sort, enable_seqscan and enable_bitmapscan off (110_claim_backlog.sql,
-- 118_claim_leases_index_scan.sql), and a function's settings hold for everything
-- it calls: the placement it makes for each waiting instance (instance_place)
-- planned target_of_kept_storage's sort and target_choose's reading of the few
-- targets under them, priced at 10^10 and so JIT-compiled (jit is on by default),
-- 100-300 ms a query, up to 16 placements a claim, every claim serialized behind
-- the claim lock. Measured with 17 instances waiting: 7.5 s a claim, 7.6 ms with
-- jit off. Now:
--   * no statement of a claim is JIT-compiled (jit = off): each is an index access
--     meant to take microseconds, and compiling costs milliseconds whatever it says;
--   * a placement is planned with the planner's ordinary settings (instance_place's
--     own SET clauses): it reads the small targets table and sorts one app name's
--     few rows, which the claim's settings cannot avoid, only price at 10^10.
-- Either alone brings the 17-instance case to milliseconds (3 claims: 18 s before,
-- 7 ms after, on a loaded 2-core machine).
ALTER FUNCTION public.lifecycle_claim(text, integer) SET jit = off;
ALTER FUNCTION public.instance_place(uuid)
    SET enable_sort = on SET enable_seqscan = on SET enable_bitmapscan = on;
