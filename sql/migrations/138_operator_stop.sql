-- 138_operator_stop.sql: an operator's stop holds until the operator provisions
-- again, whatever billing events arrive.
--
-- deprovision-instance's stop (lifecycle_deprovision) set desired_status stopped and
-- nothing else, so the subscription's next entitled event (the monthly renewal's
-- customer.subscription.updated, a plan change) asked for running again and the
-- worker started the instance: an instance stopped to move its storage to another
-- target wrote data on the old one that the copy missed, an abusive instance
-- suspended by an operator came back.
--
-- instances.operator_stopped_at records that an operator stopped the instance (and
-- when): set by every stop lifecycle_deprovision records, cleared only by
-- lifecycle_provision (provision-instance, mindroomctl provision) when it records
-- the request (outcome ok). While it is set:
-- - stripe_apply_subscription does not ask a running state of the instance. The
--   event is still recorded and applied to the subscription (tier, status, price),
--   and the plan triggers (004) still resize the instance, so it is right when
--   resumed. An event that ends the subscription (cancelled, incomplete_expired)
--   still destroys it, and unpaid/paused ask for the stop it already has.
-- - A CHECK keeps desired_status from being running (instances_operator_stop_held):
--   the worker owes a held instance no create or start (lifecycle_owed_action's
--   'start' for a stopped instance asks for desired running), the health round
--   marks failed and redeploys only instances desired running, and a tenant's
--   my-instance restart only a running one desired running.
-- A stop that came from billing (unpaid, paused) records nothing here: the
-- subscription's return to active resumes the instance as before. Instances stopped
-- before this migration while their subscription is entitled (so by an operator)
-- are marked held.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named:
-- - public.stripe_apply_subscription (128_subscription_items.sql): v_inst_held
--   (declared, and read by the one SELECT of the instance that was there: no
--   statement added on the hot path), and the `AND NOT (v_inst_held AND v_desired =
--   'running')` condition, with its comment, on the instance_request branch; and,
--   for 137_stripe_cancellations.sql, the IF v_sub_id IS NULL block with its comment
--   after the SELECT of the subscription row (an event of a subscription deleted
--   with its account raises MRW05, which 137's stripe_handle_event records ignored;
--   one primary-key probe, only when the subscription has no row).
-- - public.lifecycle_deprovision (125_purge_before_takeover.sql): the IF after
--   instance_request that sets operator_stopped_at on a stop.
-- - public.lifecycle_provision (040_owed_work.sql): `operator_stopped_at = NULL` in
--   its UPDATE and `OR operator_stopped_at IS NOT NULL` in that UPDATE's condition
--   (CREATE OR REPLACE, so its grants stay).
-- - public.lifecycle_instance_json (080_webhook_cost.sql): the operator_stopped_at
--   key, so deprovision-instance's and provision-instance's answers show the hold.

ALTER TABLE public.instances ADD COLUMN operator_stopped_at timestamptz;
ALTER TABLE public.instances ADD CONSTRAINT instances_operator_stop_held
    CHECK (operator_stopped_at IS NULL OR desired_status <> 'running');
COMMENT ON COLUMN public.instances.operator_stopped_at IS
    'when an operator stopped the instance (deprovision-instance, mode stop); until provision-instance clears it, billing events do not resume it';
