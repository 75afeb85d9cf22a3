-- 080_webhook_cost.sql: the same rules for less work per event.
--
-- Where an event's time went (make bench, webhook section; perf and
-- pg_stat_statements, docs/benchmarks.md): most of a new subscription's
-- PostgreSQL time was parsing and planning small helper functions again in every
-- transaction, waiting on the lifecycle worker's row locks, and trigger calls
-- that had nothing to do. Nothing below changes what is decided; it changes how
-- often the deciding code runs.
--
-- 1. Helpers in PL/pgSQL. A LANGUAGE sql function with SET search_path (which
--    every function here pins) is never inlined: each call site parses and plans
--    its body again in every transaction. In PL/pgSQL the plan is kept for the
--    session. Same names, signatures, bodies and grants.
-- 2. Triggers fire only when their column changed (WHEN clauses that say what
--    their functions already tested first): a status trigger on an update that
--    keeps the status, an audit row on an insert or a status change only.
-- 3. The webhook never waits on the worker: a subscription's row is locked FOR NO
--    KEY UPDATE (which the worker's foreign-key checks, FOR KEY SHARE, do not
--    wait for), and its instance row is written only when what the event asks of
--    it differs from what it has (an update that keeps the status and the price
--    takes no lock on it at all).
-- 4. An event of a type the webhook does not handle costs one insert (ON CONFLICT
--    DO NOTHING, so ten concurrent deliveries still record it once): no advisory
--    lock, no subtransaction.
-- 5. The webhook wakes the lifecycle worker right after its commit instead of in
--    it. A transaction that NOTIFYs holds a lock global to the cluster from just
--    before its commit to its end, the WAL flush included (PostgreSQL 15), so
--    every new instance's commit waited for every other's flush: that halved the
--    rate of new subscriptions at eight concurrent deliveries. The rule of when to
--    wake is unchanged (instances_work_owed: work has just become due); with
--    mindroom.wake_after_commit on in the transaction (process_stripe_event's
--    third argument), the trigger records that a wake is owed instead, the answer
--    says "wake": true, and the webhook calls lifecycle_wake() in a transaction of
--    its own, which writes nothing and so flushes nothing. Lost with the webhook's
--    process between the two, the wake is made up by the worker's poll
--    (MR_LIFECYCLE_POLL_MS): the work is recorded either way.
-- 6. An event's payload is compressed with lz4 where the server has it (a
--    subscription's event is about 3 KB, above the size at which PostgreSQL
--    compresses a value; pglz took about 3% of the backend's time per new
--    subscription). Values already stored stay as they are; both read the same.

-- 1. Helpers ------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION public.plan_for(p_tier public.subscription_tier, p_price_id text)
RETURNS public.plans
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    p public.plans;
BEGIN
    SELECT * INTO p FROM public.plans pl
     WHERE pl.tier = p_tier
     ORDER BY (pl.stripe_price_id = p_price_id) IS TRUE DESC, pl.created_at, pl.stripe_price_id
     LIMIT 1;
    RETURN p;
END;
$$;

CREATE OR REPLACE FUNCTION public.instance_names(p_subscription_id uuid)
RETURNS TABLE (dokku_app_name text, subdomain text)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
DECLARE
    h text := left(replace(p_subscription_id::text, '-', ''), 12);
BEGIN
    dokku_app_name := 'mindroom-' || h;
    subdomain := 'm' || h;
    RETURN NEXT;
END;
$$;

CREATE OR REPLACE FUNCTION public.is_entitled(p_status public.subscription_status)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
    RETURN p_status IN ('trialing', 'active', 'past_due');
END;
$$;

