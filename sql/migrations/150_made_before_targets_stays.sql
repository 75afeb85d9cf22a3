-- 150_made_before_targets_stays.sql: an instance made before targets existed is
-- created, and started, where it was made: on DOKKU_PROVISIONER_URL.
--
-- An instance without a target whose create had gone to DOKKU_PROVISIONER_URL before
-- any target was registered (without --adopt) and had not succeeded there (a
-- half-made instance: its apps, its storage entries, its homeserver up) was taken for
-- one waiting for room: lifecycle_target_wait answered 'no_capacity' for any
-- unplaced, never-provisioned instance owed a create or a start, and the claim placed
-- it by the rule (instance_place). Its apps were then made on a target, and what it
-- had on DOKKU_PROVISIONER_URL was orphaned for good: its later stop, destroy and
-- retention went to the target, and nothing ever destroyed the leftovers. Only an
-- instance inserted while targets existed and none had room (placement_waited,
-- 133_made_nowhere_yet.sql) has been asked of no provisioner; only it waits for room
-- and is placed. Any other instance without a target goes to DOKKU_PROVISIONER_URL
-- for every step, as docs/lifecycle.md says.
--
-- Rows inserted before 133 while targets existed and none had room have
-- placement_waited false; they are the unplaced ones created after the first
-- target (the placement trigger gave every other row inserted since a target), and
-- are marked here, so that they keep waiting for room.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named: public.lifecycle_target_wait (133_made_nowhere_yet.sql: AND
-- i.placement_waited), public.instance_place (130_waiting_for_room.sql: OR NOT
-- i.placement_waited) and public.lifecycle_claim (130_waiting_for_room.sql: AND
-- x.placement_waited). CREATE OR REPLACE keeps each function's grants.

UPDATE public.instances x SET placement_waited = true
 WHERE x.target_id IS NULL AND x.provisioned_at IS NULL AND NOT x.placement_waited
   AND x.status <> 'deprovisioned'
   AND x.created_at >= (SELECT min(t.created_at) FROM public.provisioner_targets t);

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

CREATE OR REPLACE FUNCTION public.instance_place(p_instance_id uuid)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
SET enable_sort = on
SET enable_seqscan = on
SET enable_bitmapscan = on
AS $$
DECLARE
    i public.instances;
    v_target bigint;
BEGIN
    PERFORM public.target_placement_lock();
    SELECT * INTO i FROM public.instances WHERE id = p_instance_id FOR UPDATE;
    IF NOT FOUND OR i.target_id IS NOT NULL OR i.provisioned_at IS NOT NULL
       OR i.status = 'deprovisioned' OR NOT i.placement_waited THEN
        RETURN NULL;
    END IF;
    v_target := coalesce(public.target_of_kept_storage(i.dokku_app_name, i.id),
                         public.target_choose(public.instance_reserved_mb(i)));
    IF v_target IS NOT NULL THEN
        UPDATE public.instances SET target_id = v_target WHERE id = i.id;
    END IF;
    RETURN v_target;
END;
$$;

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
                  WHERE x.target_id IS NULL AND x.provisioned_at IS NULL AND x.placement_waited
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
