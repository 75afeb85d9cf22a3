-- 177_claim_once_a_wake.sql: a claim that takes a step says whether more is due,
-- and a teardown that ends wakes the lifecycle worker.
--
-- Every lifecycle worker process LISTENs, so a notification woke each idle one and
-- each claimed: on a host of N processes, N claims for one instance, all but one
-- finding nothing after waiting for the claim lock the others held. The worker now
-- claims once a wake-up on each host (functions/mindroom-lifecycle/wake.c) and
-- wakes another of its processes only when its claim says more is due ('more'),
-- so that due instances are still worked on at once, one a process.
--
-- 'more': another due instance that does not wait for its target (the claim's own
-- rule, lifecycle_target_wait), read after this one was taken. A row locked by
-- another claim counts (it may be given back), so 'more' may be true with nothing
-- left to take; it is never false while something is claimable.
--
-- Work that waits for a teardown may go ahead once the teardown ends, and nothing
-- said so: the worker found it only because each process claimed whenever it woke,
-- for anything. A teardown done lets an instance of the same names be made
-- (lifecycle_target_wait: 'teardown_pending'); a teardown done or failed gives back
-- the slot it held on its target ('target_busy', target_in_flight). Like a target
-- enabled or given room (the trigger provisioner_targets_changed), a teardown that
-- ends (done, or its lease given back) now wakes the worker.
--
-- Redefines public.lifecycle_claim, whole from its last definition
-- (150_made_before_targets_stays.sql) and unchanged but for 'more'. CREATE OR
-- REPLACE keeps its grants. The triggers that wake the worker share one function
-- (below).

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
                                      'instance', public.lifecycle_instance_json(i),
                                      'more', EXISTS (
                                          SELECT 1 FROM public.instances x
                                           WHERE x.owed_due_at <= now() AND x.id <> i.id
                                             AND public.lifecycle_target_wait(x) IS NULL));
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

-- One trigger function wakes the worker after every change that may let waiting
-- work go ahead: the two that were written once each (a concurrency limit raised,
-- 040_owed_work.sql; a target added or changed, 100_provisioner_targets.sql) and
-- a teardown that ends.
CREATE FUNCTION public.lifecycle_wake_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    PERFORM public.lifecycle_wake();
    RETURN NULL;
END;
$$;
REVOKE ALL ON FUNCTION public.lifecycle_wake_trigger() FROM PUBLIC, anon, authenticated;

DROP TRIGGER lifecycle_limits_raised ON public.lifecycle_limits;
CREATE TRIGGER lifecycle_limits_raised AFTER UPDATE OF max_in_flight ON public.lifecycle_limits
    FOR EACH ROW WHEN (NEW.max_in_flight > OLD.max_in_flight)
    EXECUTE FUNCTION public.lifecycle_wake_trigger();
DROP FUNCTION public.lifecycle_limits_raised();

DROP TRIGGER provisioner_targets_changed ON public.provisioner_targets;
CREATE TRIGGER provisioner_targets_changed AFTER INSERT OR UPDATE ON public.provisioner_targets
    FOR EACH ROW EXECUTE FUNCTION public.lifecycle_wake_trigger();
DROP FUNCTION public.provisioner_targets_changed();

CREATE TRIGGER instance_teardowns_ended AFTER UPDATE ON public.instance_teardowns
    FOR EACH ROW WHEN ((OLD.done_at IS NULL AND NEW.done_at IS NOT NULL)
                       OR (OLD.claimed_until IS NOT NULL AND NEW.claimed_until IS NULL))
    EXECUTE FUNCTION public.lifecycle_wake_trigger();
