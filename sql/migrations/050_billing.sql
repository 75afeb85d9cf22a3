-- 050_billing.sql
-- Selling: what the plan catalogue shows, and every request we make to Stripe's API on
-- an account's behalf (creating its customer, Checkout and Billing Portal sessions),
-- recorded before it is sent.
--
--   public.plan_catalogue() -> jsonb                       list-plans
--   public.billing_account(p_account_id text) -> jsonb     the account as billing sees it
--   public.billing_checkout_plan(p_tier, p_interval, p_price_id) -> jsonb
--   public.billing_attempt_begin(p_account_id, p_kind, p_fingerprint) -> jsonb
--   public.billing_attempt_succeeded(p_attempt_id, p_object_id, p_url, p_expires_at,
--                                    p_livemode) -> jsonb
--   public.billing_attempt_failed(p_attempt_id, p_error, p_final) -> jsonb
--
-- All run as service_role (the functions switch to it in the transaction, with the
-- account id taken from the caller's verified JWT); none is executable by users, who
-- could otherwise link their account to a customer of their choosing.

-- The catalogue --------------------------------------------------------------------------
-- A plan row is one Stripe price: the monthly and the yearly price of a tier are two rows
-- with the same limits. A row is for sale when active; an inactive row keeps mapping its
-- price to a tier and limits (the webhook, plan_for), so subscriptions on a retired price
-- keep working. A plan becomes active only when it has what the catalogue shows.
ALTER TABLE public.plans
    ADD COLUMN amount           integer CHECK (amount >= 0),  -- minor units (cents), as Stripe's unit_amount
    ADD COLUMN currency         text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
    ADD COLUMN billing_interval text NOT NULL DEFAULT 'month'
                                CHECK (billing_interval IN ('month', 'year')),
    ADD COLUMN active           boolean NOT NULL DEFAULT false,
    ADD COLUMN sort_order       integer NOT NULL DEFAULT 0,
    ADD COLUMN trial_days       integer NOT NULL DEFAULT 0
                                CHECK (trial_days BETWEEN 0 AND 730),  -- Stripe's maximum
    ADD CONSTRAINT plans_active_is_displayable
        CHECK (NOT active OR (amount IS NOT NULL AND name IS NOT NULL));
-- A checkout names a plan by tier and interval: at most one active price answers to it.
CREATE UNIQUE INDEX plans_active_tier_interval ON public.plans (tier, billing_interval) WHERE active;

-- Stripe requests on an account's behalf ----------------------------------------------------
-- One row per attempt: recorded (pending) before the request is sent, so its
-- Idempotency-Key exists before Stripe can act on it. A request whose answer was lost is
-- sent again with the same key (Stripe replays its first answer); a new attempt, with a
-- new key, starts only when the request differs or the old one can no longer be retried.
--   kind         customer | checkout | portal
--   fingerprint  sha256 (hex) of the exact request: path and form body
--   status       pending    sent or about to be; outcome unknown
--                succeeded  Stripe created object_id
--                failed     Stripe refused it (error says how); never sent again
--                abandoned  superseded by a newer attempt of the same kind; never sent again
CREATE TABLE public.billing_attempts (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id      uuid NOT NULL REFERENCES public.accounts (id) ON DELETE CASCADE,
    kind            text NOT NULL CHECK (kind IN ('customer', 'checkout', 'portal')),
    idempotency_key text NOT NULL UNIQUE,
    fingerprint     text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'succeeded', 'failed', 'abandoned')),
    calls           integer NOT NULL DEFAULT 1,   -- function calls that sent it (each may retry)
    object_id       text,                         -- cus_..., cs_..., bps_...
    url             text,
    expires_at      timestamptz,
    livemode        boolean,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_attempts_account_idx
    ON public.billing_attempts (account_id, kind, fingerprint, created_at);

CREATE TRIGGER billing_attempts_updated_at BEFORE UPDATE ON public.billing_attempts
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();

ALTER TABLE public.billing_attempts ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.billing_attempts FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT, INSERT, UPDATE ON public.billing_attempts TO service_role;
-- No policy: only service_role (BYPASSRLS) reads or writes it.

