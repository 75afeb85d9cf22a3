-- 202_resubscribed_while_removed.sql: a customer who subscribes again while its
-- cancelled instance is still being destroyed gets that instance's data back, and an
-- event whose instance's names are still held is deferred, not answered 500.
--
-- A new subscription's instance takes the names, hence the kept data, of the
-- account's newest destroyed instance (186, instances_names_of_kept_data). An
-- instance whose destroy was still owed or under way (the subscription just
-- cancelled, its target busy or not answering) was not destroyed yet, so the new one
-- got names of its own and started empty beside it; the old one's data, once
-- destroyed, was kept under the old names for the retention, never taken over, then
-- destroyed. Now such an insert is refused while that destroy is owed (an instance
-- of another subscription of the account desired deprovisioned, not purged, and made
-- somewhere: public.instance_nowhere; and no instance of the account that stays,
-- running or stopped: an account with several MindRooms is not a returning
-- customer), with unique_violation, as an insert under names still held is:
-- provision-instance answers 409 conflict; the webhook defers the event (below);
-- once the destroy is done the instance is made under the old names and takes the
-- data over ("Your MindRoom is back").
--
-- The webhook answered an event whose instance's names were held (that case, and
-- 179's names whose data another subscription keeps, and two live subscriptions
-- sharing the 48 bits of their names) with 500 and recorded nothing: Stripe delivered
-- it again on its own schedule, for at most three days, and then dropped it, payment
-- and all. Such an event is now deferred, as one of a customer not found yet is: the
-- event is recorded with its error, answered 503 (code instance_names_taken, in the
-- answer's new key "code"; account_not_found for the other reason), applied again by
-- Stripe's redelivery or the worker's Stripe sweep (30 s, doubling, at most an hour
-- apart), and marked failed after STRIPE_DEFER_MAX_HOURS, for the operator.
--
-- An invoice of a deleted account's customer has its subscription cancelled at
-- Stripe, also one the database never recorded. An account's deletion cancels the
-- subscriptions it has rows for (137); one whose first event was recorded failed (a
-- price the catalogue lacked, or an event deferred past STRIPE_DEFER_MAX_HOURS) has
-- none, and Stripe went on billing it every period, each invoice.paid recorded on no
-- account (180) and nothing else. Such an invoice now records its subscription's
-- cancellation (stripe_deleted_account_subscription, as a subscription event of a
-- deleted account does, 159): once per subscription, and one Stripe cancelled already
-- answers 404, which the worker counts as done.
--
-- provision-instance's 409 now says which holds the names (the trigger's message),
-- not always "the instance names of this subscription are still taken", which stays
-- for a live instance under them.
--
-- Redefines public.instances_names_of_kept_data (190_kept_storage_rule.sql),
-- public.stripe_handle_event (180_deleted_account_invoices.sql: the deferral, the
-- 'code', the WHEN 'invoice' branch) and
-- public.lifecycle_provision (154_operator_stop_audited.sql: its unique_violation
-- handler), each whole and unchanged but for the lines named above. CREATE OR REPLACE
-- keeps their grants.

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
        RETURN NEW;
    END IF;
    -- None yet, but the account's instance (of another subscription) is being
    -- destroyed with its data kept, and the account has no other: this one waits to
    -- take that data over (unique_violation, as for names still taken) rather than
    -- start empty beside it. An account with another instance that stays is not
    -- held back.
    SELECT l.dokku_app_name INTO v_app
      FROM public.subscriptions mine
      JOIN public.subscriptions s ON s.account_id = mine.account_id AND s.id <> mine.id
      JOIN public.instances l ON l.subscription_id = s.id
     WHERE mine.id = NEW.subscription_id
       AND l.status <> 'deprovisioned' AND l.desired_status = 'deprovisioned'
       AND NOT l.purge_requested AND NOT public.instance_nowhere(l)
       AND NOT EXISTS (SELECT 1 FROM public.subscriptions os
                         JOIN public.instances o ON o.subscription_id = os.id
                        WHERE os.account_id = mine.account_id
                          AND o.status <> 'deprovisioned' AND o.desired_status <> 'deprovisioned')
     ORDER BY l.created_at DESC, l.id
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '23505',
            MESSAGE = pg_catalog.format('the account''s instance %s is still being removed; this '
                                        'subscription''s instance is made on its data once it is',
                                        v_app);
    END IF;
    RETURN NEW;
