-- 137_stripe_cancellations.sql: deleting an account cancels its Stripe subscriptions.
--
-- Deleting an account (Supabase Auth, or DELETE FROM auth.users) cascades to its
-- subscriptions and instances; the instances' apps and data are torn down
-- (instance_teardowns, 060), but the subscription at Stripe stayed live and
-- Stripe kept charging a customer who no longer had an account or an instance
-- (its later events named nothing we know: deferred, then failed after 72 h).
--
-- Now the delete of a subscription row that is still live at Stripe records the
-- cancellation owed in stripe_cancellations, in the same transaction, where no
-- cascade reaches; the lifecycle worker's stripe-cancel job cancels it at once at
-- Stripe (DELETE /v1/subscriptions/{id}), with retries and backoff, and records
-- the outcome here and in audit_logs. A subscription Stripe no longer has (already
-- cancelled, or unknown) counts as done.
--
-- Two triggers write it. The delete cascades accounts -> subscriptions after the
-- account row is gone, so the subscription's own trigger cannot read the customer
-- any more: the account's delete trigger records its subscriptions first, with the
-- customer (for the operator, who finds it in Stripe's dashboard), and the
-- subscriptions' trigger, which also covers a subscription row deleted alone,
-- finds them recorded.

CREATE TABLE public.stripe_cancellations (
    stripe_subscription_id text PRIMARY KEY,  -- subscriptions.stripe_subscription_id
    subscription_id    uuid,                  -- no foreign keys: the rows are gone
    account_id         uuid,
    stripe_customer_id text,                  -- NULL when the account was not linked
    status             public.subscription_status NOT NULL,  -- ours when the row went
    not_before         timestamptz NOT NULL DEFAULT now(),
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    done_at            timestamptz,
    outcome            text CHECK (outcome IN ('cancelled', 'not_found')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((done_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX stripe_cancellations_due_idx ON public.stripe_cancellations (not_before)
    WHERE done_at IS NULL;
CREATE TRIGGER stripe_cancellations_updated_at BEFORE UPDATE ON public.stripe_cancellations
    FOR EACH ROW EXECUTE FUNCTION public.set_updated_at();
ALTER TABLE public.stripe_cancellations ENABLE ROW LEVEL SECURITY;
-- service_role too (Supabase's default privileges give it everything): it reads and
-- updates, only the delete triggers insert.
REVOKE ALL ON public.stripe_cancellations FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT, UPDATE ON public.stripe_cancellations TO service_role;
CREATE POLICY "Service role manages Stripe cancellations" ON public.stripe_cancellations
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- Records the cancellation of p_sub at Stripe, once, if Stripe still has it live:
-- every status but cancelled (Stripe's canceled) and incomplete_expired, the two
-- terminal ones (001_initial_schema.sql's subscription_status). Called by the two
-- triggers below, as their owner.
CREATE FUNCTION public.stripe_cancellation_record(p_sub public.subscriptions, p_customer text)
RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    IF p_sub.stripe_subscription_id IS NULL
       OR p_sub.status IN ('cancelled', 'incomplete_expired') THEN
        RETURN;
    END IF;
    INSERT INTO public.stripe_cancellations (stripe_subscription_id, subscription_id, account_id,
                                             stripe_customer_id, status)
    VALUES (p_sub.stripe_subscription_id, p_sub.id, p_sub.account_id, p_customer, p_sub.status)
    ON CONFLICT (stripe_subscription_id) DO NOTHING;
    IF FOUND THEN
        -- No account_id: the account may be going in this very statement, and
        -- audit_logs refers to live accounts only.
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'stripe.cancellation_requested', jsonb_build_object(
            'stripe_subscription_id', p_sub.stripe_subscription_id, 'subscription_id', p_sub.id,
            'account_id', p_sub.account_id, 'customer', p_customer, 'status', p_sub.status));
    END IF;
END;
$$;

-- SECURITY DEFINER, both: the delete may come from any role allowed to delete the
-- row (service_role, Supabase Auth deleting a user), none of which may write here.
CREATE FUNCTION public.accounts_record_stripe_cancellations()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    PERFORM public.stripe_cancellation_record(s, OLD.stripe_customer_id)
       FROM public.subscriptions s
      WHERE s.account_id = OLD.id;
    RETURN OLD;
END;
$$;

CREATE FUNCTION public.subscriptions_record_stripe_cancellation()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    PERFORM public.stripe_cancellation_record(OLD, (SELECT a.stripe_customer_id
                                                      FROM public.accounts a
                                                     WHERE a.id = OLD.account_id));
    RETURN OLD;
END;
$$;

CREATE TRIGGER accounts_record_stripe_cancellations BEFORE DELETE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.accounts_record_stripe_cancellations();
CREATE TRIGGER subscriptions_record_stripe_cancellation BEFORE DELETE ON public.subscriptions
    FOR EACH ROW EXECUTE FUNCTION public.subscriptions_record_stripe_cancellation();

-- The cancellations due now (the worker's stripe-cancel job), oldest first.
CREATE FUNCTION public.stripe_cancellations_due(p_limit integer)
RETURNS TABLE (stripe_subscription_id text, attempts integer)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT c.stripe_subscription_id, c.attempts
      FROM public.stripe_cancellations c
     WHERE c.done_at IS NULL AND c.not_before <= now()
     ORDER BY c.not_before, c.stripe_subscription_id
     LIMIT greatest(p_limit, 0)
$$;

-- Records a cancellation's outcome: p_outcome 'cancelled' (Stripe cancelled it) or
-- 'not_found' (Stripe has no live subscription of that id: cancelled before, or
-- never there), both done and audited; NULL: it failed with p_error and is retried
-- after a backoff that doubles from p_base_s up to p_cap_s. Returns false when the
-- row is not owed (done meanwhile, or unknown).
CREATE FUNCTION public.stripe_cancellation_finish(p_stripe_subscription_id text, p_outcome text,
                                                  p_error text, p_base_s integer, p_cap_s integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    c public.stripe_cancellations;
BEGIN
    IF p_outcome IS NOT NULL AND p_outcome NOT IN ('cancelled', 'not_found') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'outcome is cancelled, not_found or NULL';
    END IF;
    SELECT * INTO c FROM public.stripe_cancellations
     WHERE stripe_subscription_id = p_stripe_subscription_id AND done_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_outcome IS NOT NULL THEN
        UPDATE public.stripe_cancellations
           SET done_at = now(), outcome = p_outcome, last_error = NULL, attempts = attempts + 1
         WHERE stripe_subscription_id = p_stripe_subscription_id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (NULL, 'stripe.subscription_cancelled', jsonb_build_object(
            'stripe_subscription_id', c.stripe_subscription_id, 'subscription_id', c.subscription_id,
            'account_id', c.account_id, 'customer', c.stripe_customer_id, 'outcome', p_outcome));
    ELSE
        UPDATE public.stripe_cancellations
           SET attempts = attempts + 1, last_error = left(coalesce(p_error, 'failed'), 500),
               not_before = now() + make_interval(secs => least(
                   p_cap_s::double precision,
                   p_base_s::double precision * power(2, least(c.attempts, 30))))
         WHERE stripe_subscription_id = p_stripe_subscription_id;
    END IF;
    RETURN true;
END;
$$;

REVOKE ALL ON FUNCTION public.stripe_cancellation_record(public.subscriptions, text),
    public.accounts_record_stripe_cancellations(),
    public.subscriptions_record_stripe_cancellation()
    FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON FUNCTION public.stripe_cancellations_due(integer),
    public.stripe_cancellation_finish(text, text, text, integer, integer)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.stripe_cancellations_due(integer),
    public.stripe_cancellation_finish(text, text, text, integer, integer) TO service_role;