CREATE OR REPLACE FUNCTION public.instance_desired_for(p_status public.subscription_status)
RETURNS public.instance_status
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
    RETURN CASE
        WHEN public.is_entitled(p_status) THEN 'running'::public.instance_status
        WHEN p_status IN ('unpaid', 'paused') THEN 'stopped'::public.instance_status
        WHEN p_status IN ('cancelled', 'incomplete_expired') THEN 'deprovisioned'::public.instance_status
    END;
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_owed_action(i public.instances)
RETURNS public.lifecycle_action
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
    RETURN (CASE
        WHEN i.status = 'deprovisioned' THEN
            CASE WHEN i.storage_destroyed_at IS NULL THEN 'destroy_storage' END
        WHEN i.desired_status = 'deprovisioned' OR i.status = 'deprovisioning' THEN 'destroy'
        WHEN i.desired_status = 'stopped' THEN
            CASE WHEN i.status IN ('running', 'provisioning', 'failed') THEN 'stop' END
        WHEN i.status IN ('provisioning', 'failed') THEN 'create'
        WHEN i.status = 'stopped' THEN 'start'
        WHEN i.applied_config_version IS DISTINCT FROM i.config_version THEN 'update'
        WHEN i.restart_version > i.applied_restart_version THEN 'restart'
        WHEN i.welcome_email_sent_at IS NULL THEN 'email'
    END)::public.lifecycle_action;
END;
$$;

CREATE OR REPLACE FUNCTION public.instance_transition_allowed(p_from public.instance_status,
                                                              p_to public.instance_status)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
    RETURN p_from = p_to OR (p_from, p_to) IN (
        ('provisioning'::public.instance_status,   'running'::public.instance_status),
        ('provisioning',   'failed'),
        ('provisioning',   'stopped'),
        ('provisioning',   'deprovisioning'),
        ('running',        'stopped'),
        ('running',        'failed'),
        ('running',        'deprovisioning'),
        ('stopped',        'provisioning'),
        ('stopped',        'running'),
        ('stopped',        'deprovisioning'),
        ('failed',         'provisioning'),
        ('failed',         'stopped'),
        ('failed',         'deprovisioning'),
        ('deprovisioning', 'deprovisioned'),
        ('deprovisioning', 'failed'));
END;
$$;