END;
$$;


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
    v_code     text;
    v_state    text;
    v_detail   text;
    v_refusal  jsonb;
    v_account  uuid;
    v_ref      text;
    v_stripe_sub text;
    v_meta     text;
    v_cust     text;
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

            WHEN 'customer' THEN
                -- customer.deleted: Stripe never brings a deleted customer back, so the
                -- event needs no ordering key; applied whenever it comes, and again
                -- (a forced reprocess) it changes nothing more. The account is unlinked
                -- only while it is linked to this customer: one linked to a newer
                -- customer since keeps it. Our record of creating the customer is
                -- marked, so that a late event of it does not link it again
                -- (stripe_account_for).
                v_cust := v_obj ->> 'id';
                IF v_cust IS NULL OR v_cust = '' THEN
                    RAISE EXCEPTION USING ERRCODE = 'MRW03', MESSAGE = 'customer object without id';
                END IF;
                UPDATE public.billing_attempts SET customer_deleted_at = v_created
                 WHERE kind = 'customer' AND status = 'succeeded' AND object_id = v_cust
                   AND customer_deleted_at IS NULL;
                UPDATE public.accounts SET stripe_customer_id = NULL
                 WHERE stripe_customer_id = v_cust
                RETURNING id INTO v_account;
                IF v_account IS NOT NULL THEN
                    -- The account's sessions so far were the deleted customer's: none can
                    -- be paid any more, and a paid one's subscription went with the
                    -- customer. The next checkout neither expires them nor takes one for
                    -- a payment whose subscription is on its way (122).
                    UPDATE public.billing_attempts
                       SET status = 'abandoned', error = 'its customer was deleted in Stripe'
                     WHERE account_id = v_account AND kind = 'checkout'
                       AND status IN ('succeeded', 'completed');
                    INSERT INTO public.audit_logs (account_id, action, details)
                    VALUES (v_account, 'stripe.customer.deleted',
                            jsonb_build_object('event_id', v_id, 'customer', v_cust));
                END IF;
                v_result := 'processed';

            WHEN 'invoice' THEN
                -- An invoice of a deleted account's customer (the last period's, a
                -- proration, a payment retried after the deletion) is recorded on no
                -- account, with its customer, and its subscription is to be cancelled
                -- at Stripe (stripe_cancellations: once; one cancelled already is
                -- Stripe's 404, done): the deletion cancelled only the subscriptions
                -- it had rows for, and one whose first event failed has none. One of a
                -- customer not known yet (its checkout's link still on its way) is
                -- deferred as before.
                v_cust := public.stripe_id(v_obj -> 'customer');
                v_stripe_sub := public.stripe_id(coalesce(v_obj -> 'subscription',
                                                          v_obj #> '{parent,subscription_details,subscription}'));
                BEGIN
                    v_account := public.stripe_account_for(v_cust, NULL);
                EXCEPTION WHEN SQLSTATE 'MRW01' THEN
                    IF NOT public.stripe_deleted_account_subscription(
                               v_stripe_sub, v_cust, NULL,
                               CASE WHEN v_type = 'invoice.paid' THEN 'active'
                                    ELSE 'past_due' END::public.subscription_status) THEN
                        RAISE;
                    END IF;
                    v_account := NULL;
                END;
                INSERT INTO public.audit_logs (account_id, action, details)
                VALUES (v_account, 'stripe.' || v_type, jsonb_build_object(
                    'event_id', v_id,
                    'customer', v_cust,
                    'invoice_id', v_obj ->> 'id',
                    'subscription', v_stripe_sub,
                    'amount_due', v_obj -> 'amount_due',
                    'amount_paid', v_obj -> 'amount_paid',
                    'currency', v_obj -> 'currency',
                    'attempt_count', v_obj -> 'attempt_count',
                    'status', v_obj -> 'status'));
                v_result := 'processed';

            WHEN 'charge' THEN
                -- Money that went back: an audit row, nothing else changes. A refund
                -- (the event's object is the charge) is its customer's account's when
                -- that customer is ours; a dispute names its charge but no customer, so
                -- its row names no account (the operator's, found by its action).
                -- Neither is deferred: a charge of a customer that is not ours (one
                -- paid without a customer, or another product's on the same Stripe
                -- account) is recorded without an account rather than retried.
                IF v_type = 'charge.refunded' THEN
                    v_cust := nullif(public.stripe_id(v_obj -> 'customer'), '');
                    IF v_cust IS NOT NULL THEN
                        BEGIN
                            v_account := public.stripe_account_for(v_cust, NULL);
                        EXCEPTION WHEN SQLSTATE 'MRW01' THEN
                            v_account := NULL;
                        END;
                    END IF;
                    INSERT INTO public.audit_logs (account_id, action, details)
                    VALUES (v_account, 'stripe.charge.refunded', jsonb_build_object(
                        'event_id', v_id,
                        'charge_id', v_obj ->> 'id',
                        'customer', v_cust,
                        'payment_intent', public.stripe_id(v_obj -> 'payment_intent'),
                        'amount', v_obj -> 'amount',
                        'amount_refunded', v_obj -> 'amount_refunded',
                        'currency', v_obj -> 'currency',
                        'refunded', v_obj -> 'refunded'));
                ELSE
                    INSERT INTO public.audit_logs (account_id, action, details)
                    VALUES (NULL, 'stripe.' || v_type, jsonb_build_object(
                        'event_id', v_id,
                        'dispute_id', v_obj ->> 'id',
                        'charge_id', public.stripe_id(v_obj -> 'charge'),
                        'payment_intent', public.stripe_id(v_obj -> 'payment_intent'),
                        'amount', v_obj -> 'amount',
                        'currency', v_obj -> 'currency',
                        'reason', v_obj -> 'reason',
                        'status', v_obj -> 'status',
                        'evidence_due_by', v_obj #> '{evidence_details,due_by}'));
                END IF;
                v_result := 'processed';
            END CASE;
        EXCEPTION
            WHEN SQLSTATE 'MRW01' THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'deferred';
                v_code := 'account_not_found';
            -- The instance's names are still held (the account's earlier instance
            -- being destroyed, another subscription's live instance or kept data under
            -- the same names): applied again once they are free.
            WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'deferred';
                v_code := 'instance_names_taken';
            WHEN SQLSTATE 'MRW05' THEN
                GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
                v_result := 'ignored';
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
           || CASE WHEN v_result = 'deferred' THEN jsonb_build_object('code', v_code)
                   ELSE '{}'::jsonb END
           || CASE WHEN v_result = 'refused'
                   THEN jsonb_build_object('customer', v_refusal -> 'customer',
                                           'claimed_account', v_refusal -> 'claimed_account')
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
    v_held timestamptz;
    v_msg text;
    v_constraint text;
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
            -- The names are still held: by a live instance (the index's violation),
            -- or, as the trigger that refused them says, by another subscription's
            -- kept data or the account's instance still being destroyed.
            GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_constraint = CONSTRAINT_NAME;
            RETURN jsonb_build_object('outcome', 'conflict',
                'message', CASE WHEN v_constraint <> ''
                                THEN 'the instance names of this subscription are still taken'
                                ELSE v_msg END);
        END;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF i.status = 'deprovisioning' OR i.desired_status = 'deprovisioned' THEN
        RETURN jsonb_build_object('outcome', 'conflict',
            'message', 'the instance is being destroyed',
            'instance', public.lifecycle_instance_json(i));
    END IF;

    v_held := i.operator_stopped_at;
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
    ELSIF v_held IS NOT NULL THEN
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (s.account_id, 'instance.resume_requested',
                jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                   'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role',
                                   'stopped_at', v_held));
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'instance', public.lifecycle_instance_json(i));
END;
$$;
