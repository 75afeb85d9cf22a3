-- 110_claim_backlog.sql: a claim reads a few index entries however much work is due
-- and whatever the planner's statistics say. Redefines public.lifecycle_claim and
-- public.lifecycle_target_wait (100_provisioner_targets.sql); what may be claimed,
-- the global limit, the advisory lock that orders claims, placement and the answer
-- stay as they were.
--
-- PL/pgSQL plans a claim's statements once per connection, and a worker's first claim
-- usually runs while instances is small or its statistics are stale. The claim of 100
-- filtered the due rows with lifecycle_target_wait(), which the planner cannot see
-- through (a LANGUAGE sql function with a pinned search_path is never inlined, and is
-- planned again at each call, ~30 µs): it read every due row, called the function on
-- each, and sorted them. With 5,000 instances owed a create a claim took 285 ms, and
-- during a burst of sign-ups the worker spent its time claiming. The count of live
-- leases had become a scan of every instance (3.5 ms at 25,000) the same way.
--
-- Now:
--   * the due rows are walked in owed_due_at order by a query with no function in it,
--     and lifecycle_target_wait (PL/pgSQL: planned once per connection) is asked per
--     row only until a row can be taken; without targets the first due row is taken;
--   * that row is locked by its key (FOR UPDATE SKIP LOCKED, the due condition checked
--     again on its latest version), so two workers never take the same step;
--   * the next wake-up comes from the index too: the first due row that waits for
--     nothing (0 ms), else the first row due later;
--   * the claim runs with enable_sort and enable_seqscan off. Every statement of a
--     claim is meant to be an index access; these keep it one whatever the
--     statistics say (a plan that reads every due row and sorts them is priced out).

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
    IF i.target_id IS NULL THEN
        IF i.provisioned_at IS NULL AND i.status <> 'deprovisioned'
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

CREATE OR REPLACE FUNCTION public.lifecycle_claim(p_owner text, p_lease_s integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
-- Every statement of a claim is an index access, whatever the statistics say (see
-- the header): plans that read every due row and sort them, or every instance, are
-- priced out.
SET enable_sort = off
SET enable_seqscan = off
AS $$
DECLARE
    v_limit integer;
    v_busy integer;
    v_full boolean;
    v_id uuid;
    r public.instances;
    i public.instances;
    v_next timestamptz;
BEGIN
    IF p_owner IS NULL OR p_lease_s IS NULL OR p_lease_s < 1 THEN
        RAISE EXCEPTION 'owner and a positive lease are required' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('mindroom:lifecycle_claim', 0));
    IF EXISTS (SELECT 1 FROM public.provisioner_targets) THEN
        PERFORM public.instance_place(x.id)
           FROM public.instances x
          WHERE x.target_id IS NULL AND x.provisioned_at IS NULL
            AND x.owed_due_at <= now() AND x.owed_action = 'create'
          ORDER BY x.owed_due_at
          LIMIT 16;
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