CREATE OR REPLACE FUNCTION public.stripe_id(p_value jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
    RETURN CASE jsonb_typeof(p_value)
               WHEN 'string' THEN p_value #>> '{}'
               WHEN 'object' THEN p_value ->> 'id'
               ELSE NULL END;
END;
$$;

CREATE OR REPLACE FUNCTION public.stripe_event_rank(p_type text, p_status text)
RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
    RETURN ARRAY[
        CASE p_type
            WHEN 'customer.subscription.created' THEN 1
            WHEN 'customer.subscription.updated' THEN 2
            WHEN 'customer.subscription.paused'  THEN 2
            WHEN 'customer.subscription.resumed' THEN 2
            WHEN 'customer.subscription.deleted' THEN 3
            ELSE 0 END,
        CASE p_status
            WHEN 'incomplete'         THEN 1
            WHEN 'trialing'           THEN 2
            WHEN 'active'             THEN 3
            WHEN 'past_due'           THEN 4
            WHEN 'unpaid'             THEN 5
            WHEN 'paused'             THEN 6
            WHEN 'incomplete_expired' THEN 7
            WHEN 'canceled'           THEN 8
            ELSE 0 END];
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

CREATE OR REPLACE FUNCTION public.lifecycle_take(p_id uuid, p_token text, p_owner text, p_lease_s integer)
RETURNS public.instances
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    i public.instances;
BEGIN
    UPDATE public.instances SET
        claimed_by = coalesce(p_token, gen_random_uuid()::text || '/' || left(p_owner, 100)),
        claim_expires_at = now() + make_interval(secs => p_lease_s),
        claim_action = owed_action,
        status = CASE
            WHEN owed_action IN ('create', 'start') THEN 'provisioning'::public.instance_status
            WHEN owed_action = 'destroy' THEN 'deprovisioning'::public.instance_status
            ELSE status END
     WHERE id = p_id
    RETURNING * INTO i;
    RETURN i;
END;
$$;

-- 2. Triggers that only fire when their column changed ---------------------------------------

-- The state machine allows X -> X and stamps nothing then.
DROP TRIGGER instances_status_machine ON public.instances;
CREATE TRIGGER instances_status_machine BEFORE UPDATE OF status ON public.instances
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION public.enforce_instance_status();

DROP TRIGGER instances_health_reset ON public.instances;
CREATE TRIGGER instances_health_reset BEFORE UPDATE OF status ON public.instances
    FOR EACH ROW WHEN (NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running')
    EXECUTE FUNCTION public.health_reset_on_running();

-- audit_status_change writes a row on an insert, and on an update only when the
-- status changed: the update trigger says so itself, so an update that keeps the
-- status queues nothing.
DROP TRIGGER subscriptions_audit_status ON public.subscriptions;
CREATE TRIGGER subscriptions_audit_created AFTER INSERT ON public.subscriptions
    FOR EACH ROW EXECUTE FUNCTION public.audit_status_change();
CREATE TRIGGER subscriptions_audit_status AFTER UPDATE OF status ON public.subscriptions
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION public.audit_status_change();
DROP TRIGGER instances_audit_status ON public.instances;
CREATE TRIGGER instances_audit_created AFTER INSERT ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.audit_status_change();
CREATE TRIGGER instances_audit_status AFTER UPDATE OF status ON public.instances
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION public.audit_status_change();

-- 3. and 4. The webhook's SQL ----------------------------------------------------------------

-- What the webhook does with an event type: 'subscription' (customer.subscription.*),
-- 'checkout' (checkout.session.completed), 'invoice' (invoice.paid,
-- invoice.payment_failed), or NULL: recorded as ignored. The one list.
CREATE FUNCTION public.stripe_event_kind(p_type text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
    RETURN CASE
        WHEN p_type IN ('customer.subscription.created', 'customer.subscription.updated',
                        'customer.subscription.deleted', 'customer.subscription.paused',
                        'customer.subscription.resumed') THEN 'subscription'
        WHEN p_type = 'checkout.session.completed' THEN 'checkout'
        WHEN p_type IN ('invoice.paid', 'invoice.payment_failed') THEN 'invoice'
    END;
END;
$$;

-- Applies a customer.subscription.* event (041): the same rules; the subscription row
-- is locked FOR NO KEY UPDATE and the instance row is written only when the event
-- asks something else of it (see the header).
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
    v_plan      public.plans;
    v_account   uuid;
    v_period    timestamptz;
    v_sub       public.subscriptions;
    v_last      record;
    v_inst      public.instances;
    v_names     record;
    v_desired   public.instance_status;
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
    SELECT * INTO v_sub FROM public.subscriptions s
     WHERE s.stripe_subscription_id = v_stripe_id FOR NO KEY UPDATE;

    -- Ordering: compare with the last applied event before validating anything else,
    -- so that a stale event changes nothing, not even the account link.
    IF FOUND AND v_sub.last_event_created IS NOT NULL THEN
        IF p_created < v_sub.last_event_created THEN
            stale := true;
        ELSIF p_created = v_sub.last_event_created THEN
            SELECT e.type, e.payload -> 'data' -> 'object' ->> 'status' AS st
              INTO v_last FROM public.stripe_events e WHERE e.id = v_sub.last_event_id;
            IF (public.stripe_event_rank(p_type, v_stripe_st), p_event_id)
               <= (public.stripe_event_rank(v_last.type, v_last.st), v_sub.last_event_id) THEN
                stale := true;
            END IF;
        END IF;
        IF stale THEN
            subscription_id := v_sub.id;
            RETURN;
        END IF;
    END IF;

    v_status := public.stripe_subscription_status(v_stripe_st);
    -- deleted always means canceled, whatever status the payload carries.
    IF p_type = 'customer.subscription.deleted' THEN
        v_status := 'cancelled';
    END IF;

    v_price := coalesce(v_obj #>> '{items,data,0,price,id}', v_obj #>> '{plan,id}');
    SELECT * INTO v_plan FROM public.plans p WHERE p.stripe_price_id = v_price;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'MRW02', MESSAGE = 'unknown price: no plan has this price id';
    END IF;

    -- Before API version 2025-03-31 the period end is on the subscription; since, on
    -- each item.
    v_period := coalesce(pg_catalog.to_timestamp((v_obj ->> 'current_period_end')::bigint),
                         (SELECT pg_catalog.to_timestamp(max((it ->> 'current_period_end')::bigint))
                            FROM jsonb_array_elements(
                                 CASE WHEN jsonb_typeof(v_obj #> '{items,data}') = 'array'
                                      THEN v_obj #> '{items,data}' ELSE '[]'::jsonb END) AS it));

    IF v_sub.id IS NULL THEN
        v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                               v_obj #>> '{metadata,account_id}');
        INSERT INTO public.subscriptions AS s (
            account_id, stripe_subscription_id, stripe_price_id, tier, status,
            trial_ends_at, current_period_end, cancelled_at, cancel_at_period_end,
            last_event_created, last_event_id)
        VALUES (v_account, v_stripe_id, v_price, v_plan.tier, v_status,
                pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint), v_period,
                pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
                coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
                p_created, p_event_id)
        RETURNING * INTO v_sub;
    ELSE
        UPDATE public.subscriptions AS s SET
            stripe_price_id      = v_price,
            tier                 = v_plan.tier,
            status               = v_status,
            trial_ends_at        = pg_catalog.to_timestamp((v_obj ->> 'trial_end')::bigint),
            current_period_end   = v_period,
            cancelled_at         = pg_catalog.to_timestamp((v_obj ->> 'canceled_at')::bigint),
            cancel_at_period_end = coalesce((v_obj ->> 'cancel_at_period_end')::boolean, false),
            last_event_created   = p_created,
            last_event_id        = p_event_id
        WHERE s.id = v_sub.id
        RETURNING * INTO v_sub;
    END IF;
    subscription_id := v_sub.id;

    -- The instance consequence, as intent. A new price reaches the instance's limits
    -- through the plan triggers (004), which makes an update owed. The row is read
    -- without a lock: what it is asked to become (desired_status) changes only under
    -- this subscription's lock or the instance's own, and instance_request's UPDATE
    -- re-checks the row it writes; an event that asks nothing new writes nothing.
    v_desired := public.instance_desired_for(v_status);
    SELECT * INTO v_inst FROM public.instances i
     WHERE i.subscription_id = v_sub.id AND i.status <> 'deprovisioned';
    IF v_desired = 'running' AND v_inst.id IS NULL THEN
        SELECT * INTO v_names FROM public.instance_names(v_sub.id);
        -- Memory and CPU come from the plan (trigger, 004).
        INSERT INTO public.instances AS i (
            subscription_id, dokku_app_name, subdomain, status, desired_status)
        VALUES (v_sub.id, v_names.dokku_app_name, v_names.subdomain, 'provisioning', 'running')
        RETURNING * INTO v_inst;
    ELSIF v_desired IS NOT NULL AND v_inst.id IS NOT NULL
          AND v_inst.desired_status IS DISTINCT FROM v_desired THEN
        v_inst := public.instance_request(v_inst.id, v_desired);
    END IF;
    owed := v_inst.owed_action;
    instance_id := v_inst.id;
END;
$$;

-- Records and applies one event (010, 041, 051), dispatching on stripe_event_kind.
CREATE OR REPLACE FUNCTION public.stripe_handle_event(p_event jsonb, p_force boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_id       text := p_event ->> 'id';
    v_type     text := p_event ->> 'type';
    v_kind     text := public.stripe_event_kind(p_event ->> 'type');
    v_created  timestamptz;
    v_obj      jsonb := p_event -> 'data' -> 'object';
    v_prev     text;
    v_known    boolean;
    v_result   text;
    v_owed     text;
    v_sub      uuid;
    v_inst     uuid;
    v_error    text;
    v_state    text;
    v_detail   text;
    v_refusal  jsonb;
    v_account  uuid;
    v_ref      text;
    v_meta     text;
    r          record;
BEGIN
    IF v_id IS NULL OR v_type IS NULL
       OR coalesce(jsonb_typeof(p_event -> 'created'), '') <> 'number'
       OR coalesce(jsonb_typeof(v_obj), '') <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'not a Stripe event';
    END IF;
    v_created := pg_catalog.to_timestamp((p_event ->> 'created')::bigint);

    -- Dedupe, for real: every delivery of one event id is serialized by this lock,
    -- so of ten concurrent deliveries one applies and nine then read its outcome.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('stripe_event:' || v_id, 0));
    SELECT e.status INTO v_prev FROM public.stripe_events e WHERE e.id = v_id;
    v_known := FOUND;
    IF v_prev IN ('processed', 'ignored', 'stale')
       OR (v_prev IN ('failed', 'refused') AND NOT p_force) THEN
        RETURN jsonb_build_object('result', 'duplicate', 'status', v_prev, 'owed', NULL,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    -- Otherwise new, or 'deferred' / 'failed' / 'refused' when forced: (re)apply.

    IF v_kind IS NULL THEN
        v_result := 'ignored';
    ELSE
        -- Apply in a subtransaction: an error below undoes every partial change and
        -- is recorded on the event instead.
        BEGIN
            CASE v_kind
            WHEN 'subscription' THEN
                SELECT * INTO r FROM public.stripe_apply_subscription(p_event, v_id, v_type, v_created);
                v_owed := r.owed;
                v_sub := r.subscription_id;
                v_inst := r.instance_id;
                v_result := CASE WHEN r.stale THEN 'stale' ELSE 'processed' END;

            WHEN 'checkout' THEN
                IF public.stripe_id(v_obj -> 'customer') IS NULL THEN
                    v_result := 'ignored';
                ELSE
                    -- Our sessions carry the account in both; two different accounts is a
                    -- claim no customer can back.
                    v_ref := v_obj ->> 'client_reference_id';
                    v_meta := v_obj #>> '{metadata,account_id}';
                    IF v_ref IS NOT NULL AND v_meta IS NOT NULL AND v_ref <> v_meta THEN
                        RAISE EXCEPTION USING ERRCODE = 'MRW04',
                            MESSAGE = 'account link refused: client_reference_id and metadata.account_id name different accounts',
                            DETAIL = jsonb_build_object('customer', public.stripe_id(v_obj -> 'customer'),
                                                        'claimed_account', v_ref)::text;
                    END IF;
                    v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'),
                                                           coalesce(v_ref, v_meta));
                    v_result := 'processed';
                END IF;

            WHEN 'invoice' THEN
                v_account := public.stripe_account_for(public.stripe_id(v_obj -> 'customer'), NULL);
                INSERT INTO public.audit_logs (account_id, action, details)
                VALUES (v_account, 'stripe.' || v_type, jsonb_build_object(
                    'event_id', v_id,
                    'invoice_id', v_obj ->> 'id',
                    'subscription', public.stripe_id(coalesce(v_obj -> 'subscription',
                                                              v_obj #> '{parent,subscription_details,subscription}')),
                    'amount_due', v_obj -> 'amount_due',
                    'amount_paid', v_obj -> 'amount_paid',
                    'currency', v_obj -> 'currency',
                    'attempt_count', v_obj -> 'attempt_count',
                    'status', v_obj -> 'status'));
                v_result := 'processed';
            END CASE;
        EXCEPTION
            WHEN SQLSTATE 'MRW01' THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'deferred';
            WHEN SQLSTATE 'MRW04' THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
                v_refusal := v_detail::jsonb;
                v_result := 'refused';
            WHEN SQLSTATE 'MRW02' OR SQLSTATE 'MRW03' OR data_exception THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT, v_state = RETURNED_SQLSTATE;
                IF v_state NOT IN ('MRW02', 'MRW03') THEN
                    v_error := 'malformed event payload (' || v_state || ')';
                END IF;
                v_result := 'failed';
        END;
    END IF;

    IF v_result IN ('deferred', 'failed', 'refused') THEN
        v_owed := NULL;
        v_sub := NULL;
        v_inst := NULL;
    END IF;
    IF v_result = 'refused' THEN
        -- The claimed account's owner sees that a link to it was refused; the
        -- operator finds every refusal by action.
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES ((SELECT a.id FROM public.accounts a
                  WHERE (v_refusal ->> 'claimed_account')
                        ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                    AND a.id = (v_refusal ->> 'claimed_account')::uuid),
                'stripe.account_link_refused',
                jsonb_build_object('event_id', v_id, 'type', v_type,
                                   'customer', v_refusal -> 'customer',
                                   'claimed_account', v_refusal -> 'claimed_account',
                                   'reason', v_error));
    END IF;
    -- The event row is written once, with its outcome (a new event costs one insert,
    -- not an insert and an update of its payload-sized row).
    IF v_known THEN
        UPDATE public.stripe_events SET
            status       = v_result,
            error        = v_error,
            attempts     = attempts + 1,
            processed_at = CASE WHEN v_result = 'deferred' THEN NULL ELSE now() END
        WHERE id = v_id;
    ELSE
        INSERT INTO public.stripe_events (id, type, created, api_version, livemode, payload,
                                          status, error, processed_at)
        VALUES (v_id, v_type, v_created, p_event ->> 'api_version',
                coalesce((p_event ->> 'livemode')::boolean, false), p_event,
                v_result, v_error, CASE WHEN v_result = 'deferred' THEN NULL ELSE now() END);
    END IF;

    RETURN jsonb_build_object('result', v_result, 'owed', v_owed, 'status', v_result,
                              'subscription_id', v_sub, 'instance_id', v_inst, 'error', v_error)
           || CASE WHEN v_result = 'refused'
                   THEN jsonb_build_object('customer', v_refusal -> 'customer',
                                           'claimed_account', v_refusal -> 'claimed_account')
                   ELSE '{}'::jsonb END;
END;
$$;

-- The webhook's entry (010, 041, 051). A new event of a type the webhook does not
-- handle is recorded by one INSERT ... ON CONFLICT DO NOTHING: a concurrent delivery
-- of the same id waits for the first one's commit and then finds the row (answered
-- duplicate), so it is recorded once, as before, without the event's lock and
-- subtransaction. Everything else goes through stripe_handle_event.
CREATE OR REPLACE FUNCTION public.process_stripe_event(p_event_id text, p_event text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_prev  text;
    v_event jsonb;
    v_type  text;
BEGIN
    SELECT e.status INTO v_prev FROM public.stripe_events e WHERE e.id = p_event_id;
    IF v_prev IN ('processed', 'ignored', 'stale', 'failed', 'refused') THEN
        RETURN jsonb_build_object('result', 'duplicate', 'owed', NULL, 'status', v_prev,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    v_event := p_event::jsonb;
    IF (v_event ->> 'id') IS DISTINCT FROM p_event_id THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'event id does not match the payload';
    END IF;
    v_type := v_event ->> 'type';
    IF v_prev IS NULL AND public.stripe_event_kind(v_type) IS NULL THEN
        IF p_event_id IS NULL OR v_type IS NULL
           OR coalesce(jsonb_typeof(v_event -> 'created'), '') <> 'number'
           OR coalesce(jsonb_typeof(v_event #> '{data,object}'), '') <> 'object' THEN
            RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'not a Stripe event';
        END IF;
        INSERT INTO public.stripe_events (id, type, created, api_version, livemode, payload,
                                          status, processed_at)
        VALUES (p_event_id, v_type, pg_catalog.to_timestamp((v_event ->> 'created')::bigint),
                v_event ->> 'api_version', coalesce((v_event ->> 'livemode')::boolean, false),
                v_event, 'ignored', now())
        ON CONFLICT (id) DO NOTHING;
        IF FOUND THEN
            RETURN jsonb_build_object('result', 'ignored', 'owed', NULL, 'status', 'ignored',
                                      'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
        END IF;
        SELECT e.status INTO v_prev FROM public.stripe_events e WHERE e.id = p_event_id;
        RETURN jsonb_build_object('result', 'duplicate', 'owed', NULL, 'status', v_prev,
                                  'subscription_id', NULL, 'instance_id', NULL, 'error', NULL);
    END IF;
    RETURN public.stripe_handle_event(v_event, false);
END;
$$;

DO $grants$
BEGIN
    REVOKE ALL ON FUNCTION public.stripe_event_kind(text) FROM PUBLIC, anon, authenticated;
    GRANT EXECUTE ON FUNCTION public.stripe_event_kind(text) TO service_role;
END
$grants$;

-- 5. Waking the worker after the commit -----------------------------------------------------

-- Wakes the lifecycle workers (their channel). The one place that notifies.
CREATE FUNCTION public.lifecycle_wake()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('mindroom_lifecycle', '');
END;
$$;

-- 040's trigger, the same rule; only how the wake is sent differs (see the header).
CREATE OR REPLACE FUNCTION public.instances_work_owed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    v_action public.lifecycle_action;
    v_held boolean;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.config_version = OLD.config_version
       AND (NEW.memory_limit_mb IS DISTINCT FROM OLD.memory_limit_mb
            OR NEW.cpu_limit IS DISTINCT FROM OLD.cpu_limit
            OR NEW.homeserver_memory_mb IS DISTINCT FROM OLD.homeserver_memory_mb
            OR NEW.homeserver_cpu IS DISTINCT FROM OLD.homeserver_cpu
            OR NEW.storage_gb IS DISTINCT FROM OLD.storage_gb
            OR NEW.subdomain IS DISTINCT FROM OLD.subdomain
            OR (NEW.environment_vars IS DISTINCT FROM OLD.environment_vars
                AND NEW.environment_vars IS DISTINCT FROM '{}'::jsonb)) THEN
        NEW.config_version := OLD.config_version + 1;
    END IF;

    v_action := public.lifecycle_owed_action(NEW);
    NEW.owed_action := v_action;
    IF v_action IS NULL THEN
        NEW.owed_since := NULL;
        NEW.owed_due_at := NULL;
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' OR OLD.owed_action IS DISTINCT FROM v_action OR OLD.owed_since IS NULL THEN
        NEW.owed_since := now();
    END IF;
    v_held := v_action <> 'email' AND NEW.next_attempt_at IS NULL
              AND NEW.last_error LIKE 'rejected: %';
    NEW.owed_due_at := CASE WHEN v_held THEN NULL ELSE
        greatest(NEW.owed_since,
                 CASE WHEN v_action = 'email' THEN NEW.welcome_email_next_at ELSE NEW.next_attempt_at END,
                 CASE WHEN v_action = 'destroy_storage' THEN NEW.storage_destroy_after END,
                 CASE WHEN NEW.claimed_by IS NOT NULL THEN NEW.claim_expires_at END) END;

    IF NEW.owed_due_at <= now()
       AND (TG_OP = 'INSERT' OR OLD.owed_due_at IS NULL OR OLD.owed_due_at > now()) THEN
        IF current_setting('mindroom.wake_after_commit', true) = 'on' THEN
            PERFORM pg_catalog.set_config('mindroom.wake', 'on', true);
        ELSE
            PERFORM public.lifecycle_wake();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

-- The webhook's call: process_stripe_event(id, payload) with the wake owed by its
-- commit sent by the caller after the commit (p_wake_after_commit), reported as
-- "wake": true in the answer. (The two-argument form wakes within the transaction.)
CREATE FUNCTION public.process_stripe_event(p_event_id text, p_event text,
                                            p_wake_after_commit boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v jsonb;
BEGIN
    IF NOT p_wake_after_commit THEN
        RETURN public.process_stripe_event(p_event_id, p_event);
    END IF;
    -- Both settings last to the transaction's end: cleared around this event, so
    -- that the answer speaks of it alone and later writes in the same transaction
    -- notify as usual.
    PERFORM pg_catalog.set_config('mindroom.wake', '', true),
            pg_catalog.set_config('mindroom.wake_after_commit', 'on', true);
    v := public.process_stripe_event(p_event_id, p_event);
    PERFORM pg_catalog.set_config('mindroom.wake_after_commit', '', true);
    IF current_setting('mindroom.wake', true) = 'on' THEN
        v := v || '{"wake": true}';
    END IF;
    RETURN v;
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.lifecycle_wake()',
        'public.process_stripe_event(text, text, boolean)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;

-- 6. lz4 for payloads -------------------------------------------------------------------------

DO $lz4$
BEGIN
    ALTER TABLE public.stripe_events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server: payloads stay compressed with pglz';
END
$lz4$;