-- The active plans, in display order, with what a pricing page shows.
CREATE FUNCTION public.plan_catalogue()
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'price_id', p.stripe_price_id,
               'tier', p.tier,
               'name', p.name,
               'interval', p.billing_interval,
               'amount', p.amount,
               'currency', p.currency,
               'trial_days', p.trial_days,
               'limits', jsonb_build_object(
                   'max_agents', p.max_agents,
                   'max_messages_per_day', p.max_messages_per_day,
                   'max_storage_gb', p.max_storage_gb,
                   'memory_limit_mb', p.memory_limit_mb,
                   'cpu_limit', p.cpu_limit))
             ORDER BY p.sort_order, p.tier, p.billing_interval, p.stripe_price_id), '[]'::jsonb)
      FROM public.plans p
     WHERE p.active
$$;

-- The account of a user id (text: a JWT's sub, which may be anything):
--   {"found", "email", "customer", "live_status", "had_subscription"}
-- live_status is the status of a subscription that a new checkout would duplicate: one
-- Stripe still bills or can bring back (trialing, active, past_due, unpaid, paused);
-- null when there is none. had_subscription: any subscription ever (no second trial).
CREATE FUNCTION public.billing_account(p_account_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v_acc  public.accounts;
    v_live public.subscription_status;
    v_any  boolean;
BEGIN
    IF p_account_id IS NULL
       OR p_account_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    SELECT * INTO v_acc FROM public.accounts a WHERE a.id = p_account_id::uuid;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    SELECT s.status INTO v_live FROM public.subscriptions s
     WHERE s.account_id = v_acc.id
       AND s.status IN ('trialing', 'active', 'past_due', 'unpaid', 'paused')
     ORDER BY s.updated_at DESC, s.id LIMIT 1;
    SELECT EXISTS (SELECT 1 FROM public.subscriptions s WHERE s.account_id = v_acc.id) INTO v_any;
    RETURN jsonb_build_object('found', true, 'email', v_acc.email,
                              'customer', v_acc.stripe_customer_id,
                              'live_status', v_live, 'had_subscription', v_any);
END;
$$;

-- The plan a checkout asks for: by price id, or by tier and interval among active plans.
--   {"result": "ok" | "unknown" | "inactive", "price_id", "tier", "interval", "name",
--    "trial_days"}
-- unknown: no such price, tier or interval; inactive: the plan exists but is not sold.
CREATE FUNCTION public.billing_checkout_plan(p_tier text, p_interval text, p_price_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    v public.plans;
BEGIN
    IF p_price_id IS NOT NULL THEN
        SELECT * INTO v FROM public.plans p WHERE p.stripe_price_id = p_price_id;
    ELSE
        SELECT * INTO v FROM public.plans p
         WHERE p.tier::text = p_tier AND p.billing_interval = p_interval
         ORDER BY p.active DESC, p.created_at DESC, p.stripe_price_id LIMIT 1;
    END IF;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('result', 'unknown');
    END IF;
    RETURN jsonb_build_object('result', CASE WHEN v.active THEN 'ok' ELSE 'inactive' END,
                              'price_id', v.stripe_price_id, 'tier', v.tier,
                              'interval', v.billing_interval, 'name', v.name,
                              'trial_days', v.trial_days);
END;
$$;

-- Starts or resumes an attempt. The account row is locked, so two requests of one
-- account decide one after the other. Returns
--   {"state": "done", "object_id", "url", "expires_at"}   answer from the stored attempt
--                                                         (or, for a customer, the one
--                                                         the account already has)
--   {"state": "send", "attempt_id", "idempotency_key", "resumed"}
-- An attempt is sent again (resumed, same key) when it is the account's latest of this
-- kind and request (fingerprint), still pending, and younger than Stripe keeps keys
-- (24 h; a portal session lives minutes, so one minute there). A checkout session created
-- in the last hour for the same request and open for at least ten more minutes is
-- answered again as it is. Otherwise a new attempt (new key) starts and the account's
-- older pending attempts of this kind are abandoned. Raises P0002 for an unknown account.
CREATE FUNCTION public.billing_attempt_begin(p_account_id uuid, p_kind text, p_fingerprint text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_cust   text;
    v        public.billing_attempts;
    v_window interval := CASE p_kind WHEN 'portal' THEN interval '1 minute'
                                     ELSE interval '23 hours' END;
BEGIN
    SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a
     WHERE a.id = p_account_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account' USING ERRCODE = 'P0002';
    END IF;
    IF p_kind = 'customer' AND v_cust IS NOT NULL THEN
        RETURN jsonb_build_object('state', 'done', 'object_id', v_cust, 'url', NULL,
                                  'expires_at', NULL);
    END IF;

    SELECT * INTO v FROM public.billing_attempts b
     WHERE b.account_id = p_account_id AND b.kind = p_kind AND b.fingerprint = p_fingerprint
     ORDER BY b.created_at DESC, b.id LIMIT 1;
    IF FOUND THEN
        IF v.status = 'succeeded' AND p_kind = 'checkout'
           AND v.created_at > now() - interval '1 hour'
           AND v.expires_at > now() + interval '10 minutes' THEN
            RETURN jsonb_build_object('state', 'done', 'object_id', v.object_id, 'url', v.url,
                                      'expires_at', extract(epoch FROM v.expires_at)::bigint);
        END IF;
        IF v.status = 'pending' AND v.created_at > now() - v_window THEN
            UPDATE public.billing_attempts SET calls = calls + 1 WHERE id = v.id;
            RETURN jsonb_build_object('state', 'send', 'attempt_id', v.id,
                                      'idempotency_key', v.idempotency_key, 'resumed', true);
        END IF;
    END IF;

    UPDATE public.billing_attempts SET status = 'abandoned'
     WHERE account_id = p_account_id AND kind = p_kind AND status = 'pending';
    INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint)
    VALUES (p_account_id, p_kind, 'mindroom-' || p_kind || '-' || gen_random_uuid(), p_fingerprint)
    RETURNING * INTO v;
    RETURN jsonb_build_object('state', 'send', 'attempt_id', v.id,
                              'idempotency_key', v.idempotency_key, 'resumed', false);
END;
$$;

-- Records what Stripe created. For a customer, links it to the account in the same
-- transaction unless the account already has one (then the account's stays, and the
-- attempt's error says so). Audits the first success of each attempt. Idempotent.
-- Returns {"object_id", "url", "expires_at"}: for a customer, the account's customer.
CREATE FUNCTION public.billing_attempt_succeeded(p_attempt_id uuid, p_object_id text, p_url text,
                                                 p_expires_at bigint, p_livemode boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v      public.billing_attempts;
    v_cust text;
    v_note text;
BEGIN
    SELECT * INTO v FROM public.billing_attempts b WHERE b.id = p_attempt_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown attempt' USING ERRCODE = 'P0002';
    END IF;
    IF v.kind = 'customer' THEN
        UPDATE public.accounts SET stripe_customer_id = p_object_id
         WHERE id = v.account_id AND stripe_customer_id IS NULL;
        SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a WHERE a.id = v.account_id;
        IF v_cust IS DISTINCT FROM p_object_id THEN
            v_note := 'account already linked to another customer; this one is unused';
        END IF;
    END IF;
    IF v.status <> 'succeeded' THEN
        UPDATE public.billing_attempts SET
            status     = 'succeeded',
            object_id  = p_object_id,
            url        = p_url,
            expires_at = pg_catalog.to_timestamp(p_expires_at),
            livemode   = p_livemode,
            error      = v_note
        WHERE id = v.id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v.account_id, 'billing.' || v.kind || '_created',
                jsonb_build_object('attempt_id', v.id, 'object_id', p_object_id,
                                   'livemode', p_livemode));
    END IF;
    RETURN jsonb_build_object('object_id', coalesce(v_cust, p_object_id), 'url', p_url,
                              'expires_at', p_expires_at);
END;
$$;

-- Records a failed send. p_final: Stripe refused the request (the attempt is never sent
-- again); otherwise the outcome is unknown and the attempt stays pending, to be resumed.
-- Returns {"status"}: the attempt's status afterwards (null for an unknown attempt).
CREATE FUNCTION public.billing_attempt_failed(p_attempt_id uuid, p_error text, p_final boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE public.billing_attempts SET
        status = CASE WHEN p_final THEN 'failed' ELSE status END,
        error  = p_error
    WHERE id = p_attempt_id AND status IN ('pending', 'abandoned')
    RETURNING status INTO v_status;
    IF NOT FOUND THEN
        SELECT b.status INTO v_status FROM public.billing_attempts b WHERE b.id = p_attempt_id;
    END IF;
    RETURN jsonb_build_object('status', v_status);
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.plan_catalogue()',
        'public.billing_account(text)',
        'public.billing_checkout_plan(text, text, text)',
        'public.billing_attempt_begin(uuid, text, text)',
        'public.billing_attempt_succeeded(uuid, text, text, bigint, boolean)',
        'public.billing_attempt_failed(uuid, text, boolean)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
