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
-- (jit = off is among lifecycle_claim's SET clauses, below.)
ALTER FUNCTION public.instance_place(uuid)
    SET enable_sort = on SET enable_seqscan = on SET enable_bitmapscan = on;

-- A stop or destroy owed by an instance that waits for room never happened:
-- lifecycle_target_wait answered 'no_capacity' for any work of an unplaced,
-- never-provisioned instance, and the claim places only instances owed a create. A
-- cancellation of a waiting instance left it owing destroy for good (and
-- lifecycle_provision answered conflict for its subscription for good: "being
-- destroyed"); a paused customer's stop waited the same way.
--
-- Such an instance has nothing on any provisioner: its create never ran. Now:
--   * only work that makes apps waits for room: 'no_capacity' is the answer for a
--     create (or the start of an instance stopped before it was ever made), never
--     for a stop or a destroy;
--   * the claim records such a stop or destroy done itself, calling nobody
--     (public.instance_nowhere says when nothing of the instance exists anywhere):
--     it is not handed to the worker, which would send it to DOKKU_PROVISIONER_URL
--     (the provisioner of instances without a target), a host that may not exist
--     once targets do. A destroy keeps no data (storage_destroyed_at: nothing
--     was ever stored, so no destroy_storage is owed later). A stopped one that is
--     resumed owes a start, which waits for room and is placed like a create;
--   * the claim places instances owed a start as well as a create.
-- A stop or destroy of an unplaced instance whose create was tried before targets
-- existed (attempts counted: it went to DOKKU_PROVISIONER_URL) or that took over
-- kept storage (its data is where that storage is) is not "nowhere": it is claimed
-- and goes to DOKKU_PROVISIONER_URL, where that instance's leftovers are.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.lifecycle_target_wait (125_purge_before_takeover.sql: the
-- 'no_capacity' condition) and public.lifecycle_claim (110_claim_backlog.sql, with
-- 118's enable_bitmapscan = off among its SET clauses and jit = off added: the
-- placement's owed actions and the stop or destroy recorded in the claim; the
-- placement's walk, below).

-- Whether nothing of the instance exists on any provisioner: targets exist, it was
-- never placed on one nor provisioned, no step of it was ever tried (its create has
-- waited for room since it was inserted), and it took over no destroyed instance's
-- kept storage (instances_take_kept_storage: rows of its subscription name it).
CREATE FUNCTION public.instance_nowhere(i public.instances)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    RETURN i.target_id IS NULL AND i.provisioned_at IS NULL AND i.attempts = 0
       AND EXISTS (SELECT 1 FROM public.provisioner_targets)
       AND NOT EXISTS (SELECT 1 FROM public.instances x
                        WHERE x.subscription_id = i.subscription_id AND x.storage_taken_by = i.id);
END;
$$;
REVOKE ALL ON FUNCTION public.instance_nowhere(public.instances) FROM PUBLIC, anon, authenticated;

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
    IF i.owed_action = 'create' AND EXISTS (
           SELECT 1 FROM public.instances x
            WHERE x.dokku_app_name = i.dokku_app_name AND x.id <> i.id
              AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
              AND x.storage_taken_by IS NULL AND x.purge_requested) THEN
        RETURN 'purge_pending';
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

-- A small instance that fits was never placed behind 16 larger ones that did not:
-- the claim tried to place only the 16 oldest waiting instances, and with every one
-- of them too large for the room there was, the same 16 were tried at every claim.
-- Now the claim walks the waiting instances in the same order (the same index)
-- past those larger than the most free memory a target may give a new instance
-- (public.target_room_mb), which cost no placement, and tries at most 16 that fit.
-- Nothing fits anywhere (no target may take even the smallest): it stops at the
-- first row. The walk reads the waiting rows that are due, as the claim's own walk
-- below already does while they wait.

-- The most memory a new instance may reserve now: the free memory of the target the
-- placement rule would choose for an instance reserving nothing (target_choose), or
-- NULL when no target may take one. Planned with the ordinary settings, as
-- instance_place is.
CREATE FUNCTION public.target_room_mb()
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
SET enable_sort = on
SET enable_seqscan = on
SET enable_bitmapscan = on
AS $$
    SELECT public.target_free_mb(public.target_choose(0));
$$;
REVOKE ALL ON FUNCTION public.target_room_mb() FROM PUBLIC, anon, authenticated;

CREATE OR REPLACE FUNCTION public.lifecycle_claim(p_owner text, p_lease_s integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
-- Every statement of a claim is an index access, whatever the statistics say (see
-- 110's header): plans that read every due row and sort them, or every instance, are
-- priced out; the leases in force are counted with a plain index scan (118); and no
-- statement is JIT-compiled (above).
SET enable_sort = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET jit = off
AS $$
DECLARE
    v_limit integer;
    v_busy integer;
    v_full boolean;
    v_id uuid;
    r public.instances;
    i public.instances;
    v_next timestamptz;
    v_done jsonb;
    v_room bigint;
    v_room_read boolean := false;
    v_tries integer := 0;
BEGIN
    IF p_owner IS NULL OR p_lease_s IS NULL OR p_lease_s < 1 THEN
        RAISE EXCEPTION 'owner and a positive lease are required' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('mindroom:lifecycle_claim', 0));
    IF EXISTS (SELECT 1 FROM public.provisioner_targets) THEN
        -- Instances waiting for room, oldest first: those that fit are placed (16
        -- tries at most); those larger than any room are passed over.
        FOR r IN SELECT * FROM public.instances x
                  WHERE x.target_id IS NULL AND x.provisioned_at IS NULL
                    AND x.owed_due_at <= now() AND x.owed_action IN ('create', 'start')
                  ORDER BY x.owed_due_at LOOP
            IF NOT v_room_read THEN
                v_room := public.target_room_mb();
                v_room_read := true;
            END IF;
            EXIT WHEN v_room IS NULL;
            CONTINUE WHEN public.instance_reserved_mb(r) > v_room;
            IF public.instance_place(r.id) IS NOT NULL THEN
                v_room := public.target_room_mb();
            END IF;
            v_tries := v_tries + 1;
            EXIT WHEN v_tries >= 16;
        END LOOP;
    END IF;
    SELECT l.max_in_flight INTO v_limit FROM public.lifecycle_limits l WHERE l.scope = 'global';
    SELECT count(*) INTO v_busy FROM public.instances x
     WHERE x.claimed_by IS NOT NULL AND x.claim_expires_at > now();
    v_full := v_busy >= coalesce(v_limit, 0);

    -- Due rows in order (claimed rows are due at their lease's end: not here).
    FOR r IN SELECT * FROM public.instances x WHERE x.owed_due_at <= now() ORDER BY x.owed_due_at LOOP
        CONTINUE WHEN public.lifecycle_target_wait(r) IS NOT NULL;
        IF v_full THEN
            v_next := r.owed_due_at; -- claimable once a slot frees
            EXIT;
        END IF;
        SELECT x.id INTO v_id FROM public.instances x
         WHERE x.id = r.id AND x.owed_due_at <= now()
           FOR UPDATE SKIP LOCKED;
        IF v_id IS NOT NULL THEN
            i := public.lifecycle_take(v_id, NULL, p_owner, p_lease_s);
            -- Nothing of it exists anywhere: its stop or destroy calls nobody and is
            -- done (a destroy keeps no data). What its finish chains, if anything,
            -- is this claim's step; else the claim goes on.
            IF i.claim_action IN ('stop', 'destroy') AND public.instance_nowhere(i) THEN
                v_done := public.lifecycle_finish(i.id, i.claimed_by, '{"ok": true, "purged": true}',
                                                  p_lease_s, 1, 1);
                IF v_done ->> 'outcome' = 'claimed' THEN
                    RETURN v_done;
                END IF;
                CONTINUE;
            END IF;
            RETURN jsonb_build_object('outcome', 'claimed',
                                      'step', public.lifecycle_step_json(i),
                                      'instance', public.lifecycle_instance_json(i));
        END IF;
        -- Held by another transaction for now: worth asking again at once.
        v_next := coalesce(v_next, r.owed_due_at);
    END LOOP;
    IF v_next IS NULL THEN
        SELECT min(x.owed_due_at) INTO v_next FROM public.instances x WHERE x.owed_due_at > now();
    END IF;
    RETURN jsonb_build_object(
        'outcome', CASE WHEN v_full THEN 'full' ELSE 'none' END,
        'next_due_in_ms', CASE WHEN v_next IS NOT NULL THEN
            greatest(0, ceil(extract(epoch FROM v_next - pg_catalog.clock_timestamp()) * 1000))::bigint END);
END;
$$;