-- An instance already asked to stop while its subscription is entitled was stopped
-- by an operator (billing asks an entitled subscription's instance to run): it holds.
UPDATE public.instances i SET operator_stopped_at = now()
  FROM public.subscriptions s
 WHERE s.id = i.subscription_id AND i.desired_status = 'stopped'
   AND i.status <> 'deprovisioned' AND public.is_entitled(s.status);

CREATE OR REPLACE FUNCTION public.stripe_apply_subscription(
    p_event jsonb, p_event_id text, p_type text, p_created timestamptz,
    OUT subscription_id uuid, OUT instance_id uuid, OUT owed text, OUT stale boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_obj       jsonb := p_event -> 'data' -> 'object';
    v_stripe_id text := v_obj ->> 'id';
    v_stripe_st text := v_obj ->> 'status';
    v_status    public.subscription_status;
    v_price     text;
    v_tier      public.subscription_tier;
    v_account   uuid;
    v_period    timestamptz;
    v_sub_id    uuid;
    v_sub_last  timestamptz;
    v_sub_lastid text;
    v_last      record;
    v_inst_id   uuid;
    v_inst_want public.instance_status;
    v_names     record;
    v_desired   public.instance_status;
    v_inst_held boolean;
BEGIN
    stale := false;
    IF v_stripe_id IS NULL OR v_stripe_id = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'subscription object without id';
    END IF;

    -- Every event of one subscription is serialized by this lock, including the two
    -- that might otherwise both try to create its row. The row lock keeps
    -- provision-instance's requests (FOR UPDATE) out meanwhile; the worker's
    -- foreign-key checks (FOR KEY SHARE) do not wait for it.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(v_stripe_id, 4242));
    SELECT s.id, s.last_event_created, s.last_event_id INTO v_sub_id, v_sub_last, v_sub_lastid
      FROM public.subscriptions s
     WHERE s.stripe_subscription_id = v_stripe_id FOR NO KEY UPDATE;

    -- A subscription with no row that was deleted on purpose (with its account)
    -- is not new: its events (our own cancellation's among them) are ignored.
    IF v_sub_id IS NULL AND EXISTS (SELECT 1 FROM public.stripe_cancellations c
                                     WHERE c.stripe_subscription_id = v_stripe_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW05',
            MESSAGE = 'ignored: its subscription was deleted with its account and is cancelled at Stripe by us';
    END IF;

    -- Ordering: compare with the last applied event before validating anything else,
    -- so that a stale event changes nothing, not even the account link.
    IF FOUND AND v_sub_last IS NOT NULL THEN
        IF p_created < v_sub_last THEN
            stale := true;
        ELSIF p_created = v_sub_last THEN
            SELECT e.type, e.payload -> 'data' -> 'object' ->> 'status' AS st
              INTO v_last FROM public.stripe_events e WHERE e.id = v_sub_lastid;
            IF (public.stripe_event_rank(p_type, v_stripe_st), p_event_id)
               <= (public.stripe_event_rank(v_last.type, v_last.st), v_sub_lastid) THEN
                stale := true;
            END IF;
        END IF;
        IF stale THEN
            subscription_id := v_sub_id;
            RETURN;
        END IF;
    END IF;

    v_status := public.stripe_subscription_status(v_stripe_st);
    -- deleted always means canceled, whatever status the payload carries.
    IF p_type = 'customer.subscription.deleted' THEN
        v_status := 'cancelled';
    END IF;

    -- The plan: among several items (a plan and an add-on, or two plans, in no order
    -- Stripe promises), the highest tier whose price is a plan. One item, or no item a
    -- plan: the first item's price (or the legacy `plan`), looked up as it is.
    IF v_obj #>> '{items,data,1,price,id}' IS NOT NULL
       AND jsonb_typeof(v_obj #> '{items,data}') = 'array' THEN
        SELECT p.stripe_price_id, p.tier INTO v_price, v_tier
          FROM jsonb_array_elements(v_obj #> '{items,data}') AS it
          JOIN public.plans p ON p.stripe_price_id = it #>> '{price,id}'
         ORDER BY p.tier DESC, p.stripe_price_id
         LIMIT 1;
    END IF;
    IF v_price IS NULL THEN
        v_price := coalesce(v_obj #>> '{items,data,0,price,id}', v_obj #>> '{plan,id}');
        SELECT p.tier INTO v_tier FROM public.plans p WHERE p.stripe_price_id = v_price;
        IF NOT FOUND THEN
            -- A subscription that stops or ends needs no plan: it keeps the one recorded
            -- (first seen ending: the lowest tier; nothing runs for it), so that a
            -- cancellation is never lost to a price the catalogue lacks, nor undone by an
            -- older event that arrives after it.
            IF public.instance_desired_for(v_status) IS DISTINCT FROM 'running' THEN
                IF v_sub_id IS NOT NULL THEN
                    SELECT s.stripe_price_id, s.tier INTO v_price, v_tier
                      FROM public.subscriptions s WHERE s.id = v_sub_id;
                ELSE
                    v_tier := 'free';
                END IF;
            ELSE
                RAISE EXCEPTION USING ERRCODE = 'MRW02', MESSAGE = 'unknown price: no plan has this price id';
            END IF;
        END IF;
    END IF;

    -- Before API version 2025-03-31 the period end is on the subscription; since, on
    -- each item.
    v_period := coalesce(pg_catalog.to_timestamp((v_obj ->> 'current_period_end')::bigint),
                         (SELECT pg_catalog.to_timestamp(max((it ->> 'current_period_end')::bigint))
                            FROM jsonb_array_elements(
                                 CASE WHEN jsonb_typeof(v_obj #> '{items,data}') = 'array'
                                      THEN v_obj #> '{items,data}' ELSE '[]'::jsonb END) AS it));

    IF v_sub_id IS NULL THEN
        v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                               v_obj #>> '{metadata,account_id}');
        INSERT INTO public.subscriptions AS s (
            account_id, stripe_subscription_id, stripe_price_id, tier, status,
            trial_ends_at, current_period_end, cancelled_at, cancel_at_period_end,
            last_event_created, last_event_id)
        VALUES (v_account, v_stripe_id, v_price, v_tier, v_status,
                pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint), v_period,
                pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
                coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
                p_created, p_event_id)
        RETURNING s.id INTO v_sub_id;
    ELSE
        UPDATE public.subscriptions AS s SET
            stripe_price_id      = v_price,
            tier                 = v_tier,
            status               = v_status,
            trial_ends_at        = pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint),
            current_period_end   = v_period,
            cancelled_at         = pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
            cancel_at_period_end = coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
            last_event_created   = p_created,
            last_event_id        = p_event_id
        WHERE s.id = v_sub_id;
    END IF;
    subscription_id := v_sub_id;

    -- The instance consequence, as intent. A new price reaches the instance's limits
    -- through the plan triggers (004), which makes an update owed. The row is read
    -- without a lock: what it is asked to become (desired_status) changes only under
    -- this subscription's lock or the instance's own, and instance_request's UPDATE
    -- re-checks the row it writes; an event that asks nothing new writes nothing.
    v_desired := public.instance_desired_for(v_status);
    SELECT i.id, i.desired_status, i.owed_action, i.operator_stopped_at IS NOT NULL
      INTO v_inst_id, v_inst_want, owed, v_inst_held
      FROM public.instances i
     WHERE i.subscription_id = v_sub_id AND i.status <> 'deprovisioned';
    IF v_desired = 'running' AND v_inst_id IS NULL THEN
        SELECT * INTO v_names FROM public.instance_names(v_sub_id);
        -- Memory and CPU come from the plan (trigger, 004).
        INSERT INTO public.instances AS i (
            subscription_id, dokku_app_name, subdomain, status, desired_status)
        VALUES (v_sub_id, v_names.dokku_app_name, v_names.subdomain, 'provisioning', 'running')
        RETURNING i.id, i.owed_action INTO v_inst_id, owed;
    -- An operator's stop holds until the operator provisions again: billing that
    -- keeps the subscription running does not resume it (its plan still sizes it,
    -- above); billing that ends it still destroys it.
    ELSIF v_desired IS NOT NULL AND v_inst_id IS NOT NULL
          AND v_inst_want IS DISTINCT FROM v_desired
          AND NOT (v_inst_held AND v_desired = 'running') THEN
        SELECT q.owed_action INTO owed FROM public.instance_request(v_inst_id, v_desired) q;
    END IF;
    instance_id := v_inst_id;
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_deprovision(p_instance_id uuid, p_subscription_id uuid,
                                             p_mode text, p_purge boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_sub_status public.subscription_status;
    v_id uuid := p_instance_id;
    v_mode text := p_mode;
BEGIN
    IF p_mode IS NOT NULL AND p_mode NOT IN ('stop', 'destroy') THEN
        RAISE EXCEPTION 'mode must be stop or destroy' USING ERRCODE = '22023';
    END IF;
    IF p_purge AND p_mode IS DISTINCT FROM 'destroy' THEN
        RAISE EXCEPTION 'purge goes with mode destroy' USING ERRCODE = '22023';
    END IF;
    IF v_id IS NULL THEN
        PERFORM 1 FROM public.subscriptions WHERE id = p_subscription_id;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('outcome', 'not_found');
        END IF;
        v_id := coalesce(public.lifecycle_live_instance_id(p_subscription_id),
                         (SELECT id FROM public.instances WHERE subscription_id = p_subscription_id
                           ORDER BY created_at DESC LIMIT 1));
        IF v_id IS NULL THEN
            RETURN jsonb_build_object('outcome', 'none', 'mode', coalesce(v_mode, 'stop'));
        END IF;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF v_mode IS NULL THEN
        SELECT status INTO v_sub_status FROM public.subscriptions WHERE id = i.subscription_id;
        v_mode := CASE WHEN public.instance_desired_for(v_sub_status) = 'deprovisioned'
                       THEN 'destroy' ELSE 'stop' END;
    END IF;
    i := public.instance_request(v_id, CASE v_mode WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                                                   ELSE 'stopped'::public.instance_status END);
    -- The operator's stop holds: until lifecycle_provision, no billing event resumes it.
    IF v_mode = 'stop' AND i.desired_status = 'stopped' AND i.operator_stopped_at IS NULL THEN
        UPDATE public.instances SET operator_stopped_at = now() WHERE id = v_id RETURNING * INTO i;
    END IF;
    IF p_purge AND NOT i.purge_requested AND i.storage_destroyed_at IS NULL
       AND i.storage_taken_by IS NULL THEN
        UPDATE public.instances SET purge_requested = true,
               storage_destroy_after = CASE WHEN status = 'deprovisioned' THEN now()
                                            ELSE storage_destroy_after END
         WHERE id = v_id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.purge_requested',
               jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                  'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role')
          FROM public.subscriptions s WHERE s.id = i.subscription_id;
    END IF;
    -- An explicit request lifts a retry backoff or an operator hold on what it asks for.
    IF i.owed_action IN ('stop', 'destroy', 'destroy_storage')
       AND (i.next_attempt_at > now() OR (i.next_attempt_at IS NULL AND i.last_error IS NOT NULL)) THEN
        UPDATE public.instances SET next_attempt_at = now() WHERE id = v_id RETURNING * INTO i;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'mode', v_mode, 'purge', i.purge_requested,
                              'instance', public.lifecycle_instance_json(i))
        || CASE WHEN p_purge AND i.storage_taken_by IS NOT NULL
                THEN jsonb_build_object('storage_taken_by', i.storage_taken_by)
                ELSE '{}'::jsonb END;
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_provision(p_subscription_id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    s public.subscriptions;
    i public.instances;
    v_id uuid;
    v_mem integer;
    v_cpu numeric;
BEGIN
    -- Serializes every request for this subscription (and the webhook's own writes
    -- to it) for the few statements below.
    SELECT * INTO s FROM public.subscriptions WHERE id = p_subscription_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF NOT public.is_entitled(s.status) THEN
        RETURN jsonb_build_object('outcome', 'not_entitled', 'subscription_status', s.status,
            'instance', (SELECT public.lifecycle_instance_json(x) FROM public.instances x
                          WHERE x.id = public.lifecycle_live_instance_id(p_subscription_id)));
    END IF;

    -- The same plan the tier -> limits triggers (004) use.
    SELECT p.memory_limit_mb, p.cpu_limit INTO v_mem, v_cpu
      FROM public.plan_for(s.tier, s.stripe_price_id) p;

    v_id := public.lifecycle_live_instance_id(p_subscription_id);
    IF v_id IS NULL THEN
        BEGIN
            INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status,
                                          desired_status)
            SELECT p_subscription_id, n.dokku_app_name, n.subdomain, 'provisioning', 'running'
              FROM public.instance_names(p_subscription_id) n
            RETURNING id INTO v_id;
        EXCEPTION WHEN unique_violation THEN
            -- A destroyed instance of this subscription still holds the names.
            RETURN jsonb_build_object('outcome', 'conflict',
                'message', 'the instance names of this subscription are still taken');
        END;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF i.status = 'deprovisioning' OR i.desired_status = 'deprovisioned' THEN
        RETURN jsonb_build_object('outcome', 'conflict',
            'message', 'the instance is being destroyed',
            'instance', public.lifecycle_instance_json(i));
    END IF;

    UPDATE public.instances SET
        desired_status = 'running',
        operator_stopped_at = NULL,
        memory_limit_mb = coalesce(v_mem, memory_limit_mb),
        cpu_limit = coalesce(v_cpu, cpu_limit),
        next_attempt_at = CASE WHEN next_attempt_at > now()
                                 OR (next_attempt_at IS NULL AND last_error IS NOT NULL)
                               THEN now() ELSE next_attempt_at END,
        welcome_email_next_at = CASE WHEN welcome_email_next_at > now() THEN now()
                                     ELSE welcome_email_next_at END
     WHERE id = v_id
       AND (desired_status IS DISTINCT FROM 'running'
            OR operator_stopped_at IS NOT NULL
            OR memory_limit_mb IS DISTINCT FROM coalesce(v_mem, memory_limit_mb)
            OR cpu_limit IS DISTINCT FROM coalesce(v_cpu, cpu_limit)
            OR next_attempt_at > now() OR (next_attempt_at IS NULL AND last_error IS NOT NULL)
            OR welcome_email_next_at > now())
    RETURNING * INTO i;
    IF NOT FOUND THEN
        SELECT * INTO i FROM public.instances WHERE id = v_id;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'instance', public.lifecycle_instance_json(i));
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_instance_json(i public.instances)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    RETURN jsonb_build_object(
        'id', i.id,
        'subscription_id', i.subscription_id,
        'status', i.status,
        'desired_status', i.desired_status,
        'operator_stopped_at', i.operator_stopped_at,
        'owed_action', i.owed_action,
        'owed_since', i.owed_since,
        'owed_due_at', i.owed_due_at,
        'dokku_app_name', i.dokku_app_name,
        'subdomain', i.subdomain,
        'backend_url', i.backend_url,
        'frontend_url', i.frontend_url,
        'matrix_server_url', i.matrix_server_url,
        'matrix_server_name', i.matrix_server_name,
        'memory_limit_mb', i.memory_limit_mb,
        'cpu_limit', i.cpu_limit,
        'homeserver_memory_mb', i.homeserver_memory_mb,
        'homeserver_cpu', i.homeserver_cpu,
        'storage_gb', i.storage_gb,
        'attempts', i.attempts,
        'next_attempt_at', i.next_attempt_at,
        'last_error', i.last_error,
        'error_message', i.error_message,
        'busy', (i.claimed_by IS NOT NULL AND i.claim_expires_at > now()),
        'claim_action', CASE WHEN i.claim_expires_at > now() THEN i.claim_action END,
        'claim_expires_at', CASE WHEN i.claim_expires_at > now() THEN i.claim_expires_at END,
        'purge_requested', i.purge_requested,
        'storage_destroy_after', i.storage_destroy_after,
        'storage_destroyed_at', i.storage_destroyed_at,
        'provisioned_at', i.provisioned_at,
        'deprovisioned_at', i.deprovisioned_at,
        'welcome_email_sent_at', i.welcome_email_sent_at,
        'welcome_email_error', i.welcome_email_error,
        'created_at', i.created_at,
        'updated_at', i.updated_at);
END;
$$;
